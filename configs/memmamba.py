"""MemMamba (Mamba-2 + Note Block + sparse cross-layer attention) on passkey retrieval.

    zoo train --config configs/memmamba.py:tiny --workdir runs/memmamba

Presets: `tiny` (CPU: 3000 steps, about half an hour on 2 cores shared with other jobs) and `130m`,
`370m` (the Mamba-2 released bodies with the
secondary-source Note Block defaults: pool 50, summary 64, tau1 0.5, tau2 0.3, cross layer every 4;
launch on a pod). The Note Block options are model fields, e.g. `--config.model.pool_size=32`,
`--config.model.tau1=0.6`, `--config.model.cross_layer_interval=0` (see zoo/models/memmamba.py).
"""
from zoo.config import answer_only_passkey, make_config


def get_config(preset: str = "tiny"):
    config = make_config("memmamba", preset)
    if preset == "tiny":
        answer_only_passkey(config)
    else:
        config.data.source = "text"
        config.data.seq_len = 2048
        config.data.batch_size = 256
        config.optim.lr = {"130m": 3e-3, "370m": 1.5e-3}.get(preset, 1e-3)
        config.optim.warmup_steps = 2000
        config.train.steps = 100_000
        config.train.checkpoint_every = 1000
        config.eval.lengths = [2048, 8192, 32768]
    return config
