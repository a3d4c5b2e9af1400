"""Mamba-2 (SSD) on passkey retrieval.

    zoo train --config mamba2:tiny --workdir runs/mamba2

Presets: `tiny` (CPU: 3000 steps, ~20 min measured on 2 cores shared with other jobs) and the
released sizes `130m`, `370m`, `780m`, `1.3b`, `2.7b` (state-spaces/mamba2-*: d_state 128, headdim 64,
expand 2, vocab 50277 padded to 50288; ~0.5M tokens per step at 2048 as the paper's Pile runs;
prepared token shards, launch on a pod). The Stuffed-Mamba inference options are model fields, e.g.
`--config.model.window=256`, `--config.model.b_scale=0.7`, `--config.model.a_scale=2.0`.
"""

from zoo.config import ANSWER_ONLY_PASSKEY, make_config, pod_pretraining


def _pretraining_run(lr: float) -> dict:
    """The pretraining run settings of the released sizes (2048 tokens, batch 256) at learning rate `lr`."""
    return pod_pretraining(seq_len=2048, batch_size=256, lr=lr, eval_lengths=[2048, 8192, 32768], b2=0.95)


RUNS = {
    "tiny": ANSWER_ONLY_PASSKEY,
    "130m": _pretraining_run(3e-3),
    "370m": _pretraining_run(1.5e-3),
    "780m": _pretraining_run(1.25e-3),
    "1.3b": _pretraining_run(1e-3),
    "2.7b": _pretraining_run(1e-3),
}


def get_config(preset: str = "tiny"):
    """The run config of `preset` (see the module docstring)."""
    return make_config("mamba2", preset, runs=RUNS)
