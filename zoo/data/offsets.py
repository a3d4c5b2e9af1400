"""Document offsets without materialising them: block prefix sums, lengths, partial reads.

Three lazy layouts need "which document holds item ``i``" over counts that are a function of the
document lengths: the concat-and-chunk stream (document ``d`` takes ``len_d + 1`` stream positions,
its tokens then EOS), the packing pieces (``ceil(len_d / seq_len)`` pieces per document), and the
shard records (``ceil(len_d / record_tokens)`` records per document). :class:`BlockCumsum` keeps
one int64 prefix sum per block of ``block`` documents (computed by one streaming pass over the
lengths, which may be a read-only memory map) and resolves the rest inside one block on demand.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class BlockCumsum:
    """Prefix sums of ``weight(lengths)`` kept per block; ``locate``/``start`` read one block.

    Args:
        lengths: int array-like ``[D]`` (a ``np.load(..., mmap_mode="r")`` array is never loaded whole).
        weight: maps an int64 chunk of lengths to the non-negative int64 count of each document.
        block: documents per stored prefix sum.
    """

    def __init__(self, lengths, weight: Callable[[np.ndarray], np.ndarray], block: int = 4096):
        self.lengths, self.weight, self.block = lengths, weight, int(block)
        n = len(lengths)
        starts = np.zeros(-(-n // self.block) + 1, np.int64)  # [blocks + 1]
        for b in range(len(starts) - 1):
            starts[b + 1] = starts[b] + int(self._weights(b).sum())
        self.block_starts = starts
        self.total = int(starts[-1])
        self.size = n

    def _weights(self, b: int) -> np.ndarray:
        chunk = np.asarray(self.lengths[b * self.block : (b + 1) * self.block], np.int64)  # [<= block]
        return np.asarray(self.weight(chunk), np.int64)

    def __len__(self) -> int:
        return self.size

    def start(self, d: int) -> int:
        """Sum of the counts of documents ``0 .. d-1``."""
        if not 0 <= d <= self.size:
            raise IndexError(f"document {d} is out of range [0, {self.size}]")
        b, j = divmod(int(d), self.block)
        if j == 0:
            return int(self.block_starts[b])
        return int(self.block_starts[b] + self._weights(b)[:j].sum())

    def locate(self, i: int) -> tuple[int, int]:
        """``(d, offset)``: item ``i`` of the concatenation is item ``offset`` of document ``d``."""
        if not 0 <= i < self.total:
            raise IndexError(f"item {i} is out of range [0, {self.total})")
        b = int(np.searchsorted(self.block_starts, i, side="right")) - 1
        ends = self.block_starts[b] + np.cumsum(self._weights(b))  # [<= block] exclusive ends
        j = int(np.searchsorted(ends, i, side="right"))
        begin = int(ends[j - 1]) if j else int(self.block_starts[b])
        return b * self.block + j, int(i) - begin


def document_lengths(docs) -> np.ndarray:
    """The int64 length index ``[D]`` of a document collection: ``docs.lengths`` when it has one
    (shards: a read-only memory map), else measured by reading every document once."""
    lengths = getattr(docs, "lengths", None)
    if lengths is not None:
        return lengths
    return np.fromiter((len(docs[d]) for d in range(len(docs))), np.int64, len(docs))


def read_tokens(docs, d: int, start: int, stop: int) -> np.ndarray:
    """Tokens ``start:stop`` of document ``d`` as int32; through ``docs.read`` when the collection
    can read part of a document (shards read only the records that hold the range)."""
    read = getattr(docs, "read", None)
    if read is not None:
        return read(d, start, stop)
    return np.asarray(docs[d], np.int32)[start:stop]
