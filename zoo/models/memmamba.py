"""MemMamba (Wang et al. 2025, "MemMamba: Rethinking Memory Patterns in State Space Model",
arXiv 2510.03279): Mamba-2 blocks plus a Note Block (state summarisation into a fixed pool of notes,
threshold-triggered cross-token attention over the pool, gated fusion) and sparse cross-layer
attention over notes of earlier layers. Linear in the sequence length.

The paper has no public code and our notes (`shared/references/ssm.md` §5) hold only its abstract
and secondary descriptions, so this is OUR reconstruction. What each part rests on:

From the paper (abstract / figure caption, via secondary summaries):
  - Mamba-2 blocks ("n stacked MemMamba Block Layers"); a Note Block per layer that scores token
    importance and keeps a FIXED-SIZE pool of summaries ("note-taking", state summarisation);
  - cross-token attention from the tokens to the pool, threshold-triggered, fused back by a gate;
  - sparse cross-layer attention every few layers over notes from earlier layers; linear cost.
From secondary sources [UNVERIFIED; defaults of third-party re-implementations that may mirror the
paper's hyper-parameters]: scorer s_t = sigmoid(w2^T ReLU(W1 y_t)) with hidden d/4; a linear
summariser d -> summary_dim; insert when s_t > tau1; priority replacement of the lowest-priority
slot when the pool is full; retrieval when a score exceeds tau2; sigmoid-gated fusion
y <- y + g * retrieved; defaults pool_size 50, summary_dim 64, tau1 0.5, tau2 0.3, every 4 layers.
Chosen by us (config fields; defaults in brackets):
  - `note_source` ["mixer_out"]: the scorer and summariser read the mixer output y_t of the layer
    ("block_in": the normalised block input instead);
  - `weight_notes_by_score` [True]: the note written is s_t * W_sum y_t, so the scorer receives a
    gradient (the selection itself is discrete and has none);
  - `trigger` ["score"]: retrieval at token t iff s_t > tau2 (per token, so causal; a sequence-mean
    trigger as in one third-party version would read the future); "always" = always retrieve;
  - `priority_decay` [1.0]: every step the priorities of stored notes are multiplied by it before
    insertion (< 1 makes old notes easier to replace; 1 = pure score priority);
  - `note_heads` [4]: heads of the pool attention, head dim summary_dim / note_heads; keys and
    values are linear maps of the stored summaries, queries a linear map of y_t; softmax in fp32;
  - gate g = sigmoid(W_g [y_t; r_t] + b_g) per channel (r_t the retrieved vector after its output
    projection); the fused output y_t + trig_t * (g * r_t + g_x * r_x,t) replaces the mixer output
    in the residual update x <- x + fused;
  - cross layers: layer l (0-based) is a cross layer iff `cross_layer_interval` > 0, l >= 1 and
    (l + 1) % interval == 0. A cross layer keeps a second pool of the same size, fed by the notes
    (scores, summaries) of the earlier layers, the last `cross_layer_window` of them (0 = all),
    with the same insertion rule, and reads it with its own q/k/v/output/gate projections. With
    priority_decay = 1 this pool equals the top-pool_size of the union of those layers' pools;
  - causality: token t reads only notes written by tokens < t, in both pools (it reads before it
    writes). Empty slots have priority -1 and are masked; a read of an empty pool returns 0.
  - scorer hidden width `scorer_hidden` [0 = d_model // 4].

Pool update (per layer, per token t, one `lax.scan` step shared by the parallel form and decoding):
    r_t  = Attn(q_t, pool)                                   # read the notes of tokens < t
    prio <- prio * priority_decay  (stored slots only)
    j = argmin(prio); insert (s_t, k_t, v_t) at j iff s_t > tau1 and s_t > prio[j]
Static shapes throughout (argmin + one-hot `where`, no data-dependent Python control flow).

Shapes: B batch, T time, D d_model, S summary_dim, M pool_size, Hn note_heads, Pn = S / Hn,
J number of earlier layers feeding a cross layer, L layers, X cross layers.
Inference protocol: `model(tokens)`; `cache = model.init_cache(B, max_length)` (the Mamba-2 cache
plus the pools: note_prio [L,B,M], note_k/note_v [L,B,M,Hn,Pn], xnote_* [X,...]);
`model.prefill(tokens, cache)`; `model.decode_step(tokens_t, cache)`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers import Linear, RMSNorm, param
from zoo.models import registry
from zoo.models.mamba2 import Mamba2, Mamba2Block, Mamba2Config

_EMPTY = -1.0  # priority of an empty slot (scores lie in (0, 1))


@dataclasses.dataclass(frozen=True)
class MemMambaConfig(Mamba2Config):
    pool_size: int = 50                 # M notes per pool (secondary sources)
    summary_dim: int = 64               # S (secondary sources)
    tau1: float = 0.5                   # write threshold on s_t (secondary sources)
    tau2: float = 0.3                   # retrieval threshold on s_t (secondary sources)
    cross_layer_interval: int = 4       # 0 = no cross-layer attention (secondary sources)
    cross_layer_window: int = 0         # earlier layers feeding a cross layer; 0 = all (ours)
    note_heads: int = 4                 # ours
    scorer_hidden: int = 0              # 0 = d_model // 4 (secondary sources)
    note_source: str = "mixer_out"      # mixer_out | block_in (ours)
    weight_notes_by_score: bool = True  # ours
    trigger: str = "score"              # score | always (ours)
    priority_decay: float = 1.0         # ours
    scan_unroll: int = 1                # lax.scan unroll of the pool update (speed only)

    def __post_init__(self):
        super().__post_init__()
        if self.pool_size < 1:
            raise ValueError(f"pool_size={self.pool_size} must be >= 1")
        if self.summary_dim < 1 or self.note_heads < 1 or self.summary_dim % self.note_heads:
            raise ValueError(f"summary_dim ({self.summary_dim}) must be a positive multiple of note_heads "
                             f"({self.note_heads}); change one of them")
        if not 0.0 <= self.tau1 <= 1.0 or not 0.0 <= self.tau2 <= 1.0:
            raise ValueError(f"tau1 ({self.tau1}) and tau2 ({self.tau2}) must lie in [0, 1] (scores are sigmoids)")
        if self.cross_layer_interval < 0 or self.cross_layer_window < 0:
            raise ValueError(f"cross_layer_interval ({self.cross_layer_interval}) and cross_layer_window "
                             f"({self.cross_layer_window}) must be >= 0 (0 = off / all layers)")
        if self.note_source not in ("mixer_out", "block_in"):
            raise ValueError(f"note_source={self.note_source!r}; choose 'mixer_out' or 'block_in'")
        if self.trigger not in ("score", "always"):
            raise ValueError(f"trigger={self.trigger!r}; choose 'score' or 'always'")
        if not 0.0 < self.priority_decay <= 1.0:
            raise ValueError(f"priority_decay={self.priority_decay} must lie in (0, 1]")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll={self.scan_unroll} must be >= 1")

    @property
    def note_head_dim(self) -> int:
        return self.summary_dim // self.note_heads

    @property
    def hidden(self) -> int:
        return self.scorer_hidden or max(1, self.d_model // 4)

    def is_cross_layer(self, layer: int) -> bool:
        p = self.cross_layer_interval
        return p > 0 and layer >= 1 and (layer + 1) % p == 0

    def cross_sources(self, layer: int) -> tuple[int, ...]:
        """The earlier layers whose notes feed cross layer `layer`."""
        lo = 0 if self.cross_layer_window == 0 else max(0, layer - self.cross_layer_window)
        return tuple(range(lo, layer))

    @property
    def cross_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if self.is_cross_layer(i))


def _official(d_model: int, n_layers: int) -> MemMambaConfig:
    return MemMambaConfig(vocab_size=50277, d_model=d_model, n_layers=n_layers, d_state=128, headdim=64,
                          expand=2, ngroups=1, chunk_size=256, dtype="bfloat16")


PRESETS = {
    # Mamba-2 `tiny` (2 layers, D 64) + a 16-note pool of 32-dim summaries; layer 1 is a cross layer.
    "tiny": MemMambaConfig(pool_size=16, summary_dim=32, cross_layer_interval=2),
    # Mamba-2 130m / 370m bodies with the secondary-source defaults for the Note Block.
    "130m": _official(768, 24),
    "370m": _official(1024, 48),
}


# ------------------------------------------------------------------------------- pool primitives
def init_pool(batch_size: int, cfg: MemMambaConfig) -> dict:
    """An empty pool: prio [B,M] = -1, k, v [B,M,Hn,Pn] zeros (fp32)."""
    m, h, p = cfg.pool_size, cfg.note_heads, cfg.note_head_dim
    return {"prio": jnp.full((batch_size, m), _EMPTY, jnp.float32),
            "k": jnp.zeros((batch_size, m, h, p), jnp.float32),
            "v": jnp.zeros((batch_size, m, h, p), jnp.float32)}


def pool_read(q: jax.Array, pool: dict) -> jax.Array:
    """Softmax attention of q [B,Hn,Pn] over the stored slots of the pool -> [B,Hn,Pn] (0 if empty)."""
    valid = pool["prio"] > _EMPTY / 2                                          # [B,M]
    s = jnp.einsum("bhp,bmhp->bhm", q.astype(jnp.float32), pool["k"]) * q.shape[-1] ** -0.5
    mask = valid[:, None]                                                       # [B,1,M]
    # Max-subtraction (no gradient needed); the double `where` keeps every branch finite, so
    # neither forward- nor reverse-mode derivatives see inf or NaN, even for an empty pool.
    mx = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s, -1e30), -1, keepdims=True))
    w = jnp.where(mask, jnp.exp(jnp.where(mask, s - mx, 0.0)), 0.0)
    den = jnp.sum(w, -1, keepdims=True)
    w = w / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhm,bmhp->bhp", w, pool["v"])


def pool_insert(pool: dict, score: jax.Array, k: jax.Array, v: jax.Array, tau1: float) -> dict:
    """Priority replacement: write (score [B], k, v [B,Hn,Pn]) into the lowest-priority slot (empty
    slots first) iff score > tau1 and score > that slot's priority."""
    prio = pool["prio"]
    score = jax.lax.stop_gradient(score.astype(jnp.float32))
    slot = jnp.argmin(prio, axis=-1)                                           # [B]
    lowest = jnp.take_along_axis(prio, slot[:, None], axis=-1)[:, 0]
    write = (score > tau1) & (score > lowest)
    hit = (jnp.arange(prio.shape[1])[None] == slot[:, None]) & write[:, None]  # [B,M]
    return {"prio": jnp.where(hit, score[:, None], prio),
            "k": jnp.where(hit[..., None, None], k[:, None].astype(jnp.float32), pool["k"]),
            "v": jnp.where(hit[..., None, None], v[:, None].astype(jnp.float32), pool["v"])}


def decay_pool(pool: dict, decay: float) -> dict:
    if decay == 1.0:
        return pool
    prio = pool["prio"]
    return {**pool, "prio": jnp.where(prio > _EMPTY / 2, prio * decay, prio)}


def pool_scan(pool: dict, q, score, k, v, *, tau1: float, decay: float, unroll: int = 1):
    """Read-then-write over time: q [B,T,Hn,Pn]; candidates score [B,T,C], k, v [B,T,C,Hn,Pn], written
    in the order c = 0..C-1 after the read. Returns (reads [B,T,Hn,Pn], final pool)."""
    def body(pool, xs):
        q_t, s_t, k_t, v_t = xs
        r_t = pool_read(q_t, pool)
        pool = decay_pool(pool, decay)
        for c in range(s_t.shape[-1]):
            pool = pool_insert(pool, s_t[:, c], k_t[:, c], v_t[:, c], tau1)
        return pool, r_t

    xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (q, score, k, v))
    pool, reads = jax.lax.scan(body, pool, xs, unroll=min(unroll, q.shape[1]))
    return jnp.moveaxis(reads, 0, 1), pool


# ------------------------------------------------------------------------------- modules
class PoolAttention(nnx.Module):
    """q from y [B,T,D], k/v from notes [..., S], output projection S -> D and the fusion gate."""

    def __init__(self, cfg: MemMambaConfig, *, rngs: nnx.Rngs):
        d, s, dt = cfg.d_model, cfg.summary_dim, cfg.dtype
        self.cfg = cfg
        self.wq = Linear(d, s, axes=("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(s, s, axes=(None, "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(s, s, axes=(None, "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(s, d, axes=("heads", "embed"), rngs=rngs, dtype=dt,
                         init_std=s ** -0.5 / cfg.n_layers ** 0.5)
        self.gate = Linear(2 * d, d, axes=("mlp", "embed"), rngs=rngs, dtype=dt, use_bias=True)

    def heads(self, a: jax.Array) -> jax.Array:
        return a.reshape(*a.shape[:-1], self.cfg.note_heads, self.cfg.note_head_dim).astype(jnp.float32)

    def fuse(self, y: jax.Array, reads: jax.Array) -> jax.Array:
        """reads [B,T,Hn,Pn] -> gate * W_o reads [B,T,D]."""
        r = self.wo(reads.reshape(*reads.shape[:-2], -1))
        g = jax.nn.sigmoid(self.gate(jnp.concatenate([y.astype(r.dtype), r], -1)).astype(jnp.float32))
        return g * r.astype(jnp.float32)


class NoteBlock(nnx.Module):
    """Scorer, summariser, the in-layer pool attention and (on cross layers) the cross-layer one."""

    def __init__(self, cfg: MemMambaConfig, layer: int, *, rngs: nnx.Rngs):
        d, dt = cfg.d_model, cfg.dtype
        self.cfg, self.layer = cfg, layer
        self.score1 = Linear(d, cfg.hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dt, use_bias=True)
        self.score2 = Linear(cfg.hidden, 1, axes=("mlp", None), rngs=rngs, dtype=dt, use_bias=True)
        self.summarise = Linear(d, cfg.summary_dim, axes=("embed", None), rngs=rngs, dtype=dt)
        self.local = PoolAttention(cfg, rngs=rngs)
        self.cross = PoolAttention(cfg, rngs=rngs) if cfg.is_cross_layer(layer) else None

    def notes(self, src: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Importance scores s [B,T] (fp32) and notes [B,T,S] (fp32) of the tokens."""
        s = jax.nn.sigmoid(self.score2(jax.nn.relu(self.score1(src)))[..., 0].astype(jnp.float32))
        n = self.summarise(src).astype(jnp.float32)
        if self.cfg.weight_notes_by_score:
            n = n * s[..., None]
        return s, n

    def __call__(self, src, y, pool, xpool, prev_scores, prev_notes):
        """src, y [B,T,D]; pool (and xpool on a cross layer) the pools before the first token;
        prev_scores [B,T,J], prev_notes [B,T,J,S] the notes of the earlier layers feeding a cross layer.

        Returns (fused [B,T,D] fp32, pool, xpool, scores [B,T], notes [B,T,S]).
        """
        cfg = self.cfg
        s, n = self.notes(src)
        loc = self.local
        reads, pool = pool_scan(pool, loc.heads(loc.wq(y)), s[..., None], loc.heads(loc.wk(n))[:, :, None],
                                loc.heads(loc.wv(n))[:, :, None], tau1=cfg.tau1, decay=cfg.priority_decay,
                                unroll=cfg.scan_unroll)
        extra = loc.fuse(y, reads)
        if self.cross is not None:
            xa = self.cross
            xreads, xpool = pool_scan(xpool, xa.heads(xa.wq(y)), prev_scores, xa.heads(xa.wk(prev_notes)),
                                      xa.heads(xa.wv(prev_notes)), tau1=cfg.tau1, decay=cfg.priority_decay,
                                      unroll=cfg.scan_unroll)
            extra = extra + xa.fuse(y, xreads)
        trig = jnp.ones_like(s) if cfg.trigger == "always" else (s > cfg.tau2).astype(jnp.float32)
        fused = y.astype(jnp.float32) + trig[..., None] * extra
        return fused, pool, xpool, s, n


class MemMambaBlock(Mamba2Block):
    """The Mamba-2 block (RMSNorm + mixer) plus its Note Block."""

    def __init__(self, cfg: MemMambaConfig, layer: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, layer, rngs=rngs)
        self.note = NoteBlock(cfg, layer, rngs=rngs)


_POOL_KEYS = ("prio", "k", "v")


@registry.register("memmamba", PRESETS)
class MemMamba(Mamba2):
    """MemMamba LM: the Mamba-2 LM (embedding, tied head, Stuffed-Mamba options) with Note Blocks."""

    def __init__(self, cfg: MemMambaConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, MemMambaConfig):
            raise ValueError(f"MemMamba needs a MemMambaConfig, got {type(cfg).__name__}")
        self.config = cfg
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.padded_vocab, cfg.d_model),
                               ("vocab", "embed"))
        self.blocks = nnx.List([MemMambaBlock(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)

    def set_inference_options(self, **options) -> MemMambaConfig:
        cfg = super().set_inference_options(**options)
        for block in self.blocks:
            block.note.cfg = cfg
            for att in (block.note.local, block.note.cross):
                if att is not None:
                    att.cfg = cfg
        return cfg

    # ---- cache
    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """The Mamba-2 cache plus the pools: note_* [L,...] per layer, xnote_* [X,...] per cross layer."""
        cache = super().init_cache(batch_size, max_length)
        cfg = self.config
        empty = init_pool(batch_size, cfg)
        for key in _POOL_KEYS:
            cache["note_" + key] = jnp.stack([empty[key]] * cfg.n_layers)
            cache["xnote_" + key] = jnp.broadcast_to(empty[key], (len(cfg.cross_layers),) + empty[key].shape)
        return cache

    def _mixer_state(self, cache, i):
        return {k: v[i] for k, v in cache.items() if k != "pos" and not k.startswith(("note_", "xnote_"))}

    # ---- shared layer loop: `mix(block, u, state)` is the mixer's parallel form or its step
    def _run(self, x, cache, mix):
        """x [B,T,D] fp32 embeddings -> (final residual [B,T,D], new cache without pos, residuals per layer)."""
        cfg = self.config
        xl = list(cfg.cross_layers)
        states, pools, xpools, scores, notes, stream = [], [], [], [], [], []
        for i, block in enumerate(self.blocks):
            u = block.norm(x)
            y, st = mix(block, u, self._mixer_state(cache, i))
            src = y if cfg.note_source == "mixer_out" else u
            pool = {k: cache["note_" + k][i] for k in _POOL_KEYS}
            xpool, ps, pn = None, None, None
            if cfg.is_cross_layer(i):
                xpool = {k: cache["xnote_" + k][xl.index(i)] for k in _POOL_KEYS}
                srcs = cfg.cross_sources(i)
                ps = jnp.stack([scores[j] for j in srcs], -1)                  # [B,T,J]
                pn = jnp.stack([notes[j] for j in srcs], -2)                   # [B,T,J,S]
            fused, pool, xpool, s, n = block.note(src, y, pool, xpool, ps, pn)
            x = x + fused
            states.append(st)
            pools.append(pool)
            if xpool is not None:
                xpools.append(xpool)
            scores.append(s)
            notes.append(n)
            stream.append(x)
        new = {k: jnp.stack([s[k] for s in states]) for k in states[0]}
        for key in _POOL_KEYS:
            new["note_" + key] = jnp.stack([p[key] for p in pools])
            new["xnote_" + key] = (jnp.stack([p[key] for p in xpools]) if xpools
                                   else cache["xnote_" + key])
        return x, new, stream

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, V] (from an empty cache)."""
        self._check_tokens(tokens, 2, "tokens")
        return self.prefill(tokens, self.init_cache(tokens.shape[0], tokens.shape[1]))[0]

    def prefill(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """tokens int32 [B, T] continuing from `cache` -> (logits [B, T, V], cache after the last token)."""
        self._check_tokens(tokens, 2, "tokens")
        x, new, _ = self._run(self._embed(tokens), cache,
                              lambda block, u, st: block.mixer.forward(u, st))
        new["pos"] = cache["pos"] + tokens.shape[1]
        return self._logits(x), new

    def decode_step(self, tokens_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """tokens_t int32 [B] -> (logits [B, V], updated cache); the mixers use their recurrent step."""
        self._check_tokens(tokens_t, 1, "tokens_t")

        def mix(block, u, st):
            y, st = block.mixer.step(u[:, 0], st)
            return y[:, None], st

        x, new, _ = self._run(self._embed(tokens_t[:, None]), cache, mix)
        new["pos"] = cache["pos"] + 1
        return self._logits(x)[:, 0], new

    def residual_stream(self, embeddings: jax.Array) -> jax.Array:
        """Analysis hook (zoo.eval.memory_fidelity): embeddings [B,T,D] -> residual after each block [L,B,T,D]."""
        cache = self.init_cache(embeddings.shape[0], embeddings.shape[1])
        _, _, stream = self._run(embeddings.astype(jnp.float32), cache,
                                 lambda block, u, st: block.mixer.forward(u, st))
        return jnp.stack(stream)
