"""MASFormer (mixed attention spans) on passkey retrieval: full attention in a few layers only.

    zoo train --config masformer:tiny --workdir runs/masformer

Continual training from a baseline run (same weights, new masks, then fine-tune):

    zoo train --config transformer:tiny --workdir runs/base
    zoo convert masformer --src runs/base --out runs/mas-init --schedule window,full
    zoo train --config masformer:tiny --workdir runs/mas --config.train.init_from=runs/mas-init

Presets: `tiny` (2 layers: window 32 then full, 320-token passkey, CPU minutes), `small` (4 layers,
one full), `1.3b` (the paper's 24 x 2048 decoder, 4 full layers + block-local b=1024, 8k tokens).
The schedule is `model.layer_attention`, e.g. `--config.model.layer_attention="['full','window']"`.
"""

from zoo.config import make_config, pod_pretraining

RUNS = {
    # Twice the baseline's training length: the window layer cannot see the needle, the full one can.
    "tiny": {"data": {"seq_len": 320}, "train": {"steps": 600}, "eval": {"lengths": [320, 640]}},
    "small": {"data": {"seq_len": 512}, "eval": {"lengths": [512, 1024]}},
    "1.3b": pod_pretraining(seq_len=8192, batch_size=64, lr=3e-4, eval_lengths=[8192]),
}


def get_config(preset: str = "tiny"):
    """The run config of `preset` (see the module docstring)."""
    return make_config("masformer", preset, runs=RUNS)
