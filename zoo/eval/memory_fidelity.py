"""Horizontal and vertical memory fidelity (ETMF, ECLMF) of a layered sequence model.

The MemMamba paper (arXiv 2510.03279) names two metrics: ETMF, Expected Token Memory Fidelity
(within a layer, across time) and ECLMF, Expected Cross-Layer Memory Fidelity (across layers).
Its exact formulas are not in our notes, so these are OUR operationalisation, by gradient
attribution (Jacobian norms), not by cosine similarity:

Let x^0 [T, D] be the embeddings fed to the first block and x^l [T, D] the residual stream after
block l (l = 1..L). The influence of token t on position s at layer l is the squared Frobenius norm

    I^l(t -> s) = || d x^l_s / d x^0_t ||_F^2        (0 for s < t in a causal model).

  ETMF^l(k)   = sqrt( sum_t I^l(t -> t+k) / sum_t I^l(t -> t) )       horizontal: how much of a
                token's influence on layer l is left k steps later, relative to its own position;
  ECLMF^l(k)  = sqrt( sum_t I^l(t -> t+k) / sum_t I^1(t -> t+k) )     vertical: how much of the
                influence at lag k survives from layer 1 up to layer l (1 at l = 1).

The sums run over the sampled source positions t with t + k < T (the same set in numerator and
denominator), the batch, and random probes. The expectations are estimated with Gaussian probes:
||J||_F^2 = E_v ||J v||^2 for v ~ N(0, I), and J v for one source position t and every output
position and layer comes from one forward-mode product (`jax.jvp`) with the tangent v placed at t.
A metric above 1 means the influence grows (e.g. a residual stack amplifying a token).

Known answers (tested): one linear layer x^1_t = a x^1_{t-1} + x^0_t gives ETMF^1(k) = a^k; two
such layers give ETMF^2(k) = (k+1) a^k and ECLMF^2(k) = k+1; identity layers give ETMF(k>0) = 0
and ECLMF = 1. With J a multiple of the identity the probe estimate is exact.

Models: every zoo language model (`LanguageModel.residual_stream(embeddings [B,T,D]) -> [L,B,T,D]`);
`fidelity_from_fn` takes any function of that signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

StreamFn = Callable[[jax.Array], jax.Array]  # x0 [B,T,D] -> residual stream [L,B,T,D]


def residual_stream_fn(model) -> StreamFn:
    """The map from embeddings to the residual stream after every block, for a zoo language model."""
    if not hasattr(model, "residual_stream"):
        raise ValueError(f"memory fidelity needs a zoo language model (residual_stream), got {type(model).__name__}")
    return model.residual_stream


def influence(fn: StreamFn, x0: jax.Array, sources: Sequence[int], probes: int = 4, seed: int = 0) -> np.ndarray:
    """Estimated I^l(t -> s) for every layer l, source t in `sources` and position s: [L, S, T].

    Averaged over the batch and `probes` Gaussian tangents (float64 numpy result)."""
    x0 = jnp.asarray(x0, jnp.float32)
    b, t, d = x0.shape
    src = jnp.asarray(sources, jnp.int32)
    if src.ndim != 1 or src.size == 0 or int(src.min()) < 0 or int(src.max()) >= t:
        raise ValueError(f"sources {list(sources)} must be a non-empty list of positions in [0, {t})")
    if probes < 1:
        raise ValueError(f"probes={probes} must be >= 1")
    v = jax.random.normal(jax.random.key(seed), (probes, src.size, b, d), jnp.float32)

    @jax.jit
    def one(pos, vec):  # vec [B,D] placed at position pos -> ||J v||^2 [L,T]
        tangent = jnp.zeros_like(x0).at[:, pos].set(vec)
        _, out = jax.jvp(fn, (x0,), (tangent,))  # [L,B,T,D]
        return jnp.mean(jnp.sum(jnp.square(out.astype(jnp.float32)), -1), 1)

    rows = [[np.asarray(one(src[i], v[p, i])) for i in range(src.size)] for p in range(probes)]
    return np.mean(np.asarray(rows, np.float64), 0).transpose(1, 0, 2)  # [L,S,T]


def fidelity_from_influence(inf: np.ndarray, sources: Sequence[int], lags: Sequence[int]) -> dict:
    """ETMF [L, K] and ECLMF [L, K] from an influence table [L, S, T] (NaN where no source fits)."""
    n_layers, _, t = inf.shape
    etmf = np.full((n_layers, len(lags)), np.nan)
    eclmf = np.full_like(etmf, np.nan)
    for j, k in enumerate(lags):
        if k < 0:
            raise ValueError(f"lags must be >= 0, got {k}")
        ok = [i for i, s in enumerate(sources) if s + k < t]
        if not ok:
            continue
        at_k = np.array([sum(inf[l, i, sources[i] + k] for i in ok) for l in range(n_layers)])
        at_0 = np.array([sum(inf[l, i, sources[i]] for i in ok) for l in range(n_layers)])
        with np.errstate(divide="ignore", invalid="ignore"):
            etmf[:, j] = np.sqrt(at_k / at_0)
            eclmf[:, j] = np.sqrt(at_k / at_k[0])
    return {"lags": [int(k) for k in lags], "etmf": etmf, "eclmf": eclmf}


def fidelity_from_fn(
    fn: StreamFn,
    x0: jax.Array,
    lags: Sequence[int],
    sources: Sequence[int] | None = None,
    probes: int = 4,
    seed: int = 0,
) -> dict:
    """ETMF/ECLMF of an arbitrary residual-stream function (see the module docstring)."""
    t = x0.shape[1]
    if sources is None:
        sources = list(range(0, max(1, t - max(lags))))
    inf = influence(fn, x0, sources, probes, seed)
    return {**fidelity_from_influence(inf, list(sources), lags), "sources": list(map(int, sources))}


def memory_fidelity(
    model, tokens: jax.Array, lags: Sequence[int], sources: Sequence[int] | None = None, probes: int = 4, seed: int = 0
) -> dict:
    """ETMF^l(k) and ECLMF^l(k) of a zoo language model on `tokens` int32 [B, T].

    Returns {"lags", "sources", "etmf" [L, K], "eclmf" [L, K]} (layer l+1 in row l)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens has shape {tokens.shape}; expected [B, T] int32")
    fn = residual_stream_fn(model)
    return fidelity_from_fn(fn, model.residual(model.embed_tokens(tokens)), lags, sources, probes, seed)
