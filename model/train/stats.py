"""Confidence intervals over evaluation clips: a mean per metric and paired differences.

Every clip is one independent sample (its own identity, sentences, motion and noise
seed), so the unit of the statistics is the clip, never the frame: frames of one clip
are strongly correlated and would make any interval far too narrow.

The interval is Student's t over clips: mean +- t_{(1+c)/2, n-1} * s / sqrt(n), s the
sample standard deviation (n - 1 in the denominator). For a comparison of two systems on
the same clips it is applied to the per-clip differences (the paired t-interval): what
varies between clips (how hard an identity or a sentence is) cancels, so a small but
consistent difference is resolved with few clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of n per-clip values and its two-sided confidence interval [low, high].
    With one clip there is no interval: low and high are NaN."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def defined(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)

    def format(self, digits: int = 3) -> str:
        """'mean ± half-width' (the t-interval is symmetric), or just the mean without one."""
        if not self.defined:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student's t confidence interval of the mean of `values` (one per clip)."""
    x = np.asarray(values, np.float64).ravel()
    if len(x) == 0:
        raise ValueError("no values: an interval needs at least one clip")
    if not np.isfinite(x).all():
        raise ValueError(f"values must be finite, got {x.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return Interval(mean, mean - half, mean + half, len(x))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Interval of the mean of a_i - b_i: a and b hold one value per clip, same clip order."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if len(a) != len(b):
        raise ValueError(f"paired values need the same clips: {len(a)} and {len(b)} values")
    return t_interval(a - b, confidence)
