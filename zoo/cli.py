"""The `zoo` command line: train, eval and info for every model in the zoo.

    zoo train --config configs/transformer.py:tiny --workdir runs/default [--config.a.b=value ...]
    zoo eval  --workdir runs/default [--step N]
    zoo info  --config configs/mamba2.py:130m [--seq-len 2048] [--config.a.b=value ...]

Any user error (unknown key, model, preset, missing path, bad token ids, ...) prints one line
`zoo: error: ...` and exits with status 2; nothing in an existing work directory is changed.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="JAX/Flax long-context model zoo")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a model")
    t.add_argument("--config", required=True, help="configs/<model>.py[:preset]")
    t.add_argument("--workdir", required=True)
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    e = sub.add_parser("eval", help="evaluate the checkpoint in a work directory")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None)
    i = sub.add_parser("info", help="parameters, FLOPs per token, mesh and data buckets of a config")
    i.add_argument("--config", required=True)
    i.add_argument("--seq-len", type=int, default=None, help="length for FLOPs (default: data.seq_len)")
    sub.add_parser("models", help="list the registered models and their presets")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; the zoo CLI has none of its own
    try:
        return _run(args, overrides)
    except ValueError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2


def _run(args, overrides) -> int:
    import json

    from zoo.config import load_config
    if args.command == "train":
        from zoo.train.trainer import train
        result = train(load_config(args.config, overrides), args.workdir, evaluate=not args.no_eval)
        print(json.dumps({"step": result["step"], **result["train"]}, indent=None))
        if "eval" in result:
            print(f"evaluation written to {args.workdir}/eval.json and eval.png")
            _print_eval(result["eval"])
        return 0
    if overrides and args.command != "info":
        raise ValueError(f"--config.* overrides only apply to train and info, got {overrides}")
    if args.command == "eval":
        from zoo.eval.evaluate import evaluate_workdir
        _print_eval(evaluate_workdir(args.workdir, step=args.step))
        return 0
    if args.command == "models":
        from zoo.models import registry
        for name in registry.list_models():
            print(f"{name:14s} presets: {', '.join(registry.list_presets(name))}")
        return 0
    from zoo.info import describe
    print(describe(load_config(args.config, overrides), args.seq_len))
    return 0


def _print_eval(result: dict) -> None:
    if "passkey" in result:
        r = result["passkey"]
        print("passkey exact match (rows: length, columns: depth)")
        print("length " + " ".join(f"{d:>6.2f}" for d in r["depths"]))
        for length, row in zip(r["lengths"], r["exact_match"]):
            print(f"{length:6d} " + " ".join(f"{x:6.2f}" for x in row))
    if "by_length" in result:
        r = result["by_length"]
        for length, acc, em in zip(r["lengths"], r["token_accuracy"], r["exact_match"]):
            print(f"length {length:6d}: answer token accuracy {acc:.3f}, exact match {em:.3f}")


if __name__ == "__main__":
    sys.exit(main())
