"""Dataset decomposition into power-of-two length buckets (Pouransari et al., 2024, arXiv 2405.13226).

Every document (a 1-D token array) is cut into disjoint pieces of ``2^k + 1`` tokens, ``k`` in
``[min_log2, max_log2]`` (the ``+1`` is the shifted target: inputs ``piece[:-1]``, targets
``piece[1:]``, both ``2^k`` long). Pieces never cross a document boundary, so a batch of one bucket
needs neither packing masks nor cross-document attention. Each bucket ``D_k`` is trained with its
own batch size ``B_k = tokens_per_step / 2^k`` so that every step sees the same number of tokens and
the optimizer / learning-rate schedule are shape agnostic; the attention cost of a step in bucket
``k`` is ``sum_len len^2 = B_k 4^k = tokens_per_step 2^k`` (paper Sec. 3, "cost proportional to
actual document lengths").

The module is numpy only (no JAX, no Grain). Layers, from the bottom:

* :func:`decompose_length` / :func:`decompose`: the per-document rule (a port, written from the
  definition, of ``get_binary`` in ``make_dd_buckets.py``): largest power of two first; a remainder
  shorter than ``2^min_log2 + 1`` is dropped; while the remainder still holds at least
  ``2^(max_log2+1) + 1`` tokens and an RNG is given, ``k`` is drawn with ``P(k) ∝ 2^-k`` so that every
  bucket receives equal expected token mass from long documents.
* :class:`BucketIndex`: piece locations ``(doc_id, start)`` per bucket as int64 arrays (no token
  copies) over an indexable source of documents; ``get(k, i)`` reads one piece through the source.
* :mod:`zoo.data.schedule` (its own module): which bucket each step trains on and the pieces of
  its batch.
* :func:`concat_and_chunk`: the concat-and-chunk baseline; :func:`decomposition_stats` and
  :func:`format_stats`: tokens and pieces per bucket, dropped tokens and the attention cost saving
  versus concat-and-chunk at the same maximum length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from zoo.data.schedule import BucketSchedule

__all__ = [
    "BucketIndex",
    "BucketStats",
    "DecompositionStats",
    "bucket_probabilities",
    "concat_and_chunk",
    "decompose",
    "decompose_length",
    "decomposition_stats",
    "document_rng",
    "format_stats",
]

_MAX_LOG2_LIMIT = 40  # 2^40 tokens per piece is far beyond any context length; keeps int64 safe.
_DRAW_CHUNK_LIMIT = 1 << 20  # Random-phase draws are made in chunks of at most this many.


def check_int(name: str, value: Any, minimum: int) -> int:
    """Returns ``int(value)``; raises ValueError unless it is an int (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}.")
    return int(value)


def _check_log2_range(min_log2: int, max_log2: int) -> None:
    """Raises ValueError unless ``0 <= min_log2 <= max_log2 <= 40`` are ints."""
    for name, value in (("min_log2", min_log2), ("max_log2", max_log2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name}={value!r} must be an int (log2 of a piece length, e.g. 8 for 256).")
        if not 0 <= value <= _MAX_LOG2_LIMIT:
            raise ValueError(f"{name}={value} is outside [0, {_MAX_LOG2_LIMIT}]; pick a log2 length in that range.")
    if min_log2 > max_log2:
        raise ValueError(f"min_log2={min_log2} > max_log2={max_log2}; swap them or set min_log2 <= max_log2.")


def bucket_probabilities(min_log2: int, max_log2: int) -> np.ndarray:
    """Probabilities ``P(k) ∝ 2^-k`` for ``k = min_log2 .. max_log2`` (ascending).

    A piece of bucket ``k`` carries ``2^k`` training tokens, so ``P(k) 2^k`` is the same for every
    ``k``: each bucket receives equal expected token mass from the randomised cuts.

    Returns:
        float64 array of length ``max_log2 - min_log2 + 1`` summing to 1.
    """
    _check_log2_range(min_log2, max_log2)
    w = np.exp2(-np.arange(min_log2, max_log2 + 1, dtype=np.float64))  # [K]
    return w / w.sum()


def document_rng(seed: int, doc_id: int) -> np.random.Generator:
    """The RNG :class:`BucketIndex` uses for document ``doc_id``: ``default_rng([seed, doc_id])``.

    One independent stream per document makes the decomposition of a document independent of the
    order in which documents are processed (an index can be built in parallel or in shards).
    """
    return np.random.default_rng([int(seed), int(doc_id)])


def _draw_table(min_log2: int, max_log2: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(ks [K], cdf of P(k) ∝ 2^-k [K], mean piece size, long-document threshold 2^(max+1)+1)."""
    ks_all = np.arange(min_log2, max_log2 + 1, dtype=np.int64)  # [K]
    p = bucket_probabilities(min_log2, max_log2)  # [K]
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    return ks_all, cdf, float(np.sum(p * (np.exp2(ks_all) + 1))), (1 << (max_log2 + 1)) + 1


def _random_phase(
    length: int, rng: np.random.Generator, table: tuple[np.ndarray, np.ndarray, float, int]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Randomised cuts of a long document: returns (starts, ks, consumed tokens).

    While the remainder ``R >= 2^(max_log2+1) + 1`` (i.e. ``floor(log2(R-1)) > max_log2``) the piece
    length is ``2^k + 1`` with ``k ~ P(k) ∝ 2^-k``. Draws are made in vectorised chunks by inverse
    CDF; the number of values taken from ``rng`` is a deterministic function of the draws.
    """
    ks_all, cdf, mean_size, threshold = table
    starts, ks, pos, remaining = [], [], 0, length
    while remaining >= threshold:
        # Draw enough k's to (very likely) cover the rest of the random phase in one chunk.
        n = min(int(1.1 * (remaining - threshold + 1) / mean_size) + 16, _DRAW_CHUNK_LIMIT)
        k = ks_all[np.searchsorted(cdf, rng.random(n), side="right").clip(max=len(ks_all) - 1)]  # [n]
        size = (np.int64(1) << k) + 1  # [n]
        before = np.cumsum(size) - size  # tokens consumed before draw i
        # The phase continues while the remainder before the cut is still >= threshold (monotone).
        m = int(np.count_nonzero(remaining - before >= threshold))
        starts.append(pos + before[:m])
        ks.append(k[:m])
        consumed = int(before[m - 1] + size[m - 1])
        pos += consumed
        remaining -= consumed
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    if len(starts) == 1:
        return starts[0], ks[0], pos
    return np.concatenate(starts), np.concatenate(ks), pos


def _binary_phase(
    offsets: np.ndarray, remaining: np.ndarray, min_log2: int, max_log2: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic binary decomposition of many remainders at once.

    Document ``d`` has ``remaining[d]`` tokens left starting at ``offsets[d]``. Greedy rule: take the
    largest ``k <= max_log2`` with ``2^k + 1 <= R``. First ``R // (2^max+1)`` pieces of ``k = max``;
    after that ``R < 2^max + 1`` and every smaller ``k`` is taken at most once, in descending order
    (after a cut of ``k`` the remainder is ``< 2^k``).

    Returns:
        (doc positions into ``offsets`` [P], starts [P], ks [P], dropped per document [D]).
    """
    offsets = offsets.astype(np.int64, copy=True)  # [D]
    remaining = remaining.astype(np.int64, copy=True)  # [D]
    docs, starts, ks = [], [], []
    # Full-length pieces of the largest bucket.
    size_max = (1 << max_log2) + 1
    n_max = remaining // size_max  # [D]
    total = int(n_max.sum())
    if total:
        owner = np.repeat(np.arange(len(remaining), dtype=np.int64), n_max)  # [P_max]
        first = np.cumsum(n_max) - n_max  # index of each document's first max piece
        within = np.arange(total, dtype=np.int64) - np.repeat(first, n_max)  # [P_max]
        docs.append(owner)
        starts.append(offsets[owner] + within * size_max)
        ks.append(np.full(total, max_log2, np.int64))
    offsets += n_max * size_max
    remaining -= n_max * size_max
    # One piece per smaller power of two at most, largest first.
    for k in range(max_log2 - 1, min_log2 - 1, -1):
        size = (1 << k) + 1
        take = np.flatnonzero(remaining >= size)  # [P_k]
        docs.append(take)
        starts.append(offsets[take].copy())
        ks.append(np.full(len(take), k, np.int64))
        offsets[take] += size
        remaining[take] -= size
    # The rest (< 2^min_log2 + 1 tokens) is dropped.
    if docs:
        return np.concatenate(docs), np.concatenate(starts), np.concatenate(ks), remaining
    empty = np.zeros(0, np.int64)
    return empty, empty, empty, remaining


def decompose_length(
    length: int,
    *,
    min_log2: int,
    max_log2: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Decomposes a document of ``length`` tokens into piece locations (no tokens needed).

    Args:
        length: number of tokens in the document (>= 0).
        min_log2: log2 of the shortest piece (pieces hold ``2^k + 1`` tokens).
        max_log2: log2 of the longest piece.
        rng: if given, while the remainder holds at least ``2^(max_log2+1) + 1`` tokens the piece's
            ``k`` is drawn with ``P(k) ∝ 2^-k`` over ``[min_log2, max_log2]`` (equal expected token
            mass per bucket, as ``get_binary(randomize=True)``); ``None``: ``k = max_log2`` there.

    Returns:
        ``(starts, ks, dropped)``: int64 arrays of the pieces' first token and log2 length, in
        document order (disjoint, contiguous), and the number of trailing tokens dropped
        (``< 2^min_log2 + 1``).
    """
    _check_log2_range(min_log2, max_log2)
    length = int(length)
    if length < 0:
        raise ValueError(f"length={length} must be >= 0 (a token count).")
    if rng is not None:
        starts_r, ks_r, pos = _random_phase(length, rng, _draw_table(min_log2, max_log2))
    else:
        starts_r, ks_r, pos = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    _, starts_b, ks_b, dropped = _binary_phase(
        np.array([pos], np.int64), np.array([length - pos], np.int64), min_log2, max_log2
    )
    order = np.argsort(starts_b, kind="stable")  # binary phase emits by k; restore document order
    return (
        np.concatenate([starts_r, starts_b[order]]),
        np.concatenate([ks_r, ks_b[order]]),
        int(dropped[0]),
    )


def decompose(
    doc: np.ndarray,
    *,
    min_log2: int,
    max_log2: int,
    rng: np.random.Generator | None = None,
) -> tuple[list[np.ndarray], int]:
    """Cuts one document into pieces of ``2^k + 1`` tokens (views of ``doc``, no copies).

    Args:
        doc: 1-D token array.
        min_log2, max_log2, rng: as in :func:`decompose_length`.

    Returns:
        ``(pieces, dropped)``: the pieces in document order (largest power of two first in the
        deterministic part; pieces are disjoint and contiguous from token 0) and the number of
        trailing tokens dropped.
    """
    doc = np.asarray(doc)
    if doc.ndim != 1:
        raise ValueError(f"doc has shape {doc.shape}; pass a 1-D token array (one document).")
    starts, ks, dropped = decompose_length(len(doc), min_log2=min_log2, max_log2=max_log2, rng=rng)
    return [doc[s : s + (1 << int(k)) + 1] for s, k in zip(starts, ks)], dropped


def _as_tokens(doc: Any) -> np.ndarray:
    """A source element as a 1-D array (accepts arrays, lists, or dicts with a "tokens" entry)."""
    if isinstance(doc, Mapping):
        doc = doc["tokens"]
    arr = np.asarray(doc)
    if arr.ndim != 1:
        raise ValueError(f"source element has shape {arr.shape}; each document must be a 1-D token array.")
    return arr


class BucketIndex:
    """Piece locations of a decomposed corpus, one pair of int64 arrays per bucket.

    Bucket ``k`` stores ``doc_ids[k]`` and ``starts[k]`` (sorted by document, then start): piece ``i``
    is ``source[doc_ids[k][i]][starts[k][i] : starts[k][i] + 2^k + 1]``. Only locations are kept
    (16 bytes per piece), never tokens, so it scales to corpora that do not fit in memory. The
    index is a deterministic function of the document lengths, ``(min_log2, max_log2)`` and
    ``seed`` (document ``d`` uses :func:`document_rng` ``(seed, d)``; ``seed=None``: deterministic
    binary decomposition), so every host can build the same index independently.

    Build with :meth:`build` (reads every document's length through the source) or
    :meth:`from_lengths` (lengths known, e.g. from a dataset's metadata).
    """

    def __init__(
        self,
        *,
        min_log2: int,
        max_log2: int,
        seed: int | None,
        doc_ids: Mapping[int, np.ndarray],
        starts: Mapping[int, np.ndarray],
        num_documents: int,
        total_tokens: int,
        dropped_tokens: int,
        source: Any = None,
    ):
        """Stores prebuilt arrays; prefer :meth:`build` or :meth:`from_lengths`."""
        _check_log2_range(min_log2, max_log2)
        self.min_log2, self.max_log2, self.seed = int(min_log2), int(max_log2), seed
        self.ks = tuple(range(self.min_log2, self.max_log2 + 1))
        self._doc_ids = {k: np.asarray(doc_ids[k], np.int64) for k in self.ks}
        self._starts = {k: np.asarray(starts[k], np.int64) for k in self.ks}
        self.num_documents = int(num_documents)
        self.total_tokens = int(total_tokens)
        self.dropped_tokens = int(dropped_tokens)
        self.source = source

    @classmethod
    def from_lengths(
        cls,
        lengths: Sequence[int] | np.ndarray,
        *,
        min_log2: int,
        max_log2: int,
        seed: int | None = 0,
        source: Any = None,
        chunk_documents: int = 1 << 20,
    ) -> BucketIndex:
        """Builds the index from document lengths (``lengths[d]`` = tokens of document ``d``).

        Args:
            lengths: token count of every document.
            min_log2, max_log2: bucket range.
            seed: seed of the randomised cuts of long documents; ``None`` for the deterministic
                binary decomposition (``k = max_log2`` while the document is long).
            source: indexable documents (``source[d]`` a 1-D token array) for :meth:`get`; may be
                ``None`` for statistics only.
            chunk_documents: documents processed per vectorised chunk (bounds temporary memory).
        """
        _check_log2_range(min_log2, max_log2)
        if seed is not None:
            seed = check_int("seed (None: deterministic decomposition)", seed, 0)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)  # [D]
        if lengths.size and lengths.min() < 0:
            raise ValueError("lengths contains a negative token count; lengths must be >= 0.")
        table = _draw_table(min_log2, max_log2)
        docs_parts, starts_parts, ks_parts = [], [], []
        dropped_total = 0
        for lo in range(0, len(lengths), chunk_documents):
            chunk = lengths[lo : lo + chunk_documents]  # [C]
            offsets = np.zeros(len(chunk), np.int64)
            # Randomised cuts for long documents, one RNG stream per document.
            if seed is not None:
                for j in np.flatnonzero(chunk >= table[3]):
                    st, kk, offsets[j] = _random_phase(int(chunk[j]), document_rng(seed, lo + j), table)
                    docs_parts.append(np.full(len(st), lo + j, np.int64))
                    starts_parts.append(st)
                    ks_parts.append(kk)
            # Binary decomposition of every remainder, vectorised over the chunk.
            owner, st, kk, dropped = _binary_phase(offsets, chunk - offsets, min_log2, max_log2)
            dropped_total += int(dropped.sum())
            docs_parts.append(owner + lo)
            starts_parts.append(st)
            ks_parts.append(kk)
        all_docs = np.concatenate(docs_parts) if docs_parts else np.zeros(0, np.int64)
        all_starts = np.concatenate(starts_parts) if starts_parts else np.zeros(0, np.int64)
        all_ks = np.concatenate(ks_parts) if ks_parts else np.zeros(0, np.int64)
        # Group by bucket, then sort by document and start within each bucket.
        order = np.lexsort((all_starts, all_docs, all_ks))
        all_docs, all_starts, all_ks = all_docs[order], all_starts[order], all_ks[order]
        bounds = np.searchsorted(all_ks, np.arange(min_log2, max_log2 + 2))
        doc_ids = {k: all_docs[bounds[i] : bounds[i + 1]] for i, k in enumerate(range(min_log2, max_log2 + 1))}
        starts = {k: all_starts[bounds[i] : bounds[i + 1]] for i, k in enumerate(range(min_log2, max_log2 + 1))}
        return cls(
            min_log2=min_log2,
            max_log2=max_log2,
            seed=seed,
            doc_ids=doc_ids,
            starts=starts,
            num_documents=len(lengths),
            total_tokens=int(lengths.sum()),
            dropped_tokens=dropped_total,
            source=source,
        )

    @classmethod
    def build(cls, source: Any, *, min_log2: int, max_log2: int, seed: int | None = 0) -> BucketIndex:
        """Builds the index over ``source`` (``len(source)`` documents, ``source[d]`` 1-D tokens).

        Reads every document once for its length; use :meth:`from_lengths` when lengths are known.
        """
        lengths = np.fromiter((len(_as_tokens(source[d])) for d in range(len(source))), np.int64, len(source))
        return cls.from_lengths(lengths, min_log2=min_log2, max_log2=max_log2, seed=seed, source=source)

    def _check_k(self, k: int) -> int:
        if int(k) not in self._doc_ids:
            raise ValueError(f"k={k} is not a bucket of this index; use one of {self.ks}.")
        return int(k)

    def locations(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(doc_ids, starts)`` int64 arrays of bucket ``k`` (read-only views)."""
        k = self._check_k(k)
        d, s = self._doc_ids[k].view(), self._starts[k].view()
        d.flags.writeable = s.flags.writeable = False
        return d, s

    def num_pieces(self, k: int) -> int:
        """Number of pieces in bucket ``k``."""
        return len(self._doc_ids[self._check_k(k)])

    def pieces_per_bucket(self) -> dict[int, int]:
        """``{k: number of pieces}``."""
        return {k: len(self._doc_ids[k]) for k in self.ks}

    def tokens_per_bucket(self) -> dict[int, int]:
        """``{k: pieces * (2^k + 1)}``: tokens stored in each bucket (the availability of tokens)."""
        return {k: len(self._doc_ids[k]) * ((1 << k) + 1) for k in self.ks}

    def get(self, k: int, i: int) -> np.ndarray:
        """Tokens of piece ``i`` of bucket ``k``: a ``2^k + 1`` long 1-D array read from the source."""
        k = self._check_k(k)
        n = len(self._doc_ids[k])
        if not -n <= int(i) < n:
            raise ValueError(f"i={i} is out of range for bucket k={k} with {n} pieces; use 0 <= i < {n}.")
        if self.source is None:
            raise ValueError("this index has no source; pass source= to BucketIndex.build/from_lengths to read tokens.")
        start, doc = int(self._starts[k][i]), int(self._doc_ids[k][i])
        read = getattr(self.source, "read", None)  # shards read only the records that hold the piece
        if read is not None:
            piece = read(doc, start, start + (1 << k) + 1)
        else:
            piece = _as_tokens(self.source[doc])[start : start + (1 << k) + 1]
        if len(piece) != (1 << k) + 1:
            raise ValueError(
                f"document {doc} is shorter than the index says; rebuild the index from this source (lengths changed)."
            )
        return piece

    def get_batch(self, k: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stacks pieces ``indices`` of bucket ``k`` into a ``[len(indices), 2^k + 1]`` array."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) == 0:
            return np.zeros((0, (1 << self._check_k(k)) + 1), np.int32)
        return np.stack([self.get(k, int(i)) for i in indices])


def concat_and_chunk(docs: Iterable[np.ndarray], seq_len: int) -> tuple[np.ndarray, int]:
    """The concat-and-chunk baseline: concatenate documents, cut rows of ``seq_len + 1`` tokens.

    Rows cross document boundaries (the cross-document attention decomposition avoids).

    Returns:
        ``(rows [N, seq_len + 1], dropped)``: the rows (inputs ``row[:-1]``, targets ``row[1:]``)
        and the number of trailing tokens that do not fill a row.
    """
    seq_len = check_int("seq_len", seq_len, 1)
    arrays = [_as_tokens(d) for d in docs]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    n = len(flat) // (seq_len + 1)
    return flat[: n * (seq_len + 1)].reshape(n, seq_len + 1), len(flat) - n * (seq_len + 1)


@dataclasses.dataclass(frozen=True)
class BucketStats:
    """One bucket's row of :class:`DecompositionStats`."""

    k: int
    length: int  # 2^k input tokens per piece
    pieces: int
    tokens: int  # pieces * (2^k + 1)
    step_share: float  # fraction of steps in this bucket
    batch_size: int  # tokens_per_step / 2^k
    attention_ratio: float  # sum len^2 per step vs concat-and-chunk at 2^max_log2: 2^k / 2^max


@dataclasses.dataclass(frozen=True)
class DecompositionStats:
    """Corpus statistics of a decomposition and its attention cost vs concat-and-chunk."""

    buckets: tuple[BucketStats, ...]
    documents: int
    total_tokens: int
    dropped_tokens: int
    max_len: int
    tokens_per_step: int
    cc_rows: int  # concat-and-chunk rows of max_len + 1 over the same tokens
    cc_dropped_tokens: int
    attention_cost_dd: float  # mean sum of len^2 per step
    attention_cost_cc: float  # sum of len^2 per concat-and-chunk step

    @property
    def attention_ratio(self) -> float:
        """Decomposition / concat-and-chunk attention cost per step (< 1 is a saving)."""
        return self.attention_cost_dd / self.attention_cost_cc

    @property
    def attention_saving(self) -> float:
        """``1 - attention_ratio``."""
        return 1.0 - self.attention_ratio


def decomposition_stats(
    index: BucketIndex, *, tokens_per_step: int | None = None, schedule: BucketSchedule | None = None
) -> DecompositionStats:
    """Tokens and pieces per bucket, dropped tokens and attention cost vs concat-and-chunk.

    A step of bucket ``k`` costs ``sum len^2 = B_k 4^k = tokens_per_step 2^k``; a concat-and-chunk step
    at the same maximum length ``2^max_log2`` costs ``tokens_per_step 2^max_log2``. The decomposition's
    cost is averaged over steps with the schedule's cycle composition (``schedule``) or, by default,
    with each bucket used in proportion to its tokens (one pass over the data).

    Args:
        index: the decomposed corpus.
        tokens_per_step: input tokens per step (default ``2^max_log2``; the ratio does not depend on it).
        schedule: optional schedule whose cycle composition gives the step shares.
    """
    t = (1 << index.max_log2) if tokens_per_step is None else int(tokens_per_step)
    if schedule is not None:
        t = schedule.tokens_per_step
        shares = {k: schedule.steps_per_cycle.get(k, 0) / schedule.cycle_steps for k in index.ks}
    else:
        train = {k: index.num_pieces(k) << k for k in index.ks}
        total_train = sum(train.values())
        shares = {k: (train[k] / total_train if total_train else 0.0) for k in index.ks}
    max_len = 1 << index.max_log2
    rows = [
        BucketStats(
            k=k,
            length=1 << k,
            pieces=index.num_pieces(k),
            tokens=index.tokens_per_bucket()[k],
            step_share=shares[k],
            batch_size=t >> k if t % (1 << k) == 0 else 0,
            attention_ratio=(1 << k) / max_len,
        )
        for k in index.ks
    ]
    cost_dd = float(sum(shares[k] * t * (1 << k) for k in index.ks))
    cc_rows, cc_dropped = divmod(index.total_tokens, max_len + 1)
    return DecompositionStats(
        buckets=tuple(rows),
        documents=index.num_documents,
        total_tokens=index.total_tokens,
        dropped_tokens=index.dropped_tokens,
        max_len=max_len,
        tokens_per_step=t,
        cc_rows=cc_rows,
        cc_dropped_tokens=cc_dropped,
        attention_cost_dd=cost_dd,
        attention_cost_cc=float(t) * max_len,
    )


def format_stats(stats: DecompositionStats) -> str:
    """A plain-text table of :class:`DecompositionStats` (print it)."""
    total = max(stats.total_tokens, 1)
    lines = [
        f"documents {stats.documents:,}  tokens {stats.total_tokens:,}  tokens/step {stats.tokens_per_step:,}",
        f"{'bucket':>8} {'len':>8} {'pieces':>12} {'tokens':>14} {'% tok':>7} {'% steps':>8} {'batch':>7}"
        f" {'attn/C&C':>9}",
    ]
    for b in stats.buckets:
        lines.append(
            f"{'D_' + str(b.k):>8} {b.length:>8,} {b.pieces:>12,} {b.tokens:>14,} {100 * b.tokens / total:>6.2f}%"
            f" {100 * b.step_share:>7.2f}% {b.batch_size:>7,} {b.attention_ratio:>9.4f}"
        )
    lines += [
        f"dropped (remainders < 2^min+1): {stats.dropped_tokens:,} tokens ({100 * stats.dropped_tokens / total:.3f}%)",
        f"concat-and-chunk at {stats.max_len:,}: {stats.cc_rows:,} rows, {stats.cc_dropped_tokens:,} tokens dropped",
        f"attention cost per step (sum len^2): decomposition {stats.attention_cost_dd:.4g} vs concat-and-chunk "
        f"{stats.attention_cost_cc:.4g}: ratio {stats.attention_ratio:.4f}, saving {100 * stats.attention_saving:.1f}%"
        f" ({1 / stats.attention_ratio:.2f}x less)",
    ]
    return "\n".join(lines)
