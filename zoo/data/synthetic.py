"""Synthetic long-context tasks, byte-level, generated deterministically from (seed, index).

Each task is a Grain random-access source: `len(task)` examples, `task[i]` a dict with
- "tokens": int32 [length + 1] (inputs are tokens[:-1], targets tokens[1:]);
- "loss_mask": float32 [length], 1 where the target counts in the training loss;
- "answer_mask": float32 [length], 1 on the targets that the task's accuracy is measured on.

Tasks:
- `Passkey`: the needle-in-a-haystack test of the Stuffed-Mamba / InfiniteBench template — a
  5-digit key hidden at a chosen depth in repetitive filler text, asked for at the end.
- `AssociativeRecall` (MQAR, Arora et al. 2023): key-value pairs, then queries of some keys.
- `MQAR` (Zoology, Arora et al. 2023, as its generator defines it): key-value pairs first, then
  every key queried once at a power-law distributed position, loss only on the recalled values.
- `SelectiveCopy` (Gu & Dao 2023): data tokens scattered among noise tokens, to be copied in order.
- `PasskeyRecall`: a mixture of the two retrieval tasks above, each example drawn from one of them
  (`zoo compare` trains every model on it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey. "
QUESTION = "What is the passkey? The passkey is "
N_DIGITS = 5


def _bytes(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8).astype(np.int32)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


@dataclasses.dataclass(frozen=True)
class Passkey:
    """Passkey retrieval of `length` tokens; depth in [0, 1] (None = uniform at random).

    Loss on every target (`answer_only=False`) or only on the 5 answer digits; accuracy on the
    answer digits. The full loss teaches the tiny transformer retrieval, but the tiny Mamba-2 and
    MemMamba stay at chance with it and learn retrieval only with `answer_only` (README, Mamba-2).
    """

    length: int
    depth: float | None = None
    seed: int = 0
    answer_only: bool = False
    num_examples: int = 2**31 - 1

    def __post_init__(self):
        need = self.min_length()
        if self.length < need:
            raise ValueError(
                f"passkey length {self.length} is too short; it must be >= {need} (needle + question + answer)"
            )
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"passkey depth {self.depth} must lie in [0, 1]")

    @staticmethod
    def min_length() -> int:
        return len(NEEDLE.format(key="0" * N_DIGITS)) + len(QUESTION) + N_DIGITS + 8

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        key = "".join(str(d) for d in rng.integers(0, 10, N_DIGITS))
        needle, tail = _bytes(NEEDLE.format(key=key)), _bytes(QUESTION + key)
        n_fill = self.length + 1 - len(needle) - len(tail)
        start = int(rng.integers(len(FILLER)))
        reps = n_fill // 12 + len(FILLER)
        filler = _bytes("".join(FILLER[(start + j) % len(FILLER)] for j in range(reps)))[:n_fill]
        depth = rng.uniform() if self.depth is None else self.depth
        # insert at the sentence boundary nearest to the requested depth
        at = int(round(depth * n_fill))
        bounds = np.concatenate([[0], np.flatnonzero(filler == ord(" ")) + 1, [n_fill]])
        bounds = bounds[np.r_[True, filler[np.clip(bounds[1:] - 2, 0, None)] == ord(".")]]
        at = int(bounds[np.argmin(np.abs(bounds - at))])
        tokens = np.concatenate([filler[:at], needle, filler[at:], tail]).astype(np.int32)
        answer = np.zeros(self.length, np.float32)
        answer[-N_DIGITS:] = 1.0
        loss = answer.copy() if self.answer_only else np.ones(self.length, np.float32)
        return {"tokens": tokens, "loss_mask": loss, "answer_mask": answer}


@dataclasses.dataclass(frozen=True)
class AssociativeRecall:
    """Multi-query associative recall: `num_pairs` key/value pairs, then `num_queries` keys to recall.

    Keys are bytes 128..191 (distinct within an example), values 192..255, noise 1..127 pads the
    pairs section to `length`. Loss and accuracy on the recalled values.
    """

    length: int
    num_pairs: int = 8
    num_queries: int = 4
    seed: int = 0
    num_examples: int = 2**31 - 1

    def __post_init__(self):
        if not 1 <= self.num_queries <= self.num_pairs <= 64:
            raise ValueError(f"need 1 <= num_queries ({self.num_queries}) <= num_pairs ({self.num_pairs}) <= 64")
        need = 2 * self.num_pairs + 2 * self.num_queries
        if self.length + 1 < need:
            raise ValueError(f"recall length {self.length} is too short; it must be >= {need - 1}")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        keys = rng.choice(64, self.num_pairs, replace=False) + 128
        values = rng.integers(0, 64, self.num_pairs) + 192
        pairs = np.stack([keys, values], 1).reshape(-1)
        q = rng.choice(self.num_pairs, self.num_queries, replace=False)
        queries = np.stack([keys[q], values[q]], 1).reshape(-1)
        noise = rng.integers(1, 128, self.length + 1 - len(pairs) - len(queries))
        tokens = np.concatenate([pairs, noise, queries]).astype(np.int32)
        answer = np.zeros(self.length, np.float32)
        answer[self.length - len(queries) + 1 :: 2] = 1.0  # targets that are the queried values
        return {"tokens": tokens, "loss_mask": answer.copy(), "answer_mask": answer}


@dataclasses.dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall as Zoology (Arora et al. 2023, Section 3) generates it.

    `num_pairs` key-value pairs fill the first 2 * num_pairs tokens; every key is then queried once,
    at position 2 * num_pairs + 2 g for a gap g drawn (without replacement) from a power law
    p(g) ~ a * (g + 1)^(a - 1) over g in [0, (length - 2 * num_pairs) // 2), so most queries come soon
    after the pairs and some far from them. The target at a query is its key's value; every other
    position is a random token and has no loss. Keys are tokens [1, vocab/2), values
    [vocab/2, vocab), distinct keys and distinct values within an example (Zoology's split of the
    vocabulary). The value also appears as the input after its query (the sequence is one stream of
    tokens here); keys are queried once, so no later query can use it.
    """

    length: int
    num_pairs: int = 4
    power_a: float = 0.01
    vocab_size: int = 256
    seed: int = 0
    num_examples: int = 2**31 - 1

    def __post_init__(self):
        half = self.vocab_size // 2
        if not 1 <= self.num_pairs <= half - 1:
            raise ValueError(
                f"MQAR num_pairs {self.num_pairs} must lie in [1, {half - 1}] (vocab_size {self.vocab_size})"
            )
        if (self.length - 2 * self.num_pairs) // 2 < self.num_pairs:
            raise ValueError(
                f"MQAR length {self.length} is too short for {self.num_pairs} pairs; it must be >= {4 * self.num_pairs}"
            )
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"MQAR power_a {self.power_a} must lie in (0, 1]")

    def __len__(self) -> int:
        return self.num_examples

    def gap_probabilities(self) -> np.ndarray:
        """p(g) for the query gaps g = 0 .. space - 1 (the power law, normalised)."""
        space = (self.length - 2 * self.num_pairs) // 2
        p = self.power_a * np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1.0)
        return p / p.sum()

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        half, n = self.vocab_size // 2, self.num_pairs
        keys = rng.choice(np.arange(1, half), n, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), n, replace=False)
        tokens = rng.integers(0, self.vocab_size, self.length + 1)
        tokens[0 : 2 * n : 2], tokens[1 : 2 * n : 2] = keys, values
        p = self.gap_probabilities()
        at = 2 * n + 2 * rng.choice(len(p), n, replace=False, p=p)  # query positions (the key)
        tokens[at], tokens[at + 1] = keys, values
        answer = np.zeros(self.length, np.float32)
        answer[at] = 1.0  # the target at a query position is its value
        return {"tokens": tokens.astype(np.int32), "loss_mask": answer.copy(), "answer_mask": answer}


@dataclasses.dataclass(frozen=True)
class SelectiveCopy:
    """Selective copying: `num_data` data tokens (bytes 16..255) at random positions among noise
    (byte 1), a separator (byte 2), then the data tokens in order. Loss and accuracy on the copy."""

    length: int
    num_data: int = 8
    seed: int = 0
    num_examples: int = 2**31 - 1

    def __post_init__(self):
        if self.length + 1 < 2 * self.num_data + 2:
            raise ValueError(f"selective-copy length {self.length} must be >= {2 * self.num_data + 1}")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = _rng(self.seed, index)
        n_ctx = self.length + 1 - self.num_data - 1
        data = rng.integers(16, 256, self.num_data)
        ctx = np.ones(n_ctx, np.int64)
        ctx[np.sort(rng.choice(n_ctx, self.num_data, replace=False))] = data
        tokens = np.concatenate([ctx, [2], data]).astype(np.int32)
        answer = np.zeros(self.length, np.float32)
        answer[-self.num_data :] = 1.0
        return {"tokens": tokens, "loss_mask": answer.copy(), "answer_mask": answer}


@dataclasses.dataclass(frozen=True)
class PasskeyRecall:
    """A mixture of `Passkey` and `AssociativeRecall` examples of `length` tokens.

    Example i is recall with probability `recall_fraction` (drawn from (seed, i) on a stream of its
    own), else passkey; either way it is exactly the component task's example i, so a model's scores
    on the pure tasks measure what the mixture taught. Both are byte-level and disjoint in their
    answer bytes (passkey digits are ASCII 48..57, recall values 192..255). Masks are the
    component's: passkey loss on every target (or on the digits with `answer_only`), recall loss on
    the recalled values.
    """

    length: int
    seed: int = 0
    answer_only: bool = False
    num_pairs: int = 8
    num_queries: int = 4
    recall_fraction: float = 0.5
    num_examples: int = 2**31 - 1

    def __post_init__(self):
        if not 0.0 <= self.recall_fraction <= 1.0:
            raise ValueError(f"recall_fraction {self.recall_fraction} must lie in [0, 1]")
        # the components check the length (passkey needs the longer sequence) and the recall sizes
        Passkey(self.length)
        AssociativeRecall(self.length, self.num_pairs, self.num_queries)

    def __len__(self) -> int:
        return self.num_examples

    def is_recall(self, index: int) -> bool:
        """Whether example `index` is an associative-recall example (else passkey)."""
        return bool(np.random.default_rng([self.seed, index, 1]).uniform() < self.recall_fraction)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self.is_recall(index):
            return AssociativeRecall(self.length, self.num_pairs, self.num_queries, seed=self.seed)[index]
        return Passkey(self.length, seed=self.seed, answer_only=self.answer_only)[index]


TASKS = {
    "passkey": Passkey,
    "recall": AssociativeRecall,
    "mqar": MQAR,
    "selective_copy": SelectiveCopy,
    "passkey_recall": PasskeyRecall,
}
