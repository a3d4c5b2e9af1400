"""The zoo's attention: one pattern description, one oracle, one dispatch to the best kernel.

`AttentionSpec.kind` names the causal pattern, always intersected with causality (key position <=
query position) and, for packed documents, with segment equality:
- "full":   every earlier key;
- "window": the last `spec.window` keys up to and including the query (sliding window);
- "block":  the keys of the query's own block of `spec.block` positions (block-local).
Positions are positions within a document, so a packed document sees exactly what it sees alone.

`attend` is the dense XLA oracle (fp32 scores and softmax; a query that sees no key gets zeros),
written for any query/key positions, so it also serves decoding against a KV cache (`k_valid`
marks the filled slots). `local_attention` is the same oracle cut into query blocks for the
"window" and "block" kinds (fp32 scores [.., w, 2w] instead of [.., T, T]). `self_attention` is the
one dispatch every model's training path uses; `attention_kernel` says what it picks:

- "cudnn" (implementation "auto" on GPU): cuDNN flash attention (`jax.nn.dot_product_attention`,
  `local_window_size` for windows) for full / window patterns in bf16 or fp16 without segment ids,
  head dim a multiple of 8 and <= 128 (256 on Hopper);
- "splash" ("auto" on TPU): splash attention for full / window patterns (segment ids too);
- "sparse": the Pallas sparse op, for the rest on GPU / TPU (fp32, segment ids on GPU, block-local)
  and always with implementation "pallas" (interpreted on CPU);
- "blocked": "auto" on CPU and "xla" everywhere, for the "full" pattern: `blocked_attention`, the
  oracle one query block at a time against its key prefix (the masked upper triangle is skipped);
- "oracle": "reference" everywhere, and "auto" on CPU / "xla" for window and block patterns.

"oracle" is `attend`, or `local_attention` for window / block patterns longer than two windows;
block-local layers on packed rows (segment ids with kind "block") always take `local_attention`
(their block grid follows document positions, which the kernels' row-index grid does not), so no
accelerator training path holds [T, T] fp32 scores. The kernels take causality, windows and blocks
from row indices: positions must count up by one within each document (as packed rows do).

Under a mesh (`jax.set_mesh`, as the trainer traces its step) cuDNN and splash run inside
`shard_map` like the zoo's own kernels (`pallas_kernels.sharding`): batch over data x fsdp, heads
over tensor, key/value heads following their query heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch, sharding
from pallas_kernels.sparse_attention import sparse_attention

ATTENTION_KINDS = ("full", "window", "block")
KERNELS = ("cudnn", "splash", "sparse", "blocked", "oracle")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which keys a query may see. `window`/`block` are used by the matching kinds only."""

    kind: str = "full"
    window: int = 256
    block: int = 256

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind {self.kind!r} is unknown; choose one of {ATTENTION_KINDS}")
        if self.window < 1 or self.block < 1:
            raise ValueError(f"window ({self.window}) and block ({self.block}) must be >= 1")


def attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    spec: AttentionSpec,
    k_valid: jax.Array | None = None,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B, T, S] (True = attend) from positions q_pos [B, T] and k_pos [B, S]."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = kp <= qp  # causal
    if spec.kind == "window":
        mask &= kp > qp - spec.window
    elif spec.kind == "block":
        mask &= (kp // spec.block) == (qp // spec.block)
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_pos: jax.Array,
    k_pos: jax.Array,
    spec: AttentionSpec = AttentionSpec(),
    k_valid: jax.Array | None = None,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query causal attention, the dense oracle (fp32 scores [B, K, G, T, S]).

    Args:
      q: [B, T, H, P] queries; k, v: [B, S, K, P] keys/values with K dividing H.
      q_pos: [B, T] (or [T]) query positions; k_pos: [B, S] (or [S]) key positions.
      spec: the attention pattern.
      k_valid: optional [B, S] bool, False for empty cache slots.
      q_seg, k_seg: optional [B, T] / [B, S] segment ids; attend only within equal ids.

    Returns:
      [B, T, H, P] in q's dtype.
    """
    b, t, h, p = q.shape
    kh = k.shape[2]
    if h % kh:
        raise ValueError(f"kv heads ({kh}) must divide query heads ({h})")
    q_pos = jnp.broadcast_to(q_pos, (b, t))
    k_pos = jnp.broadcast_to(k_pos, (b, k.shape[1]))
    mask = attention_mask(q_pos, k_pos, spec, k_valid, q_seg, k_seg)  # [B, T, S]
    qg = q.reshape(b, t, kh, h // kh, p)
    scores = jnp.einsum("btkgp,bskp->bkgts", qg, k, preferred_element_type=jnp.float32) * p**-0.5
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows that see nothing
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskp->btkgp", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, p).astype(q.dtype)


def local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    positions: jax.Array,
    spec: AttentionSpec,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """The oracle for a "window" / "block" self-attention pattern, one block of w rows at a time.

    With positions counting up by one within each document, every key a query sees lies less than
    w rows before it (w = spec.window or spec.block), so each block of w queries attends to its own
    block and the one before through `attend`: exactly the dense result, with fp32 scores
    [B*n, K, G, w, 2w] (n = ceil(T/w)) instead of [B, K, G, T, T].

    Args:
      q: [B, T, H, P]; k, v: [B, T, K, P]; positions: int32 [B, T] within each document;
      spec: kind "window" or "block"; segment_ids: int32 [B, T] or None.

    Returns:
      [B, T, H, P] in q's dtype.
    """
    if spec.kind not in ("window", "block"):
        raise ValueError(f"local_attention takes kind 'window' or 'block', got {spec.kind!r}; use attend for 'full'.")
    b, t, h, p = q.shape
    w = spec.window if spec.kind == "window" else spec.block
    n = -(-t // w)
    pad = n * w - t
    positions = jnp.broadcast_to(positions, (b, t))
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids

    def blocks(x, fill=0):  # [B, T, ...] -> [B, n, w, ...], padded with `fill`
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(b, n, w, *x.shape[2:])

    def with_previous(x, fill=0):  # [B, n, w, ...] -> [B*n, 2w, ...]; the block before the first is `fill`
        prev = jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
        return jnp.concatenate([prev, x], axis=2).reshape(b * n, 2 * w, *x.shape[3:])

    k_pos = with_previous(blocks(positions, -1), -1)  # padding keys: position -1, never visible
    out = attend(
        blocks(q).reshape(b * n, w, h, p),
        with_previous(blocks(k)),
        with_previous(blocks(v)),
        q_pos=blocks(positions).reshape(b * n, w),
        k_pos=k_pos,
        spec=spec,
        k_valid=k_pos >= 0,
        q_seg=blocks(seg).reshape(b * n, w),
        k_seg=with_previous(blocks(seg)),
    )
    return out.reshape(b, n * w, h, p)[:, :t]


CAUSAL_BLOCK = 128  # query rows per block of `blocked_attention`
MAX_CAUSAL_BLOCKS = 32  # longer sequences take longer blocks (the loop over blocks is unrolled)


def causal_block_size(seq_len: int, block: int = CAUSAL_BLOCK) -> int:
    """The query block of `blocked_attention` for T = seq_len: `block`, grown (by multiples of it) to
    keep at most `MAX_CAUSAL_BLOCKS` blocks, and never longer than T."""
    blocks = -(-seq_len // block)
    return min(seq_len, block * -(-blocks // MAX_CAUSAL_BLOCKS))


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    block: int = CAUSAL_BLOCK,
) -> jax.Array:
    """Full causal self-attention one query block at a time, skipping the masked upper triangle.

    Query block i (rows i*w .. (i+1)*w - 1, w = `causal_block_size(T, block)`) attends to the key
    prefix 0 .. (i+1)*w - 1 only: with positions counting up by one within each document, no later
    key is visible to it, so the result is the dense oracle's (`attend`, same mask from positions
    and segment ids, fp32 scores and softmax) while the scores cover about half of [T, T] (the
    triangle plus the diagonal blocks) and never the whole square at once. Heads go first
    ([B, K, G, T, P]) so that every block is one batched matmul; the softmax of a block is taken
    over its whole key prefix and normalised after the value product ([w, P] divisions instead of
    [w, S]). Speed against `attend` and torch: docs/kernels/sparse_attention.md.

    Args:
      q: [B, T, H, P]; k, v: [B, T, K, P] (K divides H); positions: int32 [B, T] (or [T]) within
        each document; segment_ids: int32 [B, T] or None; block: the shortest query block.

    Returns:
      [B, T, H, P] in q's dtype.
    """
    b, t, h, p = q.shape
    kh = k.shape[2]
    if h % kh:
        raise ValueError(f"kv heads ({kh}) must divide query heads ({h})")
    if block < 1:
        raise ValueError(f"block ({block}) must be >= 1")
    w = causal_block_size(t, block)
    positions = jnp.broadcast_to(positions, (b, t))
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    qh = q.reshape(b, t, kh, h // kh, p).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, P]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, P]
    outs = []
    for lo in range(0, t, w):
        hi = min(lo + w, t)  # queries lo .. hi-1 see keys 0 .. hi-1
        mask = (positions[:, None, :hi] <= positions[:, lo:hi, None]) & (seg[:, None, :hi] == seg[:, lo:hi, None])
        scores = jnp.einsum(
            "bkgqp,bksp->bkgqs", qh[:, :, :, lo:hi], kt[:, :, :hi], preferred_element_type=jnp.float32
        )  # [B, K, G, w, hi]
        scores = jnp.where(mask[:, None, None], scores * p**-0.5, -jnp.inf)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows that see nothing
        weights = jnp.exp(scores - row_max)
        denom = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum(
            "bkgqs,bksp->bkgqp", weights.astype(v.dtype), vt[:, :, :hi], preferred_element_type=jnp.float32
        )
        outs.append(out / jnp.where(denom > 0, denom, 1.0))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, P]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, p).astype(q.dtype)


def sparse_pattern_kwargs(spec: AttentionSpec, seq_len: int, batch: int, heads: int, tile: int) -> dict:
    """Keyword arguments of `sparse_attention` that give `spec`'s causal pattern."""
    if spec.kind == "full":
        return dict(block_q=tile, block_k=tile)
    if spec.kind == "window":
        return dict(window=spec.window, block_q=tile, block_k=tile)
    nq = -(-seq_len // spec.block)
    # Query block i lists key block i: block-local, causal within the block.
    own = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (batch, heads, nq, 1))
    return dict(block_indices=own, block_q=spec.block, block_k=spec.block)


def _platform(platform: str | None) -> str:
    """ "cpu", "gpu" or "tpu": `platform` (None: the default backend; "cuda"/"rocm" mean "gpu")."""
    name = jax.default_backend() if platform is None else platform
    name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    if name not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"platform={platform!r} is not one of None, 'cpu', 'gpu' ('cuda', 'rocm') or 'tpu'.")
    return name


def _cudnn_max_head_dim(platform: str | None) -> int:
    """256 on a Hopper-or-later GPU this process runs on, else 128 (cuDNN flash attention's limits)."""
    if platform is None and jax.default_backend() == "gpu":
        capability = getattr(jax.devices()[0], "compute_capability", "0.0")
        if tuple(int(c) for c in capability.split(".")) >= (9, 0):
            return 256
    return 128


def attention_kernel(
    q: jax.Array,
    spec: AttentionSpec,
    segment_ids: jax.Array | None = None,
    *,
    implementation: str = "auto",
    platform: str | None = None,
) -> str:
    """The kernel `self_attention` runs for these inputs: one of `KERNELS` (module docstring table).

    Raises:
      ValueError: for an unknown implementation or platform.
    """
    impl = dispatch.resolve(implementation)
    where = _platform(platform)
    if implementation == "auto":
        impl = "pallas" if where in ("gpu", "tpu") else "xla"  # as dispatch.resolve on that platform
    if impl == "xla" and spec.kind == "full":
        return "blocked"
    if impl in ("xla", "reference"):
        return "oracle"
    if spec.kind == "block" and segment_ids is not None:
        return "oracle"  # the block grid follows document positions
    if implementation == "auto" and spec.kind != "block":
        head_dim = q.shape[-1]
        if (
            where == "gpu"
            and segment_ids is None
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0
            and head_dim <= _cudnn_max_head_dim(platform)
        ):
            return "cudnn"
        if where == "tpu":
            return "splash"
    return "sparse"


def _gqa_dims():
    seq = ("batch", None)
    return seq + ("heads", None), seq + ("groups", None)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
    """cuDNN flash attention (`jax.nn.dot_product_attention`) for a "full" / "window" pattern.

    q [B, T, H, P], k, v [B, T, K, P] in bf16/fp16; runs per device under a mesh.
    """
    window = (spec.window - 1, 0) if spec.kind == "window" else None

    def local(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window, implementation="cudnn")

    qd, kd = _gqa_dims()
    return sharding.shard_map_kernel(local, (q, k, v), (qd, kd, kd), qd)


SPLASH_LANES = 128  # splash attention's block sizes are multiples of the TPU lane width


def _splash_block(length: int) -> int:
    return next(b for b in (512, 256, SPLASH_LANES) if length % b == 0)


def _splash_kernel(kind: str, window: int, length: int, heads: int, interpret: bool):
    """A splash kernel (forward and backward) for `heads` query heads over `length` (padded) rows.

    Built at every trace: the kernel holds its block tables as arrays of that trace (the numpy mask
    processing behind them is cached by splash itself)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if kind == "window":
        mask = sm.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    else:
        mask = sm.CausalMask((length, length))
    blk = _splash_block(length)
    sizes = sk.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    return sk.make_splash_mha_single_device(sm.MultiHeadMask([mask] * heads), block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, spec: AttentionSpec, segment_ids=None, *, interpret: bool = False) -> jax.Array:
    """JAX's TPU splash attention for a "full" / "window" pattern (grouped-query heads native).

    Args:
      q: [B, T, H, P]; k, v: [B, T, K, P] (K divides H); spec: kind "full" or "window";
      segment_ids: int32 [B, T] or None; interpret: run the kernels in the Pallas interpreter (CPU).

    T is padded to a multiple of 128 (padded keys lie after every real query, so causality hides
    them; padded queries are dropped). Runs per device under a mesh.

    Returns:
      [B, T, H, P] in q's dtype.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    if spec.kind not in ("full", "window"):
        raise ValueError(f"splash_attention takes kind 'full' or 'window', got {spec.kind!r}.")

    def local(q, k, v, seg):
        b, t, h, p = q.shape
        length = -(-t // SPLASH_LANES) * SPLASH_LANES
        pad = [(0, 0), (0, length - t), (0, 0), (0, 0)]
        kernel = _splash_kernel(spec.kind, spec.window, length, h, bool(interpret))
        # The kernels take head-major [H, T, P] rows; the 1/sqrt(P) scale goes on q (in fp32).
        qh = jnp.moveaxis(jnp.pad((q.astype(jnp.float32) * p**-0.5).astype(q.dtype), pad), 2, 1)
        kh, vh = (jnp.moveaxis(jnp.pad(x, pad), 2, 1) for x in (k, v))  # [B, K, T', P]

        def one(qi, ki, vi, si):  # one batch row
            ids = None if si is None else sk.SegmentIds(q=si, kv=si)
            return kernel(qi, ki, vi, segment_ids=ids)

        ids = None if seg is None else jnp.pad(seg.astype(jnp.int32), [(0, 0), (0, length - t)], constant_values=-1)
        out = jax.vmap(one, in_axes=(0, 0, 0, None if ids is None else 0))(qh, kh, vh, ids)  # [B, H, T', P]
        return jnp.moveaxis(out, 1, 2)[:, :t].astype(q.dtype)

    qd, kd = _gqa_dims()
    return sharding.shard_map_kernel(local, (q, k, v, segment_ids), (qd, kd, kd, ("batch", None)), qd)


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    spec: AttentionSpec,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    implementation: str = "auto",
    tile: int = 64,
    platform: str | None = None,
) -> jax.Array:
    """Causal self-attention of T tokens with the pattern `spec`, through the best kernel available.

    Args:
      q: [B, T, H, P]; k, v: [B, T, K, P] (K divides H).
      spec: the pattern; positions: int32 [B, T] positions within each document (window / block
        grid and the oracle's causality); segment_ids: int32 [B, T] or None.
      implementation: see the module docstring.
      tile: block size of the Pallas sparse op for "full" / "window".
      platform: the platform whose kernels "auto" picks: None (the default backend), "cpu", "gpu"
        ("cuda") or "tpu". Naming an accelerator from another machine lowers its kernels (for
        `jax.export(..., platforms=...)`; the Pallas sparse op is then not interpreted).

    Returns:
      [B, T, H, P] in q's dtype.
    """
    kernel = attention_kernel(q, spec, segment_ids, implementation=implementation, platform=platform)
    if kernel == "oracle":
        w = {"window": spec.window, "block": spec.block}.get(spec.kind)
        if w is not None and (q.shape[1] > 2 * w or segment_ids is not None and spec.kind == "block"):
            return local_attention(q, k, v, positions=positions, spec=spec, segment_ids=segment_ids)
        return attend(q, k, v, q_pos=positions, k_pos=positions, spec=spec, q_seg=segment_ids, k_seg=segment_ids)
    if kernel == "blocked":
        return blocked_attention(q, k, v, positions=positions, segment_ids=segment_ids)
    if kernel == "cudnn":
        return cudnn_attention(q, k, v, spec)
    if kernel == "splash":
        return splash_attention(q, k, v, spec, segment_ids)
    where = _platform(platform)
    foreign = platform is not None and where != _platform(None)  # lowering another platform's kernels
    b, t, h, _ = q.shape
    return sparse_attention(
        q,
        k,
        v,
        causal=True,
        segment_ids=segment_ids,
        implementation="pallas",
        interpret=False if foreign else dispatch.resolve_interpret("pallas"),
        backend=where if foreign else None,
        **sparse_pattern_kwargs(spec, t, b, h, tile),
    )


__all__ = [
    "ATTENTION_KINDS",
    "KERNELS",
    "AttentionSpec",
    "CAUSAL_BLOCK",
    "MAX_CAUSAL_BLOCKS",
    "attend",
    "attention_kernel",
    "blocked_attention",
    "causal_block_size",
    "attention_mask",
    "cudnn_attention",
    "local_attention",
    "self_attention",
    "splash_attention",
    "sparse_pattern_kwargs",
]
