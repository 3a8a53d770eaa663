"""DOPD-style policy: size the pools from the throughput balance of the length mix.

Producer (prefill) and consumer (decode) must keep pace (notes/papers.md §3.3). One
request costs a prefill worker `t_p(ISL) = a·ISL² + ISL / prefill_tokens_per_s + c`
seconds and a decode worker `OSL / decode_tokens_per_s` seconds, so the share of
workers prefill needs is `t_p / (t_p + t_d)`; the arrival rate cancels out. The share is
smoothed and extrapolated with Holt's linear method `forecast_horizon_s` ahead, so a
shift that is under way is acted on before it completes. The ideal (fractional) prefill
count is `N · share`; a worker moves only when the ideal is more than `0.5 + hysteresis`
away from the current count, at most one per `adjustment_interval_s`, never emptying a
pool. The quadratic term is evaluated at the window's mean ISL, which under-states the
cost of a high-variance mix (Jensen); raise `prefill_quadratic_s` to compensate.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.workers import Role
from instance_manager.controller.base import ControlSnapshot, FlipAction
from instance_manager.controller.common import (
    PolicyNote,
    describe_load,
    held,
    hold_reason_while_draining,
    least_loaded,
    pool,
)


@dataclass(frozen=True)
class DOPDConfig:
    """Knobs of the DOPD policy. Only the ratio of the two throughputs matters; the
    defaults are roughly a small model on one CPU core (measure yours with the bench)."""

    prefill_tokens_per_s: float = 4000.0
    """Prompt tokens per second one worker prefills (the linear cost term)."""
    prefill_quadratic_s: float = 0.0
    """Seconds per prompt token squared (attention's quadratic term), `a` above."""
    prefill_overhead_s: float = 0.0
    """Fixed seconds per prefill leg, `c` above."""
    decode_tokens_per_s: float = 400.0
    """Output tokens per second one worker sustains at the TPOT target (B*/tau(B*))."""
    level_smoothing: float = 0.5
    """Holt's alpha: weight of the newest share in the level."""
    trend_smoothing: float = 0.3
    """Holt's beta: weight of the newest slope in the trend."""
    forecast_horizon_s: float = 30.0
    """How far ahead the share is extrapolated (0 disables the forecast)."""
    hysteresis: float = 0.3
    """Extra workers of dead band beyond rounding before a move (0 = plain rounding)."""
    adjustment_interval_s: float = 30.0
    """At most one flip per this many seconds."""
    max_extrapolation_s: float = 5.0
    """The trend extrapolates at most this far between two updates: after a gap (ticks
    that saw no finished request) a steep old trend must not fling the level past the
    data."""


class DOPDPolicy:
    """Targets the P:D split that balances prefill and decode work for the recent mix."""

    name = "dopd"

    def __init__(self, config: DOPDConfig | None = None) -> None:
        self.config = config or DOPDConfig()
        self.last_note = PolicyNote("no tick yet")
        self._level: float | None = None
        self._trend = 0.0
        self._seen_at: float | None = None
        self._last_change_at: float | None = None

    def prefill_share(self, mean_prompt: float, mean_output: float) -> tuple[float, float, float]:
        """(prefill seconds, decode seconds, prefill share) of one average request."""
        cfg = self.config
        t_p = (cfg.prefill_quadratic_s * mean_prompt ** 2
               + mean_prompt / cfg.prefill_tokens_per_s + cfg.prefill_overhead_s)
        t_d = mean_output / cfg.decode_tokens_per_s
        total = t_p + t_d
        return t_p, t_d, (t_p / total if total > 0 else 0.5)

    def _update_forecast(self, share: float, now: float) -> float:
        """Holt's linear smoothing of the share; returns the share `horizon` ahead."""
        cfg = self.config
        if self._level is None or self._seen_at is None or now <= self._seen_at:
            self._level, self._trend = share, 0.0
        else:
            dt = now - self._seen_at
            predicted = min(1.0, max(0.0, self._level + self._trend * min(
                dt, cfg.max_extrapolation_s)))
            level = cfg.level_smoothing * share + (1 - cfg.level_smoothing) * predicted
            slope = (level - self._level) / dt
            self._trend = cfg.trend_smoothing * slope + (1 - cfg.trend_smoothing) * self._trend
            self._level = level
        self._seen_at = now
        return min(1.0, max(0.0, self._level + self._trend * cfg.forecast_horizon_s))

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        cfg = self.config
        n_p, n_d = len(pool(snapshot, Role.PREFILL)), len(pool(snapshot, Role.DECODE))
        total = n_p + n_d
        numbers: dict = {"prefill_workers": n_p, "decode_workers": n_d}
        isl, osl = snapshot.mean_prompt_tokens, snapshot.mean_output_tokens
        if isl is None or osl is None:
            self.last_note = PolicyNote("hold: no finished requests in the window", numbers)
            return []
        t_p, t_d, share = self.prefill_share(isl, osl)
        forecast = self._update_forecast(share, snapshot.time)
        ideal = total * forecast
        target = min(total - 1, max(1, round(ideal))) if total >= 2 else n_p
        numbers.update({
            "mean_prompt_tokens": round(isl, 1), "mean_output_tokens": round(osl, 1),
            "prefill_s_per_request": round(t_p, 5), "decode_s_per_request": round(t_d, 5),
            "prefill_share_now": round(share, 3), "prefill_share_forecast": round(forecast, 3),
            "ideal_prefill_workers": round(ideal, 2), "target_prefill_workers": target,
        })
        facts = (f"mix ISL {isl:.0f} / OSL {osl:.0f} tokens -> prefill {t_p * 1000:.1f} ms vs "
                 f"decode {t_d * 1000:.1f} ms per request, prefill share {share:.2f} now, "
                 f"{forecast:.2f} forecast in {cfg.forecast_horizon_s:.0f}s -> ideal "
                 f"{ideal:.2f} of {total} prefill, have {n_p}")

        def hold(why: str) -> list[FlipAction]:
            self.last_note = held(why, facts, numbers)
            return []

        if draining := hold_reason_while_draining(snapshot):
            return hold(draining)
        if target == n_p:
            return hold("the split matches")
        if abs(ideal - n_p) <= 0.5 + cfg.hysteresis:
            return hold(f"within the hysteresis band ({cfg.hysteresis:.2f})")
        if self._last_change_at is not None:
            left = cfg.adjustment_interval_s - (snapshot.time - self._last_change_at)
            if left > 0:
                return hold(f"one change per {cfg.adjustment_interval_s:.0f}s, {left:.0f}s left")
        source = Role.PREFILL if target < n_p else Role.DECODE
        dest = Role.DECODE if source == Role.PREFILL else Role.PREFILL
        worker = least_loaded(snapshot, source)
        if worker is None:
            return hold(f"the {source.value} pool cannot spare a worker")
        reason = f"{facts}; {worker.name} is least loaded ({describe_load(worker)})"
        self._last_change_at = snapshot.time
        self.last_note = PolicyNote(f"flip {worker.name} to {dest.value}: {reason}", numbers)
        return [FlipAction(worker.name, dest, reason)]
