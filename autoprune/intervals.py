"""Confidence intervals of a trial's metric from the size of the sample it was scored on. Pure, no torch.

Wilson score interval of an accuracy ``p`` (a fraction) on ``n`` samples at normal quantile ``z``
(Wilson 1927; it stays inside [0, 1] and keeps its coverage near 0% and 100%, where the normal
approximation ``p +- z sqrt(p(1-p)/n)`` collapses to a point):

    center    = (p + z^2 / 2n) / (1 + z^2 / n)
    halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

A metric that is not an accuracy has no such formula: a percentile bootstrap of the mean of its
per-sample values gives the interval when those values exist, and there is none otherwise.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

from autoprune.errors import AutopruneError

CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise AutopruneError("confidence", confidence, "must be between 0 and 1 (exclusive)")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(accuracy_pct: float, n: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) in percent of an accuracy in percent measured on ``n`` samples."""
    if n < 1:
        raise AutopruneError("n", n, "must be a positive number of samples")
    if not 0.0 <= accuracy_pct <= 100.0:
        raise AutopruneError("accuracy", accuracy_pct, "must be a percentage in [0, 100]")
    z = _z(confidence)
    p = accuracy_pct / 100.0
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # clipped: rounding can push an end a hair past 0 or 1 at p = 0 or 1
    return 100.0 * max(0.0, center - half), 100.0 * min(1.0, center + half)


def bootstrap(values: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile bootstrap interval of the mean of per-sample values (seeded: replayable)."""
    data = np.asarray(values, dtype=float)
    if data.size < 2:
        raise AutopruneError("values", data.size, "must hold at least two per-sample values")
    _z(confidence)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of repeated measurements."""
    data = np.asarray(values, dtype=float)
    if data.size < 1:
        raise AutopruneError("values", 0, "must hold at least one value")
    return float(data.mean()), float(data.std(ddof=1)) if data.size > 1 else 0.0


__all__ = ["CONFIDENCE", "wilson", "bootstrap", "mean_spread"]
