"""LaCT (large-chunk test-time training + sliding-window attention) on passkey retrieval.

    zoo train --config configs/lact.py:tiny --workdir runs/lact

Presets: `tiny` (CPU: window 64 and chunks of 64 tokens, so a 160-token passkey sequence spans
three chunks and the answer must come through the fast weights or the window), `760m` and `3b`
(the released LM configs: window 2048, chunk 2048, Muon + momentum, low-rank fast-weight init;
trained upstream on 32K-token sequences with AdamW lr 1e-3, eps 1e-15, warmup 1024, cosine to 0.1x,
grad clip 1.0, 40960 steps of 32 sequences; launch on a pod).
Any field can be overridden, e.g. `--config.model.chunk_size=32 --config.model.use_muon=False`.
"""
from zoo.config import make_config


def get_config(preset: str = "tiny"):
    config = make_config("lact", preset)
    if preset in ("760m", "3b"):
        config.data.seq_len = 32_768
        config.data.batch_size = 32
        config.data.source = "text"
        config.optim.lr = 1e-3
        config.optim.eps = 1e-15
        config.optim.warmup_steps = 1024
        config.optim.clip_norm = 1.0
        config.train.steps = 40_960
        config.train.checkpoint_every = 1000
        config.eval.lengths = [32_768, 65_536]
    return config
