"""Invariant and statistical tests of zoo.data.decomposition (dataset decomposition, arXiv 2405.13226)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from zoo.data import decomposition as dd
from zoo.data import schedule as ds

FAST = settings(max_examples=25, deadline=None)


def reference_binary(length: int, min_log2: int, max_log2: int) -> tuple[list[int], int]:
    """The deterministic rule written as the obvious loop: k = min(floor(log2(R-1)), max) until k < min."""
    ks, remaining = [], length
    while remaining > 1:
        k = min((remaining - 1).bit_length() - 1, max_log2)
        if k < min_log2:
            break
        ks.append(k)
        remaining -= (1 << k) + 1
    return ks, remaining


def check_document(length, starts, ks, dropped, min_log2, max_log2):
    """Every piece has 2^k+1 tokens with k in range, pieces tile [0, length - dropped) in order."""
    sizes = (np.int64(1) << np.asarray(ks, np.int64)) + 1
    assert np.all((np.asarray(ks) >= min_log2) & (np.asarray(ks) <= max_log2))
    expected_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else np.zeros(0)
    np.testing.assert_array_equal(starts, expected_starts)  # disjoint, contiguous, in order
    assert int(sizes.sum()) + dropped == length  # inside the document, nothing lost
    assert 0 <= dropped < (1 << min_log2) + 1  # only a short remainder is dropped


log2_ranges = st.integers(0, 6).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, lo + 4)))


@FAST
@given(length=st.integers(0, 5000), rng_range=log2_ranges)
def test_deterministic_matches_reference_loop(length, rng_range):
    lo, hi = rng_range
    starts, ks, dropped = dd.decompose_length(length, min_log2=lo, max_log2=hi, rng=None)
    ref_ks, ref_dropped = reference_binary(length, lo, hi)
    assert list(ks) == ref_ks and dropped == ref_dropped
    check_document(length, starts, ks, dropped, lo, hi)
    # Below the long-document threshold the largest power of two comes first and k decreases.
    if length < (1 << (hi + 1)) + 1:
        assert list(ks) == sorted(ks, reverse=True) and len(set(ks)) == len(ks)


@FAST
@given(length=st.integers(0, 20000), rng_range=log2_ranges, seed=st.integers(0, 2**32))
def test_randomised_invariants_and_views(length, rng_range, seed):
    lo, hi = rng_range
    doc = np.arange(length, dtype=np.int32)
    pieces, dropped = dd.decompose(doc, min_log2=lo, max_log2=hi, rng=np.random.default_rng(seed))
    ks = [int(np.log2(len(p) - 1)) for p in pieces]
    starts = [int(p[0]) for p in pieces]  # tokens are positions, so the first token is the start
    check_document(length, starts, ks, dropped, lo, hi)
    for p in pieces:
        assert len(p) == (1 << int(np.log2(len(p) - 1))) + 1
        assert np.shares_memory(p, doc)  # views, not copies
        np.testing.assert_array_equal(p, np.arange(p[0], p[0] + len(p)))
    # Once the remainder is below 2^(max+1)+1 the rest is the deterministic binary decomposition.
    threshold = (1 << (hi + 1)) + 1
    tail = [i for i, s in enumerate(starts) if length - s < threshold]
    first = tail[0] if tail else len(pieces)
    rest = length - (starts[first] if tail else (starts[-1] + len(pieces[-1]) if pieces else 0))
    assert ks[first:] == reference_binary(rest, lo, hi)[0]


def test_short_documents_ignore_the_rng():
    for length in [0, 1, 2, 17, 31, 32]:  # all < 2^(4+1)+1
        a = dd.decompose_length(length, min_log2=2, max_log2=4, rng=np.random.default_rng(0))
        b = dd.decompose_length(length, min_log2=2, max_log2=4, rng=None)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_equal_token_mass_law_on_long_documents():
    """Randomised cuts: P(k) ∝ 2^-k, hence equal expected token mass per bucket (chi-square, seeded)."""
    lo, hi = 2, 6
    threshold = (1 << (hi + 1)) + 1
    rng = np.random.default_rng(1234)
    counts = np.zeros(hi - lo + 1, np.int64)
    for _ in range(20):
        length = 200_000
        starts, ks, _ = dd.decompose_length(length, min_log2=lo, max_log2=hi, rng=rng)
        random_phase = length - starts >= threshold  # pieces cut while the document was still long
        counts += np.bincount(ks[random_phase] - lo, minlength=hi - lo + 1)
    p = dd.bucket_probabilities(lo, hi)
    np.testing.assert_allclose(p * np.exp2(np.arange(lo, hi + 1)), p[0] * 2**lo)  # equal mass by design
    n = counts.sum()
    assert sps.chisquare(counts, n * p).pvalue > 1e-3
    # Token mass per bucket: each bucket's share of 2^k-token mass is 1/K within 5 std.
    mass = counts * np.exp2(np.arange(lo, hi + 1))
    share = mass / mass.sum()
    std = np.sqrt(p * (1 - p) / n) * np.exp2(np.arange(lo, hi + 1)) / np.sum(p * np.exp2(np.arange(lo, hi + 1)))
    assert np.all(np.abs(share - 1 / len(p)) < 5 * std)
    # The deterministic rule (only max pieces) is rejected by the same test.
    _, det_ks, _ = dd.decompose_length(200_000, min_log2=lo, max_log2=hi, rng=None)
    det = np.bincount(det_ks - lo, minlength=hi - lo + 1)
    assert sps.chisquare(det, det.sum() * p).pvalue < 1e-6


@FAST
@given(
    lengths=st.lists(st.integers(0, 700), min_size=1, max_size=25),
    rng_range=st.integers(0, 3).flatmap(lambda lo: st.tuples(st.just(lo), st.integers(lo, lo + 3))),
    seed=st.one_of(st.none(), st.integers(0, 1000)),
)
def test_bucket_index_invariants(lengths, rng_range, seed):
    lo, hi = rng_range
    docs = [np.arange(1000 * d, 1000 * d + n, dtype=np.int64) for d, n in enumerate(lengths)]
    index = dd.BucketIndex.build(docs, min_log2=lo, max_log2=hi, seed=seed)
    per_doc: dict[int, list[tuple[int, int]]] = {d: [] for d in range(len(docs))}
    for k in index.ks:
        doc_ids, starts = index.locations(k)
        assert np.all(np.diff(doc_ids) >= 0)
        for i, (d, s) in enumerate(zip(doc_ids, starts)):
            piece = index.get(k, i)
            assert len(piece) == (1 << k) + 1
            assert np.all(piece // 1000 == d)  # inside one document
            assert piece[0] - 1000 * d == s
            per_doc[int(d)].append((int(s), k))
    dropped = 0
    for d, n in enumerate(lengths):
        pieces = sorted(per_doc[d])
        rng = None if seed is None else dd.document_rng(seed, d)
        ref_starts, ref_ks, ref_dropped = dd.decompose_length(n, min_log2=lo, max_log2=hi, rng=rng)
        assert [s for s, _ in pieces] == list(ref_starts) and [k for _, k in pieces] == list(ref_ks)
        check_document(n, ref_starts, ref_ks, ref_dropped, lo, hi)
        dropped += ref_dropped
    assert index.dropped_tokens == dropped
    assert sum(index.tokens_per_bucket().values()) + index.dropped_tokens == sum(lengths)
    assert index.num_documents == len(lengths)


def test_bucket_index_chunked_build_and_seed_determinism():
    lengths = np.random.default_rng(0).integers(0, 5000, 300)
    a = dd.BucketIndex.from_lengths(lengths, min_log2=3, max_log2=7, seed=5)
    b = dd.BucketIndex.from_lengths(lengths, min_log2=3, max_log2=7, seed=5, chunk_documents=7)
    c = dd.BucketIndex.from_lengths(lengths, min_log2=3, max_log2=7, seed=6)
    assert any(a.num_pieces(k) != c.num_pieces(k) for k in a.ks)
    for k in a.ks:
        for x, y in zip(a.locations(k), b.locations(k)):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == np.int64


def test_bucket_index_errors():
    index = dd.BucketIndex.from_lengths([40, 3], min_log2=2, max_log2=3, seed=None)
    with pytest.raises(ValueError, match="no source"):
        index.get(3, 0)
    with pytest.raises(ValueError, match="not a bucket"):
        index.num_pieces(9)
    with pytest.raises(ValueError, match="min_log2=5 > max_log2=3"):
        dd.decompose_length(10, min_log2=5, max_log2=3)
    with pytest.raises(ValueError, match="1-D"):
        dd.decompose(np.zeros((2, 3)), min_log2=0, max_log2=1)
    with pytest.raises(ValueError, match="negative"):
        dd.BucketIndex.from_lengths([4, -1], min_log2=0, max_log2=1)


@pytest.mark.parametrize("curriculum", ds.CURRICULA)
def test_schedule_tokens_per_step_constant_and_pure(curriculum):
    avail = {4: 5000, 5: 9000, 6: 9000, 7: 20000}
    kw = dict(availability=avail, cycle_steps=37)
    s1 = ds.BucketSchedule(range(4, 8), 512, curriculum, seed=11, **kw)
    steps = list(range(0, 120))
    seq = [s1.bucket(s) for s in steps]
    for s, k in zip(steps, seq):
        assert s1.batch_size(k) * (1 << k) == 512
    # Pure function of (seed, step): a fresh instance queried backwards (a resumed run) agrees.
    s2 = ds.BucketSchedule(range(4, 8), 512, curriculum, seed=11, **kw)
    assert [s2.bucket(s) for s in reversed(steps)] == seq[::-1]
    # position(): j counts the earlier steps of the same bucket.
    seen: dict[int, int] = {}
    for s in steps:
        k, j = s2.position(s)
        assert j == seen.get(k, 0)
        seen[k] = j + 1
    # Each cycle holds exactly steps_per_cycle[k] steps of bucket k.
    cycle = np.array(seq[37:74])
    for k, n in s1.steps_per_cycle.items():
        assert np.count_nonzero(cycle == k) == n
    if curriculum == "cyclic":
        assert np.all(np.diff(cycle) >= 0)  # one short-to-long pass per cycle
    if curriculum == "fixed":
        assert set(seq) == {7}
    if curriculum in ("uniform", "pow2"):
        assert ds.BucketSchedule(range(4, 8), 512, curriculum, seed=12, **kw).buckets(0, 120).tolist() != seq


def test_schedule_composition_and_pow2_order():
    avail = {6: 1 << 20, 7: 1 << 20, 8: 1 << 20, 9: 1 << 20}
    pow2 = ds.BucketSchedule(range(6, 10), 1 << 12, "pow2", seed=0, availability=avail)
    uni = ds.BucketSchedule(range(6, 10), 1 << 12, "uniform", seed=0, availability=avail)
    assert pow2.cycle_steps == 4 * (1 << 20) // (1 << 12)
    assert pow2.steps_per_cycle == uni.steps_per_cycle == {k: 256 for k in range(6, 10)}
    # The original odds put short buckets first in every cycle (draws without replacement).
    order = pow2.buckets(0, pow2.cycle_steps)
    mean_pos = [np.flatnonzero(order == k).mean() for k in range(6, 10)]
    assert mean_pos == sorted(mean_pos) and mean_pos[-1] - mean_pos[0] > 200
    uorder = uni.buckets(0, uni.cycle_steps)
    upos = [np.flatnonzero(uorder == k).mean() for k in range(6, 10)]
    assert max(upos) - min(upos) < 100
    # Without exhaustion the odds scale the composition: 8:4:2:1.
    iid = ds.BucketSchedule(range(6, 10), 1 << 12, "pow2", seed=0, cycle_steps=150, exhaust=False)
    assert iid.steps_per_cycle == {6: 80, 7: 40, 8: 20, 9: 10}


def test_pow2_exhaustion_matches_sequential_draws():
    """The clock race equals MyRandomMix(longest=True): fixed odds n_k o_k, exhausted buckets removed.

    Buckets 4, 5 with 2 and 1 steps per cycle and pow2 odds 2, 1 (weights 4, 1): sequential draws give
    P(4,4,5) = (4/5)^2, P(4,5,4) = 4/5 * 1/5, P(5,4,4) = 1/5.
    """
    sched = ds.BucketSchedule([4, 5], 32, "pow2", seed=7, availability={4: 2, 5: 1}, cycle_steps=3)
    assert sched.steps_per_cycle == {4: 2, 5: 1}
    cycles = 3000
    seqs = [tuple(sched.buckets(3 * c, 3 * c + 3).tolist()) for c in range(cycles)]
    observed = [seqs.count(q) for q in [(4, 4, 5), (4, 5, 4), (5, 4, 4)]]
    assert sum(observed) == cycles
    assert sps.chisquare(observed, cycles * np.array([16, 4, 5]) / 25).pvalue > 1e-3


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"not divisible by 2\^4=16 \(bucket k=4\).*multiple of 2\^7=128, e.g. 384"):
        ds.BucketSchedule(range(4, 8), 300, "uniform")
    with pytest.raises(ValueError, match="curriculum"):
        ds.BucketSchedule([4], 16, "grow")
    with pytest.raises(ValueError, match="fixed_k"):
        ds.BucketSchedule([4, 5], 32, "fixed", fixed_k=9)
    with pytest.raises(ValueError, match="step"):
        ds.BucketSchedule([4, 5], 32, "uniform").bucket(-1)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_indices_is_a_bijection(n):
    perm = ds.permute_indices(np.arange(n), n, (3, 4, 5))
    assert sorted(perm.tolist()) == list(range(n))
    np.testing.assert_array_equal(ds.permute_indices(np.arange(n)[::-1], n, (3, 4, 5)), perm[::-1])
    if n > 3:
        assert not np.array_equal(perm, ds.permute_indices(np.arange(n), n, (3, 4, 6)))


def _make_batcher(docs, seed=3):
    index = dd.BucketIndex.build(docs, min_log2=2, max_log2=5, seed=seed)
    sched = ds.BucketSchedule(index.ks, 64, "pow2", seed=seed, availability=index.tokens_per_bucket())
    return ds.BucketBatcher(index, sched)


def test_two_hosts_same_buckets_disjoint_covering_shards_and_resume():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50_000, n) for n in rng.integers(1, 300, 60)]
    host0, host1 = _make_batcher(docs), _make_batcher(docs)  # built independently on each host
    for step in range(40):
        k0, idx0 = host0.global_indices(step)
        k1, idx1 = host1.global_indices(step)
        assert k0 == k1 and np.array_equal(idx0, idx1)  # same global shape and batch
        shards = [ds.host_slice(idx0, p, 2) for p in range(2)]
        assert not set(shards[0].tolist()) & set(shards[1].tolist())  # disjoint (within an epoch)
        np.testing.assert_array_equal(np.concatenate(shards), idx0)  # cover the global batch
        ka, tok_a = host0.host_batch(step, 0, 2)
        kb, tok_b = host1.host_batch(step, 1, 2)
        assert tok_a.shape == tok_b.shape == (host0.schedule.batch_size(k0) // 2, (1 << k0) + 1)
        np.testing.assert_array_equal(np.concatenate([tok_a, tok_b]), host0.index.get_batch(k0, idx0))
    # Resume: a fresh batcher starting at step 25 yields bitwise the same batches.
    resumed = _make_batcher(docs)
    for step in range(25, 40):
        np.testing.assert_array_equal(resumed.host_batch(step, 1, 2)[1], host1.host_batch(step, 1, 2)[1])
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        ds.host_slice(np.arange(8), 0, 3)


def test_bucket_stream_visits_every_piece_once_per_epoch():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 9, n) for n in rng.integers(1, 200, 40)]
    b = _make_batcher(docs)
    k, n = 2, b.index.num_pieces(2)
    seen, step = [], 0
    while len(seen) < 2 * n:
        kk, idx = b.global_indices(step)
        if kk == k:
            seen.extend(idx.tolist())
        step += 1
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n : 2 * n]) == list(range(n))


def test_concat_and_chunk():
    docs = [np.arange(5), np.arange(10, 17), np.arange(20, 23)]
    rows, dropped = dd.concat_and_chunk(docs, 4)
    assert rows.shape == (3, 5) and dropped == 0
    np.testing.assert_array_equal(rows.reshape(-1), np.concatenate(docs))
    rows, dropped = dd.concat_and_chunk(docs, 6)
    assert rows.shape == (2, 7) and dropped == 1
    with pytest.raises(ValueError, match="seq_len"):
        dd.concat_and_chunk(docs, 0)


def test_stats_match_the_batches_and_format():
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 9, n) for n in rng.integers(1, 400, 80)]
    b = _make_batcher(docs)
    sched = b.schedule
    st_ = dd.decomposition_stats(b.index, schedule=sched)
    assert [x.pieces for x in st_.buckets] == list(b.index.pieces_per_bucket().values())
    assert sum(x.tokens for x in st_.buckets) + st_.dropped_tokens == st_.total_tokens == sum(map(len, docs))
    # Mean sum of len^2 over one cycle of real batches equals the reported decomposition cost.
    cost = np.mean([len(idx) * (1 << k) ** 2 for k, idx in map(b.global_indices, range(sched.cycle_steps))])
    assert cost == pytest.approx(st_.attention_cost_dd)
    cc_rows, cc_dropped = dd.concat_and_chunk(docs, st_.max_len)
    assert (st_.cc_rows, st_.cc_dropped_tokens) == (len(cc_rows), cc_dropped)
    assert st_.attention_cost_cc == sched.tokens_per_step * st_.max_len
    assert 0 < st_.attention_ratio < 1 and st_.attention_saving == pytest.approx(1 - st_.attention_ratio)
    # Default shares: proportional to each bucket's training tokens.
    d = dd.decomposition_stats(b.index)
    train = np.array([x.pieces * x.length for x in d.buckets], float)
    np.testing.assert_allclose([x.step_share for x in d.buckets], train / train.sum())
    text = dd.format_stats(st_)
    assert "D_2" in text and "D_5" in text and "saving" in text
