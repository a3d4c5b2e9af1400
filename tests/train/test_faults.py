"""Faults injected into runs: damaged checkpoints fall back to the previous good step and
continue exactly; non-finite steps follow train.on_nonfinite and never reach a checkpoint; SIGTERM
checkpoints and exits 0; one writer per work directory; bad input is one line and touches nothing;
kill -9 at random points resumes to bitwise-equal parameters; changed settings are recorded."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_OVERRIDES, tiny_config

from zoo import storage
from zoo.checkpoint import load_model
from zoo.cli import main
from zoo.models.params import ParamView
from zoo.train import trainer


def _params(workdir):
    model, _ = load_model(str(workdir))
    return {n: np.asarray(v) for n, v in ParamView(model).flat(model).items()}


def _losses(workdir):
    return {r["step"]: r["loss"] for r in storage.read_metrics(str(workdir))}


def _cli(*args, timeout=600, **popen):
    return subprocess.run(
        [sys.executable, "-m", "zoo.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **popen
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run with checkpoints every 4 steps (keep 3)."""
    workdir = tmp_path_factory.mktemp("reference")
    trainer.train(tiny_config(steps=12, checkpoint_every=4, keep_checkpoints=3), str(workdir), progress=False)
    return workdir


def _train_args(work, *extra: str) -> list[str]:
    """`zoo train` of the tiny transformer without the final evaluation; work None: no --workdir."""
    where = [] if work is None else ["--workdir", str(work)]
    return ["train", "--config", "transformer:tiny", *where, "--no-eval", *TINY_OVERRIDES, *extra]


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def _damage(step_dir, kind):
    params = os.path.join(step_dir, "params")
    if kind == "random_bytes":
        target = _largest_file(params)
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) // 2)
            f.write(os.urandom(21))
    elif kind == "truncated":
        target = _largest_file(params)
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 3)
    elif kind == "deleted_file":
        os.remove(_largest_file(params))
    elif kind == "deleted_params":
        import shutil

        shutil.rmtree(params)
    elif kind == "garbage_meta":
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
            f.write("{not json")


@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "deleted_file", "deleted_params", "garbage_meta"])
def test_damaged_checkpoint_falls_back_and_continues_exactly(tmp_path, reference, kind, capfd):
    work = tmp_path / "run"
    config = tiny_config(steps=12, checkpoint_every=4, keep_checkpoints=3)
    trainer.train(config, str(work), progress=False, stop_after=10)  # checkpoints 4 and 8, killed at 10
    _damage(str(work / "checkpoints" / "8"), kind)
    # evaluation uses the newest good step and says which it skipped; an explicit damaged step is an error
    model, _ = load_model(str(work))
    assert model is not None and "step 8" in capfd.readouterr().err
    with pytest.raises(ValueError, match="step 8"):
        load_model(str(work), step=8)
    trainer.train(config, str(work), progress=False)  # resumes from 4, not 8
    err = capfd.readouterr().err
    assert "checkpoint step 8" in err and "skipped it" in err, err
    assert (work / "damaged" / "8").is_dir()  # kept for inspection, out of the way
    assert _losses(work) == _losses(reference)  # steps 5..12 replayed exactly
    for name, value in _params(reference).items():
        np.testing.assert_array_equal(_params(work)[name], value, err_msg=name)


def test_keep_zero_is_refused_and_checkpoints_survive(tmp_path):
    work = tmp_path / "run"
    args = _train_args(work)
    assert main([*args, "--config.train.steps=4", "--config.train.checkpoint_every=2"]) == 0
    before = sorted(os.listdir(work / "checkpoints"))
    out = _cli(*args, "--config.train.steps=6", "--config.train.keep_checkpoints=0")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "keep_checkpoints" in out.stderr
    assert sorted(os.listdir(work / "checkpoints")) == before == ["2", "4"]


def _nan_at(step: int):
    """make_batches wrapper: the batch of global step `step` gets a NaN loss mask (a NaN loss and NaN
    gradients everywhere), every other batch is untouched."""
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
                if self.n == step + 1:  # +1: the trainer peeks at one batch before it starts
                    batch["loss_mask"] = batch["loss_mask"] * np.nan
                return batch

            def get_state(self):
                return it.get_state()

            def set_state(self, s):
                it.set_state(s)

        return Poisoned()

    return make


def test_nonfinite_skip_keeps_training_and_counts(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(trainer, "make_batches", _nan_at(3))
    result = trainer.train(tiny_config(steps=6, checkpoint_every=2), str(tmp_path), progress=False)
    assert result["step"] == 6 and result["train"]["nonfinite_steps"] == 1
    assert "step 3" in capfd.readouterr().err
    assert all(np.isfinite(v).all() for v in _params(tmp_path).values())


def test_nonfinite_stop_names_step_and_parameter_and_writes_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "make_batches", _nan_at(3))
    config = tiny_config(steps=6, checkpoint_every=2)
    config.train.on_nonfinite = "stop"
    with pytest.raises(
        trainer.NonFinite,
        match=r"step 3 \(sequence length 112\).*first in .*last checkpoint is step 2",
    ):
        trainer.train(config, str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert all(np.isfinite(v).all() for v in _params(tmp_path).values())


def test_nonfinite_rollback_returns_to_the_checkpoint_and_continues(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(trainer, "make_batches", _nan_at(3))
    config = tiny_config(steps=6, checkpoint_every=2)
    config.train.on_nonfinite = "rollback"
    result = trainer.train(config, str(tmp_path), progress=False)
    assert result["step"] == 6 and "rolled back to step 2" in capfd.readouterr().err
    assert all(np.isfinite(v).all() for v in _params(tmp_path).values())


def test_diverging_lr_exits_nonzero_and_keeps_the_good_checkpoint(tmp_path):
    work = tmp_path / "run"
    args = _train_args(work)
    assert _cli(*args, "--config.train.steps=4", "--config.train.checkpoint_every=2").returncode == 0
    out = _cli(
        *args,
        "--config.train.steps=40",
        "--config.train.checkpoint_every=2",
        "--config.optim.lr=1e3",
        "--config.optim.warmup_steps=0",
        "--config.train.max_nonfinite=3",
    )
    assert out.returncode == 2 and "non-finite" in out.stderr and "zoo: error:" in out.stderr, out.stderr[-2000:]
    for step in os.listdir(work / "checkpoints"):  # whatever was saved is finite
        assert all(np.isfinite(v).all() for v in _params(work).values()), step
    assert "resuming with changed settings" in out.stderr  # the new lr was recorded, not silently taken
    history = [json.loads(line) for line in (work / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["optim.lr"] == [0.003, 1000.0]


def test_sigterm_checkpoints_then_exits_zero_and_resumes_exactly(tmp_path, reference):
    work = tmp_path / "run"
    args = _train_args(
        work, "--config.train.steps=12", "--config.train.checkpoint_every=4", "--config.train.keep_checkpoints=3"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoo.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not _losses(work).get(5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 5 <= stopped < 12 and str(stopped) in os.listdir(work / "checkpoints")
    assert _cli(*args).returncode == 0
    assert _losses(work) == _losses(reference)
    for name, value in _params(reference).items():
        np.testing.assert_array_equal(_params(work)[name], value, err_msg=name)


def test_one_writer_per_workdir_and_stale_locks(tmp_path):
    work = tmp_path / "run"
    args = _train_args(work, "--config.train.steps=2")
    with storage.WorkdirLock(work):
        out = _cli(*args)
    assert out.returncode == 2 and f"is in use by process {os.getpid()}" in out.stderr
    assert not (work / "config.json").exists()
    lock = work / ".zoo.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": int(dead.stdout), "since": "then"}))
    out = _cli(*args)  # a lock file nobody holds (its run was killed) does not block
    assert out.returncode == 0, out.stderr[-2000:]
    assert lock.read_text() == ""  # released: no holder named


@pytest.mark.parametrize("case", ["file", "read_only", "no_validation_split", "mesh"])
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, case):
    args = _train_args(None, "--config.train.steps=2")
    work = tmp_path / "run"
    if case == "file":
        work.write_text("not a directory")
        match = "is a file"
    elif case == "read_only":
        parent = tmp_path / "ro"
        parent.mkdir()
        os.chmod(parent, 0o555)
        # root writes through permission bits; sysfs refuses new files to everyone
        work = (pathlib.Path("/sys") if os.geteuid() == 0 else parent) / "zoo-run"
        match = "not writable"
    elif case == "no_validation_split":
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "a.txt").write_text("x" * 4000)  # one file: the hash split puts it in train only
        args += ["--config.data.source=text", f"--config.data.path={corpus}"]
        match = "validation"
    else:
        args += ["--config.mesh.data=3"]
        match = "devices"
    out = _cli(*args, "--workdir", str(work))
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("zoo: error:") and match in out.stderr
    if case in ("read_only", "no_validation_split", "mesh"):
        assert not work.exists()


@pytest.mark.slow
def test_kill_9_at_random_points_of_a_200_step_run(tmp_path):
    """Five kill -9s at random points of a 200-step run: the final parameters equal an uninterrupted run's."""
    args = _train_args(
        None, "--config.train.steps=200", "--config.train.checkpoint_every=7", "--config.train.log_every=5"
    )
    ref = tmp_path / "ref"
    assert _cli(*args, "--workdir", str(ref)).returncode == 0
    work = tmp_path / "run"
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "zoo.cli", *args, "--workdir", str(work)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(4.0, 14.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _cli(*args, "--workdir", str(work)).returncode == 0
    for name, value in _params(ref).items():
        np.testing.assert_array_equal(_params(work)[name], value, err_msg=name)


def test_checkpoint_of_8_devices_restores_on_1_device_and_another_mesh(tmp_path):
    """Written on a (2, 2, 2) mesh of 8 devices; restored on 1 device here and on a (4, 1, 2) mesh."""
    work = tmp_path / "run"
    code = (
        "import sys, json, numpy as np; sys.path.insert(0, 'tests'); from conftest import tiny_config;"
        "from zoo.train.trainer import train; from zoo.checkpoint import load_model;"
        "from zoo.models.params import ParamView; from zoo.train.step import run_param_shardings;"
        "c = tiny_config(steps=3, checkpoint_every=3); c.model.d_model, c.model.n_heads, c.model.n_kv_heads = 64, 4, 2;"
        "c.mesh.data, c.mesh.fsdp, c.mesh.tensor = [int(x) for x in sys.argv[2].split(',')];"
        "train(c, sys.argv[1], progress=False) if sys.argv[3] == 'train' else None;"
        "m, rc = load_model(sys.argv[1], shardings=run_param_shardings(c));"
        "print(json.dumps({n: float(np.asarray(v, np.float64).sum()) for n, v in ParamView(m).flat(m).items()}))"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = lambda mesh, what: subprocess.run(
        [sys.executable, "-c", code, str(work), mesh, what],
        cwd=ROOT,
        env=env,  # noqa: E731
        capture_output=True,
        text=True,
        timeout=600,
    )
    written = run("2,2,2", "train")
    assert written.returncode == 0, written.stderr[-2000:]
    other = run("4,1,2", "load")
    assert other.returncode == 0, other.stderr[-2000:]
    want = json.loads(written.stdout.strip().splitlines()[-1])
    assert json.loads(other.stdout.strip().splitlines()[-1]) == want
    here = {n: float(np.asarray(v, np.float64).sum()) for n, v in _params(work).items()}
    assert here == want and jax.device_count() == 1


def test_decode_past_the_cache_is_a_value_error():
    from zoo.models import registry

    model = registry.create_model("transformer", "tiny")
    cache = model.init_cache(1, 4)
    for t in range(4):
        _, cache = model.decode_step(jnp.array([t]), cache)
    with pytest.raises(ValueError, match="cache holds 4"):
        model.decode_step(jnp.array([1]), cache)
