"""User errors: one clear line, a non-zero exit, and no existing checkpoint damaged."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY_OVERRIDES

from zoo.cli import main

CONFIG = os.path.join(ROOT, "configs", "transformer.py") + ":tiny"


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


def _main(capsys, *args):
    """Runs the CLI in-process: (exit code, stderr lines)."""
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    assert (
        main(
            [
                "train",
                "--config",
                CONFIG,
                "--workdir",
                str(workdir),
                "--no-eval",
                "--config.train.steps=2",
                *TINY_OVERRIDES,
            ]
        )
        == 0
    )
    return workdir


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.model.n_layer=3"], "unknown config key 'model.n_layer'"),
        (["--config.trian.steps=3"], "unknown config key 'trian'"),
        (["--config.train.steps=abc"], "expects int"),
        (
            ["--config.data.source=text", "--config.data.path=/no/such/dir"],
            "data.path '/no/such/dir' is not a directory",
        ),
        (["--config.model.vocab_size=100"], "outside the vocabulary [0, 100)"),
        (["--config.data.source=nope"], "unknown data.source 'nope'"),
    ],
)
def test_config_errors_leave_checkpoint_intact(trained, capsys, args, message):
    before = _digest(trained)
    code, lines = _main(capsys, "train", "--config", CONFIG, "--workdir", str(trained), *TINY_OVERRIDES, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("zoo: error: ") and message in lines[0], lines
    assert _digest(trained) == before


def test_unknown_model_and_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = tmp_path / "bad.py"
    cfg.write_text(
        "from zoo.config import make_config\ndef get_config(preset='tiny'):\n"
        "    return make_config('no_such_model', preset)\n"
    )
    for args, message in [
        (("info", "--config", str(cfg)), "unknown model 'no_such_model'"),
        (("info", "--config", "configs/transformer.py:giant"), "unknown preset 'giant'"),
        (("info", "--config", "configs/missing.py:tiny"), "does not exist"),
        (("eval", "--workdir", str(tmp_path / "empty")), "not a zoo work directory"),
    ]:
        code, lines = _main(capsys, *args)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_cli_subprocess_error_and_info(cli):
    out = cli("info", "--config", CONFIG, "--config.model.n_layers=1")
    assert out.returncode == 0, out.stderr
    assert "params" in out.stdout and "FLOPs/tok" in out.stdout and "mesh" in out.stdout
    out = cli("train", "--config", CONFIG, "--workdir", "/tmp/unused", "--config.model.n_layer=3")
    assert out.returncode == 2 and out.stderr.strip().startswith("zoo: error: unknown config key")


def test_kill_9_then_rerun_resumes_identically(tmp_path, cli):
    """kill -9 mid-run, rerun the same command: losses equal an uninterrupted run's."""
    args = [
        "--config",
        CONFIG,
        "--no-eval",
        *TINY_OVERRIDES,
        "--config.train.steps=40",
        "--config.train.checkpoint_every=5",
    ]
    ref = tmp_path / "ref"
    assert cli("train", "--workdir", str(ref), *args).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoo.cli", "train", "--workdir", str(run), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.isdir(run / "checkpoints" / "10"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(run / "checkpoints" / "10"), "the run never reached its second checkpoint"
    out = cli("train", "--workdir", str(run), *args)
    assert out.returncode == 0, out.stderr[-2000:]
    from zoo.storage import read_metrics

    a = {r["step"]: r["loss"] for r in read_metrics(str(ref))}
    b = {r["step"]: r["loss"] for r in read_metrics(str(run))}
    assert sorted(b) == list(range(1, 41))
    assert all(a[s] == b[s] for s in range(1, 41)), [(s, a[s], b[s]) for s in range(1, 41) if a[s] != b[s]]
