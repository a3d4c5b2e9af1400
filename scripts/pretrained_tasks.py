"""Long-context measurements on a converted checkpoint with its own tokenizer (shared by
`scripts/stuffed_mamba.py --pretrained` and `scripts/hip_eval.py`).

- `load`: a model directory (`zoo convert`) and its tokenizer (or one given by name);
- `text_windows`: rows of consecutive tokens of real text (a folder of text files, or the Python
  standard library's source when none is given), documents joined by the tokenizer's EOS;
- `passkey_prompts` / `passkey_exact_match`: the passkey template of `zoo.data.synthetic` (the
  Stuffed-Mamba / InfiniteBench filler, needle and question) built in tokens of the model's own
  tokenizer to an exact token length; scored by greedy generation (`zoo.generate`): a sample is
  correct when the decoded continuation starts with the 5-digit key;
- `token_losses`: the next-token loss at every position (jitted, in batches; no [B, T, V] leaves
  the device).
"""

from __future__ import annotations

import numpy as np
import optax
from flax import nnx

import zoo
from zoo.data import synthetic
from zoo.data.text import TextFiles
from zoo.data.tokenizers import load_tokenizer
from zoo.generate import encode_prompt, generate


def load(pretrained: str, tokenizer: str = ""):
    """(model, tokenizer) of a model directory; `tokenizer` ("bytes", a file) overrides its own."""
    model, meta = zoo.from_pretrained(pretrained)
    tok = load_tokenizer(tokenizer) if tokenizer else zoo.load_tokenizer(pretrained)
    if tok is None:
        raise SystemExit(f"error: {pretrained} has no tokenizer; pass --tokenizer (a tokenizer.json, .model or bytes)")
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    return model, tok, meta


def text_windows(tokenizer, length: int, rows: int, path: str = "", seed: int = 0) -> np.ndarray:
    """int32 [rows, length]: windows at random offsets of the validation split of a text folder
    (default: the standard library's source), its documents joined by EOS."""
    docs = TextFiles(path, "validation", tokenizer)
    stream = np.concatenate([np.append(d, tokenizer.eos_id) for d in docs.docs]).astype(np.int32)
    if stream.size < length + 1:
        raise SystemExit(f"error: the text has {stream.size} tokens; {length} are needed (give a larger --text)")
    starts = np.random.default_rng(seed).integers(0, stream.size - length + 1, rows)
    return np.stack([stream[s : s + length] for s in starts])


def passkey_prompts(tokenizer, length: int, depth: float | None, n: int, seed: int = 0):
    """n prompts of exactly `length` tokens: filler, the needle at `depth` (None: random), the
    question; returns (int32 [n, length], keys)."""
    filler = [encode_prompt(tokenizer, s, add_special_tokens=False) for s in synthetic.FILLER]
    head = encode_prompt(tokenizer, "", add_special_tokens=True)  # a BOS, when the tokenizer adds one
    question = encode_prompt(tokenizer, synthetic.QUESTION.rstrip(), add_special_tokens=False)
    rng = np.random.default_rng(seed)
    rows, keys = [], []
    for _ in range(n):
        key = "".join(str(d) for d in rng.integers(0, 10, synthetic.N_DIGITS))
        needle = encode_prompt(tokenizer, synthetic.NEEDLE.format(key=key), add_special_tokens=False)
        n_fill = length - len(head) - len(needle) - len(question)
        if n_fill < 0:
            raise SystemExit(f"error: passkey length {length} is shorter than the needle and question")
        pieces, total, j = [], 0, int(rng.integers(len(filler)))
        while total < n_fill:  # whole filler sentences, the last one cut
            pieces.append(filler[j % len(filler)])
            total += len(pieces[-1])
            j += 1
        fill = np.concatenate(pieces)[:n_fill] if pieces else np.zeros(0, np.int32)
        bounds = np.cumsum([0] + [len(p) for p in pieces])  # sentence boundaries
        bounds = bounds[bounds <= n_fill]
        at = int(bounds[np.argmin(np.abs(bounds - (rng.uniform() if depth is None else depth) * n_fill))])
        rows.append(np.concatenate([head, fill[:at], needle, fill[at:], question]).astype(np.int32))
        keys.append(key)
    return np.stack(rows), keys


def passkey_exact_match(model, tokenizer, length: int, depth: float | None, n: int, seed: int = 0) -> float:
    """The fraction of n passkey prompts whose greedy continuation starts with the key."""
    prompts, keys = passkey_prompts(tokenizer, length, depth, n, seed)
    out = generate(model, prompts, 8)
    texts = [tokenizer.decode(row) for row in out.rows()]
    return float(np.mean([t.strip().startswith(k) for t, k in zip(texts, keys)]))


@nnx.jit
def _losses(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def token_losses(model, tokens: np.ndarray, batch: int = 1) -> np.ndarray:
    """float32 [rows, T - 1]: the next-token loss of tokens [rows, T] at every position."""
    return np.concatenate([np.asarray(_losses(model, tokens[i : i + batch])) for i in range(0, len(tokens), batch)])
