"""Find the highest request rate that keeps SLO attainment at or above a target.

Shared by the live harness and the simulator: `evaluate(rate)` runs one experiment and
returns its result dict (with `slo_attainment`). A grid pass finds the bracket, then
bisection narrows it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class SweepResult:
    """All points tried and the best passing rate (None if even the lowest failed)."""

    target: float
    max_rate: float | None
    points: list[tuple[float, dict]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"target_attainment": self.target, "max_rate": self.max_rate,
                "points": [{"request_rate": r, **{k: v for k, v in res.items()
                                                  if not isinstance(v, list)}}
                           for r, res in sorted(self.points, key=lambda p: p[0])]}


def attains(result: dict, target: float) -> bool:
    att = result.get("slo_attainment")
    return att is not None and att >= target


def sweep_rates(evaluate: Callable[[float], dict], rates: Sequence[float], target: float = 0.9,
                refine_steps: int = 0, stop_after_fail: bool = True,
                progress: str | None = None) -> SweepResult:
    """Try `rates` in increasing order, then bisect between the last pass and first fail
    `refine_steps` times. `progress` names a progress bar on stderr (one tick per rate)."""
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(rates) + refine_steps, desc=progress, unit="rate", file=sys.stderr)
        inner = evaluate

        def evaluate(rate: float) -> dict:
            bar.set_postfix_str(f"{rate:g} req/s")
            try:
                return inner(rate)
            finally:
                bar.update(1)

        try:
            return sweep_rates(evaluate, rates, target, refine_steps, stop_after_fail)
        finally:
            bar.close()
    result = SweepResult(target=target, max_rate=None)
    passed: float | None = None
    failed: float | None = None
    for rate in sorted(rates):
        res = evaluate(rate)
        result.points.append((rate, res))
        if attains(res, target):
            passed = rate
        else:
            failed = rate
            if stop_after_fail:
                break
    lo = passed
    hi = failed if failed is not None and (passed is None or failed > passed) else None
    for _ in range(refine_steps):
        if hi is None:
            break
        mid = (hi + (lo if lo is not None else 0.0)) / 2
        if lo is None and mid <= 0:
            break
        res = evaluate(mid)
        result.points.append((mid, res))
        if attains(res, target):
            lo = mid
        else:
            hi = mid
    result.max_rate = lo
    return result
