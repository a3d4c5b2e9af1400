"""Continual training (the MASFormer paper's setting): turn a full-attention baseline run into a MASFormer run.

    python scripts/convert_to_masformer.py --src runs/base --dst runs/mas --schedule window,full \
        [--config configs/masformer.py:tiny] [--config.data.seq_len=640 ...]
    zoo train --config configs/masformer.py:tiny --workdir runs/mas [the printed overrides]

Same weights, new masks: the destination work dir gets the MASFormer run config (model shape from
the source run, attention schedule from --schedule) and a step-0 checkpoint holding the source
parameters with a fresh optimizer and data state, which `zoo train` resumes and fine-tunes.
Schedules: "window*3,full", "full,block,block,block", or "full@1,3:window" (full at 0-based
layers 1 and 3, window elsewhere).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from zoo.models.masformer import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="work dir of a trained baseline transformer")
    p.add_argument("--dst", required=True, help="new work dir for the MASFormer run")
    p.add_argument("--schedule", default=None, help="attention kind per layer (default: the preset's)")
    p.add_argument("--config", default="configs/masformer.py:tiny", help="MASFormer run config[:preset]")
    args = p.parse_args([a for a in argv if not a.startswith("--config.")])
    try:
        out = convert_checkpoint(args.src, args.dst, args.schedule, args.config, tuple(overrides))
    except ValueError as e:
        print(f"convert_to_masformer: error: {e}", file=sys.stderr)
        return 2
    cmd = " ".join(shlex.quote(a) for a in ["zoo", "train", "--config", args.config, "--workdir", args.dst,
                                            *overrides, *out["train_overrides"]])
    print(f"wrote {args.dst} (step 0 = the weights of {args.src}, schedule "
          f"{','.join(out['config']['model']['layer_attention'])}); fine-tune with:\n  {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
