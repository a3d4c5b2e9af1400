"""S4 / S4D causal LM on the zoo's default task (passkey retrieval).

    zoo train --config s4:tiny --workdir runs/s4

Presets (zoo/models/s4.py): `tiny` (S4 DPLR, CPU minutes), `tiny-s4d` (S4D-Lin ZOH). The LRA ListOps
classifier (`s4_classifier`) is trained by scripts/listops_s4.py. The SSM parameters (A, B, P, dt)
train with `optim.ssm_lr` (1e-3) and no weight decay, as in the S4 papers.
"""

from zoo.config import make_config


def get_config(preset: str = "tiny"):
    """The run config of `preset` (see the module docstring)."""
    config = make_config("s4", preset)
    # the kernel length C~ refers to; longer inputs extend it by doubling
    config.model.l_max = max(config.model.l_max, config.data.seq_len)
    return config
