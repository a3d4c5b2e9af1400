"""Matplotlib figures (Agg backend) for training curves and long-context evaluations."""

from __future__ import annotations

from io import BytesIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from zoo import storage  # noqa: E402


def training_curves(records: list[dict], path: str, title: str = "") -> None:
    """Plots the loss and answer-accuracy curves of `records` (one dict per logged step) to `path`."""
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, [r["loss"] for r in records])
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log", title=title or "loss")
    axes[1].plot(steps, [r["accuracy"] for r in records])
    axes[1].set(xlabel="step", ylabel="answer accuracy", ylim=(0, 1.02), title="accuracy")
    fig.tight_layout()
    _save(fig, path)


def eval_figure(result: dict, path: str, train_length: int, title: str = "") -> None:
    """Plots an evaluation result (passkey, accuracy by length, loss by position) to `path`."""
    panels = [k for k in ("passkey", "by_length", "loss_by_position") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        r = result[key]
        if key == "passkey":
            grid = np.asarray(r["exact_match"])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(r["depths"])), [f"{d:.2f}" for d in r["depths"]])
            ax.set_yticks(range(len(r["lengths"])), r["lengths"])
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k")
            ax.set(xlabel="needle depth", ylabel="context length", title="passkey exact match")
            fig.colorbar(im, ax=ax)
        elif key == "by_length":
            ax.plot(r["lengths"], r["token_accuracy"], "o-", label="token accuracy")
            ax.plot(r["lengths"], r["exact_match"], "s-", label="exact match")
            ax.axvline(train_length, color="gray", ls="--", label="train length")
            ax.set(xlabel="context length", ylabel="accuracy", ylim=(0, 1.02), xscale="log", title="answer accuracy")
            ax.legend()
        else:
            ax.plot(r["position"], r["loss"])
            ax.axvline(train_length, color="gray", ls="--", label="train length")
            ax.set(xlabel="position", ylabel="loss", title=f"loss by position (length {r['length']})")
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label, each label a plain number (200, 0.5)."""

    def _num_to_string(self, x, vmin, vmax):
        return np.format_float_positional(x, precision=6, trim="-")


def plain_log_ticks(fig) -> None:
    """Tick labels of every log-scaled axis of `fig` as plain numbers (200, 0.5), not 2x10^2."""
    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
                axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def _save(fig, path) -> None:
    """Saves a figure to any epath-compatible path (local or remote), log-axis ticks as plain numbers."""
    plain_log_ticks(fig)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.path(path).write_bytes(buf.getvalue())
