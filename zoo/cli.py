"""The `zoo` command line: train, eval, info and convert for every model in the zoo.

    zoo train --config transformer:tiny --workdir runs/default [--config.a.b=value ...]
    zoo eval  --workdir runs/default [--step N]
    zoo info  --config mamba2:130m [--seq-len 2048] [--config.a.b=value ...]
    zoo models
    zoo convert masformer --src runs/base --out runs/mas-init [--schedule window,full]
    zoo convert --from hf|mamba_ssm SRC --out DIR [--overwrite] [--model NAME] [--tokenizer auto] [--set FIELD=VALUE]
    zoo convert --to hf MODEL_DIR|WORKDIR --out DIR [--step N] [--overwrite] [--dtype float32]
    zoo generate --workdir DIR | --pretrained DIR --prompt TEXT [--max-new-tokens N --temperature T ...]
    zoo data prepare --input DIR --output SHARDS [--tokenizer tokenizer.json] [--workers N]
    zoo bench train [mamba2:130m transformer:small ...] [--batch-size 16 --seq-len 2048]
    zoo compare --preset tiny --out docs/compare [--models transformer,mamba2 --steps N --workdir DIR]
    zoo compare --preset mqar-cpu --out docs/compare/mqar --workdir DIR [--dry-run] [--max-cells N]

    zoo reproduce --list | --render | NAME [--budget cpu|paper] [--seeds 0,1,2] [--out results]

The CLI orchestrates: `zoo train` trains (zoo.train), then evaluates the final checkpoint
(zoo.eval); neither package imports the other. Any user error (unknown key, model, preset, missing
path, bad token ids, ...) prints one line `zoo: error: ...` and exits with status 2; nothing in an
existing work directory is changed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import zoo  # the package is imported before zoo.cli anyway


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="JAX/Flax long-context model zoo")
    p.add_argument("--version", action="version", version=f"zoo {zoo.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a model, then evaluate it")
    t.add_argument("--config", required=True, help="<model>[:preset] or path/to/config.py[:preset]")
    t.add_argument("--workdir", required=True)
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    e = sub.add_parser("eval", help="evaluate the checkpoint in a work directory")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None)
    i = sub.add_parser("info", help="parameters, FLOPs per token, mesh and data buckets of a config")
    i.add_argument("--config", required=True)
    i.add_argument("--seq-len", type=int, default=None, help="length for FLOPs (default: data.seq_len)")
    sub.add_parser("models", help="list the registered models and their presets")
    c = sub.add_parser("convert", help="convert checkpoints between zoo models and other formats")
    c.add_argument("--from", dest="from_", nargs=2, metavar=("FORMAT", "SRC"), help="import: hf|mamba_ssm SRC")
    c.add_argument(
        "--to", nargs=2, metavar=("FORMAT", "SRC"), help="export a zoo model directory or train work directory: hf SRC"
    )
    c.add_argument("--step", type=int, default=None, help="export: the work directory's checkpoint (default: latest)")
    c.add_argument(
        "--model", default=None, help="import: the zoo model (transformer, hip, masformer, mamba2, memmamba)"
    )
    c.add_argument("--out", dest="out_dir", default=None, help="--from/--to: the directory to write")
    c.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    c.add_argument("--tokenizer", default="auto", help="import: auto (the source's), none, bytes or a tokenizer file")
    c.add_argument("--eos-token", default=None, help="import: the end-of-text token of a tokenizer.json")
    c.add_argument("--dtype", default="float32", help="import: compute dtype; export: tensor dtype")
    c.add_argument("--seed", type=int, default=0, help="import: seed of parameters the source lacks")
    c.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="import: a target config field")
    csub = c.add_subparsers(dest="what", required=False)
    m = csub.add_parser("masformer", help="a trained full-attention transformer run -> a MASFormer model directory")
    m.add_argument("--src", required=True, help="work directory of a transformer run")
    m.add_argument("--out", required=True, help="new model directory (train from it with train.init_from)")
    m.add_argument("--schedule", default="", help="e.g. window,full or full@5,11:block (default: the tiny preset's)")
    m.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    g = sub.add_parser("generate", help="generate text from a trained run or a model directory")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a `zoo train` work directory (its latest checkpoint, its data tokenizer)")
    src.add_argument(
        "--pretrained", help="a model directory, a work directory or a Hugging Face / mamba_ssm checkpoint"
    )
    g.add_argument("--step", type=int, default=None, help="a work directory's checkpoint step (default: latest)")
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    g.add_argument("--prompt-ids", action="append", default=[], help="a prompt as token ids, e.g. 1,2,3")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eos", default="tokenizer", help="tokenizer (its EOS), none, or token ids 2,3")
    g.add_argument("--no-special-tokens", action="store_true", help="encode prompts without BOS etc.")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    d = sub.add_parser("data", help="prepare corpora: tokenized ArrayRecord shards")
    dsub = d.add_subparsers(dest="what", required=True)
    from zoo.data.prepare import SOURCES as PREPARE_SOURCES

    _add_prepare_arguments(
        dsub.add_parser("prepare", help="tokenize a corpus into ArrayRecord shards (resumable)"), PREPARE_SOURCES
    )
    cmp = sub.add_parser("compare", help="every LM at one matched size: train, evaluate, one table per measure")
    cmp.add_argument(
        "--preset",
        default="tiny",
        help="tiny (2 CPU cores: 13.7-24 min, depending on load), paper (GPU/TPU), test; the MQAR grid: mqar-cpu, "
        "mqar-paper, mqar-test",
    )
    cmp.add_argument("--out", default="docs/compare", help="where compare.json, compare.md and the PNGs go")
    cmp.add_argument("--workdir", default=None, help="training runs, one per row (default: a temporary dir)")
    cmp.add_argument("--models", default=None, help="comma-separated rows (default: all), e.g. transformer,mamba2")
    cmp.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    cmp.add_argument(
        "--dry-run", action="store_true", help="mqar-* presets: print the pending cells and their estimated CPU time"
    )
    cmp.add_argument("--max-cells", type=int, default=None, help="mqar-* presets: run at most N pending cells")

    r = sub.add_parser("reproduce", help="the experiments behind every published number: run, resume, render")
    r.add_argument("name", nargs="?", help="an experiment of `zoo reproduce --list`")
    r.add_argument("--list", action="store_true", help="list every experiment")
    r.add_argument("--render", action="store_true", help="re-render every results section of the docs")
    r.add_argument("--budget", default="cpu", help="cpu (a 2-core CPU), paper (an accelerator) or test")
    r.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's)")
    r.add_argument("--out", default=None, help="results folder (default: the repository's results/)")
    r.add_argument("--workdir", default="runs/reproduce", help="where cells keep checkpoints and logs")
    b = sub.add_parser("bench", help="benchmarks measured in one run")
    bsub = b.add_subparsers(dest="what", required=True)
    bt = bsub.add_parser(
        "train",
        help="the training step: time, tokens/s, peak memory, MFU vs a matmul",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bt.add_argument(
        "configs", nargs="*", help="<model>:<preset> ... (default: the tiny preset of every language model)"
    )
    bt.add_argument(
        "--batch-size", type=int, default=None, help="global batch (default: each preset's data.batch_size)"
    )
    bt.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: each preset's data.seq_len)")
    bt.add_argument("--reps", type=int, default=5, help="timed steps after one warm-up step")
    bt.add_argument("--json", default="", help="also write the rows to this JSON file")
    bt.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile (abstract inputs, nothing allocated) and print XLA's memory analysis",
    )
    return p


def _add_prepare_arguments(parser: argparse.ArgumentParser, sources: tuple[str, ...]) -> None:
    """The arguments of `zoo data prepare` (see `zoo.data.prepare.prepare` for their meaning)."""
    parser.add_argument("--source", choices=sources, default="text", help="kind of input (default: text)")
    parser.add_argument(
        "--input", default="", help="text dir | .jsonl file or dir | TFDS data_dir | HF save_to_disk dir"
    )
    parser.add_argument("--output", required=True, help="the prepared directory (new, empty, or an interrupted run)")
    parser.add_argument("--tokenizer", default="bytes", help="bytes | SentencePiece .model | tokenizer.json")
    parser.add_argument("--eos-token", default=None, help="end-of-document token of a tokenizer.json")
    parser.add_argument("--tfds-name", default="", help="TFDS dataset name (--source tfds)")
    parser.add_argument("--text-key", default="text", help="text field of JSONL / TFDS / HF records")
    parser.add_argument(
        "--splits",
        default="",
        help="TFDS/HF: split mapping, e.g. train=train,validation=test; text/JSONL: paths under --input, "
        "e.g. train=train,validation=valid (default: split by --validation-fraction)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.01,
        help="share of hash-split documents in validation, at least one document (default: 0.01)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="MiB of text/JSONL input per shard")
    parser.add_argument("--docs-per-shard", type=int, default=4096, help="TFDS/HF records per shard")
    parser.add_argument("--record-tokens", type=int, default=65536, help="tokens per ArrayRecord record")


def main(argv: list[str] | None = None) -> int:
    """The `zoo` command: parses `argv` (default sys.argv) and runs the subcommand; returns the exit code."""
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
    except OSError as e:  # a file system error on the user's paths: one line, not a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"zoo: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def _run(args, overrides) -> int:
    if overrides and args.command not in ("train", "info", "bench"):
        raise ValueError(f"--config.* overrides only apply to train, info and bench, got {overrides}")
    if args.command == "models":  # read from the model files: no JAX import
        from zoo.models import registry

        for name, kind, presets in registry.listing():
            print(f"{name:14s} {kind:10s} presets: {', '.join(presets)}")
        return 0
    from zoo.config import load_config

    if args.command == "train":
        import jax

        from zoo.train.trainer import train

        result = train(load_config(args.config, overrides), args.workdir)
        if jax.process_index() == 0:
            print(json.dumps({"step": result["step"], **result["train"]}, indent=None))
        if result.get("preempted"):  # SIGTERM: the checkpoint is written; exit cleanly, evaluate later
            return 0
        if not args.no_eval:  # every process evaluates (the parameters may span them); process 0 writes
            if not _evaluate_after_training(args.workdir):
                return 0
            if jax.process_index() == 0:
                print(f"evaluation written to {args.workdir}/eval.json and eval.png")
        return 0
    if args.command == "eval":
        _evaluate(args.workdir, args.step)
        return 0
    if args.command == "convert":
        return _convert(args) if args.what else _convert_pretrained(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "data":
        from zoo.data import prepare

        return prepare.run(args)
    if args.command == "compare":
        from zoo import compare

        models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
        report = compare.run(
            args.preset, args.out, args.workdir, models, args.steps, dry_run=args.dry_run, max_cells=args.max_cells
        )
        if args.dry_run:
            return 0
        if "cells" in report:
            print(f"wrote {args.out}/mqar.md, mqar.json and figures ({len(report['cells'])} cells finished)")
        else:
            print(f"wrote {args.out}/compare.md, compare.json and figures ({len(report['rows'])} models)")
        return 0
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "bench":
        from zoo import bench

        specs = args.configs or bench.tiny_presets()
        for s in specs:  # an unknown model, preset or key: one line and status 2 before any work
            bench.run_shape(s, overrides)
        if args.compile_only:
            rows = [
                bench.compile_train_memory(s, batch_size=args.batch_size, seq_len=args.seq_len, overrides=overrides)
                for s in specs
            ]
            for r in rows:
                gib = ", ".join(
                    f"{k.replace('_in_bytes', '')} {v / 2**30:.2f} GiB" for k, v in (r["memory"] or {}).items()
                )
                head = f"{r['config']:22s} params {r['params']:,}, compiled in {r['compile_s']:.0f} s"
                print(f"{head} on {r['backend']}: {gib}")
        else:
            rows = bench.bench_train(
                specs, batch_size=args.batch_size, seq_len=args.seq_len, overrides=overrides, reps=args.reps
            )
            print(bench.format_rows(rows))
        if args.json:
            from zoo import storage

            storage.write_json_atomic(args.json, rows)
        return 0
    from zoo.info import describe

    print(describe(load_config(args.config, overrides), args.seq_len))
    return 0


def _reproduce(args) -> int:
    """zoo reproduce --list | --render | NAME [--budget B] [--seeds S] [--out DIR] [--workdir DIR]."""
    from zoo import reproduce

    if args.list:
        print(reproduce.listing())
        return 0
    if args.render:
        changed = reproduce.render_docs()
        print(f"rendered the results sections; {len(changed)} page(s) changed: {', '.join(changed) or 'none'}")
        return 0
    if not args.name:
        raise ValueError("zoo reproduce needs an experiment name, --list or --render")
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2") from e
    out = args.out or str(reproduce.ROOT / "results")
    doc = reproduce.run_experiment(args.name, args.budget, seeds, out, args.workdir)
    print(f"{args.name}: {len(doc['cells'])} cell(s) in {reproduce.result_path(out, args.name, args.budget)}")
    return 0


class _Terminated(BaseException):
    """A SIGTERM during the evaluation that follows training (no `except Exception` swallows it)."""


def _evaluate_after_training(workdir: str) -> bool:
    """The evaluation after `zoo train`; a SIGTERM skips it cleanly (False): the checkpoint is saved."""

    def stop(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        _evaluate(workdir, None)
        return True
    except _Terminated:
        print(
            f"zoo: stopped by SIGTERM during the evaluation, which was skipped (the checkpoint is saved); "
            f"run `zoo eval --workdir {workdir}` later",
            file=sys.stderr,
        )
        return False
    finally:
        signal.signal(signal.SIGTERM, previous)


def _evaluate(workdir: str, step: int | None) -> None:
    """Evaluates a run's checkpoint on every process of the job; process 0 writes and prints.

    One process: the parameters on one device. Several (`zoo train` on a pod, or `zoo eval` started
    like it): restored into the run's own shardings over all processes' devices, never gathered
    onto one process.
    """
    import jax

    from zoo.checkpoint import read_config
    from zoo.eval.evaluate import evaluate_workdir
    from zoo.train.sharding import maybe_initialize_distributed
    from zoo.train.step import run_param_shardings

    maybe_initialize_distributed()
    shardings = run_param_shardings(read_config(workdir)) if jax.process_count() > 1 else None
    result = evaluate_workdir(workdir, step=step, shardings=shardings)
    if jax.process_index() == 0:
        _print_eval(result)


def _convert(args) -> int:
    from zoo.convert.masformer import from_transformer_run

    schedule = from_transformer_run(args.src, args.out, args.schedule, overwrite=args.overwrite)
    print(
        f"wrote {args.out}: masformer with schedule {','.join(schedule)}; train it with "
        f"--config.train.init_from={args.out}"
    )
    return 0


def _field_value(text: str):
    """--set FIELD=VALUE: the value as JSON (numbers, booleans, lists), else the string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return tuple(value) if isinstance(value, list) else value


def _convert_pretrained(args) -> int:
    """zoo convert --from hf|mamba_ssm SRC --out DIR [--model NAME] / zoo convert --to hf SRC --out DIR."""
    if bool(args.from_) == bool(args.to):
        raise ValueError("zoo convert needs one of: a subcommand (masformer), --from FORMAT SRC, --to hf SRC")
    if not args.out_dir:
        raise ValueError("zoo convert --from/--to needs --out DIR")
    from zoo.convert import pretrained

    if args.step is not None and not args.to:
        raise ValueError("--step applies to --to hf WORKDIR (the checkpoint to export)")
    if args.to:
        fmt, src = args.to
        if fmt != "hf":
            raise ValueError(f"--to {fmt!r}: the zoo exports to 'hf' (Hugging Face safetensors + config.json)")
        out = pretrained.export_hf(src, args.out_dir, dtype=args.dtype, step=args.step, overwrite=args.overwrite)
        print(f"wrote {out['path']}: {out['config']['architectures'][0]}, {out['tensors']} tensors ({args.dtype})")
        return 0
    fmt, src = args.from_
    fields = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: write FIELD=VALUE")
        fields[key] = _field_value(value)
    info = pretrained.convert_checkpoint(
        src,
        args.out_dir,
        fmt,
        args.model,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.overwrite,
        **fields,
    )
    print(pretrained.describe(info))
    print(f"wrote {args.out_dir}: load it with zoo.from_pretrained({args.out_dir!r}) or `zoo generate --pretrained`")
    return 0


def _generate(args) -> int:
    """zoo generate --workdir DIR | --pretrained DIR --prompt TEXT ...: prints the continuations."""
    from zoo.data.tokenizers import from_spec, run_tokenizer
    from zoo.generate import decode_new, encode_prompt, generate

    if args.workdir:
        from zoo.checkpoint import load_model

        model, config = load_model(args.workdir, args.step)
        tok = run_tokenizer(config.data)
    else:
        from zoo.convert.pretrained import load_any
        from zoo.model_dir import tokenizer_spec

        model, meta = load_any(args.pretrained, args.step)
        spec = tokenizer_spec(args.pretrained, meta)
        tok = None if spec is None else from_spec(spec)
    if not args.prompt and not args.prompt_ids:
        raise ValueError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    if args.prompt and tok is None:
        raise ValueError(f"{args.pretrained!r} has no tokenizer; give --prompt-ids, or convert it with --tokenizer")
    prompts = [encode_prompt(tok, p, not args.no_special_tokens) for p in args.prompt]
    for ids in args.prompt_ids:
        try:
            prompts.append([int(x) for x in ids.split(",") if x.strip()])
        except ValueError as e:
            raise ValueError(f"--prompt-ids {ids!r}: give comma-separated integers") from e
    if args.eos == "tokenizer":
        eos = None if tok is None else tok.eos_id
    elif args.eos == "none":
        eos = None
    else:
        eos = [int(x) for x in args.eos.split(",")]
    out = generate(
        model,
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos=eos,
        seed=args.seed,
    )
    for i, row in enumerate(out.rows()):
        text = None if tok is None else decode_new(tok, row, eos)
        if args.json:
            print(json.dumps({"prompt": i, "prompt_ids": [int(t) for t in prompts[i]], "ids": row, "text": text}))
        else:
            print(f"--- prompt {i} ({len(prompts[i])} tokens) -> {len(row)} new tokens")
            print(text if text is not None else " ".join(map(str, row)))
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
