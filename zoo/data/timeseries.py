"""Time-series forecasting data: synthetic AR(p)/ARIMA processes and Informer-format CSVs (ETT).

Everything yields windows as a Grain-compatible random-access source: `len(windows)` examples,
`windows[i]` a dict {"x": float32 [lag, C], "y": float32 [horizon, C]}; `windows.arrays()` stacks
them all (small evaluation sets).

Synthetic (SpaceTime paper, AR(p) expressivity experiment):
    phi = sample_ar_coefficients(p, rng)            # stable: all roots inside the unit circle
    series = simulate_arima(phi, length, rng=rng)   # y_t = sum_j phi_j y_{t-j} + eps_t (+ MA, d)
    oracle = ar_forecast(phi, history, horizon)     # the optimal (conditional-mean) forecast
    task = ARTask(p=16, lag=128, horizon=64)        # train / val / test windows of one process

Informer CSV (ETTh1/ETTh2/ETTm1/ETTm2: a `date` column, then channels, `OT` last):
    splits = load_informer_csv("ETTh1.csv", lag=336)   # standard 12/4/4-month borders,
    ForecastWindows(splits.train, 336, 720)           # per-channel standardisation fitted on train
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
from scipy import signal

# --------------------------------------------------------------------------------------------------
# Synthetic AR(p) / ARIMA(p, d, q)
# --------------------------------------------------------------------------------------------------


def sample_ar_coefficients(
    p: int, rng: np.random.Generator, *, min_radius: float = 0.5, max_radius: float = 0.95
) -> np.ndarray:
    """phi [p] of a stable AR(p): roots of z^p - phi_1 z^{p-1} - .. - phi_p drawn inside the unit disk.

    Roots come in conjugate pairs (radius ~ U[min_radius, max_radius], angle ~ U(0, pi)) plus one real
    root (random sign) when p is odd, so phi is real and the process is stationary.
    """
    if p < 1:
        raise ValueError(f"AR order p={p} must be >= 1")
    if not 0.0 <= min_radius <= max_radius < 1.0:
        raise ValueError(f"need 0 <= min_radius ({min_radius}) <= max_radius ({max_radius}) < 1 for a stable process")
    n_pairs = p // 2
    radius = rng.uniform(min_radius, max_radius, n_pairs)
    angle = rng.uniform(0.0, np.pi, n_pairs)
    pairs = radius * np.exp(1j * angle)
    roots = np.concatenate([pairs, pairs.conj()])
    if p % 2:
        roots = np.append(roots, rng.choice([-1.0, 1.0]) * rng.uniform(min_radius, max_radius))
    monic = np.real(np.poly(roots))  # z^p + m_1 z^{p-1} + .. + m_p
    return -monic[1:]


def ar_roots(phi: np.ndarray) -> np.ndarray:
    """Roots of the characteristic polynomial z^p - sum_j phi_j z^{p-j}; stable iff all |root| < 1."""
    return np.roots(np.concatenate([[1.0], -np.asarray(phi, np.float64)]))


def simulate_arima(
    phi: np.ndarray,
    length: int,
    *,
    rng: np.random.Generator | None = None,
    d: int = 0,
    theta: np.ndarray = (),
    noise_std: float = 1.0,
    burn_in: int | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """A realisation of ARIMA(p, d, q): w_t = sum_j phi_j w_{t-j} + eps_t + sum_i theta_i eps_{t-i},
    then integrated d times (y = cumsum^d w). float64 [length].

    `noise` (shape [burn_in + length]) replaces the Gaussian draw (then nothing is discarded when
    burn_in is 0): with zero history this is exactly the recursion started at t = 0.
    """
    phi = np.asarray(phi, np.float64)
    theta = np.asarray(theta, np.float64)
    burn = (10 * (len(phi) + len(theta)) + 100) if burn_in is None else burn_in
    if noise is None:
        if rng is None:
            raise ValueError("simulate_arima needs rng (a numpy Generator) or explicit noise")
        noise = noise_std * rng.standard_normal(burn + length)
    elif noise.shape != (burn + length,):
        raise ValueError(f"noise has shape {noise.shape}; expected ({burn + length},) = burn_in + length")
    # ARMA filter: (1 - sum phi_j z^j) w = (1 + sum theta_i z^i) eps, zero initial conditions
    w = signal.lfilter(np.concatenate([[1.0], theta]), np.concatenate([[1.0], -phi]), noise)[burn:]
    for _ in range(d):
        w = np.cumsum(w)
    return w


def ar_forecast(phi: np.ndarray, history: np.ndarray, horizon: int, *, d: int = 0) -> np.ndarray:
    """The optimal forecast of an ARI(p, d) process: iterate the recursion on its own predictions.

    history [..., T] (T >= p + d) -> forecast [..., horizon]. With d > 0 the history is differenced
    d times, forecast, and integrated back from its last values.
    """
    phi = np.asarray(phi, np.float64)
    p = len(phi)
    hist = np.asarray(history, np.float64)
    if hist.shape[-1] < p + d:
        raise ValueError(f"history length {hist.shape[-1]} is shorter than p + d = {p + d}")
    lasts = []
    for _ in range(d):  # remember the level to integrate back from
        lasts.append(hist[..., -1])
        hist = np.diff(hist, axis=-1)
    buf = list(np.moveaxis(hist[..., -p:], -1, 0))  # oldest .. newest
    out = []
    for _ in range(horizon):
        nxt = sum(phi[j] * buf[-1 - j] for j in range(p))
        buf.append(nxt)
        out.append(nxt)
    fc = np.moveaxis(np.stack(out), 0, -1)
    for last in reversed(lasts):
        fc = last[..., None] + np.cumsum(fc, axis=-1)
    return fc


# --------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForecastWindows:
    """Sliding (lag, horizon) windows over a series [T, C] (stride 1, as the Informer loaders).

    `windows[i]` = {"x": series[i : i+lag], "y": series[i+lag : i+lag+horizon]}, float32.
    """

    series: np.ndarray
    lag: int
    horizon: int

    def __post_init__(self):
        if self.series.ndim != 2:
            raise ValueError(
                f"series has shape {self.series.shape}; expected [T, C] (use x[:, None] for a univariate series)"
            )
        if len(self) < 1:
            raise ValueError(
                f"series of length {self.series.shape[0]} is shorter than lag + horizon = {self.lag + self.horizon}"
            )

    def __len__(self) -> int:
        return self.series.shape[0] - self.lag - self.horizon + 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        s = self.series[index : index + self.lag + self.horizon].astype(np.float32)
        return {"x": s[: self.lag], "y": s[self.lag :]}

    def arrays(self, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """All windows (or `indices`) stacked: {"x": [n, lag, C], "y": [n, horizon, C]}."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        offsets = idx[:, None] + np.arange(self.lag + self.horizon)[None, :]
        s = self.series[offsets].astype(np.float32)  # [n, lag + horizon, C]
        return {"x": s[:, : self.lag], "y": s[:, self.lag :]}


@dataclasses.dataclass(frozen=True)
class ARTask:
    """One stable AR(p) (or ARIMA(p, d, 0)) process, three independent realisations as splits.

    Series are divided by the train split's standard deviation. `phi` is the true coefficient vector
    and `oracle(split)` the optimal forecasts of every window (the error floor).
    """

    p: int
    lag: int = 128
    horizon: int = 64
    d: int = 0
    seed: int = 0
    train_length: int = 8192
    eval_length: int = 2048
    min_radius: float = 0.5
    max_radius: float = 0.95

    @property
    def phi(self) -> np.ndarray:
        return sample_ar_coefficients(
            self.p, np.random.default_rng([self.seed, 0]), min_radius=self.min_radius, max_radius=self.max_radius
        )

    def _raw(self, split: str) -> np.ndarray:
        index = {"train": 1, "val": 2, "test": 3}[split]
        length = self.train_length if split == "train" else self.eval_length
        return simulate_arima(self.phi, length, rng=np.random.default_rng([self.seed, index]), d=self.d)

    @property
    def scale(self) -> float:
        return float(self._raw("train").std())

    def series(self, split: str) -> np.ndarray:
        """[T, 1] float32, in units of the train split's standard deviation."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split {split!r} must be one of train, val, test")
        return (self._raw(split) / self.scale).astype(np.float32)[:, None]

    def windows(self, split: str) -> ForecastWindows:
        return ForecastWindows(self.series(split), self.lag, self.horizon)

    def oracle(self, split: str) -> dict[str, np.ndarray]:
        """{"x", "y", "forecast"} for every window of `split`; forecast is the true-phi forecast."""
        w = self.windows(split).arrays()
        fc = ar_forecast(self.phi, w["x"][..., 0].astype(np.float64), self.horizon, d=self.d)
        return {**w, "forecast": fc[..., None].astype(np.float32)}


# --------------------------------------------------------------------------------------------------
# Informer-format CSV (ETT)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InformerSplits:
    """Standardised train / val / test arrays [T, C] (val and test start `lag` rows early, as the
    Informer loaders do, so their first window forecasts the first row of the split)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mean: np.ndarray  # [C] fitted on the train rows only
    std: np.ndarray  # [C]
    columns: tuple[str, ...]
    dates: np.ndarray  # datetime64 [T_total] of the whole file
    borders: tuple[tuple[int, int], ...]  # (start, end) rows of train, val, test in the file

    def inverse_transform(self, x: np.ndarray) -> np.ndarray:
        """Back to the file's units: x * std + mean (last axis = channels)."""
        return x * self.std + self.mean


def load_informer_csv(
    path: str,
    *,
    lag: int,
    features: str = "M",
    target: str = "OT",
    months: tuple[int, int, int] = (12, 4, 4),
    rows_per_month: int | None = None,
) -> InformerSplits:
    """Reads an Informer ETT-format CSV and returns the standard splits, standardised on train.

    The file: a header `date,<channel>,...`, then one row per time step ("YYYY-MM-DD HH:MM:SS").
    Borders follow the ETT convention of 30-day months: train = the first 12 months, val = the next 4,
    test = the next 4 (`months`), with rows_per_month = 30 days / the sampling interval (720 for
    ETTh, 2880 for ETTm) unless given. features="M" keeps every channel, "S" only `target`.
    """
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip().lower() != "date":
        raise ValueError(f"{path}: the first column must be 'date' (Informer format), got header {rows[:1]}")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if r]
    dates = np.array([np.datetime64(r[0].strip().replace(" ", "T")) for r in body])
    values = np.array([[float(v) for v in r[1:]] for r in body], np.float64)
    columns = tuple(header[1:])
    if features == "S":
        if target not in columns:
            raise ValueError(f"{path}: target column {target!r} not among {columns}")
        values = values[:, [columns.index(target)]]
        columns = (target,)
    elif features != "M":
        raise ValueError(f"features={features!r} must be 'M' (all channels) or 'S' (target only)")
    if rows_per_month is None:
        if len(dates) < 2:
            raise ValueError(f"{path}: need at least two rows to infer the sampling interval")
        step = np.median(np.diff(dates).astype("timedelta64[s]").astype(np.int64))
        rows_per_month = int(round(30 * 24 * 3600 / step))
    n_train, n_val, n_test = (m * rows_per_month for m in months)
    need = n_train + n_val + n_test
    if len(values) < need:
        raise ValueError(
            f"{path}: {len(values)} rows, but {months} months of {rows_per_month} rows need "
            f"{need}; pass smaller months or rows_per_month"
        )
    if lag > n_train:
        raise ValueError(f"lag={lag} exceeds the train split ({n_train} rows)")
    borders = ((0, n_train), (n_train - lag, n_train + n_val), (n_train + n_val - lag, need))
    mean = values[:n_train].mean(axis=0)
    std = values[:n_train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    scaled = ((values - mean) / std).astype(np.float32)
    train, val, test = (scaled[a:b] for a, b in borders)
    return InformerSplits(train, val, test, mean.astype(np.float32), std.astype(np.float32), columns, dates, borders)
