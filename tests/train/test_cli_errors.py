"""User errors: one clear line, a non-zero exit, and no existing checkpoint damaged."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_OVERRIDES

CONFIG = "configs/transformer.py:tiny"


def _digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            full = os.path.join(root, f)
            h.update(full.encode())
            with open(full, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    from conftest import run_cli
    out = run_cli("train", "--config", CONFIG, "--workdir", str(workdir), "--no-eval",
                  "--config.train.steps=2", *TINY_OVERRIDES)
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


@pytest.mark.parametrize("args,message", [
    (["--config.model.n_layer=3"], "unknown config key 'model.n_layer'"),
    (["--config.trian.steps=3"], "unknown config key 'trian'"),
    (["--config.train.steps=abc"], "expects int"),
    (["--config.data.source=text", "--config.data.path=/no/such/dir"], "data.path '/no/such/dir' is not a directory"),
    (["--config.model.vocab_size=100"], "outside the vocabulary [0, 100)"),
    (["--config.data.source=nope"], "unknown data.source 'nope'"),
])
def test_config_errors_leave_checkpoint_intact(trained, cli, args, message):
    before = _digest(trained)
    out = cli("train", "--config", CONFIG, "--workdir", str(trained), *TINY_OVERRIDES, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: ") and message in lines[0], out.stderr
    assert _digest(trained) == before


def test_unknown_model_and_preset(tmp_path, cli):
    cfg = tmp_path / "bad.py"
    cfg.write_text("from zoo.config import make_config\ndef get_config(preset='tiny'):\n"
                   "    return make_config('no_such_model', preset)\n")
    out = cli("info", "--config", str(cfg))
    assert out.returncode == 2 and "unknown model 'no_such_model'" in out.stderr
    out = cli("info", "--config", "configs/transformer.py:giant")
    assert out.returncode == 2 and "unknown preset 'giant'" in out.stderr
    out = cli("info", "--config", "configs/missing.py:tiny")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = cli("eval", "--workdir", str(tmp_path / "empty"))
    assert out.returncode == 2 and "not a zoo work directory" in out.stderr


def test_info_prints_params_flops_mesh(cli):
    out = cli("info", "--config", CONFIG, "--config.model.n_layers=1")
    assert out.returncode == 0, out.stderr
    assert "params" in out.stdout and "FLOPs/tok" in out.stdout and "mesh" in out.stdout


def test_kill_9_then_rerun_resumes_identically(tmp_path, cli):
    """kill -9 mid-run, rerun the same command: losses equal an uninterrupted run's."""
    args = ["--config", CONFIG, "--no-eval", *TINY_OVERRIDES, "--config.train.steps=40",
            "--config.train.checkpoint_every=5"]
    ref = tmp_path / "ref"
    assert cli("train", "--workdir", str(ref), *args).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "train", "--workdir", str(run), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.isdir(run / "checkpoints" / "10"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(run / "checkpoints" / "10"), "the run never reached its second checkpoint"
    out = cli("train", "--workdir", str(run), *args)
    assert out.returncode == 0, out.stderr[-2000:]
    from zoo.train.metrics import read_metrics
    a = {r["step"]: r["loss"] for r in read_metrics(str(ref))}
    b = {r["step"]: r["loss"] for r in read_metrics(str(run))}
    assert sorted(b) == list(range(1, 41))
    assert all(a[s] == b[s] for s in range(1, 41)), [(s, a[s], b[s]) for s in range(1, 41) if a[s] != b[s]]
