"""Which bucket each step trains on, and the pieces of its batch (dataset decomposition training).

* :class:`BucketSchedule`: per-bucket batch sizes and the bucket of step ``s`` as a pure function of
  ``(seed, s)`` (identical on every host, resumable without state), with the curricula ``uniform``,
  ``pow2`` (the original odds), ``cyclic`` and ``fixed``;
* :func:`permute_indices` (a keyed bijection) and :class:`BucketBatcher` turn a step into the global
  batch's piece indices of a :class:`zoo.data.decomposition.BucketIndex`, and :func:`host_slice`
  into one host's disjoint shard of it.

Numpy only, like the decomposition itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from zoo.data.decomposition import BucketIndex, check_int

__all__ = ["CURRICULA", "BucketBatcher", "BucketSchedule", "host_slice", "permute_indices"]

CURRICULA = ("uniform", "pow2", "cyclic", "fixed")


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, np.float64)
    if total == 0 or w.sum() <= 0:
        return np.zeros(len(w), np.int64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    # Hand the remaining units to the largest fractional parts (ties: lower index first).
    order = np.lexsort((np.arange(len(w)), -(exact - counts)))
    counts[order[:short]] += 1
    return counts


class BucketSchedule:
    """Per-bucket batch sizes and the bucket of every step: a pure function of ``(seed, step)``.

    Batch sizes: ``B_k = tokens_per_step / 2^k`` input tokens (pieces hold ``2^k + 1`` tokens), so
    every step has the same number of training tokens.

    Steps are grouped in cycles of ``cycle_steps``. Cycle ``c`` holds a fixed number ``n_k`` of steps
    of each bucket (its composition) in an order drawn from ``default_rng([seed, c])`` alone, so the
    bucket of step ``s`` needs no state: every host computes the same sequence, and a resumed run
    continues it exactly. Composition ``n_k`` ∝ the token mass ``m_k`` of bucket ``k``
    (``availability[k]`` tokens when given, else 1 — equal mass), apportioned by largest remainder.
    Curricula (``odds`` o_k):

    * ``"uniform"``: o_k = 1; the cycle is a uniformly random permutation.
    * ``"pow2"``: o_k = 2^(max_k - k), the original "Pow-2" odds. With ``exhaust=True`` (the
      original ``MyRandomMix(longest=True)`` in each epoch) the next step's bucket is drawn with
      probability ∝ n_k o_k among buckets not yet exhausted in the cycle, so short buckets come
      first and every cycle sweeps short to long while still using each bucket ∝ its mass. It is
      sampled exactly by racing exponential clocks of rate ``n_k o_k``. With ``exhaust=False`` the
      odds also scale the composition (n_k ∝ m_k o_k) and the order is a random permutation.
    * ``"cyclic"``: deterministic short-to-long passes: every cycle is ``n_min`` steps of the shortest
      bucket, then the next, ..., counts ∝ the buckets' mass.
    * ``"fixed"``: every step is bucket ``fixed_k`` (default the longest).

    ``odds`` overrides the curriculum's odds for ``"uniform"`` / ``"pow2"`` (one per sorted bucket),
    e.g. linear odds ``[6, 5, 4, 3, 2, 1]``.
    """

    def __init__(
        self,
        bucket_ks: Sequence[int],
        tokens_per_step: int,
        curriculum: str = "pow2",
        seed: int = 0,
        *,
        availability: Mapping[int, int] | Sequence[int] | None = None,
        cycle_steps: int | None = None,
        exhaust: bool = True,
        fixed_k: int | None = None,
        odds: Sequence[float] | None = None,
    ):
        """Validates the configuration.

        Args:
            bucket_ks: log2 lengths of the buckets (distinct ints).
            tokens_per_step: input tokens per step; divisible by 2^k for every bucket.
            curriculum: one of ``CURRICULA``.
            seed: schedule seed (identical on every host).
            availability: tokens per bucket (``{k: tokens}`` or a sequence aligned with ``bucket_ks``,
                e.g. ``BucketIndex.tokens_per_bucket()``); weights the cycle composition.
            cycle_steps: steps per cycle; default: one pass over the data
                (``sum_k availability_k // tokens_per_step``) when ``availability`` is given, else
                ``64 * len(bucket_ks)``.
            exhaust: see the class docstring (``pow2`` and custom odds only).
            fixed_k: the bucket of the ``"fixed"`` curriculum (default ``max(bucket_ks)``).
            odds: custom per-bucket odds replacing the curriculum's.
        """
        ks = [int(k) for k in bucket_ks]
        if not ks or len(set(ks)) != len(ks) or min(ks) < 0:
            raise ValueError(f"bucket_ks={list(bucket_ks)} must be distinct non-negative ints, e.g. range(8, 14).")
        self.bucket_ks = tuple(sorted(ks))
        if curriculum not in CURRICULA:
            raise ValueError(f"curriculum={curriculum!r} is unknown; use one of {CURRICULA}.")
        tokens_per_step = check_int("tokens_per_step", tokens_per_step, 1)
        max_k = max(self.bucket_ks)
        for k in self.bucket_ks:
            if tokens_per_step % (1 << k):
                fix = -(-tokens_per_step // (1 << max_k)) * (1 << max_k)
                raise ValueError(
                    f"tokens_per_step={tokens_per_step} is not divisible by 2^{k}={1 << k} (bucket k={k}); "
                    f"use a multiple of 2^{max_k}={1 << max_k}, e.g. {fix}."
                )
        seed = check_int("seed", seed, 0)
        self.tokens_per_step, self.curriculum, self.seed = int(tokens_per_step), curriculum, int(seed)
        self.exhaust = bool(exhaust)
        self.batch_sizes = {k: self.tokens_per_step >> k for k in self.bucket_ks}

        # Token mass per bucket.
        if availability is None:
            mass = np.ones(len(self.bucket_ks))
        elif isinstance(availability, Mapping):
            missing = [k for k in self.bucket_ks if k not in availability]
            if missing:
                raise ValueError(
                    f"availability has no entry for buckets {missing}; give tokens for every k in {self.bucket_ks}."
                )
            mass = np.array([float(availability[k]) for k in self.bucket_ks])
        else:
            mass = np.asarray(availability, np.float64).reshape(-1)
            if len(mass) != len(self.bucket_ks):
                raise ValueError(
                    f"availability has {len(mass)} entries for {len(self.bucket_ks)} buckets; "
                    "align it with sorted bucket_ks."
                )
        if np.any(mass < 0) or (curriculum != "fixed" and mass.sum() <= 0):
            raise ValueError("availability must be >= 0 with at least one bucket holding tokens.")

        # Odds of the curriculum.
        if odds is not None:
            o = np.asarray(odds, np.float64).reshape(-1)
            if len(o) != len(self.bucket_ks) or np.any(o <= 0):
                raise ValueError(
                    f"odds={list(odds)} must hold {len(self.bucket_ks)} positive numbers, one per sorted bucket."
                )
        elif curriculum == "pow2":
            o = np.exp2(max_k - np.array(self.bucket_ks, np.float64))
        else:
            o = np.ones(len(self.bucket_ks))
        self.odds = o

        if curriculum == "fixed":
            fk = max_k if fixed_k is None else int(fixed_k)
            if fk not in self.bucket_ks:
                raise ValueError(f"fixed_k={fixed_k} is not in bucket_ks={self.bucket_ks}; pick one of them.")
            self.fixed_k = fk
        elif fixed_k is not None:
            raise ValueError(
                f"fixed_k={fixed_k} is only used by curriculum='fixed'; drop it or set curriculum='fixed'."
            )
        else:
            self.fixed_k = None

        if cycle_steps is None:
            if availability is not None:
                cycle_steps = max(int(np.sum(mass // self.tokens_per_step)), len(self.bucket_ks))
            else:
                cycle_steps = 64 * len(self.bucket_ks)
        self.cycle_steps = check_int("cycle_steps", cycle_steps, 1)

        # Composition of one cycle.
        if curriculum == "fixed":
            counts = np.array([self.cycle_steps if k == self.fixed_k else 0 for k in self.bucket_ks], np.int64)
        elif curriculum != "cyclic" and not self.exhaust:
            counts = _apportion(mass * o, self.cycle_steps)
        else:
            counts = _apportion(mass, self.cycle_steps)
        self.steps_per_cycle = {k: int(c) for k, c in zip(self.bucket_ks, counts)}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def batch_size(self, k: int) -> int:
        """Global batch size (pieces) of bucket ``k``: ``tokens_per_step / 2^k``."""
        if int(k) not in self.batch_sizes:
            raise ValueError(f"k={k} is not a bucket of this schedule; use one of {self.bucket_ks}.")
        return self.batch_sizes[int(k)]

    def _cycle(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each step [cycle_steps], rank of the step among its bucket's steps) of cycle c."""
        if c in self._cache:
            return self._cache[c]
        ks = np.array(self.bucket_ks, np.int64)
        counts = np.array([self.steps_per_cycle[k] for k in self.bucket_ks], np.int64)
        multiset = np.repeat(ks, counts)  # [cycle_steps], sorted short to long
        rng = np.random.default_rng([self.seed, int(c)])
        if self.curriculum in ("cyclic", "fixed"):
            order = multiset
        elif self.exhaust and not np.all(self.odds == self.odds[0]):
            # Draw without replacement with odds ∝ n_k o_k among non-exhausted buckets: bucket k's
            # steps arrive at the jump times of a Poisson clock of rate n_k o_k; merge the clocks.
            gaps = rng.exponential(size=len(multiset))  # [cycle_steps]
            times = np.empty(len(multiset))
            lo = 0
            for n_k, o_k in zip(counts, self.odds):
                times[lo : lo + n_k] = np.cumsum(gaps[lo : lo + n_k]) / (n_k * o_k)
                lo += n_k
            order = multiset[np.argsort(times, kind="stable")]
        else:
            order = rng.permutation(multiset)
        # Rank of each step among the cycle's steps of the same bucket.
        rank = np.zeros(len(order), np.int64)
        for k in self.bucket_ks:
            idx = np.flatnonzero(order == k)
            rank[idx] = np.arange(len(idx))
        order.flags.writeable = rank.flags.writeable = False
        if len(self._cache) >= 2:
            self._cache.pop(next(iter(self._cache)))
        self._cache[c] = (order, rank)
        return order, rank

    def _check_step(self, step: int) -> int:
        return check_int("step", step, 0)

    def bucket(self, step: int) -> int:
        """Bucket ``k`` of global step ``step`` (same on every host; no state)."""
        step = self._check_step(step)
        order, _ = self._cycle(step // self.cycle_steps)
        return int(order[step % self.cycle_steps])

    def buckets(self, start: int, stop: int) -> np.ndarray:
        """Buckets of steps ``start .. stop-1`` as an int64 array."""
        return np.array([self.bucket(s) for s in range(start, stop)], np.int64)

    def position(self, step: int) -> tuple[int, int]:
        """``(k, j)``: the bucket of ``step`` and how many earlier steps used bucket ``k``.

        ``j`` indexes the bucket's stream of batches: step ``step`` reads pieces
        ``j B_k .. (j+1) B_k - 1`` of that stream. O(cycle_steps), independent of ``step``.
        """
        step = self._check_step(step)
        c, p = divmod(step, self.cycle_steps)
        order, rank = self._cycle(c)
        k = int(order[p])
        return k, c * self.steps_per_cycle[k] + int(rank[p])

    def tokens(self, num_steps: int) -> int:
        """Training tokens seen after ``num_steps`` steps (``num_steps * tokens_per_step``)."""
        return int(num_steps) * self.tokens_per_step


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (a bijective 64-bit hash) on a uint64 array."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute_indices(indices: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
    """A keyed pseudo-random bijection of ``[0, n)`` applied to ``indices`` in O(len(indices)).

    A 4-round balanced Feistel network on ``2 * h`` bits (``4^h >= n``) with cycle walking: values
    that land outside ``[0, n)`` are permuted again until they fall inside, which restricts the
    bijection of ``[0, 4^h)`` to one of ``[0, n)``. Used to shuffle a bucket per epoch without
    materialising a permutation of its (possibly 10^8) pieces.

    Args:
        indices: int array with values in ``[0, n)``.
        n: domain size (>= 1).
        key: ints (e.g. ``(seed, k, epoch)``) selecting the permutation.
    """
    idx = np.asarray(indices, np.int64)
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 (size of the permuted range).")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, n={n}).")
    if n == 1:
        return np.zeros_like(idx)
    h = max(1, (int(n - 1).bit_length() + 1) // 2)  # half width in bits
    mask = np.uint64((1 << h) - 1)
    round_keys = np.random.SeedSequence([int(v) for v in key]).generate_state(4, np.uint64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(h), x & mask
        for rk in round_keys:
            left, right = right, left ^ (_mix64(right ^ rk) & mask)
        return (left << np.uint64(h)) | right

    with np.errstate(over="ignore"):
        y = feistel(idx.astype(np.uint64))
        out = y >= np.uint64(n)
        while np.any(out):
            y[out] = feistel(y[out])
            out = y >= np.uint64(n)
    return y.astype(np.int64)


class BucketBatcher:
    """Global batches of a :class:`BucketSchedule` over a :class:`BucketIndex`, one host's shard.

    Bucket ``k``'s stream of pieces is the concatenation of epochs; epoch ``e`` visits all
    ``N_k`` pieces in the order :func:`permute_indices` ``(., N_k, (seed, k, e))``. Step ``s`` with
    ``(k, j) = schedule.position(s)`` reads stream items ``j B_k .. (j+1) B_k - 1``. Everything is a
    pure function of ``(seed, step)``: resuming at step ``s`` reproduces the same batches bitwise.
    """

    def __init__(self, index: BucketIndex, schedule: BucketSchedule, *, seed: int | None = None):
        """Checks that every scheduled bucket has pieces; ``seed`` defaults to the schedule's."""
        for k in schedule.bucket_ks:
            if k not in index.ks:
                raise ValueError(f"schedule bucket k={k} is not in the index buckets {index.ks}; align bucket_ks.")
            if schedule.steps_per_cycle[k] > 0 and index.num_pieces(k) == 0:
                raise ValueError(
                    f"bucket k={k} has no pieces but the schedule uses it; pass "
                    "availability=index.tokens_per_bucket() to BucketSchedule."
                )
        self.index, self.schedule = index, schedule
        self.seed = schedule.seed if seed is None else int(seed)

    def global_indices(self, step: int) -> tuple[int, np.ndarray]:
        """``(k, piece indices [B_k])`` of the global batch of ``step`` (same on every host)."""
        k, j = self.schedule.position(step)
        b, n = self.schedule.batch_size(k), self.index.num_pieces(k)
        items = j * b + np.arange(b, dtype=np.int64)  # [B_k] positions in the bucket stream
        epoch, within = np.divmod(items, n)
        out = np.empty(b, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = permute_indices(within[sel], n, (self.seed, k, int(e)))
        return k, out

    def host_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> tuple[int, np.ndarray]:
        """``(k, tokens [B_k / process_count, 2^k + 1])``: this host's shard of step ``step``."""
        k, idx = self.global_indices(step)
        return k, self.index.get_batch(k, host_slice(idx, process_index, process_count))


def host_slice(global_batch: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """The contiguous shard ``process_index`` of ``process_count`` along axis 0 of a global batch.

    Shards of different hosts are disjoint and together cover the global batch, in host order (the
    layout ``jax.make_array_from_process_local_data`` expects for a batch sharded over hosts).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    b = len(global_batch)
    if b % process_count:
        raise ValueError(
            f"global batch of {b} is not divisible by process_count={process_count}; raise tokens_per_step "
            f"so that the longest bucket's batch is a multiple of {process_count}."
        )
    per = b // process_count
    return global_batch[process_index * per : (process_index + 1) * per]
