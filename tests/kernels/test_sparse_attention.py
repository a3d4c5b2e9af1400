"""Parity suite for pallas_kernels.sparse_attention: every implementation vs the fp32 reference.

The reference (dense scores + the mask expanded from its definition, fp32 softmax) is the oracle.
Each implementation runs at the test dtype and is compared, output and gradients (jax.vjp through
its custom VJP: the XLA blocked backward for "xla", the Pallas backward kernels for "pallas"),
against the oracle run in fp32 on the same (rounded) inputs. The Pallas kernels of both backends
run interpreted on CPU: "tpu" (Mosaic kernels) and "gpu" (Triton kernels).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import common, pallas_tpu, sparse_attention

# Max abs error of the output / gradients vs the fp32 reference, per test dtype (unit-normal
# inputs, so outputs and gradients are O(1)).
TOL = {jnp.float32: {"out": 2e-5, "grad": 5e-5}, jnp.bfloat16: {"out": 3e-2, "grad": 8e-2}}
IMPLS = ("xla", "tpu", "gpu")  # "tpu" / "gpu": the Pallas kernels of that backend, interpreted


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 1
    tq: int = 40
    tk: int = 40
    h: int = 4
    kv: int = 2
    p: int = 16
    bq: int = 16
    bk: int = 16
    causal: bool = True
    window: int | None = None
    sinks: int = 0
    n_listed: int = 0  # k_blocks random listed blocks (with duplicates and -1 padding) when > 0
    segments: bool = False
    empty_listed: bool = False  # all slots -1: with no window every row sees nothing
    tiles: bool = False  # no block sizes: the tile table's (dense patterns only)


CASES = [
    Case("dense_causal_gqa_tail"),  # T = 40: a partial last block on both axes
    Case("dense_noncausal_segments", causal=False, segments=True),
    Case("dense_table_tiles", tq=70, tk=70, tiles=True),
    Case("window_only", window=9),
    Case("blocks_window_sinks_tq_lt_tk_mqa_segments", n_listed=3, window=5, sinks=3, tq=24, tk=56, kv=1, segments=True),
    Case(
        "blocks_window_sinks_noncausal_p72", n_listed=3, window=6, sinks=2, causal=False, tq=24, tk=50, h=2, kv=2, p=72
    ),
    Case("random_blocks", n_listed=4, tq=48, tk=64),
    Case("decode_rows_tq_lt_tk", tq=5, tk=45, n_listed=2, window=7, bq=16),
    Case("tq_gt_tk", tq=48, tk=20),  # the first queries sit before every key: zero rows
    Case("mqa_window_sinks_segments", h=4, kv=1, window=12, sinks=2, segments=True),
    Case("blocks_segments_two_batches", b=2, n_listed=2, segments=True),
    Case("nothing_visible", n_listed=2, empty_listed=True),
]
# Default suite: every mask feature through each implementation's forward and backward (fp32);
# the full cross product runs with -m slow.
# Each kernel backend: the dense variant (causal with tails and GQA; non-causal with segments)
# and the table variant (blocks + window + sinks: causal with Tq < Tk, MQA and segment ids;
# non-causal with head dim 72 and T not a multiple of the block).
_KERNEL_FAST = (
    "dense_causal_gqa_tail",
    "dense_noncausal_segments",
    "blocks_window_sinks_tq_lt_tk_mqa_segments",
    "blocks_window_sinks_noncausal_p72",
)
FAST = {"xla": ("dense_causal_gqa_tail", "blocks_window_sinks_noncausal_p72"), "tpu": _KERNEL_FAST, "gpu": _KERNEL_FAST}
FAST_BF16 = {"xla": ("random_blocks",), "tpu": ("random_blocks",), "gpu": ("dense_causal_gqa_tail",)}


def make_inputs(case: Case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(case.b, case.tq, case.h, case.p)), dtype)
    k = jnp.asarray(rng.normal(size=(case.b, case.tk, case.kv, case.p)), dtype)
    v = jnp.asarray(rng.normal(size=(case.b, case.tk, case.kv, case.p)), dtype)
    kw = {"causal": case.causal, "window": case.window, "sinks": case.sinks}
    if not case.tiles:
        kw.update(block_q=case.bq, block_k=case.bk)
    if case.n_listed:
        nq, nk = common.cdiv(case.tq, case.bq), common.cdiv(case.tk, case.bk)
        bi = rng.integers(-1, nk, size=(case.b, case.h, nq, case.n_listed))
        bi[..., -1] = bi[..., 0]  # a duplicate in every row (must be counted once)
        if case.empty_listed:
            bi[...] = -1
        kw["block_indices"] = jnp.asarray(bi, jnp.int32)
    if case.segments:
        seg = np.cumsum(rng.random((case.b, case.tk)) < 0.1, axis=1)
        kw["segment_ids"] = (jnp.asarray(seg[:, -case.tq :], jnp.int32), jnp.asarray(seg, jnp.int32))
    return q, k, v, kw


def _impl_kwargs(impl):
    if impl == "xla":
        return {"implementation": "xla"}
    if impl == "reference":
        return {"implementation": "reference"}
    return {"implementation": "pallas", "interpret": True, "backend": impl}


@functools.cache
def _jitted(impl, static, grads):
    """One jit of the output (and its vjp) per (implementation, static options)."""
    static = dict(static)
    if impl == "reference" and "block_q" not in static:
        static.update(block_q=16, block_k=16)  # any blocks: the oracle is dense

    def run(q, k, v, arrays, do):
        f = lambda q, k, v: sparse_attention(q, k, v, **_impl_kwargs(impl), **static, **arrays)
        if not grads:
            return f(q, k, v)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(do)

    return jax.jit(run)


def run(impl, q, k, v, kw, do=None, grads=True):
    """(output, (dq, dk, dv)) of one implementation (jitted once per case); the output only when
    grads=False."""
    arrays = {n: x for n, x in kw.items() if isinstance(x, (jax.Array, tuple))}
    static = tuple(sorted((n, x) for n, x in kw.items() if n not in arrays))
    if do is None:
        do = jnp.ones(q.shape, q.dtype)
    return _jitted(impl, static, grads)(q, k, v, arrays, do)


def f32(x):
    return x.astype(jnp.float32)


def _check(impl, case, dtype):
    q, k, v, kw = make_inputs(case, dtype, seed=1)
    do = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), dtype)
    ref, ref_g = run("reference", f32(q), f32(k), f32(v), kw, f32(do))
    out, grads = run(impl, q, k, v, kw, do)
    assert out.dtype == dtype and out.shape == q.shape
    assert bool(jnp.all(jnp.isfinite(f32(out))))
    np.testing.assert_allclose(f32(out), ref, atol=TOL[dtype]["out"], rtol=0)
    for name, g, g_ref in zip("qkv", grads, ref_g):
        assert g.dtype == dtype, name
        assert bool(jnp.all(jnp.isfinite(f32(g)))), name
        np.testing.assert_allclose(f32(g), g_ref, atol=TOL[dtype]["grad"], rtol=0, err_msg=name)


def _params(fast, dtype_name):
    out = []
    for impl in IMPLS:
        for c in CASES:
            marks = () if c.name in fast[impl] else (pytest.mark.slow,)
            out.append(pytest.param(impl, c, id=f"{impl}-{c.name}-{dtype_name}", marks=marks))
    return out


@pytest.mark.parametrize("impl, case", _params(FAST, "f32"))
def test_parity_f32(impl, case):
    """Output and dq, dk, dv in fp32 vs the fp32 oracle."""
    _check(impl, case, jnp.float32)


@pytest.mark.parametrize("impl, case", _params(FAST_BF16, "bf16"))
def test_parity_bf16(impl, case):
    """Output and gradients at bf16 (fp32 accumulation) vs the fp32 oracle on the rounded inputs."""
    _check(impl, case, jnp.bfloat16)


def test_duplicates_count_once():
    """A block listed three times (plus padding) equals it listed once."""
    case = Case("dup", n_listed=1, tq=32, tk=64)
    q, k, v, kw = make_inputs(case, jnp.float32)
    one = run("xla", q, k, v, kw, grads=False)
    single = kw["block_indices"]
    kw["block_indices"] = jnp.concatenate([single, single, single, jnp.full_like(single, -1)], -1)
    np.testing.assert_allclose(run("xla", q, k, v, kw, grads=False), one, atol=1e-6, rtol=0)


def test_empty_rows_are_zero_with_zero_gradients():
    q, k, v, kw = make_inputs(CASES[-1], jnp.float32)
    out, grads = run("tpu", q, k, v, kw)
    np.testing.assert_array_equal(out, jnp.zeros_like(out))
    for g in grads:
        np.testing.assert_array_equal(g, jnp.zeros_like(g))


def test_reference_is_dense_attention():
    """The oracle itself: with no pattern it equals jax.nn.dot_product_attention."""
    q, k, v, kw = make_inputs(Case("d", tq=33, tk=33), jnp.float32)
    for causal in (True, False):
        kw["causal"] = causal
        expect = jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), is_causal=causal)
        np.testing.assert_allclose(run("reference", q, k, v, kw, grads=False), expect, atol=2e-6, rtol=0)


def test_reference_window_matches_explicit_mask():
    """Window + sinks mask of the oracle against a hand-written numpy loop."""
    case = Case("w", tq=12, tk=20, h=1, kv=1, window=3, sinks=2, bq=4, bk=4)
    q, k, v, kw = make_inputs(case, jnp.float32)
    off = case.tk - case.tq
    s = np.einsum("qd,kd->qk", np.asarray(q[0, :, 0]), np.asarray(k[0, :, 0])) / 4.0
    out = np.zeros((case.tq, case.p))
    for i in range(case.tq):
        p = i + off
        vis = [j for j in range(case.tk) if (p - 3 < j <= p or j < 2) and j <= p]
        w = np.exp(s[i, vis] - s[i, vis].max())
        out[i] = (w / w.sum()) @ np.asarray(v[0, vis, 0])
    np.testing.assert_allclose(run("reference", q, k, v, kw, grads=False)[0, :, 0], out, atol=1e-5)


# ----------------------------------------------------------------------------- tables


def test_slot_table_dedups_classifies_and_orders():
    cfg = common.Config(
        seq_q=8, seq_k=40, block_q=8, block_k=8, causal=True, window=3, sinks=1, sm_scale=1.0, dense=False
    )
    bi = jnp.asarray([[[[3, -1, 3, 0, 9, 2]]]], jnp.int32)  # dup, padding, out of range
    t = common.slot_table(bi, cfg, 1, 1)
    n = int(t.n_valid[0, 0, 0])
    # Queries sit at 32..39. Listed {0, 2, 3} are FULL (wholly in the past); the window of the
    # block touches blocks 3 and 4: 3 is listed (FULL), 4 is the diagonal (PARTIAL); sink block 0
    # is listed (FULL).
    assert n == 4 and int(t.n_full[0, 0, 0]) == 3
    np.testing.assert_array_equal(t.fetch[0, 0, 0, :n], [0, 2, 3, 4])
    np.testing.assert_array_equal(t.code[0, 0, 0, :n], [common.FULL] * 3 + [common.PARTIAL])
    assert bool(jnp.all(t.code[0, 0, 0, n:] == common.INVALID))
    assert bool(jnp.all(t.fetch[0, 0, 0, n:] == 4))


def _visits(table, kv_heads):
    """{(b, kv head, query head in group, query block, key block, code)} of a slot table."""
    b, h, nq, s = table.fetch.shape
    g = h // kv_heads
    out = set()
    for bi, hi, i, si in np.ndindex(b, h, nq, s):
        if table.code[bi, hi, i, si] >= 0:
            out.add((bi, hi // g, hi % g, i, int(table.fetch[bi, hi, i, si]), int(table.code[bi, hi, i, si])))
    return out


def test_transposed_tables_list_the_same_visits():
    """The CSR (GPU) and flattened (TPU) key tables hold exactly the slot table's visits, grouped
    by key block, FULL first (CSR), one placeholder per key block (flat)."""
    case = Case("t", b=2, tq=48, tk=70, h=4, kv=2, n_listed=3, window=10, sinks=4)
    q, k, v, kw = make_inputs(case, jnp.float32)
    cfg, _, _ = common.validate(
        q, k, v, kw["block_indices"], None, causal=True, window=10, sinks=4, block_q=16, block_k=16, sm_scale=None
    )
    table = jax.tree.map(
        np.asarray, jax.jit(common.slot_table, static_argnums=(1, 2, 3))(kw["block_indices"], cfg, 2, 4)
    )
    want = _visits(table, 2)
    nq, nk = cfg.nq, cfg.nk
    kt = jax.tree.map(np.asarray, jax.jit(common.transpose_table, static_argnums=(1, 2))(table, cfg, 2))
    got = set()
    for bi, ki, j in np.ndindex(2, 2, nk):
        start, mid, end, _ = kt.bounds[bi, ki, j]
        for r in range(start, end):
            src, code = divmod(int(kt.entry[bi, ki, r]), 4)
            assert (code == common.FULL) == (r < mid)
            got.add((bi, ki, src // nq, src % nq, j, code))
    assert got == want
    ft = jax.tree.map(np.asarray, jax.jit(common.flat_key_table, static_argnums=(1, 2))(table, cfg, 2))
    got, placeholders = set(), set()
    for bi, ki in np.ndindex(2, 2):
        for e in range(ft.blk.shape[-1]):
            info, j = int(ft.info[bi, ki, e]), int(ft.blk[bi, ki, e])
            code, first = info % 4, info // 4 % 2
            if first:
                placeholders.add((bi, ki, j))
            elif code != common.SKIP:
                src = info // 16
                got.add((bi, ki, src // nq, src % nq, j, code))
    assert got == want
    assert placeholders == set(np.ndindex(2, 2, nk))


@pytest.mark.parametrize(
    "causal, tq, segmented", [(True, 40, False), (True, 24, False), (False, 40, False), (True, 40, True)]
)
def test_dense_bounds_match_the_table(causal, tq, segmented):
    """The arithmetic block ranges of the dense kernels equal the dense pattern's slot table, and
    the key-major ranges are their transpose."""
    cfg = common.Config(
        seq_q=tq,
        seq_k=40,
        block_q=8,
        block_k=16,
        causal=causal,
        window=None,
        sinks=0,
        sm_scale=1.0,
        dense=True,
        segmented=segmented,
    )
    table = jax.jit(common.slot_table, static_argnums=(1, 2, 3))(None, cfg, 1, 1)
    i = jnp.arange(cfg.nq)
    n_full, n_vis = common.dense_bounds(i, cfg)
    np.testing.assert_array_equal(n_full, table.n_full[0, 0])
    np.testing.assert_array_equal(n_vis, table.n_valid[0, 0])
    full = np.arange(cfg.nk)[None, :] < np.asarray(n_full)[:, None]  # [nq, nk]
    vis = np.arange(cfg.nk)[None, :] < np.asarray(n_vis)[:, None]
    i_first, i_full = common.dense_query_bounds(jnp.arange(cfg.nk), cfg)
    rows = np.arange(cfg.nq)[:, None]
    np.testing.assert_array_equal(vis, rows >= np.asarray(i_first)[None, :])
    np.testing.assert_array_equal(full, rows >= np.asarray(i_full)[None, :])


def test_cost_model_counts_the_visited_blocks():
    """The CostEstimate's visited-pair count of a dense pattern equals its slot table's."""
    for causal in (True, False):
        cfg = common.Config(
            seq_q=100, seq_k=130, block_q=16, block_k=32, causal=causal, window=None, sinks=0, sm_scale=1.0, dense=True
        )
        table = jax.jit(common.slot_table, static_argnums=(1, 2, 3))(None, cfg, 1, 1)
        assert common.visited_pairs(cfg, None) == int(table.n_valid.sum())


# ----------------------------------------------------------------------------- TPU semantics


@pytest.mark.parametrize("listed", [True, False], ids=["table", "dense"])
def test_tpu_interpreter_forward_and_backward(listed):
    """The TPU kernels (forward, dQ, dK/dV of the table or dense variant) under the TPU-semantics
    interpreter, which also rejects out-of-bounds block reads."""
    case = Case(
        "tpu",
        tq=8,
        tk=16,
        h=2,
        kv=1,
        p=8,
        bq=8,
        bk=8,
        n_listed=2 if listed else 0,
        window=3 if listed else None,
        sinks=1 if listed else 0,
    )
    q, k, v, kw = make_inputs(case, jnp.float32)
    do = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
    f = lambda q, k, v: sparse_attention(
        q, k, v, implementation="pallas", backend="tpu", interpret=pltpu.InterpretParams(), **kw
    )
    out, vjp = jax.vjp(f, q, k, v)
    ref, ref_g = run("reference", q, k, v, kw, do)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    for name, g, g_ref in zip("qkv", vjp(do), ref_g):
        np.testing.assert_allclose(g, g_ref, atol=5e-5, rtol=0, err_msg=name)


def test_tpu_unit_chunks_split_large_tables(monkeypatch):
    """Tables larger than the SMEM budget are split over (batch, kv head) units; same result."""
    case = Case("chunks", b=2, n_listed=2, window=5, sinks=1)
    q, k, v, kw = make_inputs(case, jnp.float32)
    want = run("reference", q, k, v, kw)
    # Slot table: 36 words per unit (2 per call); key table: 78 words per unit (1 per call).
    monkeypatch.setattr(pallas_tpu, "SMEM_WORDS", 100)
    f = jax.jit(
        lambda q, k, v, bi: jax.vjp(
            lambda *a: sparse_attention(
                *a,
                implementation="pallas",
                backend="tpu",
                interpret=True,
                block_indices=bi,
                **{n: x for n, x in kw.items() if n != "block_indices"},
            ),
            q,
            k,
            v,
        )[1](jnp.ones_like(q))
    )
    got = f(q, k, v, kw["block_indices"])
    for g, g_ref in zip(got, want[1]):
        np.testing.assert_allclose(g, g_ref, atol=5e-5, rtol=0)
    monkeypatch.setattr(pallas_tpu, "SMEM_WORDS", 4)
    with pytest.raises(ValueError, match="SMEM"):
        jax.jit(
            lambda q, k, v: sparse_attention(q, k, v, implementation="pallas", backend="tpu", interpret=True, **kw)
        )(q, k, v)


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_pallas_lowers_for_gpu_and_tpu(platform, monkeypatch):
    """Forward and backward (dense and table variants) lower to Triton / Mosaic (jax.export; not
    compiled: no such device here)."""
    from jax import export  # pylint: disable=g-import-not-at-top
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top

    # Mosaic lowering asks the default device for its TPU generation: pretend a v5e.
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    backend = {"tpu": "tpu", "cuda": "gpu"}[platform]
    b, t, h, kv, p, blk = 1, 200, 4, 2, 72, 64 if backend == "gpu" else 128
    nq = common.cdiv(t, blk)
    kw = {"implementation": "pallas", "interpret": False, "backend": backend}

    def loss(q, k, v, bi, seg):
        dense = sparse_attention(q, k, v, **kw)
        listed = sparse_attention(
            q, k, v, block_indices=bi, window=100, sinks=16, segment_ids=seg, block_q=blk, block_k=blk, **kw
        )
        return jnp.sum(dense.astype(jnp.float32)) + jnp.sum(listed.astype(jnp.float32))

    structs = [
        jax.ShapeDtypeStruct((b, t, h, p), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, kv, p), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, kv, p), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, h, nq, 3), jnp.int32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    ]
    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
        platforms=(platform,),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*structs)
    text = exported.mlir_module()
    marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    # forward x 2, dQ x 2, dK/dV x 2 (dense and table variants).
    assert text.count(marker) >= 6, text.count(marker)
    for name in ("fwd", "dq", "dkv"):
        assert f"sparse_attention_{name}_{backend}" in text, name


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"window": 0}, "window"),
        ({"sinks": -1}, "sinks"),
        ({"block_q": 0, "block_k": 16}, "block_q"),
        ({"implementation": "cuda"}, "implementation"),
        ({"implementation": None}, "implementation"),
        ({"block_indices": jnp.zeros((1, 4, 3, 3), jnp.int32)}, "block_indices"),  # 64-blocks: nq=1
        ({"block_indices": jnp.zeros((1, 4, 2, 3), jnp.int32), "block_q": 16, "block_k": 16}, "block_indices"),
        ({"segment_ids": jnp.zeros((1, 7), jnp.int32)}, "segment_ids"),
        (
            {"implementation": "pallas", "backend": "gpu", "interpret": True, "block_q": 24, "block_k": 16},
            "power of two",
        ),
        ({"implementation": "pallas", "backend": "cuda", "interpret": True}, "backend"),
    ],
)
def test_validation_errors(bad, match):
    q, k, v, _ = make_inputs(Case("e"), jnp.float32)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, **bad)


def test_gqa_head_counts_must_divide():
    q, k, v, _ = make_inputs(Case("e", h=4, kv=3), jnp.float32)
    with pytest.raises(ValueError, match="kv_heads"):
        sparse_attention(q, k, v)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only dispatch rule")
def test_pallas_on_cpu_interprets_by_default():
    """implementation='pallas' with interpret=None runs the interpreted kernels on CPU (and
    matches the oracle); interpret=False without a backend to lower for is an error."""
    q, k, v, kw = make_inputs(Case("e", window=9), jnp.float32)
    out = jax.jit(lambda q, k, v: sparse_attention(q, k, v, implementation="pallas", **kw))(q, k, v)
    np.testing.assert_allclose(out, run("reference", q, k, v, kw, grads=False), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="interpret"):
        sparse_attention(q, k, v, implementation="pallas", interpret=False, **kw)
