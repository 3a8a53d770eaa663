"""Quantiles of small, already sorted samples without numpy's per-call overhead."""

from __future__ import annotations

import math
from collections.abc import Sequence


def linear_quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ascending `ordered`, by numpy's default "linear"
    method (same interpolation, same rounding): `np.quantile(ordered, q)`."""
    if not ordered:
        raise ValueError("quantile of an empty sample")
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be in [0, 1]")
    position = q * (len(ordered) - 1)
    lo = math.floor(position)
    below = float(ordered[lo])
    if lo + 1 >= len(ordered):
        return below
    frac = position - lo
    diff = ordered[lo + 1] - below
    return below + diff * frac if frac < 0.5 else ordered[lo + 1] - diff * (1 - frac)
