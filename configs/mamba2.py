"""Mamba-2 (SSD) on passkey retrieval.

    zoo train --config configs/mamba2.py:tiny --workdir runs/mamba2

Presets: `tiny` (CPU: 3000 steps, ~20 min measured on 2 cores shared with other jobs) and the
released sizes `130m`, `370m`, `780m`, `1.3b`, `2.7b`
(state-spaces/mamba2-*: d_state 128, headdim 64, expand 2, vocab 50277 padded to 50288; launch on a
pod). The Stuffed-Mamba inference options are model fields, e.g. `--config.model.window=256`,
`--config.model.b_scale=0.7`, `--config.model.a_scale=2.0` (see zoo/models/mamba2.py).
"""
from zoo.config import answer_only_passkey, make_config


def get_config(preset: str = "tiny"):
    config = make_config("mamba2", preset)
    if preset == "tiny":
        answer_only_passkey(config)
    else:
        config.data.source = "text"
        config.data.seq_len = 2048          # the released models' training length
        config.data.batch_size = 256        # ~0.5M tokens per step, as the paper's Pile runs
        config.optim.lr = {"130m": 3e-3, "370m": 1.5e-3, "780m": 1.25e-3}.get(preset, 1e-3)
        config.optim.warmup_steps = 2000
        config.optim.b2 = 0.95
        config.train.steps = 100_000
        config.train.checkpoint_every = 1000
        config.eval.lengths = [2048, 8192, 32768]
    return config
