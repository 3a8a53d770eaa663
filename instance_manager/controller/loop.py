"""The live controller: every interval, scrape -> decide -> act (or only advise) -> record.

Deciding and acting are separate steps, so advisory mode, `fulcrum explain` and the
simulator all run the same policy code; only this loop touches the cluster, and only
through the `FlipCoordinator`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from core.feedback import PolicyFeedback
from core.flips import FlipCoordinator, FlipRefused
from core.pressure import PressureLog, SLOPressure
from core.slo import SLOTargets
from instance_manager.controller.base import (
    ControlPolicy,
    ControlSnapshot,
    FlipAction,
    WorkerMetrics,
)
from instance_manager.controller.common import PolicyNote
from instance_manager.controller.registry import (
    CONTROL_POLICIES,
    make_control_policy,
    policy_knobs,
)
from instance_manager.metrics_collector import MetricsCollector

log = logging.getLogger("fulcrum.controller")


@dataclass(frozen=True)
class Decision:
    """One controller tick: what the policy saw, said and asked for, and what happened."""

    tick: int
    at: float
    policy: str
    mode: str
    note: str
    numbers: Mapping[str, Any]
    actions: tuple[FlipAction, ...] = ()
    results: tuple[str, ...] = ()
    workers: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {
            "tick": self.tick, "at": self.at, "policy": self.policy, "mode": self.mode,
            "note": self.note, "numbers": dict(self.numbers),
            "actions": [{"worker": a.worker, "to": a.to.value, "reason": a.reason}
                        if isinstance(a, FlipAction) else
                        {"scale": a.direction, "worker": a.worker or "(new worker)",
                         "reason": a.reason,
                         "to": a.role.value if a.role else "(given back)"}
                        for a in self.actions],
            "results": list(self.results), "workers": [dict(w) for w in self.workers],
        }


def worker_rows(snapshot: ControlSnapshot) -> tuple[dict[str, Any], ...]:
    """Per-worker numbers of a snapshot, as plain dicts (for explain and watch)."""
    rows = []
    for w in snapshot.cluster.workers:
        m = snapshot.metrics.get(w.name)
        row: dict[str, Any] = {"name": w.name, "role": w.role.value, "state": w.state.value,
                               "in_flight_prefill": w.in_flight_prefill,
                               "in_flight_decode": w.in_flight_decode, "scraped": m is not None}
        if m is not None:
            row.update(ttft_p50_s=m.ttft_p50_s, ttft_p90_s=m.ttft_p90_s, itl_p50_s=m.itl_p50_s,
                       itl_p90_s=m.itl_p90_s, num_running=m.num_running,
                       num_waiting=m.num_waiting, kv_cache_usage=m.kv_cache_usage,
                       prompt_tokens_per_s=m.prompt_tokens_per_s,
                       generation_tokens_per_s=m.generation_tokens_per_s,
                       requests_finished_per_s=m.requests_finished_per_s,
                       gateway_ttft_p90_s=m.gateway_ttft_p90_s)
        rows.append(row)
    return tuple(rows)


def with_gateway_ttft(snapshot: ControlSnapshot,
                      legs: Mapping[str, tuple[float, int]]) -> ControlSnapshot:
    """`snapshot` with each worker's gateway-timed prefill legs (p90, samples) merged into
    its metrics; a worker with legs but no scrape gets metrics of its own."""
    if not legs:
        return snapshot
    metrics = dict(snapshot.metrics)
    for name, (p90, n) in legs.items():
        base = metrics.get(name) or WorkerMetrics(name=name)
        metrics[name] = replace(base, gateway_ttft_p90_s=p90, gateway_ttft_samples=n)
    return replace(snapshot, metrics=metrics)


class Controller:
    """Owns the policy and the decision log; acts through a `FlipCoordinator`."""

    def __init__(self, collector: MetricsCollector, flips: FlipCoordinator,
                 policy: ControlPolicy, *, interval_s: float = 5.0, advisory: bool = False,
                 drain_timeout_s: float | None = None, history_size: int = 50,
                 wall_clock: Callable[[], float] = time.time,
                 request_mix: Callable[[float], tuple[float | None, float | None, int]]
                 | None = None,
                 pressure: Callable[[], list[SLOPressure]] | None = None,
                 min_interval_s: float = 0.5,
                 prefill_legs: Callable[[float], Mapping[str, tuple[float, int]]]
                 | None = None) -> None:
        self.collector = collector
        self.flips = flips
        self.policy = policy
        self.interval_s = interval_s
        self.advisory = advisory
        self.drain_timeout_s = drain_timeout_s
        self._wall = wall_clock
        self._request_mix = request_mix
        self._pressure = pressure
        self._prefill_legs = prefill_legs
        self.min_interval_s = min_interval_s
        self._wake = asyncio.Event()
        self._decisions: deque[Decision] = deque(maxlen=history_size)
        self._ticks = 0
        self.last_snapshot: ControlSnapshot | None = None
        # Called with every fresh snapshot: the gateway reads its routing gauges from
        # here instead of scraping each worker a second time.
        self.on_snapshot: Callable[[ControlSnapshot], None] | None = None

    @property
    def slo(self) -> SLOTargets:
        return self.collector.slo

    def set_slo(self, ttft_s: float | None = None, tpot_s: float | None = None) -> SLOTargets:
        changes = {k: v for k, v in (("ttft_s", ttft_s), ("tpot_s", tpot_s)) if v is not None}
        if any(v <= 0 for v in changes.values()):
            raise ValueError("SLO targets must be positive seconds")
        self.collector.slo = replace(self.collector.slo, **changes)
        return self.collector.slo

    def set_policy(self, policy: ControlPolicy) -> None:
        """Swap the policy; the new one starts with fresh state (no cooldown carried)."""
        self.policy = policy

    def use_policy(self, name: str | None, knobs: Mapping[str, Any]) -> None:
        """Switch to policy `name` (None: the current one) with `knobs`: knobs given for
        the current policy are merged into its current ones; a new policy starts from its
        defaults plus the knobs given. ValueError or TypeError for a bad name or knob."""
        name = name or self.policy.name
        merged = dict(policy_knobs(self.policy)) if name == self.policy.name else {}
        merged.update(knobs)
        self.set_policy(make_control_policy(name, **merged))

    @property
    def decisions(self) -> tuple[Decision, ...]:
        return tuple(self._decisions)

    def decision_log(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` decisions as plain dicts, oldest first."""
        return [d.to_dict() for d in list(self._decisions)[-limit:]] if limit > 0 else []

    @property
    def scrape_errors(self) -> Mapping[str, str]:
        return dict(self.collector.errors)

    def state(self) -> dict[str, Any]:
        """The policy, its knobs, mode, interval, SLO and window, for the admin API."""
        return {
            "name": self.policy.name,
            "knobs": dict(policy_knobs(self.policy)),
            "mode": "advisory" if self.advisory else "act",
            "interval_s": self.interval_s,
            "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            "window_s": self.collector.window_s,
            "available": sorted(CONTROL_POLICIES),
        }

    def latest_rows(self) -> dict[str, dict[str, Any]]:
        """Per worker, the numbers of the last scrape (empty before the first tick)."""
        if self.last_snapshot is None:
            return {}
        return {row["name"]: row for row in worker_rows(self.last_snapshot)}

    async def tick(self, client: httpx.AsyncClient) -> Decision:
        """One scrape-decide-act round."""
        self._ticks += 1
        snapshot = await self.collector.scrape_once(self.flips.cluster.snapshot(), client)
        if self.on_snapshot is not None:
            self.on_snapshot(snapshot)
        if self._request_mix is not None:  # the gateway's own view of the length mix
            prompt, output, n = self._request_mix(self.collector.window_s)
            if n:
                # finished requests per second: the arrival rate in steady state
                snapshot = replace(snapshot, mean_prompt_tokens=prompt,
                                   mean_output_tokens=output,
                                   arrival_rate_per_s=n / self.collector.window_s)
        if self._prefill_legs is not None:  # the gateway's clock on each prefill leg
            snapshot = with_gateway_ttft(snapshot, self._prefill_legs(self.collector.window_s))
        if self._pressure is not None:
            snapshot = replace(snapshot, pressure=tuple(self._pressure()))
        self.last_snapshot = snapshot
        mode = "advisory" if self.advisory else "act"
        if self.flips.active:
            note = PolicyNote(f"hold: flip of {', '.join(self.flips.active)} in progress")
            actions: list[FlipAction] = []
        else:
            actions = self.policy.decide(snapshot)
            note = getattr(self.policy, "last_note", None) or PolicyNote(
                "; ".join(a.reason for a in actions) or "hold")
        # several flips of one decision drain side by side, not one after another
        results = list(await asyncio.gather(*(self._apply(a) for a in actions)))
        decision = Decision(self._ticks, self._wall(), self.policy.name, mode, note.summary,
                            dict(note.numbers), tuple(actions), tuple(results),
                            worker_rows(snapshot))
        self._decisions.append(decision)
        if actions:
            log.info("controller tick %d: %s -> %s", decision.tick, note.summary, results)
        return decision

    async def _apply(self, action: FlipAction) -> str:
        if self.advisory:
            return "advisory: not applied"
        if not isinstance(action, FlipAction):  # a scale action (controller/scaling.py)
            scaler = getattr(self, "scaler", None)
            return await scaler.apply(action) if scaler else "refused: no back end can scale"
        try:
            record = await self.flips.flip(action.worker, action.to, reason=action.reason,
                                           drain_timeout_s=self.drain_timeout_s)
        except FlipRefused as exc:
            return f"refused: {exc}"
        return f"{record.outcome.value}: {record.detail}"

    def listen(self, routing_policy: PolicyFeedback) -> None:
        """Read the routing policy's SLO-pressure log each tick and tick early when it
        reports (policies without a log are ignored)."""
        log_ = routing_policy.pressure_log()
        if isinstance(log_, PressureLog):
            self._pressure = log_.drain
            log_.sink = self.wake

    def wake(self, _signal: object = None) -> None:
        """Tick now instead of at the end of the interval (the routing policy predicted an
        SLO miss on every worker: Arrow's inline flip). Usable as a pressure sink."""
        self._wake.set()

    async def run(self, client: httpx.AsyncClient) -> None:
        """Tick every interval, or sooner when woken (cancel the task to stop); a failing
        tick is logged, not fatal."""
        while True:
            self._wake.clear()
            try:
                await self.tick(client)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive one bad tick
                log.exception("controller tick failed")
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            # a burst of pressure signals wakes the loop once per `min_interval_s`
            pause = min(self.min_interval_s, self.interval_s)
            await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))
