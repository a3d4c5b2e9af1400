"""S4 / S4D causal LM on the zoo's default task (passkey retrieval).

    zoo train --config configs/s4.py:tiny --workdir runs/s4

Presets (zoo/models/s4.py): `tiny` (S4 DPLR, CPU minutes), `tiny-s4d` (S4D-Lin ZOH); `lra-listops` and
`s4d-scifar` are the papers' classifier shapes (their causal LM variant here; the LRA ListOps
classifier itself is trained by scripts/listops_s4.py). The SSM parameters (A, B, P, dt) train with
`optim.ssm_lr` and no weight decay, as in the S4 papers (lr 1e-3, wd 0 for the SSM).
"""
from zoo.config import make_config


def get_config(preset: str = "tiny"):
    # the LM is causal and reads the byte-level tasks of zoo.data
    config = make_config("s4", preset, bidirectional=False, vocab_size=256)
    # the kernel length C~ refers to; longer inputs extend it by doubling
    config.model.l_max = max(config.model.l_max, config.data.seq_len)
    config.optim.ssm_lr = 1e-3
    if preset in ("lra-listops", "s4d-scifar"):
        config.optim.lr = 1e-2
        config.optim.weight_decay = 0.05
        config.data.seq_len = config.model.l_max
        config.train.steps = 50_000
    return config
