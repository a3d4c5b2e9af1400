"""LaCT (large-chunk test-time training + sliding-window attention) on passkey retrieval.

    zoo train --config lact:tiny --workdir runs/lact

Presets: `tiny` (CPU: window 64 and chunks of 64 tokens, so a 160-token passkey sequence spans
three chunks and the answer must come through the fast weights or the window), `760m` and `3b`
(the released LM configs: window 2048, chunk 2048, Muon + momentum, low-rank fast-weight init;
trained upstream on 32K-token sequences with AdamW lr 1e-3, eps 1e-15, warmup 1024, cosine to 0.1x,
grad clip 1.0, 40960 steps of 32 sequences; prepared token shards, launch on a pod).
Any field can be overridden, e.g. `--config.model.chunk_size=32 --config.model.use_muon=False`.
"""

from zoo.config import make_config, pod_pretraining


def _released() -> dict:
    return pod_pretraining(
        seq_len=32_768,
        batch_size=32,
        lr=1e-3,
        steps=40_960,
        warmup_steps=1024,
        eval_lengths=[32_768, 65_536],
        eps=1e-15,
        clip_norm=1.0,
    )


RUNS = {"760m": _released(), "3b": _released()}


def get_config(preset: str = "tiny"):
    """The run config of `preset` (see the module docstring)."""
    return make_config("lact", preset, runs=RUNS)
