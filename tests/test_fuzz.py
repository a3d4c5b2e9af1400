"""Property-based checks (hypothesis) of every public kernel and model entry point: random shapes,
dtypes and values give the reference's answer or a named ValueError, never a crash, never NaN.

Shapes are kept small and the example counts low: every new shape compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.cauchy import cauchy, vandermonde
from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.ssd import ssd
from zoo.models import registry

FUZZ = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _rel(a, b) -> float:
    """max |a - b| / max(1, max |b|), complex or real."""
    a, b = np.asarray(a).astype(np.complex128), np.asarray(b).astype(np.complex128)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b))))) if b.size else 0.0


@settings(FUZZ, max_examples=8)
@given(
    batch=st.integers(1, 2),
    seqlen=st.integers(1, 40),
    heads_groups=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),
    head_dim=st.integers(1, 9),
    d_state=st.integers(1, 9),
    chunk=st.integers(1, 16),
    bf16=st.booleans(),
    packed=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_ssd_matches_reference(batch, seqlen, heads_groups, head_dim, d_state, chunk, bf16, packed, scale, seed):
    h, g = heads_groups
    k = jax.random.split(jax.random.key(seed), 5)
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    x = (scale * jax.random.normal(k[0], (batch, seqlen, h, head_dim))).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (batch, seqlen, h)))
    A = -jnp.exp(jax.random.normal(k[2], (h,)))
    B = jax.random.normal(k[3], (batch, seqlen, g, d_state)).astype(dtype)
    C = jax.random.normal(k[4], (batch, seqlen, g, d_state)).astype(dtype)
    seq_idx = (jnp.arange(seqlen)[None] // 7).repeat(batch, 0).astype(jnp.int32) if packed else None
    kw = dict(chunk_size=chunk, seq_idx=seq_idx, return_final_states=True)
    y, s = ssd(x, dt, A, B, C, implementation="xla", **kw)
    y_ref, s_ref = ssd(x, dt, A, B, C, implementation="reference", **kw)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32)))) and bool(jnp.all(jnp.isfinite(s)))
    tol = 3e-2 if bf16 else 2e-4
    assert _rel(y.astype(jnp.float32), y_ref.astype(jnp.float32)) < tol and _rel(s, s_ref) < tol


@FUZZ
@given(
    bad=st.sampled_from(["x_ndim", "dt", "A", "groups", "chunk", "seq_idx_dtype", "impl"]),
)
def test_ssd_bad_inputs_are_value_errors(bad):
    x, dt, A = jnp.ones((1, 8, 4, 2)), jnp.ones((1, 8, 4)), -jnp.ones((4,))
    B = C = jnp.ones((1, 8, 2, 3))
    kw = {}
    if bad == "x_ndim":
        x = x[0]
    elif bad == "dt":
        dt = dt[..., :3]
    elif bad == "A":
        A = A[:3]
    elif bad == "groups":
        B = C = jnp.ones((1, 8, 3, 3))
    elif bad == "chunk":
        kw["chunk_size"] = 0
    elif bad == "seq_idx_dtype":
        kw["seq_idx"] = jnp.zeros((1, 8), jnp.float32)
    else:
        kw["implementation"] = "cuda"
    with pytest.raises(ValueError):
        ssd(x, dt, A, B, C, **kw)


@settings(FUZZ, max_examples=6)
@given(
    tq_tk=st.sampled_from([(1, 1), (5, 5), (17, 17), (9, 23), (33, 33)]),
    heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    head_dim=st.sampled_from([4, 8, 12]),
    window=st.sampled_from([None, 1, 5, 40]),
    sinks=st.integers(0, 6),
    causal=st.booleans(),
    listed=st.booleans(),
    segments=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sparse_attention_matches_reference(tq_tk, heads_kv, head_dim, window, sinks, causal, listed, segments, seed):
    (tq, tk), (h, hk) = tq_tk, heads_kv
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (2, tq, h, head_dim))
    kk = jax.random.normal(k[1], (2, tk, hk, head_dim))
    v = jax.random.normal(k[2], (2, tk, hk, head_dim))
    block = 4
    nq, nk = -(-tq // block), -(-tk // block)
    idx = jax.random.randint(k[3], (2, h, nq, 2), -1, nk) if listed else None
    seg = None
    if segments and tq == tk:
        seg = (jnp.arange(tq)[None] // 6).repeat(2, 0)
    kw = dict(
        block_indices=idx, causal=causal, window=window, sinks=sinks, block_q=block, block_k=block, segment_ids=seg
    )
    got = sparse_attention(q, kk, v, implementation="xla", **kw)
    want = sparse_attention(q, kk, v, implementation="reference", **kw)
    assert bool(jnp.all(jnp.isfinite(got)))
    assert _rel(got, want) < 1e-4


@FUZZ
@given(
    n=st.integers(1, 24),
    length=st.integers(0, 60),
    batch=st.integers(0, 3),
    conj=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cauchy_and_vandermonde_match_reference(n, length, batch, conj, seed):
    rng = np.random.default_rng(seed)
    c = lambda *s: jnp.asarray((rng.normal(size=s) + 1j * rng.normal(size=s)).astype(np.complex64))  # noqa: E731
    v, w = c(batch, n), -jnp.abs(c(batch, n).real) - 0.1 + 1j * c(batch, n).imag
    z = 1j * jnp.asarray(rng.uniform(-3, 3, size=(length,)).astype(np.float32))
    x = -0.1 * jnp.abs(c(batch, n).real) + 1j * c(batch, n).imag
    for got, want in [
        (cauchy(v, z, w, conj=conj, implementation="xla"), cauchy(v, z, w, conj=conj, implementation="reference")),
        (
            vandermonde(v, x, length, conj=conj, implementation="xla"),
            vandermonde(v, x, length, conj=conj, implementation="reference"),
        ),
    ]:
        assert got.shape == (batch, length) and bool(jnp.all(jnp.isfinite(got)))
        assert _rel(got, want) < 1e-4


LMS = registry.list_models("lm")
MODELS = {name: registry.create_model(name, "tiny") for name in LMS}


@FUZZ
@given(
    name=st.sampled_from(LMS),
    batch=st.integers(0, 3),
    length=st.integers(0, 12),
    dtype=st.sampled_from([np.int32, np.int16, np.float32]),
    low=st.integers(-3, 0),
    over=st.integers(-1, 3),
    seed=st.integers(0, 2**16),
)
def test_model_entry_points_give_logits_or_value_errors(name, batch, length, dtype, low, over, seed):
    """Any token array: finite logits [B, T, V] when it is a valid batch of ids, else a ValueError."""
    model = MODELS[name]
    vocab = model.config.vocab_size
    tokens = np.random.default_rng(seed).integers(low, vocab + over, (batch, length)).astype(dtype)
    in_range = tokens.size > 0 and tokens.min() >= 0 and tokens.max() < vocab
    valid = batch >= 1 and length >= 1 and dtype != np.float32 and in_range
    if not valid:
        with pytest.raises(ValueError):
            model(jnp.asarray(tokens))
        return
    logits = model(jnp.asarray(tokens))
    assert logits.shape == (batch, length, vocab) and bool(jnp.all(jnp.isfinite(logits)))
