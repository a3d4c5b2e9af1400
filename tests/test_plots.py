"""Figures: log-scaled axes label their ticks with plain numbers (200, 0.5), not 2x10^2."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zoo.eval import plots  # noqa: E402


def _labels(fig):
    fig.canvas.draw()
    ax = fig.axes[0]
    texts = [
        t.get_text() for axis in (ax.xaxis, ax.yaxis) for minor in (False, True) for t in axis.get_ticklabels(minor)
    ]
    return [t for t in texts if t]


def test_log_axes_have_plain_tick_labels():
    fig, ax = plt.subplots()
    ax.plot([160, 320, 640, 1280], [0.5, 0.2, 0.3, 0.9])
    ax.set(xscale="log", yscale="log")
    fig.canvas.draw()
    assert any("times" in t for t in _labels(fig))  # matplotlib's default: 2x10^2
    plots.plain_log_ticks(fig)
    labels = _labels(fig)
    assert "200" in labels and "1000" in labels and "0.2" in labels
    assert not any("times" in t or "^" in t for t in labels), labels
    plt.close(fig)
