"""Batched, jitted text generation for every zoo language model.

    out = zoo.generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=32, temperature=0.8, top_p=0.9,
                       eos=2, seed=0)
    out.tokens   # int32 [B, max_new_tokens]: the new tokens, `pad_id` after a row's EOS
    out.lengths  # int32 [B]: new tokens per row, its EOS included

How prompts of different lengths share one batch (exact per-prompt results): the cache is filled
by one parallel `model.prefill` of the common prefix (the shortest prompt's length m), then one
`lax.while_loop` steps every row with `model.decode_step`; at position t a row whose prompt is
longer than t is fed its own prompt token (teacher forcing) and the others the token sampled from
the previous step's logits. Every row therefore sees exactly its own tokens at positions 0, 1, ...
with no padding inside the sequence, no position offsets and no attention or state masks, so this
works for every model of the protocol (KV caches, SSM and TTT states, note pools) unchanged; the
alternative, left padding with segment ids, would need every model's cache to skip pad slots and
shift positions. The rows of a batch never interact, so a batch gives each prompt what it gets
alone, up to the float rounding between a parallel prefill and token-by-token decoding (the
models' parallel and recurrent forms compute the same function; HiP's searched pattern differs
between its prefill (one search per query block) and its decoding (per query) for prompts past
`dense_below`, so there a longer prompt in a mixed batch decodes its tail with the per-query search).
The cost of the teacher-forced tail is one decode step per extra prompt token.

Sampling (`sample_logits`, Hugging Face's order): logits / temperature, then top-k (keep the k
largest, ties at the k-th kept), then top-p (keep the smallest set of most likely tokens whose
probability reaches top_p), then a categorical draw; temperature 0 is greedy (argmax). Row i draws
with key fold_in(row_key_i, position), row_key_i = fold_in(key(seed), i) for an int seed or
key(seed[i]) for one seed per row, so a row's samples depend only on its seed and positions.
A row stops after `max_new_tokens` tokens or at an `eos` token (kept in its output, then
`pad_id`); the loop ends when every row has stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.data.tokenizers import Tokenizer, from_spec
from zoo.models.base import LanguageModel


@dataclasses.dataclass(frozen=True)
class Generation:
    """The output of `generate`.

    Attributes:
      tokens: int32 [B, N] the new tokens of every row; after a row's EOS, `pad_id`.
      lengths: int32 [B] the number of new tokens of every row (its EOS included).
      logits: float32 [B, N, V] the logits each new token was drawn from (`return_logits=True`;
        zeros after a row stops), else None.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None = None

    def rows(self) -> list[list[int]]:
        """The new tokens of every row as lists, without the padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def sample_logits(key: jax.Array, logits: jax.Array, temperature, top_k: int = 0, top_p=1.0) -> jax.Array:
    """One token id from logits [V] (see the module docstring): a categorical draw from
    `filtered_logits`; a Python temperature of 0 is the argmax. Vmappable over rows."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def filtered_logits(logits: jax.Array, temperature, top_k: int = 0, top_p=1.0) -> jax.Array:
    """logits [..., V] / temperature with the tokens outside top-k (static k; 0 = off) and top-p
    (1 = off) set to -inf."""
    x = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]  # [..., 1] the k-th largest
        x = jnp.where(x < kth, -jnp.inf, x)
    order = jnp.argsort(-x, axis=-1, stable=True)  # most likely first
    probs = jax.nn.softmax(jnp.take_along_axis(x, order, -1), -1)
    before = jnp.cumsum(probs, -1) - probs  # the probability of the more likely tokens
    keep_sorted = (before < top_p) | (top_p >= 1.0)  # the most likely token always (before = 0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
    return jnp.where(keep, x, -jnp.inf)


def _prompt_rows(prompts) -> list[np.ndarray]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"prompts has shape {arr.shape}; give [B, T] token ids or a list of token lists")
        rows = list(arr)
    elif isinstance(prompts, Sequence) and prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
        rows = [np.asarray(prompts)]
    elif isinstance(prompts, Sequence):
        rows = [np.asarray(p) for p in prompts]
    else:
        raise ValueError(f"prompts is a {type(prompts).__name__}; give a list of token-id lists or an array [B, T]")
    if not rows:
        raise ValueError("prompts is empty; give at least one prompt")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"prompt {i} has shape {r.shape}; every prompt needs at least one token id")
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"prompt {i} has dtype {r.dtype}; pass integer token ids")
    return rows


def _check(model, rows, max_new_tokens, temperature, top_k, top_p, eos, seed) -> None:
    if not isinstance(model, LanguageModel):
        raise ValueError(f"generate needs a zoo language model, got {type(model).__name__}")
    vocab = model.config.vocab_size
    for i, r in enumerate(rows):
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"prompt {i} holds token id {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab}); "
                "check the tokenizer against model.config.vocab_size"
            )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1] (1 = off)")
    bad = [e for e in eos if not 0 <= e < vocab]
    if bad:
        raise ValueError(f"eos ids {bad} lie outside the vocabulary [0, {vocab})")
    if not isinstance(seed, (int, np.integer)) and len(seed) != len(rows):
        raise ValueError(f"seed has {len(seed)} values for {len(rows)} prompts; give one int or one per prompt")


@nnx.jit(static_argnames=("prefix", "total", "new_tokens", "top_k", "greedy", "return_logits"))
def _generate(
    model,
    cache,
    seq,
    lengths,
    row_keys,
    temperature,
    top_p,
    eos,
    pad,
    *,
    prefix,
    total,
    new_tokens,
    top_k,
    greedy,
    return_logits,
):
    """The jitted prefill and loop (see the module docstring): seq int32 [B, total] holds the
    prompts, `cache` is the model's empty cache for B rows of `total` tokens."""
    b = seq.shape[0]
    # The cache is empty: position 0 as a Python int lets models specialise their prefill on it.
    logits, cache = model.prefill(seq[:, :prefix], {**cache, "pos": 0})
    cache = {**cache, "pos": jnp.asarray(cache["pos"], jnp.int32)}
    logits = logits[:, -1]  # [B, V] the distribution of the token at position `prefix`
    vocab = logits.shape[-1]
    store = jnp.zeros((b, new_tokens if return_logits else 0, vocab), jnp.float32)

    def draw(keys, pos, logits):
        if greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, pos))(keys)
        return jax.vmap(lambda k, x: sample_logits(k, x, temperature, top_k, top_p))(step_keys, logits)

    def cond(c):
        pos, _, _, _, done, _, _ = c
        return (pos < total) & ~jnp.all(done)

    def body(c):
        pos, logits, cache, seq, done, count, store = c
        in_prompt = pos < lengths  # [B]
        new = ~in_prompt & ~done
        tok = jnp.where(in_prompt, seq[:, pos], jnp.where(done, pad, draw(row_keys, pos, logits)))
        if return_logits:
            hit = jax.nn.one_hot(pos - lengths, new_tokens, dtype=bool) & new[:, None]  # [B, N]
            store = jnp.where(hit[..., None], logits[:, None], store)
        count = count + new
        done = done | (new & (jnp.any(tok[:, None] == eos[None], -1) | (count >= new_tokens)))
        seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], pos, 1)

        def step(cache):
            return model.decode_step(tok, cache)

        def skip(cache):
            return logits, cache

        logits, cache = jax.lax.cond((pos + 1 < total) & ~jnp.all(done), step, skip, cache)
        return pos + 1, logits, cache, seq, done, count, store

    init = (
        jnp.asarray(prefix, jnp.int32),
        logits,
        cache,
        seq,
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        store,
    )
    _, _, _, seq, _, count, store = jax.lax.while_loop(cond, body, init)
    idx = lengths[:, None] + jnp.arange(new_tokens)[None]  # [B, N]
    tokens = jnp.take_along_axis(seq, idx, 1)
    tokens = jnp.where(jnp.arange(new_tokens)[None] < count[:, None], tokens, pad)
    return tokens, count, store


def generate(
    model: LanguageModel,
    prompts,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos: int | Sequence[int] | None = None,
    seed: int | Sequence[int] = 0,
    *,
    pad_id: int | None = None,
    return_logits: bool = False,
) -> Generation:
    """Continues every prompt by up to `max_new_tokens` tokens (see the module docstring).

    Args:
      model: a zoo language model.
      prompts: token ids: a list of lists (any lengths >= 1), an array [B, T], or one list / [T].
      max_new_tokens: N, new tokens per row.
      temperature: 0 = greedy; else the softmax temperature.
      top_k: sample among the k most likely tokens (0 = all).
      top_p: nucleus sampling threshold (1 = off).
      eos: token id(s) that end a row (None: rows run for N tokens).
      seed: an int, or one int per prompt (a row's samples then depend on its own seed only).
      pad_id: the token after a row's end (default: the first eos id, else 0).
      return_logits: also return the logits of every step [B, N, V].

    Returns:
      A `Generation` (tokens [B, N], lengths [B], logits).

    Raises:
      ValueError: naming the argument: a prompt id outside [0, vocab_size), an empty prompt, a bad
        sampling parameter, eos outside the vocabulary.
    """
    rows = _prompt_rows(prompts)
    eos_ids = [] if eos is None else [int(e) for e in ([eos] if isinstance(eos, (int, np.integer)) else eos)]
    _check(model, rows, max_new_tokens, temperature, top_k, top_p, eos_ids, seed)
    lengths = np.array([len(r) for r in rows], np.int32)
    total = int(lengths.max()) + max_new_tokens
    seq = np.zeros((len(rows), total), np.int32)
    for i, r in enumerate(rows):
        seq[i, : len(r)] = r
    if isinstance(seed, (int, np.integer)):
        base = jax.random.key(int(seed))
        row_keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(len(rows)))
    else:
        row_keys = jnp.stack([jax.random.key(int(s)) for s in seed])
    pad = eos_ids[0] if pad_id is None and eos_ids else (pad_id or 0)
    if not 0 <= pad < model.config.vocab_size:
        raise ValueError(f"pad_id={pad} lies outside the vocabulary [0, {model.config.vocab_size})")
    # The empty cache is built outside the compiled loop: S4's holds the discretised step matrices
    # (solves and matrix powers per layer), which then stay out of the loop's program, where XLA:CPU
    # could run several layers' complex matmuls concurrently on one thread pool (docs/models/s4.md).
    cache = model.init_cache(len(rows), total)
    tokens, count, store = _generate(
        model,
        cache,
        jnp.asarray(seq),
        jnp.asarray(lengths),
        row_keys,
        jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.float32(top_p),
        jnp.asarray(eos_ids or [-1], jnp.int32),
        jnp.int32(pad),
        prefix=int(lengths.min()),
        total=total,
        new_tokens=max_new_tokens,
        top_k=min(int(top_k), model.config.vocab_size),
        greedy=temperature == 0,
        return_logits=return_logits,
    )
    return Generation(
        np.asarray(tokens, np.int32), np.asarray(count, np.int32), np.asarray(store) if return_logits else None
    )


def encode_prompt(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> np.ndarray:
    """Token ids of a prompt: with a Hugging Face tokenizer, its post-processor's special tokens
    (e.g. a BOS) when `add_special_tokens`; a SentencePiece model's BOS likewise; bytes as they are."""
    if add_special_tokens and tokenizer.kind == "hf":
        return np.asarray(tokenizer.tok.encode(text, add_special_tokens=True).ids, np.int32)
    ids = tokenizer.encode(text)
    if add_special_tokens and tokenizer.kind == "sentencepiece" and tokenizer.sp.bos_id() >= 0:
        ids = np.concatenate([[tokenizer.sp.bos_id()], ids]).astype(np.int32)
    return ids


def generate_text(
    model: LanguageModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    *,
    add_special_tokens: bool = True,
    eos: int | Sequence[int] | None | str = "tokenizer",
    **sampling,
) -> list[str]:
    """`generate` on text prompts: encode, generate (stopping at the tokenizer's EOS by default),
    decode the new tokens (the EOS left out)."""
    ids = [encode_prompt(tokenizer, p, add_special_tokens) for p in prompts]
    eos_ids = tokenizer.eos_id if eos == "tokenizer" else eos
    out = generate(model, ids, max_new_tokens, eos=eos_ids, **sampling)
    return [decode_new(tokenizer, row, eos_ids) for row in out.rows()]


def decode_new(tokenizer: Tokenizer, row: Sequence[int], eos: int | Sequence[int] | None) -> str:
    """The text of a row of new tokens, its EOS tokens (`eos`, as given to `generate`) left out."""
    stop = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    return tokenizer.decode([t for t in row if t not in stop])


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    """The tokenizer of a spec (`zoo.data.tokenizers.from_spec`; for `zoo.load_tokenizer`)."""
    return from_spec(spec)
