"""RULER-style synthetic long-context tasks at token level (Hsieh et al. 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?", arXiv 2404.06654), deterministic from (seed, index).

Token-level: every example is built directly from token ids of disjoint ranges of a byte-sized
vocabulary (no text template), so any tokenizer-free model of vocabulary >= 256 can take them:

    noise / filler      1 .. 95      background the needles hide in
    keys, names         96 .. 159    multi-token keys (NIAH) and variable names (VT)
    values, words       160 .. 255   multi-token values (NIAH), assigned values (VT), words (CWE)
    0                   separator    between the context and the question
    markers             the first two key/value ids of a task are reserved as markers where needed

Tasks (each a Grain random-access source: `len`, `task[i]` -> {"tokens", "loss_mask", "answer_mask"}
like `zoo.data.synthetic`, inputs tokens[:-1], targets tokens[1:]; loss and accuracy on the answer):

- `MultiKeyNeedle` (RULER's MK-NIAH): `num_needles` pairs "key -> value" (keys `key_len` tokens,
  values `value_len` tokens) scattered in noise at random depths; the question repeats one key; the
  answer is its value.
- `VariableTracking` (RULER's VT): a chain X1 = v, X2 = X1, ..., X_hops = X_{hops-1} of assignments
  (name, "=", name-or-value) in noise, plus distractor chains with other values; the question names
  the value v; the answer is the names of the chain bound to v, in chain order.
- `CommonWords` (RULER's CWE): a list of words where `num_common` words occur `common_freq` times
  and every other word `rare_freq` times, shuffled; the answer is the common words sorted by id.

`solve(tokens)` of every task computes the answer from the context alone (the oracle; tests check it
equals the stored answer, so the task is answerable), and `chance(task)` the accuracy per answer
token of a model that guesses uniformly in the answer's token range.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NOISE = (1, 96)
KEYS = (96, 160)
VALUES = (160, 256)
SEP = 0


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 0x52554C4552])


def _example(context: list[int], question: list[int], answer: list[int], length: int) -> dict[str, np.ndarray]:
    """Noise-padded context, then SEP + question + answer; exactly length + 1 tokens."""
    tail = [SEP, *question, *answer]
    if len(context) + len(tail) > length + 1:
        raise ValueError(f"length {length} is too short for this task's needles and answer; raise the length")
    tokens = np.asarray(context + tail, np.int32)
    answer_mask = np.zeros(length, np.float32)
    answer_mask[length - len(answer) :] = 1.0
    return {"tokens": tokens, "loss_mask": answer_mask.copy(), "answer_mask": answer_mask}


def _scatter(rng: np.random.Generator, pieces: list[list[int]], n_tokens: int) -> list[int]:
    """Noise of `n_tokens` tokens with the pieces inserted, in order, at random distinct gaps."""
    n_noise = n_tokens - sum(len(p) for p in pieces)
    if n_noise < 0:
        raise ValueError("the length is too short for the needles of this task; raise the length")
    noise = rng.integers(*NOISE, n_noise).tolist()
    at = np.sort(rng.choice(n_noise + 1, len(pieces), replace=True))
    out, last = [], 0
    for a, piece in zip(at, pieces):
        out += noise[last:a] + piece
        last = a
    return out + noise[last:]


def _distinct(rng: np.random.Generator, n: int, width: int, lo_hi: tuple[int, int]) -> list[list[int]]:
    """n distinct token tuples of `width` tokens from the range lo_hi."""
    seen, out = set(), []
    while len(out) < n:
        t = tuple(rng.integers(*lo_hi, width).tolist())
        if t not in seen:
            seen.add(t)
            out.append(list(t))
    return out


@dataclasses.dataclass(frozen=True)
class MultiKeyNeedle:
    """MK-NIAH: find the value of the queried key among `num_needles` key -> value pairs in noise."""

    length: int
    num_needles: int = 4
    key_len: int = 3
    value_len: int = 3
    seed: int = 0
    num_examples: int = 2**31 - 1
    ARROW = VALUES[0]  # marker between a key and its value (values start one id above it)

    def __post_init__(self):
        if self.num_needles < 1 or self.key_len < 1 or self.value_len < 1:
            raise ValueError("num_needles, key_len and value_len must be >= 1")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        keys = _distinct(rng, self.num_needles, self.key_len, KEYS)
        values = [rng.integers(VALUES[0] + 1, VALUES[1], self.value_len).tolist() for _ in keys]
        pieces = [k + [self.ARROW] + v for k, v in zip(keys, values)]
        order = rng.permutation(self.num_needles)
        q = int(rng.integers(self.num_needles))
        question = keys[q] + [self.ARROW]
        n_ctx = self.length + 1 - (1 + len(question) + self.value_len)
        return _example(_scatter(rng, [pieces[i] for i in order], n_ctx), question, values[q], self.length)

    def solve(self, tokens: np.ndarray) -> list[int]:
        """The value following the queried key in the context (the oracle)."""
        tokens = list(np.asarray(tokens))
        sep = len(tokens) - 1 - tokens[::-1].index(SEP)
        key = tokens[sep + 1 : sep + 1 + self.key_len]
        ctx = tokens[:sep]
        for i in range(len(ctx) - self.key_len):
            if ctx[i : i + self.key_len] == key and ctx[i + self.key_len] == self.ARROW:
                return ctx[i + self.key_len + 1 : i + self.key_len + 1 + self.value_len]
        raise ValueError("the queried key is not in the context")

    def answer_range(self) -> int:
        return VALUES[1] - VALUES[0] - 1


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    """VT: which variables end up bound to the queried value through a chain of assignments."""

    length: int
    hops: int = 4
    num_chains: int = 2
    seed: int = 0
    num_examples: int = 2**31 - 1
    EQ = KEYS[0]  # the "=" token (names start one id above it)

    def __post_init__(self):
        if self.hops < 1 or self.num_chains < 1:
            raise ValueError("hops and num_chains must be >= 1")
        if self.hops * self.num_chains > KEYS[1] - KEYS[0] - 1:
            raise ValueError("hops * num_chains exceeds the number of variable names (63)")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        names = (rng.permutation(KEYS[1] - KEYS[0] - 1)[: self.hops * self.num_chains] + KEYS[0] + 1).tolist()
        values = (rng.permutation(VALUES[1] - VALUES[0])[: self.num_chains] + VALUES[0]).tolist()
        chains = [names[c * self.hops : (c + 1) * self.hops] for c in range(self.num_chains)]
        # Statements per chain, in order: X1 = v, X2 = X1, ...; chains interleaved at random.
        stmts = [
            [[ch[0], self.EQ, values[c]]] + [[ch[i], self.EQ, ch[i - 1]] for i in range(1, self.hops)]
            for c, ch in enumerate(chains)
        ]
        order, cursor = [], [0] * self.num_chains
        for c in rng.permutation(np.repeat(np.arange(self.num_chains), self.hops)):
            order.append(stmts[c][cursor[c]])
            cursor[c] += 1
        n_ctx = self.length + 1 - (1 + 1 + self.hops)
        return _example(_scatter(rng, order, n_ctx), [values[0]], chains[0], self.length)

    def solve(self, tokens: np.ndarray) -> list[int]:
        """Follow the assignments from the queried value (the oracle)."""
        tokens = list(np.asarray(tokens))
        sep = len(tokens) - 1 - tokens[::-1].index(SEP)
        target, ctx = tokens[sep + 1], tokens[:sep]
        bound, chain = {target}, []
        for i in range(len(ctx) - 2):
            if ctx[i + 1] == self.EQ and KEYS[0] < ctx[i] < KEYS[1] and ctx[i + 2] in bound:
                chain.append(ctx[i])
                bound.add(ctx[i])
        return chain[: self.hops]

    def answer_range(self) -> int:
        return KEYS[1] - KEYS[0] - 1


@dataclasses.dataclass(frozen=True)
class CommonWords:
    """CWE: the `num_common` words that occur most often (each `common_freq` times, every other
    word `rare_freq` times), answered sorted by token id."""

    length: int
    num_common: int = 3
    common_freq: int = 6
    rare_freq: int = 2
    seed: int = 0
    num_examples: int = 2**31 - 1

    def __post_init__(self):
        if not 1 <= self.rare_freq < self.common_freq or self.num_common < 1:
            raise ValueError("need num_common >= 1 and 1 <= rare_freq < common_freq")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        n_ctx = self.length + 1 - (1 + self.num_common)
        n_rare = (n_ctx - self.num_common * self.common_freq) // self.rare_freq
        n_rare = min(n_rare, VALUES[1] - VALUES[0] - self.num_common)
        if n_rare < 1:
            raise ValueError(f"length {self.length} is too short for common-word extraction; raise the length")
        words = (rng.permutation(VALUES[1] - VALUES[0])[: self.num_common + n_rare] + VALUES[0]).tolist()
        common, rare = words[: self.num_common], words[self.num_common :]
        bag = np.asarray(common * self.common_freq + rare * self.rare_freq)
        ctx = rng.permutation(bag).tolist()
        ctx += rng.integers(*NOISE, n_ctx - len(ctx)).tolist()  # noise pads to the length
        return _example(ctx, [], sorted(common), self.length)

    def solve(self, tokens: np.ndarray) -> list[int]:
        """The most frequent words of the context, sorted by id (the oracle)."""
        tokens = np.asarray(tokens)
        sep = len(tokens) - 1 - int(np.flatnonzero(tokens[::-1] == SEP)[0])
        ctx = tokens[:sep]
        words, counts = np.unique(ctx[(ctx >= VALUES[0]) & (ctx < VALUES[1])], return_counts=True)
        top = words[np.argsort(-counts, kind="stable")[: self.num_common]]
        return sorted(int(w) for w in top)

    def answer_range(self) -> int:
        return VALUES[1] - VALUES[0]


TASKS = {"ruler_niah": MultiKeyNeedle, "ruler_vt": VariableTracking, "ruler_cwe": CommonWords}


def chance(task) -> float:
    """Per-answer-token accuracy of a model guessing uniformly over the answer's token range."""
    return 1.0 / task.answer_range()


def score(task, predict, n: int) -> dict[str, float]:
    """Exact match and answer-token accuracy of `predict(prompt tokens) -> answer tokens` on n examples.

    The prompt is everything before the answer (context, separator, question).
    """
    exact = correct = total = 0
    for i in range(n):
        ex = task[i]
        k = int(ex["answer_mask"].sum())
        prompt, answer = ex["tokens"][:-k], ex["tokens"][-k:]
        got = np.asarray(predict(prompt))[:k]
        hits = int(np.sum(got == answer)) if len(got) == k else 0
        exact += hits == k
        correct += hits
        total += k
    return {"exact_match": exact / n, "token_accuracy": correct / total}
