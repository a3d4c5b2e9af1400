"""Real multi-process training on localhost, and a work directory on a non-local filesystem.

Two `zoo train` processes (`jax.distributed`, coordinator on 127.0.0.1, 4 CPU devices each, gloo
collectives) against one process with 8 devices, on the same mesh (data=1, fsdp=4, tensor=2: the
fsdp axis crosses the processes, so every parameter is split between them). The processes are
`multihost_worker.py`, which runs `zoo.cli.main` and records what each process read and trained on.

Tolerance of the 2 x 4 vs 1 x 8 comparison: the two runs compile the same SPMD program over the same
global batch; what differs is the order in which fp32 partial sums meet (the per-device rows are
permuted: process p holds examples p, p + 2, ...; and gloo's cross-process all-reduce adds the
per-device sums in another order than the in-process one). That moves the last bit or two of a
sum (measured: at most 1 ulp, 8e-8 relative, over 6 Adam steps). RTOL = 2e-6 (~25 ulps) leaves room
for Adam to amplify such differences a little and still fails on any real error (a wrong or missing
row changes the loss by > 1e-3 relative).

The gs:// test runs against an in-memory GCS emulator (`gcp_storage_emulator`, served from this
test process): epath reaches it through gcsfs, Orbax's tensorstore through TENSORSTORE_GCS_HTTP_URL,
Orbax's bucket check through google-cloud-storage; nothing needs the network or TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES, tiny_config

from zoo.train import sharding
from zoo.train.trainer import host_data_state

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
RTOL = 2e-6
RUN = ["--config.train.steps=6", "--config.train.checkpoint_every=2"]
MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
DIST_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "ZOO_TEST_STOP_AFTER")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp, name, workdir, processes, *extra, stop_after=None, env=None, cwd=ROOT, devices=8):
    """Runs `zoo train` in `processes` processes sharing `devices` CPU devices; returns each one's record."""
    args = ["train", "--config", "transformer:tiny", "--workdir", str(workdir), *TINY_OVERRIDES, *RUN, *extra]
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    base.update(JAX_PLATFORMS="cpu", ZOO_TEST_RECORD=str(tmp / name), **(env or {}))
    if stop_after is not None:
        base["ZOO_TEST_STOP_AFTER"] = str(stop_after)
    port, procs, logs = _free_port(), [], []
    for i in range(processes):
        e = {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
        if processes > 1:
            e.update(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)
            )
        logs.append(tmp / f"{name}.log.{i}")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=e, cwd=cwd, stdout=log, stderr=log))
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    for i, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"{name} process {i} exited {p.returncode}:\n{text[-4000:]}"
    records = [json.loads((tmp / f"{name}.{i}.json").read_text()) for i in range(processes)]
    for i, r in enumerate(records):
        assert (r["process_index"], r["process_count"], r["devices"]) == (i, processes, devices)
        assert r["local_devices"] == devices // processes
    return records, texts


def _lines(file) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _row_digests(n: int) -> dict[str, int]:
    """sha1 of the input tokens of training examples 0..n-1 -> example index (the workers' row digests)."""
    from zoo.config import apply_overrides
    from zoo.data.pipeline import example_source, to_model_inputs

    config = apply_overrides(tiny_config(), RUN)
    source = example_source(config.data, "train", config.data.seq_len)
    digests = {hashlib.sha1(to_model_inputs(source[i])["inputs"].tobytes()).hexdigest(): i for i in range(n)}
    assert len(digests) == n  # distinct examples, so a digest names one example
    return digests


def _check_losses(stage: list[dict], ref: dict[int, dict], steps: list[int]) -> None:
    assert [r["step"] for r in stage] == steps
    for r in stage:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(r[key], ref[r["step"]][key], rtol=RTOL, err_msg=f"{key} at step {r['step']}")


def _check_rows(records: list[dict], index: dict[str, int], first_step: int, batch: int = 8) -> None:
    """Each process trained on its own rows of the global batch of every step, and read only its shard."""
    count = len(records)
    for p, r in enumerate(records):
        assert r["read"] and all(i % count == p for i in r["read"]), (p, r["read"])
        for k, rows in enumerate(r["steps"]):
            start = (first_step + k - 1) * batch  # the global batch of step s is examples [(s-1)B, sB)
            assert [index[d] for d in rows] == list(range(start + p, start + batch, count)), (p, first_step + k)


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir())


def _check_checkpoint(workdir, step: int, processes: int, next_index: int) -> None:
    """One committed step directory, written by `processes` processes, with every process's data state."""
    d = workdir / "checkpoints" / str(step)
    assert sorted(p.name for p in d.iterdir()) == [
        "_CHECKPOINT_METADATA",
        "commit_success.txt",
        "data",
        "meta",
        "opt_state",
        "params",
    ]
    assert not [p.name for p in d.parent.iterdir() if "tmp" in p.name]  # no unfinished save left beside it
    for item in ("params", "opt_state"):
        blocks = sorted(p.name for p in (d / item).iterdir() if p.name.startswith("ocdbt.process_"))
        assert blocks == [f"ocdbt.process_{i}" for i in range(processes)], (item, blocks)
    data = json.loads((d / "data" / "metadata").read_text())
    assert data == {"process_count": processes, "hosts": [{"next_index": next_index}] * processes}
    meta = json.loads((d / "meta" / "metadata").read_text())
    checksums = meta.pop("checksums")  # content checksums of every saved array, verified on restore
    digests = {k: meta.pop(k) for k in ("data_sha256", "meta_sha256")}  # the checksums of the data state and meta
    assert all(len(v) == 64 for v in digests.values())
    assert meta == {"step": step, "model_name": "transformer", "process_count": processes}
    assert any("blocks/layers/0/attn/wq/kernel" in k for k in checksums) and len(checksums) > 20


def test_two_processes_equal_one_process_and_resume_across_process_counts(tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices: losses, data shards, checkpoints (saved once,
    collectively; restored 2 -> 1 -> 2 processes) and the final evaluation on parameters split
    between the processes."""
    ref, _ = _launch(tmp_path, "ref", tmp_path / "ref", 1, *MESH)  # steps 1..6, then evaluation
    reference = {r["step"]: r for r in _lines(tmp_path / "ref" / "metrics.jsonl")}
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    index = _row_digests(64)
    _check_rows(ref, index, first_step=1)

    work = tmp_path / "work"
    a, out_a = _launch(tmp_path, "a", work, 2, *MESH, "--no-eval", stop_after=3)  # checkpoint 2, stop after 3
    lines = _lines(work / "metrics.jsonl")
    _check_losses(lines, reference, [1, 2, 3])  # process 0 alone wrote the log
    _check_rows(a, index, first_step=1)
    assert _checkpoint_steps(work) == [2]
    _check_checkpoint(work, 2, processes=2, next_index=2)
    for r in a:  # every process took part in the save; the matrices were split between the processes
        assert [s["step"] for s in r["saves"]] == [2]
        save = r["saves"][0]
        assert save["spanning"] == save["params"] and 0 < save["split"] < save["params"]  # norms are replicated
    assert '"step": 3' in out_a[0] and '"step": 3' not in out_a[1]  # only process 0 prints

    b, _ = _launch(tmp_path, "b", work, 1, *MESH, "--no-eval", stop_after=5)  # 1 process resumes at 3
    _check_losses(_lines(work / "metrics.jsonl"), reference, [1, 2, 3, 4, 5])  # step 3's record replaced
    _check_rows(b, index, first_step=3)
    assert _checkpoint_steps(work) == [2, 4]
    _check_checkpoint(work, 4, processes=1, next_index=4)
    assert b[0]["saves"][0]["spanning"] == 0

    c, out_c = _launch(tmp_path, "c", work, 2, *MESH)  # 2 processes resume at 5, finish, evaluate
    _check_losses(_lines(work / "metrics.jsonl"), reference, [1, 2, 3, 4, 5, 6])
    _check_rows(c, index, first_step=5)
    assert _checkpoint_steps(work) == [4, 6]
    _check_checkpoint(work, 6, processes=2, next_index=6)

    for r in c:  # both processes evaluated the parameters where training left them
        assert len(r["eval"]) == 1 and {"step": 6, **r["eval"][0]} == r["saves"][0]
    assert "evaluation written" in out_c[0] and "evaluation written" not in out_c[1]
    assert sorted(p.name for p in work.iterdir()) == sorted(
        [
            ".zoo.lock",
            "checkpoints",
            "config.json",
            "eval.json",
            "eval.png",
            "metrics.jsonl",
            "tensorboard",
            "training.png",
        ]
    )  # nothing else, no temporary file of process 1
    ev, ev_ref = (json.loads((d / "eval.json").read_text()) for d in (work, tmp_path / "ref"))
    assert ev["passkey"] == ev_ref["passkey"]
    for key in ("lengths", "token_accuracy", "exact_match"):
        assert ev["by_length"][key] == ev_ref["by_length"][key]
    np.testing.assert_allclose(ev["by_length"]["answer_loss"], ev_ref["by_length"]["answer_loss"], rtol=1e-5)
    assert ev["loss_by_position"]["position"] == ev_ref["loss_by_position"]["position"]
    np.testing.assert_allclose(ev["loss_by_position"]["loss"], ev_ref["loss_by_position"]["loss"], rtol=1e-5)


def test_packed_mode_keeps_each_process_data_position(tmp_path):
    """Packed mode packs each process's own documents, so the processes' iterator states differ: the
    checkpoint keeps every process's, and a 2-process resume trains exactly what the uninterrupted
    2-process run trained."""
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"d{i}.txt").write_bytes(rng.integers(97, 123, int(rng.integers(30, 400))).astype(np.uint8).tobytes())
    packed = [
        "--config.data.source=text",
        f"--config.data.path={corpus}",
        "--config.data.mode=packed",
        "--config.data.pack_bins=4",
        "--config.train.steps=4",
        "--no-eval",
    ]
    work = tmp_path / "work"
    full, _ = _launch(tmp_path, "full", work, 2, *packed)  # checkpoints 2 and 4
    first = {r["step"]: r["loss"] for r in _lines(work / "metrics.jsonl")}
    data = json.loads((work / "checkpoints" / "2" / "data" / "metadata").read_text())
    assert data["process_count"] == 2 and data["hosts"][0] != data["hosts"][1]
    shutil.rmtree(work / "checkpoints" / "4")  # as if preempted before step 4's save
    resumed, _ = _launch(tmp_path, "resumed", work, 2, *packed)  # from 2: steps 3 and 4 again
    for p in (0, 1):  # the same rows on the same process
        assert resumed[p]["steps"] == full[p]["steps"][2:]
    lines = _lines(work / "metrics.jsonl")  # the replayed steps' records replace the earlier ones
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert {r["step"]: r["loss"] for r in lines} == first


def _serve_gcs(monkeypatch, port: int, bucket: str):
    """An in-memory GCS emulator on 127.0.0.1:`port`, with the conditional reads tensorstore relies on.

    The stub emulator sends media downloads without the object's generation and ignores
    `ifGenerationNotMatch` / `ifGenerationMatch`; tensorstore re-reads an OCDBT manifest it has just
    written with `ifGenerationNotMatch=<its generation>` and, given a body without a generation,
    fails the save ("Malformed StorageGeneration", in some runs, depending on its cache). Real GCS
    answers 304 Not Modified (412 for a failed match) and sends x-goog-generation: so does this.
    """
    from http import HTTPStatus

    import gcp_storage_emulator.server as emulator
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def conditional_download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # a missing object: the emulator's own 404
            return download(request, response, storage, *args, **kwargs)
        generation = str(obj["generation"])
        response["x-goog-generation"] = generation
        response["x-goog-metageneration"] = str(obj["metageneration"])
        if request.query.get("ifGenerationNotMatch", [None])[0] == generation:
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        if request.query.get("ifGenerationMatch", [generation])[0] != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return download(request, response, storage, *args, **kwargs)

    monkeypatch.setattr(objects, "download", conditional_download)  # objects.get(alt=media) calls it
    table = [
        (regex, {m: conditional_download if f is download else f for m, f in h.items()})
        for regex, h in emulator.HANDLERS
    ]
    monkeypatch.setattr(emulator, "HANDLERS", table)
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    return server


class _Bucket:
    """Reads the GCS emulator's bucket over its JSON API (no client library, no environment)."""

    def __init__(self, url: str, name: str):
        self.url, self.name = url, name

    def names(self, prefix: str) -> list[str]:
        q = urllib.parse.urlencode({"prefix": prefix})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.name}/o?{q}") as r:
            return sorted(o["name"] for o in json.load(r).get("items", []))

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.name}/o/{quoted}?alt=media") as r:
            return r.read()


def test_gcs_work_directory_creates_no_local_folder(tmp_path, monkeypatch):
    """`zoo train --workdir gs://...` (two processes, interrupted; resumed by one, evaluated) writes
    everything to the bucket, through epath and Orbax, and nothing to the local disk."""
    port = _free_port()
    server = _serve_gcs(monkeypatch, port, "zoo-test")
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    workdir = "gs://zoo-test/runs/tiny"
    try:
        # Two processes (one device each) stop after step 3; one process (two devices) resumes from the
        # step-2 checkpoint they wrote, finishes and evaluates.
        _launch(tmp_path, "first", workdir, 2, "--no-eval", stop_after=3, env=env, cwd=cwd, devices=2)
        bucket = _Bucket(url, "zoo-test")
        at_2 = bucket.names("runs/tiny/checkpoints/2/")
        first = [json.loads(line) for line in bucket.read("runs/tiny/metrics.jsonl").decode().splitlines()]
        _launch(tmp_path, "second", workdir, 1, env=env, cwd=cwd, devices=2)
        names = bucket.names("runs/tiny/")
        metrics = [json.loads(line) for line in bucket.read("runs/tiny/metrics.jsonl").decode().splitlines()]
        events = [n for n in names if n.startswith("runs/tiny/tensorboard/events.out.tfevents.")]
        event_data = [bucket.read(n) for n in events]
        ev = json.loads(bucket.read("runs/tiny/eval.json"))
    finally:
        server.stop()
    for name in ("config.json", "metrics.jsonl", "eval.json", "eval.png", "training.png"):
        assert f"runs/tiny/{name}" in names, name
    steps = sorted({n.split("/")[3] for n in names if n.startswith("runs/tiny/checkpoints/")})
    assert steps == ["4", "6"]  # keep_checkpoints=2: step 2 was saved, restored from, then deleted
    for step in steps:
        assert f"runs/tiny/checkpoints/{step}/_CHECKPOINT_METADATA" in names
    for item in ("params", "opt_state"):  # the two processes' step-2 save: one step, both processes' blocks
        for p in (0, 1):
            assert any(n.startswith(f"runs/tiny/checkpoints/2/{item}/ocdbt.process_{p}/") for n in at_2), (item, p)
    assert "runs/tiny/checkpoints/2/commit_success.txt" in at_2
    # The first run's records survive the resume (an object store cannot append: the log is rewritten
    # whole), the replayed step 3 replaces its first record, and equals it (one process vs two).
    assert [r["step"] for r in first] == [1, 2, 3] and [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[:2] == first[:2]
    _check_losses(metrics[2:3], {3: first[2]}, [3])
    assert (metrics[2]["accuracy"], metrics[2]["lr"]) == (first[2]["accuracy"], first[2]["lr"])
    assert len(events) == 2 and all(b"brain.Event:2" in d and b"loss" in d for d in event_data)
    assert "loss_by_position" in ev and "passkey" in ev
    assert os.listdir(cwd) == []  # no local folder named like the URI ("gs:/zoo-test/...")
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


def test_distributed_environment_errors(monkeypatch):
    """A partial or malformed hand-written process description is one clear error; none is a no-op."""
    for k in (*DIST_VARS, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    sharding.maybe_initialize_distributed()  # nothing set: a single process
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    sharding.maybe_initialize_distributed()  # one process said by hand: still nothing to do
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID is not"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 with JAX_NUM_PROCESSES=2: the id must be in \[0, 2\)"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost")
    with pytest.raises(ValueError, match="must be host:port"):
        sharding.maybe_initialize_distributed()


def test_host_data_state_across_process_counts():
    """Fixed-length and decomposition states are the step (any process count); packed states are per
    process and resume only on as many processes; a one-process checkpoint of before stays readable."""
    two = {"process_count": 2, "hosts": [{"next_index": 5}, {"next_index": 5}]}
    assert host_data_state(two, "fixed", 1, 2) == {"next_index": 5}
    assert host_data_state(two, "fixed", 0, 1) == {"next_index": 5}
    assert host_data_state(two, "decomposition", 3, 4) == {"next_index": 5}
    packed = {"process_count": 2, "hosts": [{"parent": 7}, {"parent": 9}]}
    assert host_data_state(packed, "packed", 1, 2) == {"parent": 9}
    with pytest.raises(ValueError, match="written by 2 processes and this run has 1.*resume with 2 processes"):
        host_data_state(packed, "packed", 0, 1)
    assert host_data_state({"next_index": 3}, "fixed", 0, 1) == {"next_index": 3}
