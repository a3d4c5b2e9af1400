"""Trainer: it learns, resumes exactly, accumulates gradients correctly, loads in one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.storage import read_metrics
from zoo.train import optim
from zoo.train.trainer import train


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def test_train_writes_everything_and_loads(tmp_path, tiny, monkeypatch):
    """`zoo train` (the CLI: train, then evaluate) writes the run and the model loads in one line; the
    work dir is relative, as in the README's main job (Orbax refuses relative checkpoint paths)."""
    from conftest import TINY_OVERRIDES

    from zoo import cli

    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        "--config",
        "transformer:tiny",
        "--workdir",
        "runs/default",
        *TINY_OVERRIDES,
        "--config.train.steps=6",
        "--config.train.checkpoint_every=3",
    ]
    assert cli.main(args) == 0
    assert cli.main(["eval", "--workdir", "runs/default"]) == 0
    tmp_path = tmp_path / "runs" / "default"
    for name in ("config.json", "metrics.jsonl", "eval.json", "eval.png", "training.png"):
        assert (tmp_path / name).is_file(), name
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"loss", "accuracy", "grad_norm", "lr", "tokens_per_sec"} <= set(records[0])
    model, cfg = zoo.load("runs/default")
    assert cfg.model_name == "transformer" and model.config.d_model == 32
    logits = model(jnp.zeros((1, 16), jnp.int32))
    assert logits.shape == (1, 16, 256)
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert "passkey" in ev and "loss_by_position" in ev


def test_resume_equals_uninterrupted(tmp_path, tiny):
    """Stop after 7 steps (checkpoint at 5), rerun: steps 6.. equal an uninterrupted run exactly."""
    full = tmp_path / "full"
    train(tiny(steps=12, checkpoint_every=5), str(full), progress=False)
    part = tmp_path / "part"
    train(tiny(steps=12, checkpoint_every=5), str(part), progress=False, stop_after=7)
    assert sorted(os.listdir(part / "checkpoints")) == ["5"]
    train(tiny(steps=12, checkpoint_every=5), str(part), progress=False)
    a, b = _losses(str(full)), _losses(str(part))
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert a[step] == b[step], (step, a[step], b[step])


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny):
    one = train(tiny(steps=3), str(tmp_path / "one"), progress=False)
    acc_cfg = tiny(steps=3, grad_accum=2)
    two = train(acc_cfg, str(tmp_path / "two"), progress=False)
    for step in (1, 2, 3):
        np.testing.assert_allclose(
            _losses(str(tmp_path / "one"))[step], _losses(str(tmp_path / "two"))[step], rtol=2e-5
        )
    np.testing.assert_allclose(one["train"]["grad_norm"], two["train"]["grad_norm"], rtol=1e-4)


def test_optimizer_groups_and_token_schedule():
    assert optim.param_label({"axes": ("norm",)}, 1) == "no_decay"
    assert optim.param_label({"axes": ("embed", "mlp")}, 2) == "decay"
    assert optim.param_label({"axes": ("heads", None), "wd": False}, 2) == "no_decay"
    assert optim.param_label({"axes": ("heads",), "lr_group": "ssm"}, 1) == "ssm"
    # the schedule is a function of tokens: 10 steps of 100 tokens == 5 steps of 200 tokens
    a = optim.lr_schedule(1.0, 500, 4000, 0.1, tokens_per_step=100)
    b = optim.lr_schedule(1.0, 500, 4000, 0.1, tokens_per_step=200)
    assert float(a(10)) == pytest.approx(float(b(5)))
    assert float(a(5)) == pytest.approx(1.0)


def test_weight_decay_skips_norms(tiny):
    """One step with lr ~ 0 except weight decay: only decayed params move."""
    from zoo.train.step import make_setup

    config = tiny()
    config.optim.weight_decay = 0.5
    setup = make_setup(config)
    params = setup.init_params()
    opt_state = setup.tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):  # get past the first warmup step where lr = 0
        updates, opt_state = setup.tx.update(zeros, opt_state, params)
    for name, u in updates.items():
        moved = float(jnp.abs(u).max()) > 0
        assert moved == (setup.view.metadata[name].get("wd", True) and u.ndim >= 2), name


def test_decomposition_training_resumes_exactly(tmp_path, tiny):
    """The transformer trains on variable-length buckets (a curriculum from the config) and resumes."""
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"d{i}.txt").write_bytes(rng.integers(97, 123, int(rng.integers(40, 600))).astype(np.uint8).tobytes())

    def config():
        c = tiny(steps=8, checkpoint_every=4)
        c.data.source, c.data.path, c.data.mode = "text", str(corpus), "decomposition"
        c.data.min_log2, c.data.max_log2, c.data.tokens_per_step, c.data.curriculum = 4, 6, 128, "uniform"
        return c

    train(config(), str(tmp_path / "full"), progress=False)
    train(config(), str(tmp_path / "part"), progress=False, stop_after=6)
    train(config(), str(tmp_path / "part"), progress=False)
    full, part = read_metrics(str(tmp_path / "full")), read_metrics(str(tmp_path / "part"))
    assert len({r["seq_len"] for r in full}) > 1
    assert [r["loss"] for r in full] == [r["loss"] for r in part]
