"""Checks by hand that `zoo convert --to hf` output loads in Hugging Face transformers and computes
what the zoo model computes (transformers and torch are not zoo dependencies: step 2 runs in
another venv, e.g. the one of scripts/make_golden.py).

    .venv/bin/python scripts/check_export_in_transformers.py export --out /tmp/hf-check
    /path/to/venv-with-transformers/bin/python scripts/check_export_in_transformers.py load --out /tmp/hf-check

`export` (zoo venv) builds one small zoo model per exported variant (a zoo-trained tied transformer
whose head the export unties, per-layer sliding windows -> Qwen2, a sliding window -> Mistral, an
output bias with YaRN, linear RoPE with an explicit head width, llama3 RoPE, Mamba-2 tied with two
groups and untied), plus the Qwen2 and mamba_ssm golden fixtures after import, writes each as a zoo
model directory and its `export_hf` output, and saves the zoo logits of fixed tokens. `load`
(transformers venv) loads every export with AutoModelForCausalLM (fp32, eager attention) and prints
max |transformers - zoo| per variant; it exits non-zero when one exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden")
CASES = {
    "llama_tied_scaled": ("transformer", {}),
    "qwen2_mixed_window": ("transformer", dict(layer_attention=("window", "full"), window=6, n_kv_heads=2)),
    "mistral_window": ("transformer", dict(attention="window", window=6, tie_embeddings=False)),
    "llama_obias_yarn": (
        "transformer",
        dict(o_bias=True, qkv_bias=True, rope_scaling="yarn", rope_factor=4.0, rope_original_max_position=8),
    ),
    "llama_linear_head_dim": (
        "transformer",
        dict(rope_scaling="linear", rope_factor=2.0, tie_embeddings=False, head_dim_override=16),
    ),
    "llama3_rope": (
        "transformer",
        dict(
            rope_scaling="llama3",
            rope_factor=8.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_position=16,
            tie_embeddings=False,
        ),
    ),
    "mamba2_tied_g2": ("mamba2", dict(d_model=32, headdim=16, d_state=16, chunk_size=8, ngroups=2)),
    "mamba2_untied": ("mamba2", dict(d_model=32, headdim=8, d_state=16, chunk_size=16, tie_embeddings=False)),
}


def export(out: str) -> None:
    import zoo
    from zoo.convert.pretrained import export_hf, import_checkpoint
    from zoo.model_dir import save_pretrained

    tokens = (np.arange(2 * 40, dtype=np.int32).reshape(2, 40) * 37 + 11) % 250
    logits = {}
    for name, (model_name, fields) in CASES.items():
        shape = dict(d_model=32, n_heads=4, d_ff=64) if model_name == "transformer" else {}
        model = zoo.create_model(model_name, "tiny", seed=3, **{**shape, **fields})
        save_pretrained(model, os.path.join(out, "zoo_" + name))
        result = export_hf(os.path.join(out, "zoo_" + name), os.path.join(out, "hf_" + name))
        logits[name] = np.asarray(model(tokens))
        print(f"{name}: {result['config']['architectures'][0]}")
    for name, fmt in (("qwen2", "hf"), ("mamba2_ss", "mamba_ssm")):
        model, _ = import_checkpoint(os.path.join(GOLDEN, name), fmt)
        export_hf(None, os.path.join(out, "hf_golden_" + name), model=model, meta={})
        with np.load(os.path.join(GOLDEN, name, "golden.npz")) as g:
            logits["golden_" + name] = np.asarray(model(g["input_ids"]))
    np.savez(os.path.join(out, "zoo_logits.npz"), tokens=tokens, **logits)


def load(out: str) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    z = np.load(os.path.join(out, "zoo_logits.npz"))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    worst = 0.0
    for name in z.files:
        if name == "tokens":
            continue
        model = AutoModelForCausalLM.from_pretrained(
            os.path.join(out, "hf_" + name), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        ids = z["tokens"]
        if name.startswith("golden_"):
            with np.load(os.path.join(GOLDEN, name[len("golden_") :], "golden.npz")) as g:
                ids = g["input_ids"]
        with torch.no_grad():
            got = model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        diff = float(np.abs(got - z[name]).max())
        worst = max(worst, diff)
        print(f"| {name} | {type(model).__name__} | {diff:.2e} |")
    return 0 if worst < 1e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("export", "load"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.step == "export":
        export(args.out)
        return 0
    return load(args.out)


if __name__ == "__main__":
    sys.exit(main())
