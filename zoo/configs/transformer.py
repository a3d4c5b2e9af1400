"""The baseline transformer on passkey retrieval (the zoo's default run).

    zoo train --config transformer:tiny --workdir runs/default

Presets: `tiny` (CPU, a few minutes), `small`, `1.3b` (paper scale: prepared token shards, launch on
a pod). Any field can be overridden, e.g. `--config.model.n_layers=4 --config.data.source=text`.
"""

from zoo.config import make_config, pod_pretraining

RUNS = {
    "1.3b": pod_pretraining(seq_len=8192, batch_size=64, lr=3e-4, eval_lengths=[8192, 16384]),
}


def get_config(preset: str = "tiny"):
    """The run config of `preset` (see the module docstring)."""
    return make_config("transformer", preset, runs=RUNS)
