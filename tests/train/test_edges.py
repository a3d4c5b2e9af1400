"""Reliability at the edges: divergence never costs a good checkpoint, one writer per work directory
under a race, converters that never overwrite unasked, every item of a checkpoint verified, and one
clear line for bad input. The table in docs/guide.md ("Faults and bad input") names these tests."""

import json
import multiprocessing
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES, tiny_config
from flax import nnx

from zoo import storage
from zoo.checkpoint import load_model
from zoo.models import registry
from zoo.models.params import ParamView
from zoo.train import trainer


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "zoo.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _train_args(work, *extra: str) -> list[str]:
    return ["train", "--config", "transformer:tiny", "--workdir", str(work), "--no-eval", *TINY_OVERRIDES, *extra]


def _one_line_error(out, match: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error:") and match in lines[0], out.stderr[-2000:]


def _nan_from(first: int, last: int):
    """make_batches wrapper: the batches of global steps first..last get a NaN loss mask (a NaN loss
    and NaN gradients: the update is skipped), every other batch is untouched."""
    real = trainer.make_batches

    def make(data, split, **kw):
        it = real(data, split, **kw)
        if split != "train":
            return it

        class Poisoned:
            def __init__(self):
                self.n = 0

            def __getattr__(self, name):  # the iterator's keys and shapes
                return getattr(it, name)

            def __iter__(self):
                return self

            def __next__(self):
                batch = dict(next(it))
                self.n += 1
                if first + 1 <= self.n <= last + 1:  # +1: the trainer peeks at one batch before it starts
                    batch["loss_mask"] = batch["loss_mask"] * np.nan
                return batch

            def get_state(self):
                return it.get_state()

            def set_state(self, s):
                it.set_state(s)

        return Poisoned()

    return make


# -- data loss --------------------------------------------------------------------------------------


def test_divergence_writes_no_checkpoint_and_keeps_the_last_good_ones(tmp_path, monkeypatch, capfd):
    """Steps 3-6 skipped: no checkpoint at 4 or 6, and the checkpoint before step 3 (step 2) survives
    the rotation by the later saves at 8 and 10 (keep 2)."""
    monkeypatch.setattr(trainer, "make_batches", _nan_from(3, 6))
    config = tiny_config(steps=10, checkpoint_every=2, keep_checkpoints=2, max_nonfinite=10)
    result = trainer.train(config, str(tmp_path), progress=False)
    assert result["step"] == 10 and result["train"]["nonfinite_steps"] == 4
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 8, 10]
    err = capfd.readouterr().err
    assert "no checkpoint at step 4" in err and "no checkpoint at step 6" in err


def test_divergence_stop_names_the_step_to_resume_from(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_batches", _nan_from(5, 100))
    config = tiny_config(steps=20, checkpoint_every=2, keep_checkpoints=2, max_nonfinite=3)
    with pytest.raises(
        trainer.NonFinite, match=r"last checkpoint is step 4, written before the first non-finite step \(5\)"
    ):
        trainer.train(config, str(tmp_path), progress=False)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 4]


def test_stop_without_a_checkpoint_says_a_rerun_starts_from_0(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_batches", _nan_from(1, 100))
    config = tiny_config(steps=10, checkpoint_every=5)
    config.train.on_nonfinite = "stop"
    with pytest.raises(trainer.NonFinite, match="no checkpoint yet, so a rerun starts from step 0") as e:
        trainer.train(config, str(tmp_path), progress=False)
    assert "None" not in str(e.value)


def _contend(workdir: str, barrier, start, results, index: int, trials: int, procs: int) -> None:
    """One of `procs` processes entering WorkdirLock at the same instant, `trials` times (a fresh
    directory each time); each holder keeps the lock until every process has tried. A process that
    fails records -1 and breaks the barrier, so the others stop at once instead of waiting."""
    from zoo import storage as zoo_io

    try:
        for t in range(trials):
            lock = zoo_io.WorkdirLock(os.path.join(workdir, str(t)))
            if barrier.wait(timeout=120) == 0:
                start.value = time.time() + 0.02
            barrier.wait(timeout=120)
            while time.time() < start.value:  # one instant for all, sharper than the barrier's wake-ups
                pass
            try:
                lock.__enter__()
                got = True
            except ValueError:
                got = False
            results[t * procs + index] = int(got)
            barrier.wait(timeout=120)
            if got:
                lock.__exit__(None, None, None)
    except BaseException:
        results[index] = -1
        barrier.abort()
        raise


def test_workdir_lock_race_admits_exactly_one_holder(tmp_path):
    procs, trials = 6, 40
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    results = ctx.Array("i", procs * trials)
    start = ctx.Value("d", 0.0)
    workers = [
        ctx.Process(target=_contend, args=(str(tmp_path), barrier, start, results, i, trials, procs))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert all(w.exitcode == 0 for w in workers)
    holders = [sum(results[t * procs : (t + 1) * procs]) for t in range(trials)]
    assert holders == [1] * trials, holders


def test_workdir_lock_is_released_by_a_killed_holder_and_names_a_live_one(tmp_path):
    work = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from zoo import storage; storage.WorkdirLock(sys.argv[1]).__enter__(); "
            "print('held', flush=True); time.sleep(600)",
            str(work),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by process {holder.pid}"):
            storage.WorkdirLock(work).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with storage.WorkdirLock(work) as lock:  # kill -9 released it: no stale lock to clean up
        assert lock.fd is not None
    assert (work / ".zoo.lock").read_text() == ""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny transformer's model directory (what `zoo convert --from` writes)."""
    import zoo
    from zoo.model_dir import save_pretrained

    out = tmp_path_factory.mktemp("zoo") / "model"
    save_pretrained(zoo.create_model("transformer", "tiny"), str(out))
    return out


@pytest.mark.parametrize("direction", ["to_hf", "from_hf"])
def test_convert_refuses_a_non_empty_out_without_overwrite(tmp_path, model_dir, direction):
    from zoo.cli import main

    hf = tmp_path / "hf"
    assert main(["convert", "--to", "hf", str(model_dir), "--out", str(hf)]) == 0
    if direction == "to_hf":
        args, out = ["convert", "--to", "hf", str(model_dir)], tmp_path / "existing"
    else:
        args, out = ["convert", "--from", "hf", str(hf), "--tokenizer", "none"], tmp_path / "existing"
    out.mkdir()
    (out / "config.json").write_text("mine")
    (out / "model.json").write_text("mine too")
    _one_line_error(_cli(*args, "--out", str(out)), "--overwrite")
    assert sorted(os.listdir(out)) == ["config.json", "model.json"] and (out / "config.json").read_text() == "mine"
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / ("config.json" if direction == "to_hf" else "model.json")).read_text())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directory left behind


def test_an_interrupted_export_leaves_the_old_files(tmp_path, model_dir, monkeypatch):
    from zoo.convert import pretrained

    out = tmp_path / "hf"
    pretrained.export_hf(str(model_dir), str(out))
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained.json, "dump", interrupted)  # after model.safetensors, before config.json
    with pytest.raises(KeyboardInterrupt):
        pretrained.export_hf(str(model_dir), str(out), overwrite=True)
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]


# -- silent wrong results ---------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["data", "meta"])
def test_an_edited_data_position_or_meta_is_a_damaged_checkpoint(tmp_path, item, capfd):
    config = tiny_config(steps=4, checkpoint_every=2, keep_checkpoints=3)
    trainer.train(config, str(tmp_path), progress=False)
    file = tmp_path / "checkpoints" / "4" / item / "metadata"
    saved = json.loads(file.read_text())
    if item == "data":
        saved["hosts"][0] = {k: v + 1 if isinstance(v, int) else v for k, v in saved["hosts"][0].items()}
    else:
        saved["model_name"] = "mamba2"
    file.write_text(json.dumps(saved))
    config.train.steps = 6
    trainer.train(config, str(tmp_path), progress=False)  # resumes from 2, not the edited 4
    err = capfd.readouterr().err
    assert f"step 4 is damaged: its {item} item differs" in err, err
    assert (tmp_path / "damaged" / "4").is_dir()


def test_an_empty_workdir_is_refused(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "zoo.cli", *_train_args("", "--config.train.steps=2")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    _one_line_error(out, "--workdir is empty")
    assert os.listdir(tmp_path) == []


def _params(workdir):
    model, _ = load_model(str(workdir))
    return {n: np.asarray(v) for n, v in ParamView(model).flat(model).items()}


@pytest.mark.parametrize("name", registry.list_models("lm"))
def test_every_eager_entry_point_refuses_ids_outside_the_vocabulary(name):
    model = registry.create_model(name, "tiny")
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary"):
            model(jnp.array([[1, bad, 2]]))
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary"):
            model.prefill(jnp.array([[1, bad]]), model.init_cache(1, 8))
        with pytest.raises(ValueError, match=f"token id {bad}, outside the vocabulary"):
            model.decode_step(jnp.array([bad]), model.init_cache(1, 8))


def test_s4_classifier_refuses_ids_outside_the_vocabulary():
    model = registry.create_model("s4_classifier", "tiny")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(jnp.array([[0, model.config.vocab_size]]))


def test_jitted_decode_past_the_cache_gives_nan_logits_not_plausible_ones():
    model = registry.create_model("transformer", "tiny")
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    cache = model.init_cache(1, 4)
    for t in range(6):
        logits, cache = step(model, jnp.array([t + 1]), cache)
        assert bool(jnp.all(jnp.isfinite(logits))) == (t < 4), t
    prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))
    _, half = prefill(model, jnp.ones((1, 2), jnp.int32), model.init_cache(1, 4))
    logits, _ = prefill(model, jnp.ones((1, 3), jnp.int32), half)  # 2 + 3 tokens in 4 slots
    assert bool(jnp.all(jnp.isnan(logits)))
    logits, _ = prefill(model, jnp.ones((1, 2), jnp.int32), half)
    assert bool(jnp.all(jnp.isfinite(logits)))


# -- smaller points ---------------------------------------------------------------------------------


def test_every_checkpoint_damaged_says_training_starts_again(tmp_path, capfd):
    config = tiny_config(steps=2, checkpoint_every=2)
    trainer.train(config, str(tmp_path), progress=False)
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("{not json")
    trainer.train(config, str(tmp_path), progress=False)
    err = capfd.readouterr().err
    assert "no usable checkpoint: every step (2) is damaged" in err and "starts again from step 0" in err, err


def test_a_nan_weight_converts_with_a_warning(tmp_path, capfd):
    import zoo
    from zoo.convert import pretrained

    model = zoo.create_model("transformer", "tiny")
    view = ParamView(model)
    params = view.flat(model)
    params["embed/embedding"] = params["embed/embedding"].at[3, 1].set(jnp.nan)
    pretrained.export_hf(None, str(tmp_path / "hf"), model=view.merge(params), meta={})
    _, info = pretrained.import_checkpoint(str(tmp_path / "hf"), "hf")
    assert "embed/embedding" in info["report"]["nonfinite"]  # (and the untied head the export writes)
    assert "hold NaN or Inf values (first: zoo parameter embed/embedding)" in capfd.readouterr().err


def test_eval_json_records_the_checkpoint_step(tmp_path):
    from zoo.eval.evaluate import evaluate_workdir

    trainer.train(tiny_config(steps=4, checkpoint_every=2, keep_checkpoints=3), str(tmp_path), progress=False)
    evaluate_workdir(str(tmp_path), step=2)
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint_step"] == 2
    evaluate_workdir(str(tmp_path))
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint_step"] == 4


# -- unclear errors ---------------------------------------------------------------------------------


def test_a_huge_seq_len_is_refused_before_anything_is_allocated(tmp_path):
    out = _cli(*_train_args(tmp_path / "run", "--config.data.seq_len=100000000"), timeout=120)
    _one_line_error(out, "lower data.batch_size or data.seq_len")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_damaged_during_the_run_is_set_aside_after_the_next_save(tmp_path, monkeypatch, capfd):
    from zoo import checkpoint as ckpt_lib

    real = ckpt_lib.Checkpointer.save

    def save(self, step, *args):
        if step == 4:  # step 2 is on disk (not yet read back) when its bytes change
            self.manager.wait_until_finished()
            params = tmp_path / "checkpoints" / "2" / "params"
            target = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            data = bytearray(target.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 16] = os.urandom(16)
            target.write_bytes(bytes(data))
        return real(self, step, *args)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    result = trainer.train(tiny_config(steps=6, checkpoint_every=2, keep_checkpoints=2), str(tmp_path), progress=False)
    assert result["step"] == 6
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"] and (tmp_path / "damaged" / "2").is_dir()
    assert "checkpoint step 2" in capfd.readouterr().err


def test_init_from_with_other_layers_touches_nothing(tmp_path):
    import zoo
    from zoo.model_dir import save_pretrained

    other = tmp_path / "other"
    save_pretrained(
        zoo.create_model("transformer", "tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=2), str(other)
    )
    work = tmp_path / "run"
    _one_line_error(_cli(*_train_args(work, f"--config.train.init_from={other}")), "init_from")
    assert not work.exists()


_SIGTERM_AT = """
import os, signal, sys, time
sys.path.insert(0, "tests")
from conftest import TINY_OVERRIDES
from zoo import cli
from zoo.train import trainer
import zoo.eval.evaluate as ev
def term(real):
    def wrapped(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        return real(*a, **k)
    return wrapped
if sys.argv[2] == "compile":
    trainer.check_memory = term(trainer.check_memory)
else:
    ev.evaluate = term(ev.evaluate)
sys.exit(cli.main(["train", "--config", "transformer:tiny", "--workdir", sys.argv[1], *TINY_OVERRIDES,
                   "--config.train.steps=4", "--config.train.checkpoint_every=4"]))
"""


@pytest.mark.parametrize("when", ["compile", "evaluation"])
def test_sigterm_during_the_first_compile_or_the_evaluation_exits_0(tmp_path, when):
    work = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AT, str(work), when], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    if when == "compile":  # the first step runs, is saved, and the run stops
        assert "stopped by SIGTERM at step 1" in out.stderr and os.listdir(work / "checkpoints") == ["1"]
    else:
        assert "during the evaluation, which was skipped" in out.stderr and not (work / "eval.json").exists()
        assert os.listdir(work / "checkpoints") == ["4"]


@pytest.mark.parametrize(
    "case",
    [
        "config_syntax",
        "hf_config_in_workdir",
        "garbage_params",
        "corrupt_config_json",
        "bad_model_json",
        "info_seq_len",
    ],
)
def test_bad_files_are_one_line_naming_the_file(tmp_path, model_dir, case):
    work = tmp_path / "run"
    if case == "config_syntax":
        bad = tmp_path / "cfg.py"
        bad.write_text("def get_config(:\n")
        args, match = ["train", "--config", str(bad), "--workdir", str(work)], f"{bad}' is not valid Python (line 1"
    elif case == "hf_config_in_workdir":
        work.mkdir()
        (work / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
        args, match = _train_args(work), "looks like a Hugging Face config.json"
    elif case == "corrupt_config_json":
        work.mkdir()
        (work / "config.json").write_text('{"model_name": "transformer", ')
        args, match = _train_args(work), f"{work / 'config.json'}' is not valid JSON"
    elif case == "garbage_params":
        import shutil

        work = tmp_path / "model"
        shutil.copytree(model_dir, work)
        (work / "params.safetensors").write_bytes(os.urandom(64))
        args = ["generate", "--pretrained", str(work), "--prompt-ids", "1,2"]
        match = f"{work / 'params.safetensors'}' is not a readable safetensors file"
    elif case == "bad_model_json":
        import shutil

        work = tmp_path / "model"
        shutil.copytree(model_dir, work)
        (work / "model.json").write_text(json.dumps({"format": "zoo-model"}))
        args, match = ["generate", "--pretrained", str(work), "--prompt-ids", "1,2"], 'lacks "model_name"'
    else:
        args, match = ["info", "--config", "transformer:tiny", "--seq-len", "-5"], "--seq-len -5"
    before = sorted(os.listdir(work)) if work.exists() else None
    _one_line_error(_cli(*args), match)
    assert (sorted(os.listdir(work)) if work.exists() else None) == before


def test_a_cut_off_metrics_line_does_not_block_the_resume(tmp_path, capfd):
    config = tiny_config(steps=4, checkpoint_every=2, keep_checkpoints=3)
    trainer.train(config, str(tmp_path), progress=False, stop_after=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a write cut off by kill -9
    trainer.train(config, str(tmp_path), progress=False)
    assert "dropped 1 unreadable line(s)" in capfd.readouterr().err
    assert [r["step"] for r in storage.read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_the_guide_table_names_every_edge_test_and_only_real_ones():
    """docs/guide.md's "Faults and bad input" table: each test it names exists, and each test of
    this file (but this one) is in it."""
    import re

    guide = open(os.path.join(ROOT, "docs", "guide.md")).read()
    table = guide.split("## Faults and bad input")[1].split("\n## ")[0]
    named, current = set(), None
    for file, name in re.findall(r"`(?:(tests/[\w/]+\.py))?::(\w+)`", table):
        current = file or current
        named.add((current, name))
    for file, name in named:
        assert f"def {name}(" in open(os.path.join(ROOT, file)).read(), (file, name)
    here = re.findall(r"^def (test_\w+)\(", open(__file__).read(), re.M)
    missing = [n for n in here if ("tests/train/test_edges.py", n) not in named and "guide_table" not in n]
    assert not missing, missing


def test_a_truncated_hugging_face_safetensors_is_one_line(tmp_path, model_dir):
    hf = tmp_path / "hf"
    from zoo.convert import pretrained

    pretrained.export_hf(str(model_dir), str(hf))
    file = hf / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    _one_line_error(_cli("convert", "--from", "hf", str(hf), "--out", str(tmp_path / "o")), "is truncated")
    assert not (tmp_path / "o").exists()


# -- zoo data prepare -------------------------------------------------------------------------------


def test_prepare_rerun_after_an_in_place_edit_refuses_the_stale_shards(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 40)
    args = ["data", "prepare", "--source", "text", "--input", str(corpus), "--output", str(tmp_path / "out")]
    assert _cli(*args).returncode == 0
    first = corpus / "0.txt"
    text = first.read_text()
    first.write_text(text.replace("document", "DOCUMENT"))  # same size, other content
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _one_line_error(_cli(*args), "the input files changed since")


@pytest.mark.parametrize("bad", ["empty_jsonl", "binary_jsonl"])
def test_prepare_of_bad_input_leaves_nothing_and_the_corrected_rerun_works(tmp_path, bad):
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"" if bad == "empty_jsonl" else b'{"text": "ok"}\n\xff\xfe\x00\x01binary\n')
    out = tmp_path / "out"
    args = ["data", "prepare", "--source", "jsonl", "--input", str(data), "--output", str(out)]
    match = "yielded no non-empty documents" if bad == "empty_jsonl" else f"{data}: byte 15: not valid JSON (not UTF-8"
    _one_line_error(_cli(*args), match)
    assert not out.exists()
    data.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(20)))
    assert _cli(*args).returncode == 0 and (out / "manifest.json").is_file()


def _damaged_shards(tmp_path, how: str):
    """A prepared corpus whose first train shard has flipped bytes or lost its second half."""
    from zoo.data import prepare as pp

    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 200)
    out = tmp_path / "shards"
    pp.prepare("text", str(corpus), str(out), shard_mb=0.002)
    shard = out / json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    if how == "flipped":
        for k in range(64, len(data) - 64, 97):
            data[k] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    return out, shard


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_damaged_shard_is_one_line_naming_it(tmp_path, how):
    from zoo.data.shards import ShardDocuments

    out, shard = _damaged_shards(tmp_path, how)
    docs = ShardDocuments(str(out), "train")
    with pytest.raises(ValueError, match=f"{shard}' is damaged .*rerun the same `zoo data prepare`"):
        for d in range(len(docs)):
            docs[d]


def test_training_on_a_damaged_shard_is_one_line(tmp_path):
    out, shard = _damaged_shards(tmp_path, "flipped")
    args = _train_args(tmp_path / "run", "--config.data.source=shards", f"--config.data.path={out}")
    _one_line_error(_cli(*args), f"{shard}' is damaged")


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_a_full_disk_names_the_step_and_the_intact_ones(small_disk):
    work = small_disk / "run"
    args = _train_args(work, "--config.train.steps=8", "--config.train.checkpoint_every=2")
    assert _cli(*args, "--config.train.steps=2").returncode == 0  # step 2 fits
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "fill", "wb") as f:  # leaves less than one checkpoint's space
        f.truncate(0)
        f.write(b"\0" * (free - 100 * 1024))
    out = _cli(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("zoo: error:")]  # Orbax's threads print too
    assert line.startswith("zoo: error: no space left on device while saving step 4") and "step 2 is intact" in line
    assert os.listdir(work / "checkpoints") == ["2"]  # the partial step is removed
