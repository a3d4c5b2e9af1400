"""MASFormer (mixed attention spans) on passkey retrieval: full attention in a few layers only.

    zoo train --config configs/masformer.py:tiny --workdir runs/masformer

Continual training from a baseline run (same weights, new masks, then fine-tune at a longer length):

    zoo train --config configs/transformer.py:tiny --workdir runs/base
    python scripts/convert_to_masformer.py --src runs/base --dst runs/mas --schedule window,full
    zoo train --config configs/masformer.py:tiny --workdir runs/mas

Presets: `tiny` (2 layers: window 32 then full, 320-token passkey, CPU minutes), `small` (4 layers,
one full), `1.3b` (the paper's 24 x 2048 decoder, 4 full layers + block-local b=1024, 8k tokens).
The schedule is `model.layer_attention`, e.g. `--config.model.layer_attention="['full','window']"`.
"""
from zoo.config import make_config


def get_config(preset: str = "tiny"):
    config = make_config("masformer", preset)
    if preset == "tiny":
        # Twice the baseline's training length: the window layer cannot see the needle, the full one can.
        config.data.seq_len = 320
        config.data.batch_size = 16
        config.train.steps = 600
        config.eval.lengths = [320, 640]
    elif preset == "small":
        config.data.seq_len = 512
        config.data.batch_size = 16
        config.eval.lengths = [512, 1024]
    elif preset == "1.3b":
        config.data.seq_len = 8192
        config.data.batch_size = 64
        config.data.source = "text"
        config.optim.lr = 3e-4
        config.train.steps = 100_000
        config.train.checkpoint_every = 1000
        config.eval.lengths = [8192]
    return config
