"""Kernels under a mesh: every Pallas op runs inside shard_map on local blocks.

The planner (`pallas_kernels.sharding.plan`) is tested in this process. Everything that needs a mesh
runs once, in one subprocess on 8 simulated CPU devices (mesh data=2 x fsdp=2 x tensor=2), which
prints one JSON report that the tests below read:
  (a) each op's jaxpr holds a shard_map whose body holds every pallas_call, on per-device shapes;
  (b) sharded results and gradients equal the unsharded op's (interpreted kernels on CPU), and the
      compiled sharded op has no all-gather when its operands arrive split as the op wants;
  (c) `jax.export` for cuda and tpu of the gradient of a tiny model's loss (mamba2: SSD; transformer
      in fp32: the sparse op; bf16: cuDNN / splash) and of the ops (HiP search + sparse attention,
      Cauchy, Vandermonde), params and batch sharded as the trainer shards them: every kernel
      custom call sits in an `sdy.manual_computation` (directly or in a function only called from
      one) whose operands are the local blocks, and no all-gather appears (the exported module is
      StableHLO before partitioning: collectives in it are the ones the program asks for; the
      manual regions are what keeps XLA from gathering the kernels' operands).
Run `python tests/kernels/test_kernel_sharding.py` with XLA_FLAGS=--xla_force_host_platform_device_count=8
to see the report.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from pallas_kernels import sharding

MESH = (("data", 2), ("fsdp", 2), ("tensor", 2))
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "collective_permute", "collective_broadcast")


def _mesh(types=(AxisType.Auto,) * 3, names=("data", "fsdp", "tensor"), sizes=(2, 2, 2)):
    return AbstractMesh(sizes, names, axis_types=types)


# ------------------------------------------------------------------------------- the planner (1 device)
X = ("batch", None, "heads", None)
GROUPS = ("batch", None, "groups", None)


def test_plan_splits_batch_and_heads():
    p = sharding.plan(_mesh(), [(8, 16, 4, 8), (4,)], [X, ("heads",)])
    assert (p.batch, p.heads, p.split) == (("data", "fsdp"), ("tensor",), ("data", "fsdp", "tensor"))
    assert p.spec(X) == P(("data", "fsdp"), None, "tensor", None)
    assert p.spec(("heads",)) == P("tensor")


def test_plan_undividable_dims_stay_replicated():
    # B = 2 splits over data only; B = 3 over nothing; H = 3 not at all.
    assert sharding.plan(_mesh(), [(2, 5, 4, 8)], [X]).batch == ("data",)
    p = sharding.plan(_mesh(), [(3, 5, 4, 8)], [X])
    assert p.batch == () and p.heads == ("tensor",)
    assert sharding.plan(_mesh(), [(3, 5, 3, 8)], [X]) is None  # nothing split: the op runs unchanged


@pytest.mark.parametrize(
    "heads,groups,tensor,split",
    [
        (8, 4, 2, True),  # G % t == 0: the groups split like the heads
        (8, 1, 2, True),  # t % G == 0: each group is repeated t / G times
        (8, 2, 4, True),
        (12, 6, 4, False),  # neither: the heads stay whole
    ],
)
def test_plan_groups_follow_heads(heads, groups, tensor, split):
    mesh = _mesh(sizes=(1, 1, tensor))
    p = sharding.plan(mesh, [(2, 5, heads, 8), (2, 5, groups, 4)], [X, GROUPS])
    assert (p is not None and p.heads == ("tensor",)) == split


def test_plan_skips_missing_size_one_and_manual_axes():
    assert sharding.plan(_mesh(names=("data", "model", "tensor")), [(8, 5, 4, 8)], [X]).batch == ("data",)
    assert sharding.plan(_mesh(sizes=(1, 1, 1)), [(8, 5, 4, 8)], [X]) is None
    inner = _mesh(types=(AxisType.Manual, AxisType.Auto, AxisType.Manual))
    p = sharding.plan(inner, [(8, 5, 4, 8)], [X])
    assert (p.batch, p.heads, p.split) == (("fsdp",), (), ("fsdp",))
    assert sharding.plan(None, [(8, 5, 4, 8)], [X]) is None
    custom = sharding.plan(_mesh(names=("dp", "x", "tp")), [(8, 5, 4, 8)], [X], batch_axes=("dp",), head_axes=("tp",))
    assert (custom.batch, custom.heads) == (("dp",), ("tp",))


def test_plan_rows_and_errors():
    p = sharding.plan(_mesh(), [(24, 8), (16,)], [("rows", None), (None,)])
    assert p.rows == ("data", "fsdp", "tensor") and p.spec(("rows", None), gathered=True) == P(None, None)
    assert sharding.plan(_mesh(), [(6, 8)], [("rows", None)]).rows == ("data",)
    with pytest.raises(ValueError, match="one role per dimension"):
        sharding.plan(_mesh(), [(8, 5)], [X])
    with pytest.raises(ValueError, match="different sizes"):
        sharding.plan(_mesh(), [(8, 5, 4, 8), (6, 4)], [X, ("batch", None)])


def test_no_mesh_calls_the_op_unchanged():
    """Without a mesh the op's jaxpr has no shard_map (the single-device path is untouched)."""
    from pallas_kernels.ssd import ssd

    x = jnp.ones((2, 16, 2, 4))
    args = (x, jnp.ones((2, 16, 2)), -jnp.ones((2,)), jnp.ones((2, 16, 1, 4)), jnp.ones((2, 16, 1, 4)))
    text = str(jax.make_jaxpr(functools.partial(ssd, chunk_size=8, implementation="pallas"))(*args))
    assert "pallas_call" in text and "shard_map" not in text


# ------------------------------------------------------------------------------- the 8-device report
@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


OPS = ("ssd", "sparse_attention", "hip_block_indices", "cauchy", "vandermonde")


@pytest.mark.parametrize("op", OPS)
def test_kernels_run_on_local_blocks(report, op):
    """(a) One shard_map holds every pallas_call; its body sees the per-device blocks."""
    r = report["ops"][op]
    assert r["pallas_outside"] == 0 and r["pallas_inside"] >= 1, r
    assert r["body_shapes"] == r["expected_local_shapes"], r


@pytest.mark.parametrize("op", OPS)
def test_sharded_equals_unsharded(report, op):
    """(b) Results and gradients of every differentiable operand equal the single-device op's."""
    r = report["ops"][op]
    assert r["max_rel_err"] <= 1e-5, r
    # Operands arrive split as the op wants: nothing is gathered but the Cauchy / Vandermonde
    # result, and only parameter-sized gradient sums cross devices (dA, dD, dt_bias over the batch
    # axes) plus, for SSD's one group repeated over tensor, dB and dC [B/2, T, N] summed over the
    # copies (the price of heads on two devices sharing a group).
    assert r["all_gathers"] == 0 or op in ("cauchy", "vandermonde"), r
    group_sums = [[1, 40, 16]] if op == "ssd" else []
    assert all(np.prod(s) <= 128 or s in group_sums for s in r["all_reduce_shapes"]), r


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", ["mamba2", "transformer_fp32", "transformer_bf16", "sparse_ops", "cauchy_ops"])
def test_export_keeps_kernels_in_manual_regions(report, name, platform):
    """(c) Exported for the accelerator: kernels only inside manual regions, on local shapes, no all-gather."""
    r = report["exports"][f"{name}/{platform}"]
    assert r["kernels_inside"], r
    assert r["kernels_outside"] == [], r
    expected = {
        ("mamba2", "tpu"): {"ssd_tpu_fwd", "ssd_tpu_bwd"},
        ("mamba2", "cuda"): {"ssd_bmm", "ssd_state_fwd", "ssd_chunk_fwd"},
        ("transformer_fp32", "cuda"): {"sparse_attention_fwd_gpu", "sparse_attention_dq_gpu"},
        ("transformer_bf16", "cuda"): {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"},
        ("transformer_bf16", "tpu"): {"splash_mha_fwd_residuals", "splash_mha_dq_no_residuals"},
    }.get((name, platform), set())
    assert expected <= set(r["kernels_inside"]), r
    for region in r["regions"]:
        assert region["manual_axes"] == ["data", "fsdp", "tensor"], region
        for spec, glob, loc in region["operands"]:
            divided = [g // int(np.prod([dict(MESH)[a] for a in axes])) for g, axes in zip(glob, spec)]
            assert loc == divided, region
        split = ["data", "fsdp", "tensor"] if name == "cauchy_ops" else ["data", "fsdp"]  # rows / batch
        assert any(spec and spec[0] == split for spec, _, _ in region["operands"]), region
    assert r["global_shapes_in_kernels"] == [], r
    gathers = [c for c in r["collectives"] if c[0] == "all_gather"]
    assert len(gathers) == (2 if name == "cauchy_ops" else 0), r  # the Cauchy and Vandermonde results
    assert all(inside for _, inside in r["collectives"]), r  # collectives only inside manual regions


# ------------------------------------------------------------------------------- the subprocess
def _jaxpr_kernels(closed) -> dict:
    """pallas_calls inside / outside shard_map bodies and the first shard_map body's input shapes."""
    from jax.extend.core import jaxprs_in_params

    found = {"inside": 0, "outside": 0, "body_shapes": None}

    def walk(jaxpr, inside):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "pallas_call":
                found["inside" if inside else "outside"] += 1
            if name == "shard_map" and found["body_shapes"] is None:
                found["body_shapes"] = [list(v.aval.shape) for v in eqn.params["jaxpr"].invars]
            for sub in jaxprs_in_params(eqn.params):
                walk(sub, inside or name == "shard_map")

    walk(closed.jaxpr, False)
    return found


def _local(shape, spec, mesh_sizes) -> list[int]:
    out = []
    for n, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        out.append(n // int(np.prod([mesh_sizes[a] for a in axes])))
    return out


def _collective_shapes(hlo: str, op: str) -> list[list[int]]:
    """The result shapes of every `op` (e.g. "all-gather") in compiled HLO text (tuples flattened)."""
    shapes = []
    for result in re.findall(r"= (.*?) " + op + r"(?:-start)?\(", hlo):
        shapes += [[int(d) for d in s.split(",") if d] for s in re.findall(r"\w+\[([\d,]*)\]", result)]
    return shapes


def _rel_err(a, b) -> float:
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        errs.append(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30)))
    return max(errs)


def _check_op(mesh, fn, args, specs, diff_argnums, body_specs=None):
    """Runs fn sharded (args placed with `specs`, under the mesh) and unsharded; the report entry."""
    from jax.sharding import NamedSharding

    def value_and_grads(*a):
        out = fn(*a)
        if not diff_argnums:
            return out, ()
        loss = lambda *b: sum(jnp.sum(jnp.abs(o) ** 2) for o in jax.tree.leaves(fn(*b)))  # noqa: E731
        return out, jax.grad(loss, argnums=diff_argnums)(*a)

    start = time.time()
    single = jax.jit(value_and_grads)(*args)
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    with jax.set_mesh(mesh):
        kernels = _jaxpr_kernels(jax.make_jaxpr(fn)(*placed))
        compiled = jax.jit(value_and_grads).lower(*placed).compile()
        sharded = compiled(*placed)
    hlo = compiled.as_text()
    body_specs = [(a.shape, s) for a, s in zip(args, specs)] if body_specs is None else body_specs
    sizes = dict(mesh.shape)
    return {
        "seconds": time.time() - start,
        "pallas_inside": kernels["inside"],
        "pallas_outside": kernels["outside"],
        "body_shapes": kernels["body_shapes"],
        "expected_local_shapes": [_local(s, spec, sizes) for s, spec in body_specs],
        "max_rel_err": _rel_err(sharded, single),
        "all_gathers": len(_collective_shapes(hlo, "all-gather")),
        "all_reduce_shapes": _collective_shapes(hlo, "all-reduce"),
    }


def _ops_report(mesh) -> dict:
    from pallas_kernels.cauchy import cauchy, vandermonde
    from pallas_kernels.sparse_attention import hip_block_indices, sparse_attention
    from pallas_kernels.ssd import ssd

    rng = np.random.default_rng(0)  # numpy inputs: no per-shape compiles
    rnd = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    bt, b_h, h_ = P(("data", "fsdp"), None), P(("data", "fsdp"), None, "tensor", None), P("tensor")
    report = {}

    # SSD with every option; one group (Mamba-2's released models), repeated once per tensor shard;
    # B = 2 splits over data only; D per (head, p).
    b, t, h, p, g, n = 2, 40, 4, 8, 1, 16
    seq_idx = np.broadcast_to((np.arange(t) >= 17).astype(np.int32), (b, t))
    args = (rnd(b, t, h, p), 0.5 * rnd(b, t, h), -np.exp(rnd(h)), rnd(b, t, g, n), rnd(b, t, g, n))
    args += (rnd(h, p), rnd(b, t, h, p), rnd(h), rnd(b, h, p, n), seq_idx)

    def ssd_all(x, dt, A, B, C, D, z, dt_bias, h0, idx):
        return ssd(
            x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, initial_states=h0, seq_idx=idx,
            chunk_size=16, return_final_states=True, implementation="pallas",
        )  # fmt: skip

    d_h, d = P("data", None, "tensor", None), P("data")
    specs = (d_h, P("data", None, "tensor"), h_, d, d, h_, d_h, h_, P("data", "tensor"), d)
    body = [(a.shape, s) for a, s in zip(args, specs)]
    body[3] = body[4] = ((b, t, 2, n), d_h)  # the group repeated once per tensor shard
    report["ssd"] = _check_op(mesh, ssd_all, args, specs, tuple(range(9)), body)

    # HiP search + block-sparse attention with window, sinks and segment ids; K = 2 kv heads.
    b, t, h, kv, p = 4, 96, 4, 2, 16
    q, k, v = rnd(b, t, h, p), rnd(b, t, kv, p), rnd(b, t, kv, p)
    seg = np.broadcast_to((np.arange(t) >= 50).astype(np.int32), (b, t))
    pattern = dict(block_q=16, block_k=16, window=16, sinks=8)
    idx = rng.integers(-1, t // 16, (b, h, t // 16, 2)).astype(np.int32)  # listed blocks, -1 = unused

    def sparse(q, k, v, idx, seg):
        return sparse_attention(
            q, k, v, block_indices=idx, segment_ids=seg, implementation="pallas", **pattern
        )  # fmt: skip

    specs = (b_h, b_h, b_h, P(("data", "fsdp"), "tensor"), bt)
    body = [(a.shape, s) for a, s in zip((q, k, v, seg, seg, idx), specs[:3] + (bt, bt, specs[3]))]
    report["sparse_attention"] = _check_op(mesh, sparse, (q, k, v, idx, seg), specs, (0, 1, 2), body)
    search = lambda q, k: hip_block_indices(q, k, k_blocks=2, implementation="pallas", **pattern)  # noqa: E731
    report["hip_block_indices"] = _check_op(mesh, search, (q, k), (b_h, b_h), ())

    # Cauchy / Vandermonde: 24 flattened rows split over all 8 devices, the [rows, L] result gathered.
    c64 = lambda *shape: (rnd(*shape) + 1j * rnd(*shape)).astype(np.complex64)  # noqa: E731
    v_, w_ = c64(6, 4, 8), -0.5 + 0.1 * c64(4, 8)
    z_ = c64(20)
    cau = lambda v, z, w: cauchy(v, z, w, implementation="pallas")  # noqa: E731
    rows = P(("data", "fsdp", "tensor"))
    body = [((24, 8), rows), ((20,), P()), ((24, 8), rows)]
    report["cauchy"] = _check_op(mesh, cau, (v_, z_, w_), (P(), P(), P()), (0, 1, 2), body)
    x_ = -0.1 + 0.5j * c64(24, 8).imag
    vdm = lambda v, x: vandermonde(v, x, 20, implementation="pallas")  # noqa: E731
    report["vandermonde"] = _check_op(mesh, vdm, (c64(24, 8), x_), (P(), P()), (0, 1), [((24, 8), rows)] * 2)
    return report


# --- the exported modules
def _functions(text: str) -> dict[str, list[str]]:
    funcs, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*func\.func (?:public |private )?@([\w$.]+)\(", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        if name is not None:
            funcs[name].append(line)
    return funcs


def _types(sig: str) -> list[list[int]]:
    """The shapes of the `tensor<...>` types in an MLIR signature, in order."""
    return [
        [int(d) for d in dims.split("x") if d] for dims in re.findall(r"tensor<((?:\d+x)*)(?:complex<\w+>|\w+)>", sig)
    ]


def _kernel_name(line: str, target: str) -> str:
    m = re.search(r'kernel_name = "(\w+)"', line) or re.search(r', name = "(\w+)"', line)
    return m.group(1) if m else target


def analyze_module(text: str) -> dict:
    """Kernel custom calls and collectives of an exported module, inside or outside manual regions.

    A line is inside a manual region when it lies in an `sdy.manual_computation` body, or in a
    private function called only from such lines (transitively).
    """
    funcs = _functions(text)
    calls_from = {f: [] for f in funcs}  # callee -> [(caller, inside)]
    items, regions = [], []
    for fname, lines in funcs.items():
        depth_stack = []  # indentation of the open manual regions
        for i, line in enumerate(lines):
            indent = len(line) - len(line.lstrip())
            while depth_stack and line.strip().startswith("}") and indent == depth_stack[-1]:
                depth_stack.pop()
                region = regions[-1]
                if region["globals"] is None:  # the closing line carries the global operand types
                    region["globals"] = _types(line.split(") ->")[0])
            inside = bool(depth_stack)
            if "sdy.manual_computation(" in line:
                header = line
                specs = re.findall(r"<@mesh, \[(.*?)\]>", header.split("out_shardings=")[0])
                axes = re.search(r"manual_axes=\{([^}]*)\}", header).group(1)
                regions.append(
                    {
                        "specs": [[re.findall(r'"(\w+)"', d) for d in re.findall(r"\{([^}]*)\}", s)] for s in specs],
                        "manual_axes": re.findall(r'"(\w+)"', axes),
                        "locals": _types(header.split("manual_axes=")[1]),
                        "globals": None,
                    }
                )
                depth_stack.append(indent)
                continue
            for callee in re.findall(r"\bcall @([\w$.]+)\(", line):
                calls_from.setdefault(callee, []).append((fname, inside))
            m = re.search(r"stablehlo\.custom_call @([\w$.]+)\(", line)
            if m and m.group(1) in KERNEL_TARGETS:
                sig = line[line.rfind("} : (") :]
                items.append(("kernel", fname, inside, _kernel_name(line, m.group(1)), _types(sig)))
            m = re.search(r"stablehlo\.(" + "|".join(COLLECTIVES) + r")\b", line)
            if m:
                items.append(("collective", fname, inside, m.group(1), None))

    manual_funcs: dict[str, bool] = {}

    def is_manual(f, seen=()):  # every call site lies in a manual region
        if f not in manual_funcs:
            sites = calls_from.get(f, [])
            manual_funcs[f] = bool(sites) and all(
                inside or (caller not in seen and is_manual(caller, seen + (f,))) for caller, inside in sites
            )
        return manual_funcs[f]

    kernels_in, kernels_out, collectives, kernel_types = [], [], [], []
    for kind, fname, inside, name, types in items:
        inside = inside or is_manual(fname)
        if kind == "kernel":
            (kernels_in if inside else kernels_out).append(name)
            kernel_types += types
        else:
            collectives.append([name, inside])
    out_regions = []
    for r in regions:
        operands = [[spec, glob, loc] for spec, glob, loc in zip(r["specs"], r["globals"] or [], r["locals"])]
        out_regions.append({"manual_axes": sorted(r["manual_axes"]), "operands": operands})
    split_globals = {
        tuple(glob) for reg in out_regions for spec, glob, _ in reg["operands"] if any(spec) and len(glob) >= 3
    }
    return {
        "kernels_inside": sorted(set(kernels_in)),
        "kernels_outside": sorted(set(kernels_out)),
        "regions": [reg for reg in out_regions if reg["operands"]],
        "collectives": collectives,
        "global_shapes_in_kernels": sorted({tuple(t) for t in kernel_types} & split_globals),
    }


def _patched_platform(platform: str):
    """Makes "auto" choose `platform`'s kernels from this CPU process (for jax.export only)."""
    from jax._src.cudnn import fused_attention_stablehlo
    from jax._src.pallas.mosaic import tpu_info

    tpu_info.get_device_kind = lambda: "TPU v5 lite"  # Mosaic asks the device for its generation
    tpu_info.get_num_device_cores = lambda: 1
    fused_attention_stablehlo.check_cudnn_version = lambda: 91000  # cuDNN 9.10 (no cuDNN on CPU)
    jax.default_backend = lambda: {"cuda": "gpu", "tpu": "tpu"}[platform]


DISABLED = ("__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def _export(fn, platform, *args) -> str:
    from jax import export

    disabled = [export.DisabledSafetyCheck.custom_call(t) for t in DISABLED]
    return export.export(jax.jit(fn), platforms=(platform,), disabled_checks=disabled)(*args).mlir_module()


def _model_grad(model: str, overrides: dict, platform: str, batch: int = 8, seq: int = 128) -> str:
    """The exported gradient of a tiny model's training loss on the trainer's mesh and shardings."""
    from zoo.config import make_config
    from zoo.train import sharding as train_sharding
    from zoo.train.step import lm_loss, make_setup

    config = make_config(model, "tiny")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    for key, value in overrides.items():
        config.model[key] = value
    setup = make_setup(config)

    def loss(params, batch):
        return lm_loss(setup.view.merge(params)(batch["inputs"]), batch)[0]

    bsh = train_sharding.batch_sharding(setup.mesh, 2)
    dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "answer_mask": jnp.float32}
    batch_structs = {k: jax.ShapeDtypeStruct((batch, seq), d, sharding=bsh) for k, d in dtypes.items()}
    params = {
        n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=setup.param_shardings[n])
        for n, s in setup.view.shapes.items()
    }
    with jax.set_mesh(setup.mesh):
        return _export(jax.grad(loss), platform, params, batch_structs)


def _ops_export(mesh, platform: str) -> dict[str, str]:
    from jax.sharding import NamedSharding

    from pallas_kernels.cauchy import cauchy, vandermonde
    from pallas_kernels.sparse_attention import hip_block_indices, sparse_attention

    S = lambda shape, spec, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))  # noqa: E731
    b_h = P(("data", "fsdp"), None, "tensor", None)
    pattern = dict(block_q=64, block_k=64, window=64, sinks=64)

    def sparse_loss(q, k, v, seg):
        idx = hip_block_indices(q, k, k_blocks=2, **pattern)
        out = sparse_attention(q, k, v, block_indices=idx, segment_ids=seg, **pattern)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    qs, ks = S((8, 512, 4, 64), b_h), S((8, 512, 2, 64), b_h)
    seg = S((8, 512), P(("data", "fsdp"), None), jnp.int32)

    def cauchy_loss(v, z, w, vv, x):
        out = cauchy(v, z, w)
        return jnp.sum(jnp.abs(out) ** 2) + jnp.sum(vandermonde(vv, x, 256) ** 2)

    c = lambda shape: S(shape, P(), jnp.complex64)  # noqa: E731
    with jax.set_mesh(mesh):
        cauchy_args = (c((4, 16, 32)), c((129,)), c((16, 32)), c((16, 32)), c((16, 32)))
        return {
            "sparse_ops": _export(jax.grad(sparse_loss, argnums=(0, 1, 2)), platform, qs, ks, ks, seg),
            "cauchy_ops": _export(jax.grad(cauchy_loss, argnums=(0, 1, 2, 3, 4)), platform, *cauchy_args),
        }


def main():
    from zoo.train.sharding import make_mesh

    start = time.time()
    mesh = make_mesh(2, 2, 2)
    report = {"devices": jax.device_count(), "ops": _ops_report(mesh), "exports": {}}
    report["ops_seconds"] = time.time() - start
    for platform in ("cuda", "tpu"):
        _patched_platform(platform)
        texts = {
            "mamba2": _model_grad("mamba2", {}, platform),
            "transformer_fp32": _model_grad("transformer", {"n_heads": 4, "n_kv_heads": 2}, platform),
            "transformer_bf16": _model_grad(
                "transformer", {"n_heads": 4, "n_kv_heads": 2, "dtype": "bfloat16"}, platform
            ),
            **_ops_export(mesh, platform),
        }
        for name, text in texts.items():
            report["exports"][f"{name}/{platform}"] = analyze_module(text)
    report["seconds"] = time.time() - start
    print(json.dumps(report))


if __name__ == "__main__":
    main()
