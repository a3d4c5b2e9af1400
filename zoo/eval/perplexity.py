"""Sliding-window (strided) log-likelihood and perplexity of held-out text under any zoo language model.

    python -m zoo.eval.perplexity --pretrained models/mamba2 --text held_out.txt --window 2048 --stride 1024
    python -m zoo.eval.perplexity --workdir runs/default --text held_out.txt --window 512 --stride 256 --json

The standard strided evaluation of a token sequence s_0 .. s_{N-1} longer than the model's context:
the targets s_1 .. s_{N-1} are split into consecutive blocks of `stride` S targets; the block with
targets s_lo .. s_{hi-1} feeds the model the W = `window` tokens s_a .. s_{hi-2} that end just
before its last target (a = max(0, hi - 1 - W)) and scores only its own targets. So every target
is scored exactly once; in a full block the first target sees W - S + 1 tokens of context and the
last W; the targets of the first blocks (while hi - 1 <= W) see everything before them. S = W gives
disjoint windows (the fastest; lm-evaluation-harness's rolling log-likelihood), S = 1 token-by-token
evaluation with a full window of context each (the most exact for a model trained at length W).
When W >= N - 1 every S gives the plain full-sequence perplexity. s_0 is context only: prepend a
document token (`prefix_token`) to score it as well.

Rows of one batch are padded on the right to a common bucket length (powers of two, at most W):
the models are causal, so a position's logits never depend on the padding after it; the buckets
bound the number of compilations. A model that is not strictly causal in this sense sees the
padding: HiP is dense below `dense_below` tokens and sparse above, and selects key blocks by scores
that include keys after a query inside its block. For it pass `pad_to_bucket=False`: rows are then
grouped by exact length, unpadded. Only the per-token
log-probabilities and greedy flags [B, T] leave the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_BUCKET = 16


@nnx.jit
def _score(model, inputs, targets):
    """Log-probability of each target and whether it is the argmax: inputs, targets int32 [B, T]."""
    logits = model(inputs).astype(jnp.float32)  # [B, T, V]
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]  # [B, T]
    greedy = jnp.argmax(logits, -1) == targets  # [B, T]
    return picked, greedy


def bucket_length(n: int, max_length: int) -> int:
    """The padded length of a row of n tokens: the next power of two >= max(n, 16), at most max_length."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_length)


def score_rows(
    model, rows: Sequence[np.ndarray], batch_size: int, max_length: int, pad_to_bucket: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-position target log-probs and greedy flags of token rows, batched.

    Row r (int [L_r + 1], 2 <= L_r + 1 <= max_length + 1) is fed as inputs row[:-1] with targets
    row[1:]. Rows are grouped by their padded length (`bucket_length` of L_r, or L_r itself when
    `pad_to_bucket` is False: no padding at all, one compilation per distinct length), taken longest
    first, padded on the right and batched `batch_size` at a time (a short last batch is filled with
    empty rows, so every batch of a group has one shape).

    Returns:
      (logprobs, greedy): for each row in the given order, float64 [L_r] and bool [L_r].
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    vocab = model.config.vocab_size
    out_lp: list[np.ndarray | None] = [None] * len(rows)
    out_greedy: list[np.ndarray | None] = [None] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if len(r) < 2 or len(r) - 1 > max_length:
            raise ValueError(f"row {i} has {len(r)} tokens; score_rows needs 2 .. max_length + 1 = {max_length + 1}")
        if r.min() < 0 or r.max() >= vocab:
            raise ValueError(
                f"row {i} holds a token id outside the vocabulary [0, {vocab}); check the tokenizer against "
                "model.config.vocab_size"
            )
        width = bucket_length(len(r) - 1, max_length) if pad_to_bucket else len(r) - 1
        groups.setdefault(width, []).append(i)
    for width in sorted(groups, reverse=True):
        group = sorted(groups[width], key=lambda i: -len(rows[i]))
        for start in range(0, len(group), batch_size):
            idx = group[start : start + batch_size]
            inputs = np.zeros((batch_size, width), np.int32)
            targets = np.zeros((batch_size, width), np.int32)
            for j, i in enumerate(idx):
                n = len(rows[i]) - 1
                inputs[j, :n], targets[j, :n] = rows[i][:-1], rows[i][1:]
            lp, greedy = _score(model, jnp.asarray(inputs), jnp.asarray(targets))
            lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
            for j, i in enumerate(idx):
                n = len(rows[i]) - 1
                out_lp[i], out_greedy[i] = lp[j, :n], greedy[j, :n]
    return out_lp, out_greedy


@dataclasses.dataclass(frozen=True)
class Block:
    """One forward of the strided evaluation: the model is fed s[start : hi - 1] and scores the
    targets s[lo : hi] (its last hi - lo predictions)."""

    start: int
    lo: int
    hi: int


def strided_blocks(n_tokens: int, window: int, stride: int) -> list[Block]:
    """The forwards that score targets 1 .. n_tokens - 1 of a sequence (module docstring)."""
    for name, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an int >= 1")
    if stride > window:
        raise ValueError(f"stride={stride} exceeds window={window}: tokens would go unscored; use stride <= window")
    blocks = []
    for lo in range(1, n_tokens, stride):
        hi = min(lo + stride, n_tokens)
        blocks.append(Block(max(0, hi - 1 - window), lo, hi))
    return blocks


def strided_logprobs(
    model,
    sequences: Sequence[Sequence[int]],
    window: int,
    stride: int,
    batch_size: int = 8,
    pad_to_bucket: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Log-probability (float64) and greedy flag of every target s_1 .. s_{N-1} of each sequence under
    the strided evaluation; the forwards of all sequences are batched together (`score_rows`).

    Returns:
      (logprobs, greedy): one [N_i - 1] array of each per sequence (empty for a one-token sequence).
    """
    seqs = [np.asarray(s, np.int64) for s in sequences]
    rows, owners = [], []
    for k, s in enumerate(seqs):
        if s.ndim != 1:
            raise ValueError(f"sequence {k} has shape {s.shape}; give 1-D token ids")
        for b in strided_blocks(len(s), window, stride):
            rows.append(s[b.start : b.hi])
            owners.append((k, b))
    lp, greedy = score_rows(model, rows, batch_size, window, pad_to_bucket) if rows else ([], [])
    out_lp = [np.zeros(max(len(s) - 1, 0)) for s in seqs]
    out_greedy = [np.zeros(max(len(s) - 1, 0), bool) for s in seqs]
    for (k, b), row_lp, row_greedy in zip(owners, lp, greedy):
        n = b.hi - b.lo
        out_lp[k][b.lo - 1 : b.hi - 1] = row_lp[-n:]
        out_greedy[k][b.lo - 1 : b.hi - 1] = row_greedy[-n:]
    return out_lp, out_greedy


def perplexity(
    model,
    tokens: Sequence[int],
    window: int,
    stride: int | None = None,
    batch_size: int = 8,
    prefix_token: int | None = None,
    pad_to_bucket: bool = True,
) -> dict:
    """Strided perplexity of one token sequence (module docstring).

    Args:
      model: a zoo language model.
      tokens: the token ids of the held-out text.
      window: W, the most tokens fed to the model in one forward.
      stride: S <= W targets scored per forward (default W // 2, at least 1).
      batch_size: forwards per batch.
      prefix_token: a token put before `tokens` so that their first token is scored too (e.g. EOS).
      pad_to_bucket: pad rows to power-of-two buckets (False: exact lengths; see the module docstring).

    Returns:
      {"nll": mean negative log-likelihood per scored token (nats), "perplexity": exp(nll),
       "bits_per_token", "tokens": scored tokens, "window", "stride", "forwards"}.
    """
    stride = max(window // 2, 1) if stride is None else stride
    seq = np.asarray(tokens, np.int64)
    if prefix_token is not None:
        seq = np.concatenate([[prefix_token], seq])
    if len(seq) < 2:
        raise ValueError(f"tokens has {len(seq)} token(s) to read; perplexity needs at least one scored token")
    (lp,), _ = strided_logprobs(model, [seq], window, stride, batch_size, pad_to_bucket)
    nll = float(-lp.mean())
    return {
        "nll": nll,
        "perplexity": math.exp(nll),
        "bits_per_token": nll / math.log(2),
        "tokens": int(lp.size),
        "window": int(window),
        "stride": int(stride),
        "forwards": len(strided_blocks(len(seq), window, stride)),
    }


def text_perplexity(model, tokenizer, text: str, window: int, stride: int | None = None, batch_size: int = 8) -> dict:
    """`perplexity` of a text in the tokenizer's tokens, every token scored (the tokenizer's EOS goes
    first as the document token), plus bits per UTF-8 byte (comparable across tokenizers)."""
    ids = tokenizer.encode(text)
    result = perplexity(model, ids, window, stride, batch_size, prefix_token=tokenizer.eos_id)
    n_bytes = len(text.encode("utf-8"))
    result["bytes"] = n_bytes
    result["bits_per_byte"] = result["nll"] * result["tokens"] / math.log(2) / max(n_bytes, 1)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zoo.eval.perplexity", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", help="a model directory (its tokenizer)")
    src.add_argument("--workdir", help="a `zoo train` work directory (its latest checkpoint, its data tokenizer)")
    p.add_argument("--step", type=int, default=None, help="--workdir: the checkpoint step (default: latest)")
    p.add_argument("--text", required=True, help="a UTF-8 text file of held-out text")
    p.add_argument("--window", type=int, required=True, help="W: tokens fed per forward")
    p.add_argument("--stride", type=int, default=None, help="S <= W: targets scored per forward (default W // 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def load_model_and_tokenizer(pretrained: str | None = None, workdir: str | None = None, step: int | None = None):
    """(model, tokenizer) of a model directory (or anything `zoo.from_pretrained` takes) or a work
    directory; the tokenizer may be None for a model directory converted without one."""
    from zoo.checkpoint import load_model
    from zoo.convert.pretrained import load_any
    from zoo.data.tokenizers import from_spec, run_tokenizer
    from zoo.model_dir import tokenizer_spec

    if (pretrained is None) == (workdir is None):
        raise ValueError("give exactly one of pretrained= (a model directory) or workdir= (a zoo train run)")
    if workdir is not None:
        model, config = load_model(workdir, step)
        return model, run_tokenizer(config.data)
    model, meta = load_any(pretrained, step)
    spec = tokenizer_spec(pretrained, meta)
    return model, None if spec is None else from_spec(spec)


def main(argv: list[str] | None = None) -> int:
    """The perplexity-vs-length command: parses `argv`, evaluates, writes the result; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        model, tok = load_model_and_tokenizer(args.pretrained, args.workdir, args.step)
        if tok is None:
            raise ValueError(f"{args.pretrained!r} has no tokenizer; convert it with --tokenizer")
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        result = text_perplexity(model, tok, text, args.window, args.stride, args.batch_size)
    except (ValueError, OSError) as e:
        print(f"perplexity: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['perplexity']:.4f} (nll {result['nll']:.4f} nats/token, "
            f"{result['bits_per_byte']:.4f} bits/byte) over {result['tokens']} tokens; window {result['window']}, "
            f"stride {result['stride']}, {result['forwards']} forwards"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
