"""Settings of `zoo compare`: every language model of the zoo trained at one matched size on the same
data, then evaluated the same way (`zoo.compare`).

    zoo compare --preset tiny --out docs/compare --workdir /tmp/zoo-compare

This is not a run config of one model (it has no `get_config`; `zoo train` does not take it):
`get_settings(preset)` returns the plain dict `zoo.compare` reads.

Presets:
- `tiny`: what runs on a 2-core CPU in 13.7-24 minutes (depending on load) for all eight rows (d_model 64, 2 layers,
  93k-127k parameters, 400 steps of 1,024 tokens of the passkey + MQAR mixture in decomposition
  buckets of 128 and 256 tokens, evaluated up to 8x = 2048). This is the run committed under
  docs/compare/ (docs/compare.md); at this budget no model learns retrieval.
- `paper`: the same protocol at a size for one GPU/TPU host (d_model 768, 12 layers, 70M-89M
  parameters, bfloat16, buckets up to 2048 tokens, 20k steps of 262k tokens, evaluated up to 16384).
  Not run here (no accelerator on the machine this was written on); its numbers are not in the docs.
- `test`: the smallest setting the end-to-end test runs (a handful of steps, short lengths).
- `mqar-cpu`, `mqar-test`, `mqar-paper`: the MQAR grid (`zoo.compare_mqar`), Zoology's Figure 2 at the
  zoo's sizes: multi-query associative recall as Zoology generates it (pairs first, queries at
  power-law gaps, loss on the recalled values; T/16 pairs), 2 layers, every row trained at every
  model dimension x sequence length x learning rate x seed, each cell an independent run through the
  trainer (`grid`, `rows`, `converted`, `families`). `cost` holds the seconds per training step at
  d_model 64, T=64, batch 64 that `--dry-run` scales (by d_model/64 x T/64) to estimate the grid's
  time before any cell has run; once cells have run, their measured times replace it.
  `mqar-cpu` runs T = 32 and 64 (2 and 4 pairs): at T = 128 the transformer needs more steps than a
  CPU cell affords to solve MQAR, so longer sequences are left to `mqar-paper`.

Sizes: `model` fields apply to every model whose config has the field; `per_model` then adjusts the
widths so the parameter counts stay close (S4's block is one GLU projection, a quarter of a
transformer block, so it gets more layers instead). Extra rows (`extra_rows`) are a registered
model under other fields (a window-only transformer, the baseline LaCT's paper compares with);
converted rows (`converted`) are not trained but built from another row's trained weights
(`zoo.convert.convert_model`): HiP is training-free and runs the transformer's weights.
"""

from __future__ import annotations

import copy

_COMMON_ROWS = {
    # name -> (registered model, model fields): trained like the registered models
    "extra_rows": {"transformer-window": ("transformer", {"attention": "window", "window": 64})},
    # name -> (source row, model fields of the converted model)
    "converted": {
        "hip": (
            "transformer",
            {"k_blocks": 4, "block_q": 32, "block_k": 32, "window": 64, "sinks": 16, "dense_below": 128},
        )
    },
}

PRESETS = {
    "tiny": {
        "model": {"d_model": 64, "n_layers": 2},
        "per_model": {
            "transformer": {"d_ff": 192},
            "hip": {"d_ff": 192},
            "masformer": {"d_ff": 192, "window": 64},  # its preset schedule: (window, full)
            "lact": {"d_ff": 128},  # window 64, chunks of 64 tokens (its preset)
            "mamba2": {"expand": 3},
            "memmamba": {},
            "s4": {"n_layers": 8},
        },
        **copy.deepcopy(_COMMON_ROWS),
        "data": {
            "source": "passkey_recall",
            "answer_only": False,  # passkey: loss on every target (recall: on the recalled values)
            "mode": "decomposition",
            "min_log2": 7,
            "max_log2": 8,  # training length 256
            "seq_len": 256,
            "tokens_per_step": 1024,
            "curriculum": "pow2",
        },
        "train": {"steps": 400, "log_every": 50},
        "optim": {"lr": 3e-3, "warmup_steps": 40},
        "eval": {
            "length_multiples": [1, 2, 4, 8],
            "depths": [0.0, 0.5, 1.0],
            "samples": 8,
            "batch_size": 8,
            "loss_samples": 8,
            "bench_lengths": [256, 512, 1024, 2048],
            "bench_reps": 2,
        },
    },
    "paper": {
        "model": {"d_model": 768, "n_layers": 12, "dtype": "bfloat16"},
        "per_model": {
            "transformer": {"n_heads": 12, "n_kv_heads": 12, "d_ff": 2048},
            "hip": {"n_heads": 12, "n_kv_heads": 12, "d_ff": 2048},
            # two full layers of twelve, window 256 elsewhere
            "masformer": {
                "n_heads": 12,
                "n_kv_heads": 12,
                "d_ff": 2048,
                "window": 256,
                "layer_attention": ["window"] * 5 + ["full"] + ["window"] * 5 + ["full"],
            },
            "lact": {"n_heads": 12, "d_ff": 2048, "window": 256, "chunk_size": 256},
            "mamba2": {"expand": 4, "d_state": 128, "headdim": 64},
            "memmamba": {"d_state": 128, "headdim": 64},
            "s4": {"n_layers": 64, "d_state": 64},
        },
        "extra_rows": {
            "transformer-window": ("transformer", {"attention": "window", "window": 256}),
        },
        "converted": {
            "hip": (
                "transformer",
                {"k_blocks": 16, "block_q": 64, "block_k": 64, "window": 256, "sinks": 64, "dense_below": 1024},
            )
        },
        "data": {
            "source": "passkey_recall",
            "answer_only": False,  # passkey: loss on every target (recall: on the recalled values)
            "mode": "decomposition",
            "min_log2": 8,
            "max_log2": 11,  # training length 2048
            "seq_len": 2048,
            "tokens_per_step": 262144,
            "curriculum": "pow2",
        },
        "train": {"steps": 20000, "log_every": 100},
        "optim": {"lr": 1e-3, "warmup_steps": 1000},
        "eval": {
            "length_multiples": [1, 2, 4, 8],
            "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
            "samples": 64,
            "batch_size": 16,
            "loss_samples": 32,
            "bench_lengths": [2048, 4096, 8192, 16384],
            "bench_reps": 5,
        },
    },
    "test": {
        "model": {"d_model": 32, "n_layers": 2},
        "per_model": {
            "transformer": {"d_ff": 64, "n_heads": 2, "n_kv_heads": 2},
            "hip": {"d_ff": 64, "n_heads": 2, "n_kv_heads": 2},
            "mamba2": {"headdim": 8},
        },
        **copy.deepcopy(_COMMON_ROWS),
        "data": {
            "source": "passkey_recall",
            "answer_only": False,  # passkey: loss on every target (recall: on the recalled values)
            "mode": "decomposition",
            "min_log2": 7,
            "max_log2": 7,
            "seq_len": 128,
            "tokens_per_step": 256,
            "curriculum": "pow2",
        },
        "train": {"steps": 3, "log_every": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "eval": {
            "length_multiples": [1, 2],
            "depths": [0.0, 1.0],
            "samples": 2,
            "batch_size": 2,
            "loss_samples": 2,
            "bench_lengths": [128],
            "bench_reps": 1,
        },
    },
}


# ------------------------------------------------------------------------------------------ the MQAR grid

_MQAR_WINDOW = 16  # below the key-to-query distance of 24% of the queries at T=32, 46% at T=64, 75% at T=128

_MQAR_ROWS = {
    # name -> (registered model, model fields besides d_model and d_ff)
    "transformer": ("transformer", {}),
    "transformer-window": ("transformer", {"attention": "window", "window": _MQAR_WINDOW}),
    "masformer": ("masformer", {"layer_attention": ["window", "full"], "window": _MQAR_WINDOW}),  # 1 full of 2
    "lact": ("lact", {"window": _MQAR_WINDOW, "chunk_size": _MQAR_WINDOW}),
    "mamba2-n16": ("mamba2", {"d_state": 16}),
    "mamba2-n64": ("mamba2", {"d_state": 64}),
    "memmamba": ("memmamba", {}),
    "s4": ("s4", {}),
}

_MQAR_CONVERTED = {
    # name -> (trained source row, model, fields): HiP runs the trained transformer's weights, no training
    "hip": (
        "transformer",
        "hip",
        {"k_blocks": 2, "block_q": 8, "block_k": 8, "window": _MQAR_WINDOW, "sinks": 4, "dense_below": 0},
    ),
}

_MQAR_FAMILIES = {
    "attention": ["transformer", "transformer-window", "hip", "masformer", "lact"],
    "state-space": ["mamba2-n16", "mamba2-n64", "memmamba", "s4"],
}

# seconds per step at d_model 64, T=64, batch 64 on a loaded 2-core CPU, for --dry-run before any cell
# has run: the transformer's from the budget probe (500 steps in 54 s), Mamba-2's (d_state 32) and
# S4's from 3000-step runs (765 s, 140 s); the other rows' are their nearest model's
_MQAR_COST = {
    "transformer": 0.11,
    "transformer-window": 0.11,
    "masformer": 0.11,
    "lact": 0.26,
    "mamba2-n16": 0.26,
    "mamba2-n64": 0.26,
    "memmamba": 0.26,
    "s4": 0.05,
    "hip": 0.0,
}


def _mqar(grid: dict, train: dict, optim: dict, eval_: dict, rows=None, dtype: str = "float32") -> dict:
    rows = rows or list(_MQAR_ROWS)
    return {
        "kind": "mqar",
        "grid": grid,
        "model": {"n_layers": 2, "ff_mult": 2, "dtype": dtype},
        "rows": {k: v for k, v in copy.deepcopy(_MQAR_ROWS).items() if k in rows},
        "converted": {k: v for k, v in copy.deepcopy(_MQAR_CONVERTED).items() if v[0] in rows},
        "families": copy.deepcopy(_MQAR_FAMILIES),
        "data": {"source": "mqar", "mode": "fixed", "batch_size": 64, "power_a": 0.01, "pairs_per_token": 1 / 16},
        "train": {"log_every": 100, **train},
        "optim": {"warmup_steps": 100, "weight_decay": 0.1, **optim},
        "eval": {"window": _MQAR_WINDOW, **eval_},
        "cost": dict(_MQAR_COST),
    }


PRESETS["mqar-cpu"] = _mqar(
    grid={"d_model": [64, 128], "seq_len": [32, 64], "lr": [1e-3, 3e-3, 1e-2], "seed": [0, 1, 2]},
    train={"steps": 1000},
    optim={},
    eval_={"samples": 256, "batch_size": 64},
)
PRESETS["mqar-paper"] = _mqar(
    grid={
        "d_model": [64, 128, 256, 512],
        "seq_len": [64, 128, 256, 512],
        "lr": [1e-4, 4.6e-4, 2.2e-3, 1e-2],
        "seed": [0, 1, 2],
    },
    train={"steps": 20000},
    optim={},
    eval_={"samples": 3000, "batch_size": 250},
)
PRESETS["mqar-test"] = _mqar(
    grid={"d_model": [32], "seq_len": [32], "lr": [3e-3], "seed": [0]},
    train={"steps": 2, "log_every": 1},
    optim={"warmup_steps": 1},
    eval_={"samples": 8, "batch_size": 8},
    rows=["transformer"],  # and HiP converted from it: two cells
)


def get_settings(preset: str = "tiny") -> dict:
    """A deep copy of the preset's settings (see the module docstring)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])
