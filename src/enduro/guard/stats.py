"""Robust trend statistics for the guard: Theil–Sen slope, Sen's interval, Mann–Kendall test.

Memory readings are noisy and now and then wild (a burst of requests, a collection), so the
slope is the median of all pairwise slopes rather than least squares: up to ~29 % of the
points can be arbitrary without moving it. Numpy only; the normal quantile comes from the
standard library.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

MAX_POINTS = 500
"""Largest number of points fitted exactly. Pairwise slopes cost O(n²) time and memory, so a
longer series is thinned to MAX_POINTS points evenly spaced by index (first and last kept):
the slope, interval and p-value are then exactly those of the thinned series."""

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SlopeEstimate:
    slope: float
    """Theil–Sen slope: the median of the pairwise slopes, in y units per x unit."""
    intercept: float
    """median(y - slope * x)."""
    low: float
    """Lower end of Sen's confidence interval for the slope."""
    high: float
    """Upper end of Sen's confidence interval for the slope."""
    p_value: float
    """Two-sided Mann–Kendall p-value of "no monotonic trend"."""
    num_points: int
    """Points fitted (after thinning, see MAX_POINTS)."""


def theil_sen(
    xs: Sequence[float], ys: Sequence[float], confidence: float = 0.95
) -> SlopeEstimate | None:
    """Fit y = intercept + slope * x; None when fewer than 3 points or all xs are equal."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys must have the same length")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    x, y = _thinned(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
    if len(x) < 3:
        return None
    first, second = np.triu_indices(len(x), k=1)
    dx = x[second] - x[first]
    dy = y[second] - y[first]
    distinct = dx != 0
    if not distinct.any():
        return None
    slopes = np.sort(dy[distinct] / dx[distinct])
    slope = float(np.median(slopes))
    # Kendall's S: concordant minus discordant pairs; pairs tied in x or y count zero.
    s = int(np.sum(np.sign(dx) * np.sign(dy)))
    var_s = _kendall_variance(x, y)
    low, high = _sen_interval(slopes, var_s, confidence)
    return SlopeEstimate(
        slope=slope,
        intercept=float(np.median(y - slope * x)),
        low=low,
        high=high,
        p_value=_mann_kendall_p_value(s, var_s),
        num_points=len(x),
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 to 100), interpolated linearly as numpy does; None when empty."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _thinned(x: Floats, y: Floats) -> tuple[Floats, Floats]:
    if len(x) <= MAX_POINTS:
        return x, y
    # Spacing is above 1 when len(x) > MAX_POINTS, so the rounded indices are distinct.
    keep = np.linspace(0, len(x) - 1, MAX_POINTS).round().astype(np.int64)
    return x[keep], y[keep]


def _tie_sizes(values: Floats) -> Floats:
    counts = np.unique(values, return_counts=True)[1]
    return counts[counts > 1].astype(np.float64)


def _kendall_variance(x: Floats, y: Floats) -> float:
    """Var(S) under "no trend", corrected for ties in x (t) and in y (u) (Kendall 1970).

    With distinct xs (times) it is the usual Mann–Kendall variance
    (n(n-1)(2n+5) - Σu(u-1)(2u+5)) / 18.
    """
    n = float(len(x))
    t, u = _tie_sizes(x), _tie_sizes(y)
    base = n * (n - 1) * (2 * n + 5)
    base -= float(np.sum(t * (t - 1) * (2 * t + 5))) + float(np.sum(u * (u - 1) * (2 * u + 5)))
    pairs = float(np.sum(t * (t - 1))) * float(np.sum(u * (u - 1))) / (2 * n * (n - 1))
    triples = float(np.sum(t * (t - 1) * (t - 2))) * float(np.sum(u * (u - 1) * (u - 2)))
    return base / 18 + pairs + triples / (9 * n * (n - 1) * (n - 2))


def _sen_interval(slopes: Floats, var_s: float, confidence: float) -> tuple[float, float]:
    """Sen (1968): the slopes ranked (N - C)/2 and (N + C)/2 + 1, C = z * sqrt(Var(S)).

    Ranks are rounded and clipped to the slopes there are, as scipy's theilslopes does.
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    spread = z * math.sqrt(max(var_s, 0.0))
    num = len(slopes)
    lower_rank = round((num - spread) / 2)
    upper_rank = round((num + spread) / 2) + 1
    low = slopes[min(max(lower_rank - 1, 0), num - 1)]
    high = slopes[min(max(upper_rank - 1, 0), num - 1)]
    return float(low), float(high)


def _mann_kendall_p_value(s: int, var_s: float) -> float:
    """Two-sided p from the normal approximation, with continuity correction (|S| - 1)."""
    if s == 0 or var_s <= 0:
        return 1.0
    z = (abs(s) - 1) / math.sqrt(var_s)
    return math.erfc(z / math.sqrt(2))
