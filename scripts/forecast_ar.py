"""SpaceTime vs S4D on synthetic AR(p) forecasting (the SpaceTime paper's expressivity result, small).

    .venv/bin/python scripts/forecast_ar.py --out runs/forecast_ar      # p 4 8 16 32, seeds 0 1 2
    .venv/bin/python scripts/forecast_ar.py --target optimal --steps 3200 --out runs/forecast_ar_optimal

For each order p and seed: one stable AR(p) process (roots drawn inside the unit circle, radius in
[0.8, 0.99] so that the process is predictable over the horizon), independent train (65536 steps)
and test realisations, windows of `lag` inputs and `horizon` targets. Both models get the same
optimiser (AdamW, cosine decay, clip 1.0), steps and batch size, at about the same parameter count,
each at its best peak lr from the same three-value sweep; then every test window is evaluated:
- `rmse`: error of the forecast against the noisy future (the task);
- `oracle`: the error of the optimal forecast (the true-phi recursion) — the floor;
- `vs_oracle`: RMSE between the model's forecast and the optimal one (0 = learned the process).
The table reports mean ± std over the seeds.
`--target optimal` trains on the optimal forecast instead of the realised future (the noise-free
continuation of the AR recursion from each window). The lag-window terms of SpaceTime's loss are
unchanged. This removes the target noise from the gradients, so what is left between a model and the
oracle is what it can represent and what the optimiser finds, not the noise. Test metrics are the same.

S4D baseline (the Informer-style forecaster of the S4 codebase): append `horizon` zeros to the
input, Linear(1 -> H), causal S4D blocks from zoo.models.s4 (S4D-Lin, ZOH), RMSNorm, Linear(H -> 1),
read the last `horizon` outputs; loss RMSE on the horizon.
SpaceTime: zoo.models.spacetime (residual preprocessing block + closed-loop companion decoder),
trained with its three-term loss; `--decoder-norm a` (default) L1-normalises only the decoder's a,
so that A + b k^T can realise AR processes whose coefficients have ||phi||_1 >> 1.
Neither model subtracts the lag mean by default (`--input-transform none`): the series is zero-mean
and stationary, and centring discards the level that the optimal forecast uses.
Writes results.json, a markdown table and ar_forecast.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zoo.data.timeseries import ARTask
from zoo.eval.plots import plain_log_ticks
from zoo.layers import Linear, RMSNorm
from zoo.models import registry
from zoo.models.base import Forecaster, make_context
from zoo.models.s4 import S4Block, S4Config


class S4DForecaster(Forecaster):
    """x [B, lag, C] -> [B, horizon, C] with causal S4D blocks over lag + horizon steps (masked future)."""

    def __init__(
        self,
        lag: int,
        horizon: int,
        d_model: int,
        n_layers: int,
        d_state: int,
        *,
        input_transform: str = "mean",
        rngs: nnx.Rngs,
    ):
        self.lag, self.horizon, self.input_transform = lag, horizon, input_transform
        cfg = S4Config(
            d_model=d_model,
            n_layers=n_layers,
            d_state=d_state,
            mode="diag",
            init="lin",
            disc="zoh",
            l_max=lag + horizon,
        )
        self.embed = Linear(1, d_model, axes=(None, "embed"), rngs=rngs, use_bias=True)
        self.blocks = nnx.List([S4Block(cfg, bidirectional=False, rngs=rngs) for _ in range(n_layers)])
        self.norm = RMSNorm(d_model, rngs=rngs)
        self.head = Linear(d_model, 1, axes=("embed", None), rngs=rngs, use_bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, c = x.shape
        offset = x.mean(axis=1, keepdims=True) if self.input_transform == "mean" else jnp.zeros_like(x[:, :1])
        u = jnp.moveaxis(x - offset, 2, 1).reshape(b * c, self.lag, 1)  # channel-independent
        u = jnp.concatenate([u, jnp.zeros((b * c, self.horizon, 1), u.dtype)], axis=1)
        z = self.embed(u)
        ctx = make_context(jnp.zeros(z.shape[:2], jnp.int32))
        for block in self.blocks:
            z = block(z, ctx)
        out = self.head(self.norm(z))[:, self.lag :, 0]  # [B*C, H]
        return jnp.moveaxis(out.reshape(b, c, self.horizon), 1, 2) + offset

    def loss(self, x: jax.Array, y: jax.Array):
        f = self(x)
        mse = jnp.mean(jnp.square(f - y))
        return jnp.sqrt(mse), {"horizon": jnp.sqrt(mse), "mse": mse}


def n_params(model: nnx.Module) -> int:
    return int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))


def fit(
    model: nnx.Module, task: ARTask, *, steps: int, batch_size: int, lr: float, seed: int, target: str = "noisy"
) -> dict:
    """AdamW (cosine decay, clip 1.0) on random train windows; then test metrics vs truth and oracle.

    target "noisy": the horizon targets are the realised future; "optimal": the optimal forecast
    (the noise-free continuation of the AR recursion from the window).
    """
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.1), weight_decay=0.0)
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, x, y):
        (loss, _), grads = nnx.value_and_grad(lambda m: m.loss(x, y), has_aux=True)(model)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def predict(model, x):
        return model(x)

    if target == "optimal":
        oracle = task.oracle("train")
        train = {"x": oracle["x"], "y": oracle["forecast"]}
    elif target == "noisy":
        train = task.windows("train").arrays()
    else:
        raise ValueError(f"target {target!r} must be 'noisy' or 'optimal'")
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(train["x"]), batch_size)
        losses.append(float(train_step(model, opt, jnp.asarray(train["x"][idx]), jnp.asarray(train["y"][idx]))))
    train_s = time.perf_counter() - t0
    model.eval()
    test = task.oracle("test")
    preds = np.concatenate(
        [np.asarray(predict(model, jnp.asarray(test["x"][i : i + 512]))) for i in range(0, len(test["x"]), 512)]
    )
    rmse = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))
    return {
        "rmse": rmse(preds, test["y"]),
        "oracle": rmse(test["forecast"], test["y"]),
        "vs_oracle": rmse(preds, test["forecast"]),
        "final_train_loss": float(np.mean(losses[-50:])),
        "train_seconds": train_s,
        "params": n_params(model),
        "example": {
            "x": test["x"][0, :, 0].tolist(),
            "y": test["y"][0, :, 0].tolist(),
            "oracle": test["forecast"][0, :, 0].tolist(),
            "pred": preds[0, :, 0].tolist(),
        },
    }


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def plot(results: dict, orders: list[int], seeds: list[int], target: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    get = lambda p, name, key: [results[str(p)][str(s)][name][key] for s in seeds]
    for name, style in (("spacetime", "o-"), ("s4d", "s--")):
        for ax, key in ((axes[0], "rmse"), (axes[1], "vs_oracle")):
            ax.errorbar(
                orders,
                [np.mean(get(p, name, key)) for p in orders],
                yerr=[np.std(get(p, name, key)) for p in orders],
                fmt=style,
                capsize=3,
                label=name,
            )
    axes[0].plot(orders, [np.mean(get(p, "spacetime", "oracle")) for p in orders], "k:", label="oracle (true AR)")
    axes[0].set(
        xlabel="AR order p",
        ylabel="test RMSE vs truth",
        title=f"forecast error (mean ± std, {len(seeds)} seeds)",
        xscale="log",
        xticks=orders,
    )
    axes[1].set(
        xlabel="AR order p",
        ylabel="RMSE vs optimal forecast",
        title="distance to the optimal forecast",
        xscale="log",
        yscale="log",
        xticks=orders,
    )
    for ax in axes[:2]:
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticklabels([str(p) for p in orders])
        ax.legend()
    p, s = orders[-1], seeds[0]
    ex = results[str(p)][str(s)]["spacetime"]["example"]
    lag = len(ex["x"])
    t_in, t_out = np.arange(lag), lag + np.arange(len(ex["y"]))
    axes[2].plot(t_in[-48:], ex["x"][-48:], color="gray", label="input")
    axes[2].plot(t_out, ex["y"], "k", label="truth")
    axes[2].plot(t_out, ex["oracle"], "k:", label="oracle")
    axes[2].plot(t_out, ex["pred"], label="spacetime")
    axes[2].plot(t_out, results[str(p)][str(s)]["s4d"]["example"]["pred"], "--", label="s4d")
    axes[2].set(title=f"AR({p}) test window (seed {s})", xlabel="t")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"SpaceTime vs S4D on AR(p), trained on {target} targets")
    fig.tight_layout()
    plain_log_ticks(fig)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one AR process, train/test realisation and model init per seed",
    )
    ap.add_argument("--lag", type=int, default=128)
    ap.add_argument("--horizon", type=int, default=32)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--st-lr", type=float, default=1e-2, help="SpaceTime peak lr (best of 3e-3/1e-2/3e-2 on AR(16))")
    ap.add_argument("--s4d-lr", type=float, default=3e-2, help="S4D peak lr (best of 3e-3/1e-2/3e-2 on AR(16))")
    ap.add_argument("--train-length", type=int, default=65536, help="length of the training realisation")
    ap.add_argument(
        "--input-transform",
        choices=("none", "mean"),
        default="none",
        help="both models: none, or subtract the lag-window mean (loses the level of the series)",
    )
    ap.add_argument(
        "--decoder-norm",
        choices=("a", "abck"),
        default="a",
        help="SpaceTime decoder: L1-normalise only a (b, c, k free) or all four (the reference)",
    )
    ap.add_argument("--d-model", type=int, default=32, help="SpaceTime width (S4D width is matched on params)")
    ap.add_argument("--kernel-dim", type=int, default=64, help="SpaceTime state size N (>= max p)")
    ap.add_argument("--s4d-d-model", type=int, default=40)
    ap.add_argument("--s4d-layers", type=int, default=2)
    ap.add_argument("--s4d-state", type=int, default=64)
    ap.add_argument("--min-radius", type=float, default=0.8, help="smallest modulus of the AR roots")
    ap.add_argument("--max-radius", type=float, default=0.99, help="largest modulus of the AR roots (< 1)")
    ap.add_argument(
        "--target",
        choices=("noisy", "optimal"),
        default="noisy",
        help="training horizon targets: the realised (noisy) future, or the optimal forecast",
    )
    ap.add_argument("--out", default="runs/forecast_ar")
    args = ap.parse_args(argv)
    if max(args.orders) > args.kernel_dim:
        raise SystemExit(f"error: --kernel-dim {args.kernel_dim} must be >= the largest order {max(args.orders)}")
    os.makedirs(args.out, exist_ok=True)

    t_start = time.perf_counter()
    results = {}
    for p in args.orders:
        results[str(p)] = {}
        for seed in args.seeds:
            task = ARTask(
                p=p,
                lag=args.lag,
                horizon=args.horizon,
                seed=seed,
                train_length=args.train_length,
                min_radius=args.min_radius,
                max_radius=args.max_radius,
            )
            models = {
                "spacetime": (
                    registry.create_model(
                        "spacetime",
                        "tiny",
                        seed=seed,
                        lag=args.lag,
                        horizon=args.horizon,
                        d_model=args.d_model,
                        kernel_dim=args.kernel_dim,
                        first_block_kernels=args.d_model // 8,
                        max_avg_window=64,
                        input_transform=args.input_transform,
                        decoder_norm=args.decoder_norm,
                    ),
                    args.st_lr,
                ),
                "s4d": (
                    S4DForecaster(
                        args.lag,
                        args.horizon,
                        args.s4d_d_model,
                        args.s4d_layers,
                        args.s4d_state,
                        input_transform=args.input_transform,
                        rngs=nnx.Rngs(seed),
                    ),
                    args.s4d_lr,
                ),
            }
            results[str(p)][str(seed)] = {}
            for name, (model, lr) in models.items():
                r = fit(model, task, steps=args.steps, batch_size=args.batch_size, lr=lr, seed=seed, target=args.target)
                results[str(p)][str(seed)][name] = r
                print(
                    f"AR({p:2d}) seed {seed} {name:9s} params {r['params']:6d}  test rmse {r['rmse']:.4f}  oracle "
                    f"{r['oracle']:.4f}  vs oracle {r['vs_oracle']:.4f}  train {r['train_seconds']:.1f}s",
                    flush=True,
                )

    lines = [
        "| p | SpaceTime RMSE | S4D RMSE | oracle RMSE | SpaceTime vs oracle | S4D vs oracle | "
        "S4D / SpaceTime (vs oracle) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in args.orders:
        get = lambda name, key: [results[str(p)][str(s)][name][key] for s in args.seeds]
        ratios = np.array(get("s4d", "vs_oracle")) / np.array(get("spacetime", "vs_oracle"))
        lines.append(
            f"| {p} | {_mean_std(get('spacetime', 'rmse'))} | {_mean_std(get('s4d', 'rmse'))} | "
            f"{_mean_std(get('spacetime', 'oracle'))} | {_mean_std(get('spacetime', 'vs_oracle'))} | "
            f"{_mean_std(get('s4d', 'vs_oracle'))} | {ratios.mean():.1f}x (min {ratios.min():.1f}x) |"
        )
    first = results[str(args.orders[0])][str(args.seeds[0])]
    wall = time.perf_counter() - t_start
    lines.append(
        f"\nmean ± std over seeds {args.seeds}; params: SpaceTime {first['spacetime']['params']}, S4D "
        f"{first['s4d']['params']}; lag {args.lag}, horizon {args.horizon}, {args.steps} steps x batch "
        f"{args.batch_size}, lr SpaceTime {args.st_lr} / S4D {args.s4d_lr}, train length "
        f"{args.train_length}, input transform {args.input_transform}, decoder norm {args.decoder_norm}, "
        f"training targets {args.target}; "
        f"wall {wall / 60:.1f} min"
    )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "wall_seconds": wall}, f)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot(results, args.orders, args.seeds, args.target, os.path.join(args.out, "ar_forecast.png"))
    print(f"wrote {args.out}/results.json, table.md, ar_forecast.png")


if __name__ == "__main__":
    main()
