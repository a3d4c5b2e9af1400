"""Run `python scripts/make_golden.py` in a scratch venv with torch and transformers to write the golden fixtures.

    python3 -m venv golden-venv
    golden-venv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors==0.8.0 \
        tokenizers==0.23.3 numpy==2.4.6
    golden-venv/bin/python scripts/make_golden.py [--out tests/fixtures/golden]

Golden reference fixtures for the checkpoint converters. The reference implementations
(PyTorch + Hugging Face transformers) are *not* dependencies of the zoo: this script runs once, outside the
project's venv, and its outputs are committed; the zoo's tests only read them (numpy, safetensors files, a
torch-free reader for `pytorch_model.bin`). It never imports the `zoo` package.
One module per family lives in `scripts/golden/` (`attention`, `mamba2`, `tokenizer`), sharing
`golden/common.py` (settings, seeded parameters, the checks, deterministic writing).

For each model it builds a tiny fp32 model with fixed seeds, overwrites every parameter with seeded random
values at unit-preserving scales (HF's own init leaves biases at 0 and norm weights at 1, which would let a
converter that drops them pass), saves the checkpoint in the format of the real releases, and writes
`golden.npz` next to it:

- `input_ids` [2, T] int32: two different random rows,
- `logits` [2, T, V] float32: the model's full forward in eval mode (eager attention),
- `greedy_ids` [2, N] int32: the greedy continuation of each full row, by `model.generate` with the
  model's own cache (KV cache, or Mamba-2's conv + SSM state),
- `decode_logits` [2, N, V] float32: the logits of each generation step from that cached path, so that
  `argmax(decode_logits[:, k]) == greedy_ids[:, k]`; step k has seen `input_ids` + `greedy_ids[:, :k]`.

Every fixture is checked before it is written: the cached decode against a loop of full forwards (same
tokens, logits within 1e-4), the reloaded checkpoint against the in-memory model (same logits), the greedy
margin (top-1 minus top-2 logit) against 1e-3 so that a converter within fp32 round-off cannot flip a token;
for the Mamba-2 fixtures the HF logits against a float64 numpy recurrence written from the state-spaces/mamba
equations (`_mamba2_numpy_logits`), and the same weights without Llama's RoPE scaling or Mistral's sliding
window must give different logits (so a converter that ignores either fails). `MANIFEST.json` records
files, sizes, hashes,
configs, seeds, key-name conventions, the check results and the versions. The outputs are byte-identical
from run to run (fixed zip timestamps in `golden.npz`; `torch.save` is deterministic for a fixed file
name).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from golden.attention import make_llama, make_mistral, make_qwen2
from golden.common import MAMBA_SEQ_LEN, MIN_GREEDY_MARGIN, NEW_TOKENS, SEQ_LEN, _file_table
from golden.mamba2 import make_mamba2_hf, make_mamba2_ss
from golden.tokenizer import make_tokenizer

COMMAND = "python scripts/make_golden.py --out tests/fixtures/golden"


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/golden", help="output directory (replaced)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)

    fixtures = {
        "llama": make_llama(args.out),
        "qwen2": make_qwen2(args.out),
        "mistral": make_mistral(args.out),
        "mamba2_hf": make_mamba2_hf(args.out, groups=1),
        "mamba2_hf_g2": make_mamba2_hf(args.out, groups=2),
        "mamba2_ss": make_mamba2_ss(args.out),
        "tokenizer": make_tokenizer(args.out),
    }
    total = 0
    for name, entry in fixtures.items():
        entry["files"] = _file_table(os.path.join(args.out, name))
        entry["bytes"] = sum(f["bytes"] for f in entry["files"].values())
        total += entry["bytes"]
    manifest = {
        "about": (
            "Golden outputs of the reference implementations (PyTorch + HF transformers) for the zoo's checkpoint "
            "converters; tests load each checkpoint through a converter and compare logits (fp32, atol 1e-4), "
            "the greedy continuation exactly, and token-by-token decoding."
        ),
        "command": COMMAND,
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "settings": {
            "dtype": "float32",
            "attn_implementation": "eager",
            "torch.use_deterministic_algorithms": True,
            "torch.set_num_threads": 1,
            "T_attention": SEQ_LEN,
            "T_mamba2": MAMBA_SEQ_LEN,
            "N_new_tokens": NEW_TOKENS,
            "min_greedy_margin": MIN_GREEDY_MARGIN,
        },
        "total_bytes_excluding_manifest": total,
        "fixtures": fixtures,
    }
    with open(os.path.join(args.out, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(fixtures)} fixtures, {total} bytes, to {args.out}")


if __name__ == "__main__":
    main()
