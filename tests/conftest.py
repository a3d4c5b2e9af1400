"""Shared fixtures: tiny run configs and a helper to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zoo.config import make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Overrides that make the transformer run small enough for a unit test.
TINY_OVERRIDES = [
    "--config.model.d_model=32",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=2",
    "--config.model.d_ff=64",
    "--config.data.seq_len=112",
    "--config.data.batch_size=8",
    "--config.train.log_every=1",
    "--config.optim.warmup_steps=2",
    "--config.eval.lengths=[112]",
    "--config.eval.depths=[0.5]",
    "--config.eval.samples=4",
    "--config.eval.batch_size=4",
]


def tiny_config(**train):
    """A run config of a ~20k-parameter transformer on 112-token passkey sequences."""
    from zoo.config import apply_overrides

    config = apply_overrides(make_config("transformer", "tiny"), TINY_OVERRIDES)
    for k, v in train.items():
        config.train[k] = v
    return config


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python -m zoo.cli args...` from the repository root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "zoo.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture
def cli():
    return run_cli
