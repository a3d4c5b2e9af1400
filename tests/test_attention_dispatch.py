"""The attention dispatch: one entry point, the library kernel of each platform.

- The choice table of `attention_kernel` (cuDNN / splash / the sparse op / the oracle).
- Splash attention (TPU kernels, interpreted) equals the oracle for full, window, segment ids and
  grouped-query heads, forward and gradients; the Pallas sparse-op path, the blocked oracle
  (`local_attention`) and the blocked causal path (`blocked_attention`, the CPU default for full
  attention) equal the dense oracle.
- cuDNN: `self_attention(platform="gpu")` exports for cuda with cuDNN's fused custom calls (forward
  and backward, the sliding window in the call); it cannot run here (no GPU), and JAX refuses to
  trace it without a cuDNN install, so the test stands in a cuDNN 9.10 version number.
- No [T, T] scores on any accelerator training path: the gradient of every attention model's loss,
  exported for cuda and tpu at T = 2048 with "auto" resolved as on that platform, holds no tensor
  whose two trailing dims are T (while the CPU oracle's export does, so the check can fail).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from zoo.layers import attention
from zoo.layers.attention import (
    AttentionSpec,
    attend,
    attention_kernel,
    blocked_attention,
    causal_block_size,
    local_attention,
    self_attention,
)
from zoo.models import registry

FULL, WINDOW, BLOCK = AttentionSpec("full"), AttentionSpec("window", window=48), AttentionSpec("block", block=40)
CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__gpu$xla.gpu.triton")


def _inputs(b=2, t=300, h=4, kv=2, p=32, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, t, n, p)).astype(np.float32) for n in (h, kv, kv))
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _packed(b, t, cut):
    """Two documents per row, split at `cut`: segment ids and positions within each document."""
    idx = np.arange(t)
    seg = np.broadcast_to((idx >= cut).astype(np.int32), (b, t))
    pos = np.broadcast_to(np.where(idx >= cut, idx - cut, idx).astype(np.int32), (b, t))
    return jnp.asarray(seg), jnp.asarray(pos)


def _oracle(q, k, v, spec, pos, seg):
    return attend(q, k, v, q_pos=pos, k_pos=pos, spec=spec, q_seg=seg, k_seg=seg)


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=tol, rtol=tol)


def _grads(fn, q, k, v):
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))  # a cotangent that is not uniform
    return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)


# ------------------------------------------------------------------------------------------ choice
def test_kernel_choice_table():
    bf16, f32 = jnp.zeros((1, 8, 4, 64), jnp.bfloat16), jnp.zeros((1, 8, 4, 64), jnp.float32)
    seg = jnp.zeros((1, 8), jnp.int32)
    choose = lambda q, spec, seg=None, **kw: attention_kernel(q, spec, seg, **kw)  # noqa: E731
    assert choose(bf16, FULL, platform="gpu") == "cudnn"
    assert choose(bf16, WINDOW, platform="cuda") == "cudnn"
    assert choose(jnp.zeros((1, 8, 4, 72), jnp.bfloat16), FULL, platform="gpu") == "cudnn"
    assert choose(jnp.zeros((1, 8, 4, 60), jnp.bfloat16), FULL, platform="gpu") == "sparse"  # not a multiple of 8
    assert choose(jnp.zeros((1, 8, 4, 192), jnp.bfloat16), FULL, platform="gpu") == "sparse"  # > 128 off Hopper
    assert choose(f32, FULL, platform="gpu") == "sparse"  # cuDNN flash attention is bf16/fp16 only
    assert choose(bf16, FULL, seg, platform="gpu") == "sparse"  # jax.nn.dot_product_attention has no segment ids
    assert choose(bf16, BLOCK, platform="gpu") == "sparse"
    assert choose(f32, FULL, seg, platform="tpu") == choose(bf16, WINDOW, platform="tpu") == "splash"
    assert choose(f32, BLOCK, platform="tpu") == "sparse"
    assert choose(f32, BLOCK, seg, platform="tpu") == "oracle"  # blocked oracle: the grid follows positions
    assert choose(bf16, FULL, platform="cpu") == choose(bf16, FULL, platform="gpu", implementation="xla") == "blocked"
    assert choose(bf16, WINDOW, platform="cpu") == choose(f32, BLOCK, platform="cpu") == "oracle"
    assert choose(bf16, FULL, platform="cpu", implementation="reference") == "oracle"
    assert choose(bf16, FULL, platform="cpu", implementation="pallas") == "sparse"
    assert choose(bf16, FULL) == "blocked"  # this machine: CPU
    with pytest.raises(ValueError, match="platform='metal'"):
        choose(bf16, FULL, platform="metal")
    with pytest.raises(ValueError, match="implementation='fast'"):
        choose(bf16, FULL, implementation="fast")


# ------------------------------------------------------------------------------------------ splash
def test_splash_interpreted_equals_oracle():
    """Full, window, segment ids; 4 query heads over 2 kv heads; T = 300 padded to 384 (3 x 3 blocks of 128)."""
    q, k, v = _inputs()
    b, t = q.shape[:2]
    seg, pos = _packed(b, t, 131)
    plain = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cases = [(FULL, None, plain), (WINDOW, None, plain), (FULL, seg, pos), (WINDOW, seg, pos)]

    @jax.jit
    def both(q, k, v):
        splash = [attention.splash_attention(q, k, v, s, sg, interpret=True) for s, sg, _ in cases]
        return splash, [_oracle(q, k, v, s, ps, sg) for s, sg, ps in cases]

    _close(*both(q, k, v))
    grads = jax.jit(
        lambda q, k, v: (
            _grads(lambda *a: attention.splash_attention(*a, WINDOW, seg, interpret=True), q, k, v),
            _grads(lambda *a: _oracle(*a, WINDOW, pos, seg), q, k, v),
        )
    )(q, k, v)
    _close(*grads, tol=1e-4)


# ------------------------------------------------------------------------------------------ sparse op, blocked oracle
@pytest.mark.parametrize("spec", [FULL, WINDOW, BLOCK], ids=lambda s: s.kind)
def test_sparse_path_equals_oracle(spec):
    """implementation="pallas": the Pallas sparse op (interpreted), forward and gradients; T = 100."""
    q, k, v = _inputs(t=100, seed=1)
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = None if spec.kind == "block" else _packed(b, t, 37)[0]
    if seg is not None:
        pos = _packed(b, t, 37)[1]
    kernel = lambda *a: self_attention(*a, spec=spec, positions=pos, segment_ids=seg, implementation="pallas", tile=16)  # noqa: E731
    assert attention_kernel(q, spec, seg, implementation="pallas") == "sparse"
    got = jax.jit(lambda q, k, v: (kernel(q, k, v), _grads(kernel, q, k, v)))(q, k, v)
    oracle = lambda *a: _oracle(*a, spec, pos, seg)  # noqa: E731
    want = jax.jit(lambda q, k, v: (oracle(q, k, v), _grads(oracle, q, k, v)))(q, k, v)
    _close(got, want, tol=1e-4)


@pytest.mark.parametrize("spec", [WINDOW, BLOCK], ids=lambda s: s.kind)
def test_local_attention_equals_dense_oracle(spec):
    """The blocked oracle on packed rows (T = 130 not a multiple of the window / block)."""
    q, k, v = _inputs(t=130, seed=2)
    seg, pos = _packed(q.shape[0], q.shape[1], 57)
    got = jax.jit(lambda *a: local_attention(*a, positions=pos, spec=spec, segment_ids=seg))(q, k, v)
    _close(got, _oracle(q, k, v, spec, pos, seg))
    # self_attention routes long window/block patterns on the XLA path to it.
    _close(self_attention(q, k, v, spec=spec, positions=pos, segment_ids=seg, implementation="xla"), got, tol=1e-6)
    with pytest.raises(ValueError, match="kind 'window' or 'block'"):
        local_attention(q, k, v, positions=pos, spec=FULL)


# ------------------------------------------------------------------------------------------ blocked causal path
def test_causal_block_size():
    assert [causal_block_size(t) for t in (1, 100, 128, 300, 4096, 4097, 32768)] == [1, 100, 128, 128, 128, 256, 1024]
    assert causal_block_size(300, block=16) == 16 and causal_block_size(1000, block=16) == 32


@pytest.mark.parametrize(
    "t, h, kv, p, block, packed, dtype",
    [
        (300, 4, 2, 32, 64, False, jnp.float32),  # T not a multiple of the block, grouped-query heads
        (300, 4, 2, 32, 64, True, jnp.float32),  # packed documents, the cut inside a block
        (1, 2, 2, 16, 64, False, jnp.float32),  # T = 1
        (96, 3, 1, 72, 32, True, jnp.float32),  # head dim 72, one kv head, T a multiple of the block
        (200, 4, 2, 64, 64, True, jnp.bfloat16),
    ],
    ids=["gqa", "packed", "t1", "p72-mqa", "bf16"],
)
def test_blocked_attention_equals_dense_oracle(t, h, kv, p, block, packed, dtype):
    """Forward and gradients against the fp32 dense oracle on the same (rounded) inputs."""
    q, k, v = _inputs(b=2, t=t, h=h, kv=kv, p=p, seed=3, dtype=dtype)
    seg, pos = _packed(2, t, 2 * t // 3 + 1) if packed else (None, jnp.broadcast_to(jnp.arange(t), (2, t)))
    blocked = lambda *a: blocked_attention(*a, positions=pos, segment_ids=seg, block=block)  # noqa: E731
    oracle = lambda *a: _oracle(*(x.astype(jnp.float32) for x in a), FULL, pos, seg)  # noqa: E731
    got = jax.jit(lambda q, k, v: (blocked(q, k, v), _grads(blocked, q, k, v)))(q, k, v)
    want = jax.jit(lambda q, k, v: (oracle(q, k, v), _grads(oracle, q, k, v)))(q, k, v)
    assert got[0].dtype == dtype
    _close(got, want, tol=2e-5 if dtype == jnp.float32 else 3e-2)


def test_self_attention_full_on_xla_is_blocked():
    """The XLA path of a full pattern runs `blocked_attention` (packed rows), equal to the dense reference."""
    q, k, v = _inputs(t=300, seed=5)
    seg, pos = _packed(2, 300, 131)
    run = lambda impl: self_attention(q, k, v, spec=FULL, positions=pos, segment_ids=seg, implementation=impl)  # noqa: E731
    _close(run("xla"), blocked_attention(q, k, v, positions=pos, segment_ids=seg), tol=0)
    _close(run("auto"), run("reference"))
    with pytest.raises(ValueError, match="kv heads"):
        blocked_attention(q, k[:, :, :1].repeat(3, axis=2), v, positions=pos)


# ------------------------------------------------------------------------------------------ cuDNN (lowered, not run)
@pytest.fixture
def as_platform(monkeypatch):
    """Makes "auto" resolve as on `platform` in this CPU process, for jax.export only."""
    from jax._src.cudnn import fused_attention_stablehlo
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)

    def use(platform):
        monkeypatch.setattr(jax, "default_backend", lambda: {"cuda": "gpu", "tpu": "tpu", "cpu": "cpu"}[platform])

    return use


def _export(fn, platform, *args) -> str:
    disabled = [export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_CALLS]
    return export.export(jax.jit(fn), platforms=(platform,), disabled_checks=disabled)(*args).mlir_module()


@pytest.mark.parametrize("spec", [FULL, WINDOW], ids=lambda s: s.kind)
def test_cudnn_lowers_for_cuda(as_platform, spec):
    as_platform("cpu")  # the explicit platform argument alone picks cuDNN
    q, k, v = (jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in _inputs(t=256))
    pos = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (2, 256))

    def loss(q, k, v):
        out = self_attention(q, k, v, spec=spec, positions=pos, platform="gpu")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    text = _export(jax.grad(loss, argnums=(0, 1, 2)), "cuda", q, k, v)
    assert _calls(text) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
    assert "\\22mask_type\\22: \\22CAUSAL\\22" in text
    window = re.findall(r"\\22sliding_window_length\\22: (\d+)", text)
    assert set(window) == ({str(spec.window)} if spec.kind == "window" else {"0"})
    # With segment ids the dispatch takes the Pallas sparse op's Triton kernels instead.
    seg = jnp.zeros((2, 256), jnp.int32)
    text = _export(
        lambda *a: self_attention(*a, spec=spec, positions=pos, segment_ids=seg, platform="gpu"), "cuda", q, k, v
    )
    assert _calls(text) == {"__gpu$xla.gpu.triton"}


# ------------------------------------------------------------------------------------------ no [T, T] scores
T_LONG = 2048
MODELS = registry.list_models(attention="dispatch")  # the models whose training path runs self_attention
OVERRIDES = {
    "masformer": {"window": 256, "block": 256},  # window + full layers (block layers via segment ids below)
    "hip": {"dense_below": 4096},  # the dense fallback at T = 2048
}


def _model_loss_export(name: str, overrides: dict, platform: str, *, packed: bool) -> str:
    from zoo.config import make_config
    from zoo.train.step import lm_loss, make_setup

    config = make_config(name, "tiny")
    for key, value in overrides.items():
        config.model[key] = value
    setup = make_setup(config)

    def loss(params, batch):
        extra = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]} if packed else {}
        return lm_loss(setup.view.merge(params)(batch["inputs"], **extra), batch)[0]

    dtypes = dict(inputs=jnp.int32, targets=jnp.int32, loss_mask=jnp.float32, answer_mask=jnp.float32)
    dtypes.update(segment_ids=jnp.int32, positions=jnp.int32)
    batch = {k: jax.ShapeDtypeStruct((1, T_LONG), d) for k, d in dtypes.items()}
    params = {n: jax.ShapeDtypeStruct(s.shape, s.dtype) for n, s in setup.view.shapes.items()}
    return _export(jax.grad(loss), platform, params, batch)


def _square_tensors(text: str) -> set[str]:
    return set(re.findall(rf"tensor<(?:\d+x)*{T_LONG}x{T_LONG}x\w+>", text))


def _calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w$.]+)\(", text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", MODELS)
def test_no_square_scores_in_training(as_platform, platform, name):
    """bf16 rows (cuDNN / splash) and packed rows (the sparse op's Triton kernels / splash with
    segment ids; MASFormer's block layers through the blocked oracle) at T = 2048; the kernel of
    the platform is in the module."""
    as_platform(platform)
    kernel = {"cuda": "__cudnn$fmhaSoftmax", "tpu": "tpu_custom_call"}[platform]
    text = _model_loss_export(name, {**OVERRIDES.get(name, {}), "dtype": "bfloat16"}, platform, packed=False)
    assert kernel in _calls(text) and _square_tensors(text) == set(), name
    if name == "lact":
        return  # LaCT runs packed rows token by token (its docstring): no attention kernel there
    kinds = {"layer_attention": ("block", "full")} if name == "masformer" else {}
    text = _model_loss_export(name, {**OVERRIDES.get(name, {}), "dtype": "bfloat16", **kinds}, platform, packed=True)
    kernel = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    assert kernel in _calls(text) and _square_tensors(text) == set(), name
    if name == "transformer" and platform == "cuda":  # fp32: the sparse op's Triton kernels
        text = _model_loss_export(name, {"dtype": "float32"}, platform, packed=False)
        assert _calls(text) == {"__gpu$xla.gpu.triton"} and _square_tensors(text) == set()


def test_square_check_sees_the_dense_oracle(as_platform):
    """The dense oracle (implementation "reference") does hold [T, T] fp32 scores: the check above
    can fail; the CPU default (the blocked causal path) holds none."""
    as_platform("cpu")
    text = _model_loss_export("transformer", {"implementation": "reference"}, "cpu", packed=False)
    assert f"{T_LONG}x{T_LONG}xf32" in " ".join(_square_tensors(text))
    assert _square_tensors(_model_loss_export("transformer", {}, "cpu", packed=False)) == set()
