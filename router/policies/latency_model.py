"""Per-worker latency models fitted online from measured data (Arrow §3.1).

Prefill time is quadratic in prompt length, `T(L) = a·L² + b·L + c`; a decode step's time
is linear in the tokens resident on the worker, `τ(B) = m·B + c0`. Both are weighted
least-squares fits over exponentially forgotten samples, so they follow drift, and both
answer from configurable priors until they have enough distinct samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class OnlinePolyFit:
    """Least-squares polynomial fit `y ≈ Σ coef[k]·x^k` kept as forgetting-weighted normal
    equations: O(degree²) memory, O(degree³) per refit, no stored samples.

    Plain Python floats on purpose: for degree <= 2 the matrices are at most 3x3, where
    numpy's per-call overhead costs ~10x the arithmetic (the simulator feeds one sample
    per engine iteration)."""

    def __init__(self, degree: int, forget: float = 0.99, x_scale: float = 1.0) -> None:
        if degree < 0:
            raise ValueError("degree must be >= 0")
        if not 0.0 < forget <= 1.0:
            raise ValueError("forget must be in (0, 1]")
        self.degree = degree
        self.forget = forget
        self.x_scale = x_scale  # x is divided by this before powers: keeps XᵀX conditioned
        self._n = n = degree + 1
        self._mom = [0.0] * (2 * degree + 1)  # Σ w·x^k: XᵀX is the Hankel matrix of these
        self._xty = [0.0] * n
        self._xs: set[float] = set()  # distinct x seen (capped), to know when a fit is determined
        self.samples = 0

    def add(self, x: float, y: float) -> None:
        f = self.forget
        xs = x / self.x_scale
        mom, xty = self._mom, self._xty
        power = 1.0
        for k in range(len(mom)):
            mom[k] = f * mom[k] + power
            if k < self._n:
                xty[k] = f * xty[k] + power * y
            power *= xs
        self.samples += 1
        if len(self._xs) <= self.degree:
            self._xs.add(float(x))

    @property
    def determined(self) -> bool:
        """True once at least degree+1 distinct x values have been seen."""
        return len(self._xs) > self.degree

    def coefficients(self) -> list[float] | None:
        """Coefficients in the caller's x units (lowest power first), or None if undetermined."""
        if not self.determined:
            return None
        n, mom = self._n, self._mom
        if n == 2:  # the decode model: closed form, the common case
            det = mom[0] * mom[2] - mom[1] * mom[1]
            if abs(det) > 1e-12 * mom[0] * mom[2]:
                y0, y1 = self._xty
                return [(y0 * mom[2] - y1 * mom[1]) / det,
                        (mom[0] * y1 - mom[1] * y0) / det / self.x_scale]
        if n == 3:  # the prefill model
            m0, m1, m2, m3, m4 = mom
            y0, y1, y2 = self._xty
            aug = [[m0, m1, m2, y0], [m1, m2, m3, y1], [m2, m3, m4, y2]]
        else:
            aug = [[mom[i + j] for j in range(n)] + [self._xty[i]] for i in range(n)]
        coef = _solve(aug)
        if coef is None:  # numerically singular: fall back to a minimum-norm solution
            xtx = np.array([[mom[i + j] for j in range(n)] for i in range(n)])
            coef = list(np.linalg.lstsq(xtx, np.array(self._xty), rcond=None)[0])
        scale = self.x_scale
        return [float(c) / scale ** k for k, c in enumerate(coef)]


def _solve(aug: list[list[float]]) -> list[float] | None:
    """Gaussian elimination with partial pivoting on an n x (n+1) augmented matrix;
    None when a pivot is negligible against the matrix's scale. (Loops, not generators
    or key functions: Arrow refits a 3x3 system per observed prefill.)"""
    n = len(aug)
    scale = 0.0
    first = True
    for row in aug:
        for v in row[:n]:
            a = abs(v)
            if first or a > scale:  # max(): the first of equal maxima, NaN as max() does
                scale, first = a, False
    tol = 1e-12 * scale
    for col in range(n):
        pivot, best = col, abs(aug[col][col])
        for r in range(col + 1, n):
            a = abs(aug[r][col])
            if a > best:
                pivot, best = r, a
        if best <= tol:
            return None
        aug[col], aug[pivot] = aug[pivot], aug[col]
        head = aug[col]
        for r in range(col + 1, n):
            factor = aug[r][col] / head[col]
            if factor:
                row = aug[r]
                for c in range(col, n + 1):
                    row[c] -= factor * head[c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        row = aug[r]
        acc = 0  # sum()'s start, so the rounding is the same
        for c in range(r + 1, n):
            acc = acc + row[c] * out[c]
        out[r] = (row[n] - acc) / row[r]
    return out


@dataclass
class PrefillLatencyModel:
    """`T(L) = a·L² + b·L + c` seconds for a prompt of L tokens on one worker."""

    a: float = 0.0
    b: float = 2e-4
    c: float = 0.02
    forget: float = 0.99
    _fit: OnlinePolyFit = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._fit = OnlinePolyFit(2, self.forget, x_scale=1000.0)

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        """Feed one measured prefill (compute only, queueing excluded)."""
        self._fit.add(float(prompt_tokens), float(seconds))
        coef = self._fit.coefficients()
        if coef is not None:
            self.c, self.b, self.a = (float(v) for v in coef)

    @property
    def samples(self) -> int:
        return self._fit.samples

    def predict(self, prompt_tokens: float) -> float:
        """Predicted prefill seconds, never negative."""
        x = float(prompt_tokens)
        return max(0.0, self.a * x * x + self.b * x + self.c)


@dataclass
class DecodeLatencyModel:
    """`τ(B) = m·B + c0` seconds per decode step with B tokens resident on one worker."""

    m: float = 1e-5
    c0: float = 0.02
    forget: float = 0.99
    _fit: OnlinePolyFit = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._fit = OnlinePolyFit(1, self.forget, x_scale=1000.0)

    def observe(self, resident_tokens: int, step_seconds: float) -> None:
        """Feed one measured decode step (or inter-token interval) at a known load."""
        self._fit.add(float(resident_tokens), float(step_seconds))
        coef = self._fit.coefficients()
        if coef is not None:
            self.c0, self.m = (float(v) for v in coef)

    @property
    def samples(self) -> int:
        return self._fit.samples

    def predict(self, resident_tokens: float) -> float:
        """Predicted seconds per decode step, never negative."""
        return max(0.0, self.m * float(resident_tokens) + self.c0)

    def max_tokens_under(self, tpot_s: float) -> float:
        """Most resident tokens that keep a step under `tpot_s` (Arrow's MT(i)); 0 if none."""
        if self.c0 >= tpot_s:
            return 0.0
        if self.m <= 0.0:
            return float("inf")
        return (tpot_s - self.c0) / self.m


@dataclass(frozen=True)
class LatencyPriors:
    """Coefficients a worker's models start from before they have seen data."""

    prefill_a: float = 0.0
    prefill_b: float = 2e-4
    prefill_c: float = 0.02
    decode_m: float = 1e-5
    decode_c0: float = 0.02
    forget: float = 0.99


class LatencyModelBook:
    """One prefill and one decode model per worker name, created from priors on first use."""

    def __init__(self, priors: LatencyPriors | None = None) -> None:
        self.priors = priors or LatencyPriors()
        self._prefill: dict[str, PrefillLatencyModel] = {}
        self._decode: dict[str, DecodeLatencyModel] = {}

    def prefill(self, worker: str) -> PrefillLatencyModel:
        model = self._prefill.get(worker)
        if model is None:
            p = self.priors
            model = PrefillLatencyModel(p.prefill_a, p.prefill_b, p.prefill_c, p.forget)
            self._prefill[worker] = model
        return model

    def decode(self, worker: str) -> DecodeLatencyModel:
        model = self._decode.get(worker)
        if model is None:
            p = self.priors
            model = DecodeLatencyModel(p.decode_m, p.decode_c0, p.forget)
            self._decode[worker] = model
        return model

    def best_fitted(self, kind: str, min_samples: int) -> PrefillLatencyModel | \
            DecodeLatencyModel | None:
        """The `kind` ("prefill" or "decode") model with the most samples, if it has at
        least `min_samples`: a stand-in for a worker whose own model has seen too little."""
        models = self._prefill if kind == "prefill" else self._decode
        best = max(models.values(), key=lambda m: m.samples, default=None)
        return best if best is not None and best.samples >= min_samples else None

