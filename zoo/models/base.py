"""The model protocol of the zoo: one language-model interface, one block interface, one layer stack.

Every language model is a `LanguageModel`: it embeds tokens into a residual carry, runs a
`LayerStack` of `Block`s over it and reads logits off the result.

    logits = model(tokens, segment_ids=None, positions=None)     # [B, T] -> [B, T, V], parallel form
    cache = model.init_cache(batch_size, max_length)
    logits, cache = model.prefill(tokens, cache)                  # parallel over a prompt
    logits_t, cache = model.decode_step(tokens_t, cache)          # [B] -> [B, V], recurrent form

A block maps the residual carry to the carry, in three forms that compute the same function:

    h = block(h, ctx)                           # parallel over T tokens from an empty state
    state = block.init_state(batch_size, max_length)
    h, state = block.prefill(h, state, ctx)     # parallel over T tokens continuing from `state`
    h, state = block.decode(h, state, ctx)      # one token

`ctx` (a `Context`) carries the token positions, the segment ids of packed documents (a token sees
only earlier tokens of its own segment: attention masks, state resets) and the layer index. Because
every block has this one interface, the stack can loop over the layers or scan over stacked
parameters (`scan_layers`), and rematerialise each block in the backward pass (`remat`), the same
way for every model. The carry is usually the fp32 residual stream [B, T, D]; a model may carry a
pytree (MemMamba carries the notes of every layer beside it).

Shapes: B batch, T time, D model width, V vocabulary, L layers.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import dispatch
from zoo.layers import RMSNorm, SwiGLU

REMAT_POLICIES = ("none", "full", "dots_saveable")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Fields every language model's config has (model configs subclass it and add their own).

    Attributes:
      vocab_size, d_model, n_layers: the model's size.
      dtype: the compute dtype ("float32", "bfloat16", "float16"); parameters stay fp32.
      implementation: the kernels' implementation (`pallas_kernels.dispatch`): "auto" picks the
        accelerator kernels on TPU/GPU and the XLA paths on CPU.
      remat: rematerialise each block in the backward pass: "none", "full" (save nothing inside a
        block) or "dots_saveable" (save only matmul outputs).
      scan_layers: scan over stacked layer parameters instead of looping (compile time and memory
        of deep models); parameters then carry a leading layer axis (see `LayerStack`).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    dtype: str = "float32"
    implementation: str = "auto"
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
        if self.implementation not in dispatch.IMPLEMENTATIONS:
            raise ValueError(f"implementation={self.implementation!r} is not one of {dispatch.IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")


def make_stack(cfg: LMConfig, make_block: Callable[[int], Block]) -> LayerStack:
    """The model's `LayerStack` of `make_block(i)` for every layer, laid out as the config asks."""
    return LayerStack([make_block(i) for i in range(cfg.n_layers)], scan=cfg.scan_layers, remat=cfg.remat)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    """What a block needs to know about its tokens besides their features.

    Attributes:
      positions: int32 [B, T] position of every token within its document (RoPE, chunking).
      segment_ids: int32 [B, T] or None; a token interacts only with earlier tokens of the same id.
      index: int32 scalar, the cache slot of the first token (prefill and decode; 0 otherwise).
      layer: int32 scalar (a Python int when the layers are looped), the index of the current layer.
    """

    positions: jax.Array
    segment_ids: jax.Array | None = None
    index: jax.Array | int = 0
    layer: jax.Array | int = 0

    def at_layer(self, layer) -> Context:
        return dataclasses.replace(self, layer=layer)

    def step(self, t) -> Context:
        """The context of token t alone (for a scan over time)."""
        seg = None if self.segment_ids is None else jax.lax.dynamic_slice_in_dim(self.segment_ids, t, 1, 1)
        pos = jax.lax.dynamic_slice_in_dim(self.positions, t, 1, 1)
        return dataclasses.replace(self, positions=pos, segment_ids=seg, index=self.index + t)


def make_context(tokens: jax.Array, segment_ids=None, positions=None, index=0) -> Context:
    """The context of tokens [B, T]: positions index + arange(T) unless given."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
        positions = jnp.asarray(positions, jnp.int32)
        if positions.shape != (b, t):
            raise ValueError(f"positions has shape {positions.shape}; expected {(b, t)} like the tokens")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        if segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"segment_ids has shape {segment_ids.shape} and dtype {segment_ids.dtype}; "
                f"expected integer ids of shape {(b, t)} like the tokens"
            )
        segment_ids = segment_ids.astype(jnp.int32)
    return Context(positions=positions, segment_ids=segment_ids, index=index)


def segment_starts(segment_ids: jax.Array | None, shape) -> jax.Array:
    """bool [B, T]: True where a token starts a new segment (always at t = 0)."""
    if segment_ids is None:
        return jnp.zeros(shape, bool).at[:, 0].set(True)
    prev = jnp.concatenate([segment_ids[:, :1] - 1, segment_ids[:, :-1]], axis=1)
    return segment_ids != prev


class Block(nnx.Module):
    """One residual block. Subclasses implement `__call__`, `init_state` and `decode` or `prefill`.

    The defaults here tie the forms together: `prefill` runs `decode` token by token (exact, for
    blocks without a parallel form that continues from a state).
    """

    @abc.abstractmethod
    def __call__(self, h, ctx: Context):
        """The parallel form over T tokens from an empty state: h -> h."""

    @abc.abstractmethod
    def init_state(self, batch_size: int, max_length: int):
        """The empty decoding state of this block."""

    def decode(self, h, state, ctx: Context):
        """One token: h [B, 1, D] -> (h, state). Default: `prefill` of one token."""
        return self.prefill(h, state, ctx)

    def prefill(self, h, state, ctx: Context):
        """T tokens continuing from `state`. Default: `decode` of one token at a time (a scan)."""
        if type(self).decode is Block.decode:
            raise TypeError(f"{type(self).__name__} must implement decode or prefill")
        return scan_over_time(self.decode, h, state, ctx)


def scan_over_time(decode: Callable, h: jax.Array, state, ctx: Context):
    """`decode(h_t, state, ctx_t)` of one token at a time over the T tokens of h [B, T, ...] (a
    `lax.scan`): the token-by-token form of a prefill. Returns (outputs [B, T, ...], final state)."""

    def step(state, t):
        h_t, state = decode(jax.lax.dynamic_slice_in_dim(h, t, 1, 1), state, ctx.step(t))
        return state, h_t[:, 0]

    state, hs = jax.lax.scan(step, state, jnp.arange(h.shape[1]))
    return jnp.moveaxis(hs, 0, 1), state


class PreNormBlock(Block):
    """x = x + mixer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)), the residual stream in fp32: the block of
    the transformer family and LaCT around any mixer with the block interface (`__call__(x, ctx)`,
    `init_state`, and `prefill` and/or `decode`).

    Args:
      make_mixer: builds the mixer (called after the first norm, so parameters draw in block order).
      cfg: a config with d_model, d_ff, n_layers, norm_eps and dtype.
    """

    def __init__(self, make_mixer: Callable[[], nnx.Module], cfg, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.attn = make_mixer()
        self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        out_std = cfg.d_ff**-0.5 / (2 * cfg.n_layers) ** 0.5  # GPT-2 rescaling of the residual output
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=cfg.dtype, out_init_std=out_std)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:  # x [B, T, D] fp32 residual stream
        x = x + self.attn(self.attn_norm(x), ctx).astype(jnp.float32)
        return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)

    def init_state(self, batch_size: int, max_length: int):
        return self.attn.init_state(batch_size, max_length)

    def _residual(self, method: str, x: jax.Array, state, ctx: Context):
        h, state = getattr(self.attn, method)(self.attn_norm(x), state, ctx)
        x = x + h.astype(jnp.float32)
        return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32), state

    def prefill(self, x: jax.Array, state, ctx: Context):
        if not hasattr(self.attn, "prefill"):  # a mixer with a one-token form only
            return scan_over_time(self.decode, x, state, ctx)
        return self._residual("prefill", x, state, ctx)

    def decode(self, x: jax.Array, state, ctx: Context):
        return self._residual("decode" if hasattr(self.attn, "decode") else "prefill", x, state, ctx)


# ------------------------------------------------------------------------------------------- the stack


def _repeat_period(blocks: list[nnx.Module]) -> int:
    """The smallest p dividing len(blocks) with block i structurally equal to block i % p."""
    defs = [nnx.graphdef(b) for b in blocks]
    shapes = [jax.tree.map(lambda v: v.shape, nnx.state(b)) for b in blocks]
    n = len(blocks)
    for p in range(1, n + 1):
        if n % p == 0 and all(defs[i] == defs[i % p] and shapes[i] == shapes[i % p] for i in range(n)):
            return p
    return n


def _stack_modules(blocks: list[nnx.Module]) -> nnx.Module:
    """One module whose variables are the blocks' variables stacked on a leading 'layers' axis."""
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(b) for b in blocks]

    def stack(*vs):
        axes = vs[0].get_metadata().get("axes")
        meta = {} if axes is None else {"axes": ("layers", *axes)}
        return vs[0].replace(jnp.stack([v[...] for v in vs]), **meta)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def _remat(fn: Callable, policy: str) -> Callable:
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "dots_saveable":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_saveable)
    raise ValueError(f"remat={policy!r} is not one of {REMAT_POLICIES}")


class LayerStack(nnx.Module):
    """The layers of a model, looped (`scan=False`) or scanned over stacked parameters.

    Scanned, the layers are grouped by their period p (the smallest p with layer i structurally equal
    to layer i % p: 1 for a uniform stack, 6 for a MASFormer schedule with a full layer every six)
    and a `lax.scan` runs n / p iterations of p layers. Parameters are named `layers/<i>/...` when
    looped and `scanned/<j>/...` with a leading [n / p] axis when scanned; `to_scanned` and
    `to_looped` convert between the two, so checkpoints load either way. The blocks are built in
    the same order either way, so a scanned and a looped model from one seed hold the same weights.
    """

    def __init__(self, blocks: list[Block], *, scan: bool = False, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES}")
        self.n_layers, self.remat, self.scan = len(blocks), remat, scan
        if scan:
            self.period = _repeat_period(blocks)
            self.scanned = nnx.List([_stack_modules(blocks[j :: self.period]) for j in range(self.period)])
        else:
            self.period = self.n_layers
            self.layers = nnx.List(blocks)

    @property
    def repeats(self) -> int:
        return self.n_layers // self.period

    def __len__(self) -> int:
        return self.n_layers

    def __iter__(self):
        return (self[i] for i in range(self.n_layers))

    def __getitem__(self, i: int) -> Block:
        """Layer i's block (looped layout; a scanned stack has one module per period position)."""
        if self.scan:
            raise ValueError(
                "a scanned layer stack has no per-layer modules; load the model with "
                "scan_layers=False to inspect single layers"
            )
        return self.layers[i]

    def modules(self) -> list[Block]:
        """The block modules: one per layer (looped) or one per period position (scanned)."""
        return list(self.scanned) if self.scan else list(self.layers)

    # -- the one place where layers are iterated ------------------------------------------------------
    def _run(self, method: str, h, states, ctx: Context, collect: Callable | None = None):
        """Applies `method` of every layer in order; states None (for __call__) or one per layer.

        Returns (h, new states or None, collected per-layer outputs stacked on axis 0 or None).
        """

        def apply(graphdef, params, h, state, ctx):
            block = nnx.merge(graphdef, params)
            if method == "__call__":
                return block(h, ctx), None
            return getattr(block, method)(h, state, ctx)

        apply = _remat(apply, self.remat if method == "__call__" else "none")
        if not self.scan:
            new_states, outs = [], []
            for i, block in enumerate(self.layers):
                graphdef, params = nnx.split(block)
                h, s = apply(graphdef, params, h, None if states is None else states[i], ctx.at_layer(i))
                new_states.append(s)
                if collect is not None:
                    outs.append(collect(h))
            return (
                h,
                None if states is None else new_states,
                None if collect is None else jax.tree.map(lambda *x: jnp.stack(x), *outs),
            )

        splits = [nnx.split(m) for m in self.scanned]
        p = self.period

        def body(h, xs):
            r, params, st = xs
            new, outs = [], []
            for j, (graphdef, _) in enumerate(splits):
                h, s = apply(graphdef, params[j], h, None if st is None else st[j], ctx.at_layer(r * p + j))
                new.append(s)
                if collect is not None:
                    outs.append(collect(h))
            ys = (None if st is None else new, None if collect is None else outs)
            return h, ys

        params = [s for _, s in splits]
        h, (new_states, outs) = jax.lax.scan(body, h, (jnp.arange(self.repeats, dtype=jnp.int32), params, states))
        if outs is not None:  # [repeats][p] -> layer order
            outs = jax.tree.map(lambda *x: jnp.stack(x, 1).reshape(-1, *x[0].shape[1:]), *outs)
        return h, new_states, outs

    def __call__(self, h, ctx: Context, collect: Callable | None = None):
        """The parallel form of every layer. With `collect`, also [L, ...] of collect(h) after each."""
        h, _, outs = self._run("__call__", h, None, ctx, collect)
        return h if collect is None else (h, outs)

    def prefill(self, h, states, ctx: Context):
        h, states, _ = self._run("prefill", h, states, ctx)
        return h, states

    def decode(self, h, states, ctx: Context):
        h, states, _ = self._run("decode", h, states, ctx)
        return h, states

    def init_state(self, batch_size: int, max_length: int):
        """Per-layer states: a list of L (looped) or p states stacked on [n / p] (scanned)."""
        if not self.scan:
            return [block.init_state(batch_size, max_length) for block in self.layers]

        def init(graphdef, params):
            return jax.lax.map(lambda prm: nnx.merge(graphdef, prm).init_state(batch_size, max_length), params)

        return [init(*nnx.split(m)) for m in self.scanned]

    def layer_state(self, states, i: int):
        """The state of layer i from `init_state`'s layout."""
        if not self.scan:
            return states[i]
        return jax.tree.map(lambda a: a[i // self.period], states[i % self.period])


_LOOPED = re.compile(r"^(.*?)layers/(\d+)/(.*)$")
_SCANNED = re.compile(r"^(.*?)scanned/(\d+)/(.*)$")


def to_scanned(params: dict[str, Any], period: int) -> dict[str, Any]:
    """Flat parameters of looped layers (`.../layers/<i>/...`) -> scanned (`.../scanned/<j>/...`)."""
    out, groups = {}, {}
    for name, value in params.items():
        m = _LOOPED.match(name)
        if m is None:
            out[name] = value
            continue
        prefix, i, rest = m.group(1), int(m.group(2)), m.group(3)
        groups.setdefault((prefix, i % period, rest), {})[i // period] = value
    for (prefix, j, rest), by_repeat in groups.items():
        out[f"{prefix}scanned/{j}/{rest}"] = np.stack([np.asarray(by_repeat[r]) for r in sorted(by_repeat)])
    return out


def to_looped(params: dict[str, Any], period: int) -> dict[str, Any]:
    """The inverse of `to_scanned` (the two mirror each other line by line)."""
    out = {}
    for name, value in params.items():
        m = _SCANNED.match(name)
        if m is None:
            out[name] = value
            continue
        prefix, j, rest = m.group(1), int(m.group(2)), m.group(3)
        for r in range(value.shape[0]):
            out[f"{prefix}layers/{r * period + j}/{rest}"] = value[r]
    return out


# ------------------------------------------------------------------------------------------ the models


def check_tokens(tokens, ndim: int, name: str = "tokens", vocab_size: int | None = None) -> jax.Array:
    """Shape, dtype and (for concrete arrays, when `vocab_size` is given) range checks of token ids."""
    tokens = jnp.asarray(tokens)
    want = "[B, T]" if ndim == 2 else "[B]"
    if tokens.ndim != ndim:
        raise ValueError(f"{name} has shape {tokens.shape}; expected {ndim} dims {want} of int32 token ids")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} has dtype {tokens.dtype}; pass integer token ids")
    if any(s == 0 for s in tokens.shape):
        raise ValueError(f"{name} has shape {tokens.shape}; batch and length must be >= 1")
    if vocab_size is not None and not isinstance(tokens, jax.core.Tracer):
        host = np.asarray(tokens)  # a concrete array, also when a jit trace closes over it
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size}); "
                "check the tokenizer against model.vocab_size"
            )
    return tokens.astype(jnp.int32)


class ModelInfo:
    """What a registered model declares about itself (class attributes, inherited by subclasses).

    The registry filters on them (`registry.list_models(attention="dispatch")`), and the README's
    model table is generated from them (`python -m zoo.info --write-readme`).

    Attributes:
      paper: the paper(s) the model implements, as the README's model table names them.
      numerical_core: the op or path that does its heavy numerics (the table's column).
      attention: "dispatch" when its training path runs the shared attention dispatch
        (`zoo.layers.self_attention`), else None.
      convertible_from: the model whose released checkpoints convert into it (`zoo convert`), or None.

    Every registered class declares these in the same few lines under its docstring; the repeated
    shape is the declaration form, not a copy.
    """

    paper: ClassVar[str] = ""
    numerical_core: ClassVar[str] = ""
    attention: ClassVar[str | None] = None
    convertible_from: ClassVar[str | None] = None


class LanguageModel(nnx.Module, ModelInfo):
    """A causal language model: `embed_tokens` -> `blocks` (a `LayerStack`) -> `logits`.

    Subclasses build `self.config` (an `LMConfig`), `self.blocks` (`make_stack`) and implement
    `embed_tokens` and `logits`; everything else (the parallel form, the cache, prefill, decoding, the residual stream
    for analysis) is here, once.

    The input contract of `__call__`, `prefill` and `decode_step`:
      - token ids lie in [0, vocab_size). An eager call (concrete ids) raises one ValueError for an
        id outside; under `jit` the ids are not known while tracing, so callers validate on the host
        before entering jit, as the trainer, `zoo.generate`, the evaluators and the converters do.
      - a cache with a capacity (`cache_capacity`, e.g. a KV cache) takes at most that many tokens.
        An eager call past it raises ValueError; under `jit` the logits of such a call are NaN (every
        row), so an overflow never passes for an answer. `zoo.generate` sizes its cache to the
        prompt plus the new tokens.
    """

    config: Any
    blocks: LayerStack

    @abc.abstractmethod
    def embed_tokens(self, tokens: jax.Array):
        """tokens int32 [B, T] -> the residual carry (usually fp32 [B, T, D])."""

    @abc.abstractmethod
    def logits(self, h) -> jax.Array:
        """The residual carry -> logits fp32 [B, T, V]."""

    def residual(self, h) -> jax.Array:
        """The residual stream [B, T, D] inside the carry (the carry itself by default)."""
        return h

    @classmethod
    def describe(cls, cfg, seq_len: int) -> list[str]:
        """Extra lines for `zoo info` (e.g. the attention cost of a layer schedule)."""
        del cfg, seq_len
        return []

    def __call__(self, tokens: jax.Array, *, segment_ids=None, positions=None):
        """tokens int32 [B, T] -> logits float32 [B, T, V].

        Args:
          segment_ids: int32 [B, T] document ids of packed rows: each token sees only earlier tokens
            of its own document, so a packed document gets the logits it gets alone.
          positions: int32 [B, T] positions within each document (default arange(T)).
        """
        tokens = check_tokens(tokens, 2, vocab_size=self.config.vocab_size)
        ctx = make_context(tokens, segment_ids, positions)
        return self.logits(self.blocks(self.embed_tokens(tokens), ctx))

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """The decoding cache: every layer's state and the next position."""
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"init_cache(batch_size={batch_size}, max_length={max_length}): both must be >= 1")
        return {"layers": self.blocks.init_state(batch_size, max_length), "pos": jnp.zeros((), jnp.int32)}

    def cache_capacity(self, cache: dict) -> int | None:
        """The tokens a cache can hold (None: a fixed-size state, which decodes without end)."""
        del cache
        return None

    def _check_room(self, cache: dict, n: int) -> None:
        """A concrete cache position must leave room for n more tokens (a ValueError, not wrong logits)."""
        cap, pos = self.cache_capacity(cache), cache["pos"]
        if cap is not None and not isinstance(pos, jax.core.Tracer) and int(pos) + n > cap:
            raise ValueError(
                f"the cache holds {cap} tokens and is at position {int(pos)}: {n} more do not fit; build "
                f"it with init_cache(batch_size, max_length >= {int(pos) + n})"
            )

    def _mark_overflow(self, logits: jax.Array, cache: dict, n: int) -> jax.Array:
        """Under jit the position is not known while tracing: logits of a call that runs past the
        cache's capacity become NaN (every row), never plausible values computed from a clipped cache."""
        cap, pos = self.cache_capacity(cache), cache["pos"]
        if cap is None or not isinstance(pos, jax.core.Tracer):
            return logits
        return jnp.where(pos + n > cap, jnp.nan, logits)

    def prefill(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """tokens int32 [B, T] continuing from `cache` -> (logits [B, T, V], cache after the last token)."""
        tokens = check_tokens(tokens, 2, vocab_size=self.config.vocab_size)
        self._check_room(cache, tokens.shape[1])
        ctx = make_context(tokens, index=cache["pos"])
        h, layers = self.blocks.prefill(self.embed_tokens(tokens), cache["layers"], ctx)
        logits = self._mark_overflow(self.logits(h), cache, tokens.shape[1])
        return logits, {"layers": layers, "pos": cache["pos"] + tokens.shape[1]}

    def decode_step(self, tokens_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """tokens_t int32 [B] -> (logits [B, V], updated cache)."""
        tokens_t = check_tokens(tokens_t, 1, "tokens_t", vocab_size=self.config.vocab_size)[:, None]
        self._check_room(cache, 1)
        ctx = make_context(tokens_t, index=cache["pos"])
        h, layers = self.blocks.decode(self.embed_tokens(tokens_t), cache["layers"], ctx)
        logits = self._mark_overflow(self.logits(h)[:, 0], cache, 1)
        return logits, {"layers": layers, "pos": cache["pos"] + 1}

    def residual_stream(self, embeddings: jax.Array) -> jax.Array:
        """Analysis hook (zoo.eval.memory_fidelity): the residual after each block [L, B, T, D] of the
        stack run on `embeddings` [B, T, D] (what `embed_tokens` produces for tokens)."""
        b, t = embeddings.shape[:2]
        ctx = make_context(jnp.zeros((b, t), jnp.int32))
        _, stream = self.blocks(self.carry_from_embeddings(embeddings), ctx, collect=self.residual)
        return stream

    def carry_from_embeddings(self, x: jax.Array):
        """The residual carry for embeddings x [B, T, D] (x itself by default)."""
        return x.astype(jnp.float32)


class Forecaster(nnx.Module, ModelInfo):
    """A time-series forecaster (SpaceTime): x [B, lag, C] -> forecast [B, horizon, C]."""

    config: Any

    @abc.abstractmethod
    def __call__(self, x: jax.Array) -> jax.Array:
        """The forecast [B, horizon, C] of the series x [B, lag, C]."""

    @abc.abstractmethod
    def loss(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict]:
        """The training loss on inputs x and targets y [B, horizon, C], with its named terms."""


class Classifier(nnx.Module, ModelInfo):
    """A sequence classifier (S4 on LRA): tokens [B, T] (+ mask) -> class logits [B, n_classes]."""

    config: Any

    @abc.abstractmethod
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Class logits [B, n_classes] of tokens [B, T] (mask bool [B, T], True = real token)."""


KINDS = {"lm": LanguageModel, "forecaster": Forecaster, "classifier": Classifier}


def kind_of(cls: type) -> str:
    """ "lm", "forecaster" or "classifier": which of the base classes `cls` implements."""
    for kind, base in KINDS.items():
        if issubclass(cls, base):
            return kind
    raise ValueError(f"{cls.__name__} is not a LanguageModel, Forecaster or Classifier; subclass one of them")
