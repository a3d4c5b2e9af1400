"""LRA ListOps, generated locally from its public grammar (Nangia & Bowman 2018; Tay et al. 2021).

An expression is a digit 0-9 or `[OP e1 ... ek ]` with OP one of
    MIN, MAX   the minimum / maximum of the arguments,
    MED        the median, floor((a + b) / 2) of the two middle values when k is even,
    SM         the sum modulo 10,
nested up to `max_depth`; the label is the value, 0-9 (10 classes). Example:
    [MAX 2 9 [MIN 4 7 ] 0 ]  ->  9

Tokens (vocabulary of 16): 0 = padding, 1..10 = digits 0..9, 11..14 = `[MIN [MAX [MED [SM`, 15 = `]`.
`ListOpsSource` is random-access and deterministic in (seed, index), so it can feed a Grain
`MapDataset` directly. LRA's setting is max_length 2000, depth 10, up to 10 arguments; the defaults
here are small for CPU runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

OPERATORS = ("MIN", "MAX", "MED", "SM")
VOCAB = ("<pad>", *[str(d) for d in range(10)], *[f"[{op}" for op in OPERATORS], "]")
PAD_ID = 0
CLOSE_ID = len(VOCAB) - 1
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10

Tree = int | tuple  # a digit, or (operator, [children])


def evaluate(tree: Tree) -> int:
    """The value (0-9) of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = sorted(evaluate(a) for a in args)
    if op == "MIN":
        return vals[0]
    if op == "MAX":
        return vals[-1]
    if op == "SM":
        return sum(vals) % 10
    mid = len(vals) // 2  # MED
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) // 2


def encode(tree: Tree) -> list[int]:
    """Token ids of an expression (without padding)."""
    if isinstance(tree, int):
        return [1 + tree]
    op, args = tree
    out = [1 + 10 + OPERATORS.index(op)]
    for a in args:
        out.extend(encode(a))
    return out + [CLOSE_ID]


def to_string(tree: Tree) -> str:
    """The expression in the dataset's text form, e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]`."""
    return " ".join(VOCAB[t] for t in encode(tree))


def sample_expression(rng: np.random.Generator, max_depth: int, max_args: int, leaf_prob: float) -> Tree:
    """A random expression: at depth < max_depth a node is an operator with prob 1 - leaf_prob
    (always at the root) with 2..max_args arguments; otherwise a digit."""

    def node(depth: int) -> Tree:
        if depth > 0 and (depth >= max_depth or rng.random() < leaf_prob):
            return int(rng.integers(10))
        op = OPERATORS[int(rng.integers(len(OPERATORS)))]
        return op, [node(depth + 1) for _ in range(int(rng.integers(2, max_args + 1)))]

    return node(0)


@dataclasses.dataclass(frozen=True)
class ListOpsSource:
    """Random-access ListOps examples: `source[i] -> {"tokens": int32 [max_length], "mask": bool
    [max_length], "label": int32}`, deterministic in (seed, i). Expressions longer than max_length
    are resampled."""

    num_examples: int
    seed: int = 0
    max_length: int = 128
    max_depth: int = 4
    max_args: int = 5
    leaf_prob: float = 0.6

    def __post_init__(self):
        if self.num_examples < 1:
            raise ValueError(f"num_examples={self.num_examples} must be >= 1")
        if self.max_depth < 1 or self.max_args < 2:
            raise ValueError(f"need max_depth >= 1 and max_args >= 2; got {self.max_depth}, {self.max_args}")
        if self.max_length < 2 + 2:
            raise ValueError(f"max_length={self.max_length} is too short for `[OP a b ]`; use >= 4")

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng([self.seed, index])
        while True:
            tree = sample_expression(rng, self.max_depth, self.max_args, self.leaf_prob)
            ids = encode(tree)
            if len(ids) <= self.max_length:
                break
        tokens = np.full(self.max_length, PAD_ID, np.int32)
        tokens[: len(ids)] = ids
        return {"tokens": tokens, "mask": tokens != PAD_ID, "label": np.int32(evaluate(tree))}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All examples stacked: (tokens int32 [n, max_length], mask bool [n, max_length], labels [n])."""
        items = [self[i] for i in range(self.num_examples)]
        return (
            np.stack([x["tokens"] for x in items]),
            np.stack([x["mask"] for x in items]),
            np.array([x["label"] for x in items], np.int32),
        )
