"""The baseline transformer on passkey retrieval (the zoo's default run).

    zoo train --config configs/transformer.py:tiny --workdir runs/default

Presets: `tiny` (CPU, a few minutes), `small`, `1.3b` (paper scale: launch on a pod).
Any field can be overridden, e.g. `--config.model.n_layers=4 --config.data.source=text`.
"""
from zoo.config import make_config


def get_config(preset: str = "tiny"):
    config = make_config("transformer", preset)
    if preset == "1.3b":
        config.data.seq_len = 8192
        config.data.batch_size = 64
        config.data.source = "text"
        config.optim.lr = 3e-4
        config.train.steps = 100_000
        config.train.checkpoint_every = 1000
    return config
