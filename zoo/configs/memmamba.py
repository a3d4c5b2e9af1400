"""MemMamba (Mamba-2 + Note Block + sparse cross-layer attention) on passkey retrieval.

    zoo train --config memmamba:tiny --workdir runs/memmamba

Presets: `tiny` (CPU: 3000 steps, about half an hour on 2 cores shared with other jobs) and `130m`,
`370m` (the Mamba-2 released bodies with the secondary-source Note Block defaults: pool 50, summary
64, tau1 0.5, tau2 0.3, cross layer every 4; prepared token shards, launch on a pod). The Note Block
options are model fields, e.g. `--config.model.pool_size=32`, `--config.model.tau1=0.6`.
"""

from zoo.config import ANSWER_ONLY_PASSKEY, make_config
from zoo.configs.mamba2 import RUNS as MAMBA2_RUNS

RUNS = {"tiny": ANSWER_ONLY_PASSKEY, "130m": MAMBA2_RUNS["130m"], "370m": MAMBA2_RUNS["370m"]}


def get_config(preset: str = "tiny"):
    """The run config of `preset` (see the module docstring)."""
    return make_config("memmamba", preset, runs=RUNS)
