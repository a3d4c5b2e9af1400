"""HiP attention (training-free hierarchically pruned attention) in the baseline transformer.

    zoo info --config hip:tiny --seq-len 1024

HiP is meant to run a model trained with full attention: `zoo.convert.convert_model(model, "hip",
k_blocks=..., ...)` keeps a trained baseline's parameters (same parameter tree). Training it
directly also works (the sparse op has a gradient; the block search is piecewise constant):

    zoo train --config hip:tiny --workdir runs/hip

Presets: `tiny` (HiP from 128 tokens: 32-token blocks, K=4, window 64, 16 sinks), `small`, `1.3b`.
"""

from zoo.config import make_config, pod_pretraining

RUNS = {
    # Above dense_below (128): the HiP path is the one trained.
    "tiny": {"data": {"seq_len": 256}, "eval": {"lengths": [256, 512]}},
    "small": {"data": {"seq_len": 512}, "eval": {"lengths": [512, 1024]}},
    "1.3b": pod_pretraining(seq_len=8192, batch_size=64, lr=3e-4, eval_lengths=[8192, 16384]),
}


def get_config(preset: str = "tiny"):
    """The run config of `preset` (see the module docstring)."""
    return make_config("hip", preset, runs=RUNS)
