"""HiP attention (training-free hierarchically pruned attention) in the baseline transformer.

    zoo info --config configs/hip.py:tiny --seq-len 1024

HiP is meant to run a model trained with full attention: load a baseline run's parameters with
`zoo.models.hip.from_transformer(model, k_blocks=..., ...)` (same parameter tree). Training it
directly also works (the sparse op has a gradient; the block search is piecewise constant):

    zoo train --config configs/hip.py:tiny --workdir runs/hip

Presets: `tiny` (HiP from 128 tokens: 32-token blocks, K=4, window 64, 16 sinks), `small`, `1.3b`.
"""
from zoo.config import make_config


def get_config(preset: str = "tiny"):
    config = make_config("hip", preset)
    if preset == "tiny":
        config.data.seq_len = 256  # above dense_below (128): the HiP path is the one trained
        config.data.batch_size = 16
        config.eval.lengths = [256, 512]
    elif preset == "small":
        config.data.seq_len = 512
        config.eval.lengths = [512, 1024]
    elif preset == "1.3b":
        config.data.seq_len = 8192
        config.data.batch_size = 64
        config.data.source = "text"
        config.optim.lr = 3e-4
        config.train.steps = 100_000
        config.train.checkpoint_every = 1000
        config.eval.lengths = [8192, 16384]
    return config
