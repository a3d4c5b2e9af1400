"""MemMamba (Wang et al. 2025, "MemMamba: Rethinking Memory Patterns in State Space Model",
arXiv 2510.03279): Mamba-2 blocks plus a Note Block (state summarisation into a fixed pool of notes,
threshold-triggered cross-token attention over the pool, gated fusion) and sparse cross-layer
attention over notes of earlier layers. Linear in the sequence length.

The paper has no public code and only its abstract and secondary descriptions are available, so
this is OUR reconstruction. What each part rests on:

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
Inference protocol (`zoo.models.base.LanguageModel`): `model(tokens, segment_ids=...)`;
`cache = model.init_cache(B, max_length)` (per layer: the Mamba-2 state plus the pool prio [B,M],
k/v [B,M,Hn,Pn], and on cross layers the cross pool); `model.prefill(tokens, cache)`;
`model.decode_step(tokens_t, cache)`. Packed documents (`segment_ids`) empty both pools at every
document start, besides the Mamba-2 resets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers import Linear, RMSNorm
from zoo.models import registry
from zoo.models.base import Block, Context, segment_starts
from zoo.models.mamba2 import PRESETS as MAMBA2_PRESETS
from zoo.models.mamba2 import Mamba2, Mamba2Config, Mamba2Mixer

_EMPTY = -1.0  # priority of an empty slot (scores lie in (0, 1))


@dataclasses.dataclass(frozen=True)
class MemMambaConfig(Mamba2Config):
    """MemMamba: Mamba-2's fields plus the note pool and cross-layer attention (see the field comments)."""

    pool_size: int = 50  # M notes per pool (secondary sources)
    summary_dim: int = 64  # S (secondary sources)
    tau1: float = 0.5  # write threshold on s_t (secondary sources)
    tau2: float = 0.3  # retrieval threshold on s_t (secondary sources)
    cross_layer_interval: int = 4  # 0 = no cross-layer attention (secondary sources)
    cross_layer_window: int = 0  # earlier layers feeding a cross layer; 0 = all (ours)
    note_heads: int = 4  # ours
    scorer_hidden: int = 0  # 0 = d_model // 4 (secondary sources)
    note_source: str = "mixer_out"  # mixer_out | block_in (ours)
    weight_notes_by_score: bool = True  # ours
    trigger: str = "score"  # score | always (ours)
    priority_decay: float = 1.0  # ours
    scan_unroll: int = 1  # lax.scan unroll of the pool update (speed only)

    def __post_init__(self):
        super().__post_init__()
        if self.pool_size < 1:
            raise ValueError(f"pool_size={self.pool_size} must be >= 1")
        if self.summary_dim < 1 or self.note_heads < 1 or self.summary_dim % self.note_heads:
            raise ValueError(
                f"summary_dim ({self.summary_dim}) must be a positive multiple of note_heads "
                f"({self.note_heads}); change one of them"
            )
        if not 0.0 <= self.tau1 <= 1.0 or not 0.0 <= self.tau2 <= 1.0:
            raise ValueError(f"tau1 ({self.tau1}) and tau2 ({self.tau2}) must lie in [0, 1] (scores are sigmoids)")
        if self.cross_layer_interval < 0 or self.cross_layer_window < 0:
            raise ValueError(
                f"cross_layer_interval ({self.cross_layer_interval}) and cross_layer_window "
                f"({self.cross_layer_window}) must be >= 0 (0 = off / all layers)"
            )
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


PRESETS = {
    # Mamba-2 `tiny` (2 layers, D 64) + a 16-note pool of 32-dim summaries; layer 1 is a cross layer.
    "tiny": MemMambaConfig(pool_size=16, summary_dim=32, cross_layer_interval=2),
    # Mamba-2 130m / 370m bodies with the secondary-source defaults for the Note Block.
    "130m": MemMambaConfig(**dataclasses.asdict(MAMBA2_PRESETS["130m"])),
    "370m": MemMambaConfig(**dataclasses.asdict(MAMBA2_PRESETS["370m"])),
}


# ------------------------------------------------------------------------------- pool primitives
def init_pool(batch_size: int, cfg: MemMambaConfig) -> dict:
    """An empty pool: prio [B,M] = -1, k, v [B,M,Hn,Pn] zeros (fp32)."""
    m, h, p = cfg.pool_size, cfg.note_heads, cfg.note_head_dim
    return {
        "prio": jnp.full((batch_size, m), _EMPTY, jnp.float32),
        "k": jnp.zeros((batch_size, m, h, p), jnp.float32),
        "v": jnp.zeros((batch_size, m, h, p), jnp.float32),
    }


def pool_read(q: jax.Array, pool: dict) -> jax.Array:
    """Softmax attention of q [B,Hn,Pn] over the stored slots of the pool -> [B,Hn,Pn] (0 if empty)."""
    valid = pool["prio"] > _EMPTY / 2  # [B,M]
    s = jnp.einsum("bhp,bmhp->bhm", q.astype(jnp.float32), pool["k"]) * q.shape[-1] ** -0.5
    mask = valid[:, None]  # [B,1,M]
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
    slot = jnp.argmin(prio, axis=-1)  # [B]
    lowest = jnp.take_along_axis(prio, slot[:, None], axis=-1)[:, 0]
    write = (score > tau1) & (score > lowest)
    hit = (jnp.arange(prio.shape[1])[None] == slot[:, None]) & write[:, None]  # [B,M]
    return {
        "prio": jnp.where(hit, score[:, None], prio),
        "k": jnp.where(hit[..., None, None], k[:, None].astype(jnp.float32), pool["k"]),
        "v": jnp.where(hit[..., None, None], v[:, None].astype(jnp.float32), pool["v"]),
    }


def decay_pool(pool: dict, decay: float) -> dict:
    """The note pool with every priority multiplied by `decay` (unchanged for decay 1)."""
    if decay == 1.0:
        return pool
    prio = pool["prio"]
    return {**pool, "prio": jnp.where(prio > _EMPTY / 2, prio * decay, prio)}


def pool_scan(pool: dict, q, score, k, v, *, tau1: float, decay: float, unroll: int = 1, reset=None):
    """Read-then-write over time: q [B,T,Hn,Pn]; candidates score [B,T,C], k, v [B,T,C,Hn,Pn], written
    in the order c = 0..C-1 after the read (a candidate scored below 0 is never written). With
    `reset` [B,T] bool, the pool is emptied before the read of every token that starts a new
    document. Returns (reads [B,T,Hn,Pn], final pool)."""
    empty = {
        "prio": jnp.full_like(pool["prio"], _EMPTY),
        "k": jnp.zeros_like(pool["k"]),
        "v": jnp.zeros_like(pool["v"]),
    }
    if reset is None:
        reset = jnp.zeros(q.shape[:2], bool)

    def body(pool, xs):
        q_t, s_t, k_t, v_t, reset_t = xs
        pool = jax.tree.map(lambda e, p: jnp.where(reset_t.reshape((-1,) + (1,) * (p.ndim - 1)), e, p), empty, pool)
        r_t = pool_read(q_t, pool)
        pool = decay_pool(pool, decay)
        for c in range(s_t.shape[-1]):
            pool = pool_insert(pool, s_t[:, c], k_t[:, c], v_t[:, c], tau1)
        return pool, r_t

    xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (q, score, k, v, reset))
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
        self.wo = Linear(s, d, axes=("heads", "embed"), rngs=rngs, dtype=dt, init_std=s**-0.5 / cfg.n_layers**0.5)
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

    def __init__(self, cfg: MemMambaConfig, cross: bool, *, rngs: nnx.Rngs):
        d, dt = cfg.d_model, cfg.dtype
        self.cfg = cfg
        self.score1 = Linear(d, cfg.hidden, axes=("embed", "mlp"), rngs=rngs, dtype=dt, use_bias=True)
        self.score2 = Linear(cfg.hidden, 1, axes=("mlp", None), rngs=rngs, dtype=dt, use_bias=True)
        self.summarise = Linear(d, cfg.summary_dim, axes=("embed", None), rngs=rngs, dtype=dt)
        self.local = PoolAttention(cfg, rngs=rngs)
        self.cross = PoolAttention(cfg, rngs=rngs) if cross else None

    def notes(self, src: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Importance scores s [B,T] (fp32) and notes [B,T,S] (fp32) of the tokens."""
        s = jax.nn.sigmoid(self.score2(jax.nn.relu(self.score1(src)))[..., 0].astype(jnp.float32))
        n = self.summarise(src).astype(jnp.float32)
        if self.cfg.weight_notes_by_score:
            n = n * s[..., None]
        return s, n

    def __call__(self, src, y, state, prev_scores, prev_notes, reset):
        """src, y [B,T,D]; state {"pool", ("xpool" on a cross layer)} before the first token;
        prev_scores [B,T,J], prev_notes [B,T,J,S] the notes of the earlier layers feeding a cross
        layer (a score below 0 marks a layer that does not feed it); reset [B,T] document starts.

        Returns (fused [B,T,D] fp32, new state, scores [B,T], notes [B,T,S]).
        """
        cfg = self.cfg
        s, n = self.notes(src)
        loc = self.local
        scan = dict(tau1=cfg.tau1, decay=cfg.priority_decay, unroll=cfg.scan_unroll, reset=reset)
        reads, pool = pool_scan(
            state["pool"],
            loc.heads(loc.wq(y)),
            s[..., None],
            loc.heads(loc.wk(n))[:, :, None],
            loc.heads(loc.wv(n))[:, :, None],
            **scan,
        )
        extra = loc.fuse(y, reads)
        new = {"pool": pool}
        if self.cross is not None:
            xa = self.cross
            xreads, new["xpool"] = pool_scan(
                state["xpool"],
                xa.heads(xa.wq(y)),
                prev_scores,
                xa.heads(xa.wk(prev_notes)),
                xa.heads(xa.wv(prev_notes)),
                **scan,
            )
            extra = extra + xa.fuse(y, xreads)
        trig = jnp.ones_like(s) if cfg.trigger == "always" else (s > cfg.tau2).astype(jnp.float32)
        fused = y.astype(jnp.float32) + trig[..., None] * extra
        return fused, new, s, n


class MemMambaBlock(Block):
    """The Mamba-2 block (RMSNorm + mixer) plus its Note Block. The residual carry holds, beside the
    stream x [B,T,D], the scores [L,B,T] and notes [L,B,T,S] every layer wrote for the cross layers."""

    def __init__(self, cfg: MemMambaConfig, cross: bool, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg, rngs=rngs)
        self.note = NoteBlock(cfg, cross, rngs=rngs)

    def __call__(self, h: dict, ctx: Context) -> dict:
        return self.prefill(h, self.init_state(h["x"].shape[0], h["x"].shape[1]), ctx)[0]

    def init_state(self, batch_size: int, max_length: int) -> dict:
        state = {"mixer": self.mixer.init_state(batch_size), "pool": init_pool(batch_size, self.mixer.cfg)}
        if self.note.cross is not None:
            state["xpool"] = init_pool(batch_size, self.mixer.cfg)
        return state

    def prefill(self, h: dict, state: dict, ctx: Context) -> tuple[dict, dict]:
        u = self.norm(h["x"])
        y, mixer_state = self.mixer.forward(u, state["mixer"], ctx)
        return self._notes(h, u, y, state, mixer_state, ctx)

    def decode(self, h: dict, state: dict, ctx: Context) -> tuple[dict, dict]:
        u = self.norm(h["x"])
        y, mixer_state = self.mixer.step(u[:, 0], state["mixer"], ctx)
        return self._notes(h, u, y[:, None], state, mixer_state, ctx)

    def _notes(self, h, u, y, state, mixer_state, ctx: Context):
        """The Note Block on the mixer output y, then the residual update and this layer's notes."""
        cfg, layer = self.mixer.cfg, ctx.layer
        src = y if cfg.note_source == "mixer_out" else u
        prev_scores = prev_notes = None
        if self.note.cross is not None:
            # The earlier layers feeding this cross layer: their notes in layer order. Looped, the
            # layer index is static and the sources are sliced; scanned, the other layers' scores
            # are set below 0, so they are never written (same pool, same order).
            lo = 0 if cfg.cross_layer_window == 0 else jnp.maximum(0, layer - cfg.cross_layer_window)
            if isinstance(layer, int):
                lo = 0 if cfg.cross_layer_window == 0 else max(0, layer - cfg.cross_layer_window)
                sources, scores = slice(lo, layer), h["scores"][lo:layer]
            else:
                sources = slice(None)
                j = jnp.arange(cfg.n_layers)[:, None, None]
                scores = jnp.where((j >= lo) & (j < layer), h["scores"], -1.0)
            prev_scores = jnp.moveaxis(scores, 0, -1)  # [B,T,J]
            prev_notes = jnp.moveaxis(h["notes"][sources], 0, -2)  # [B,T,J,S]
        fused, new, s, n = self.note(src, y, state, prev_scores, prev_notes, segment_starts_of(ctx, u))
        new["mixer"] = mixer_state
        return {"x": h["x"] + fused, "scores": h["scores"].at[layer].set(s), "notes": h["notes"].at[layer].set(n)}, new


def segment_starts_of(ctx: Context, u: jax.Array) -> jax.Array | None:
    """bool [B,T] document starts inside a packed row (None without segment ids: no reset)."""
    if ctx.segment_ids is None:
        return None
    starts = segment_starts(ctx.segment_ids, u.shape[:2])
    return starts.at[:, 0].set(False)  # the state before the row is the layer's (empty) initial state


@registry.register("memmamba", PRESETS)
class MemMamba(Mamba2):
    """MemMamba LM: the Mamba-2 LM (embedding, tied head, Stuffed-Mamba options) with Note Blocks."""

    paper = "MemMamba (Wang et al. 2025; our reconstruction)"
    numerical_core = "`pallas_kernels/ssd`"

    def __init__(self, cfg: MemMambaConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, MemMambaConfig):
            raise ValueError(f"MemMamba needs a MemMambaConfig, got {type(cfg).__name__}")
        super().__init__(cfg, rngs=rngs)

    def make_block(self, cfg: MemMambaConfig, layer: int, rngs: nnx.Rngs) -> Block:
        return MemMambaBlock(cfg, cfg.is_cross_layer(layer), rngs=rngs)

    def embed_tokens(self, tokens: jax.Array) -> dict:
        return self.carry_from_embeddings(super().embed_tokens(tokens))

    def carry_from_embeddings(self, x: jax.Array) -> dict:
        cfg = self.config
        b, t = x.shape[:2]
        return {
            "x": x.astype(jnp.float32),
            "scores": jnp.zeros((cfg.n_layers, b, t), jnp.float32),
            "notes": jnp.zeros((cfg.n_layers, b, t, cfg.summary_dim), jnp.float32),
        }

    def residual(self, h: dict) -> jax.Array:
        return h["x"]

    def logits(self, h: dict) -> jax.Array:
        return super().logits(h["x"])
