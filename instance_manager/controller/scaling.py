"""Flip or scale: one controller that moves a worker between pools when that fixes the
pressure, and asks the back end for another worker when it does not and the pressure lasts
longer than a worker takes to start; idle capacity goes back after a hold time.

The choice is priced in seconds: a flip takes effect in about a drain (seconds), a new worker
in `start_time_s` (30-80 s for a CPU worker here, minutes for a large model on a GPU). So:

* one pool over target, the other with room: flip (the wrapped flip policy decides which
  worker and when);
* short of capacity (both pools over target, or the hot pool needs more workers than the
  other can spare and stay under target) for longer than `start_time_s`: add a worker to the
  pool further over target (one at a time: the next only after the last had time to start),
  and no flips while short (they would only move the shortage around);
* shorter than that: hold, a new worker would arrive after the burst;
* both pools well under target (`idle_load`) for `hold_s` with more workers than `min_workers`:
  give back the least-loaded worker of the bigger pool (drained first), unless its measured
  throughput needs it: each pool remembers the tokens/s per worker it delivered while over
  target (its capacity, measured, not assumed), and keeps a worker while the load exceeds
  `give_back_utilization` of what one worker fewer could deliver.

`mode` switches the same object to `flip-only` or `scale-only` (scale whenever a pool stays
over target for `sustain_s`, never flip) for comparisons. The simulator and the live
controller drive the same object; scale actions are applied by `BackendScaler` live and by
the simulator's start-time model offline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.workers import Role, WorkerState
from instance_manager.controller.arrow import pool_load
from instance_manager.controller.base import ControlSnapshot, FlipAction
from instance_manager.controller.common import PolicyNote, least_loaded, pool

log = logging.getLogger("fulcrum.scaling")

MODES = ("flip-or-scale", "flip-only", "scale-only")


@dataclass(frozen=True)
class ScaleAction:
    """Add a worker to `role`'s pool (`direction='up'`) or give `worker` back ('down')."""

    direction: str
    reason: str
    role: Role | None = None
    worker: str | None = None


@dataclass(frozen=True)
class FlipOrScaleConfig:
    mode: str = "flip-or-scale"
    inner: str = "arrow"
    """The flip policy consulted for flips (a registered control policy name)."""
    start_time_s: float = 60.0
    """Seconds from asking for a worker to its first request; replaced by the back end's
    measured start times once it has some."""
    hold_s: float = 120.0
    """Idle this long before a worker is given back."""
    sustain_s: float = 10.0
    """scale-only: a pool over target this long gets a worker."""
    expand: float = 1.0
    """A pool is over target when its load (latency / target) exceeds this."""
    idle_load: float = 0.3
    """Both pools under this load count as idle."""
    min_workers: int = 2
    max_workers: int = 16
    min_samples: int = 3
    give_back_utilization: float = 0.7
    """Give a worker back only if the pool would then run below this share of the
    throughput per worker it was measured to sustain when it was last over target."""


class FlipOrScale:
    """A control policy whose actions are flips (from the wrapped policy) and scale actions."""

    name = "flip-or-scale"

    def __init__(self, config: FlipOrScaleConfig | None = None) -> None:
        from instance_manager.controller.registry import make_control_policy

        self.config = config or FlipOrScaleConfig()
        if self.config.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.config.mode!r}")
        self.inner = make_control_policy(self.config.inner)
        self.last_note = PolicyNote("no tick yet")
        self.start_time_source: Callable[[], float | None] | None = None
        self._over_since: dict[str, float | None] = {"both": None, Role.PREFILL: None,
                                                     Role.DECODE: None}
        self._idle_since: float | None = None
        self._last_scale_at: float | None = None
        # tokens/s per worker a pool delivered while over target: its measured capacity
        self.capacity: dict[Role, float] = {}

    def start_time_s(self) -> float:
        measured = self.start_time_source() if self.start_time_source else None
        return measured if measured else self.config.start_time_s

    def _since(self, key: Any, active: bool, now: float) -> float:
        if not active:
            self._over_since[key] = None
            return 0.0
        if self._over_since[key] is None:
            self._over_since[key] = now
        return now - self._over_since[key]

    def _shortfall(self, load: dict[Role, float], n: dict[Role, int]) -> str | None:
        """Why moving workers between the pools cannot bring both under target (None when
        it can): both over, or the hot pool needs more workers than the other can spare."""
        expand = self.config.expand
        if all(load[r] > expand for r in Role):
            return "both pools over target"
        hot = [r for r in Role if load[r] > expand]
        if not hot:
            return None
        h = hot[0]
        c = Role.DECODE if h == Role.PREFILL else Role.PREFILL
        need = math.ceil(load[h] * n[h] / expand) - n[h]  # workers that bring it under
        spare = 0
        while n[c] - spare > 1 and load[c] * n[c] / (n[c] - spare - 1) < expand:
            spare += 1
        if need > spare:
            return (f"{h.value} needs {need} more workers (load {load[h]:.2f}), "
                    f"the {c.value} pool can spare {spare}")
        return None

    @staticmethod
    def _throughput(snapshot: ControlSnapshot) -> dict[Role, float]:
        """Tokens/s each pool delivers now: prompt tokens for prefill, output for decode."""
        out = {Role.PREFILL: 0.0, Role.DECODE: 0.0}
        for w in snapshot.cluster.workers:
            m = snapshot.metrics.get(w.name)
            if m is not None:
                out[w.role] += m.prompt_tokens_per_s if w.role == Role.PREFILL \
                    else m.generation_tokens_per_s
        return out

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction | ScaleAction]:
        cfg, now = self.config, snapshot.time
        start = self.start_time_s()
        load = {r: pool_load(snapshot, r, cfg.min_samples)[1] for r in Role}
        over = {r: load[r] > cfg.expand for r in Role}
        n = {r: len(pool(snapshot, r)) for r in Role}
        short = self._shortfall(load, n)
        both_for = self._since("both", short is not None, now)
        over_for = {r: self._since(r, over[r], now) for r in Role}
        live = [w for w in snapshot.cluster.workers
                if w.state in (WorkerState.READY, WorkerState.STARTING, WorkerState.DRAINING)]
        starting = sum(w.state == WorkerState.STARTING for w in live)
        numbers = {"prefill_load": round(load[Role.PREFILL], 3),
                   "decode_load": round(load[Role.DECODE], 3), "workers": len(live),
                   "start_time_s": round(start, 1), "short_s": round(both_for, 1),
                   "prefill_over_s": round(over_for[Role.PREFILL], 1),
                   "decode_over_s": round(over_for[Role.DECODE], 1), "mode": cfg.mode}
        busiest = max(Role, key=lambda r: load[r])
        waited = self._last_scale_at is None or now - self._last_scale_at >= start

        def note(text: str) -> None:
            self.last_note = PolicyNote(text, numbers)

        tput = self._throughput(snapshot)
        for r in Role:
            if over[r] and n[r]:
                self.capacity[r] = max(self.capacity.get(r, 0.0), tput[r] / n[r])
        # Give idle capacity back, unless the measured throughput says it is still needed
        # (latency stays low until close to saturation, so low latency alone would give
        # back a worker the load needs and ask for it again: oscillation).
        idle = all(load[r] < cfg.idle_load for r in Role)
        if not idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        if cfg.mode != "flip-only" and idle and len(live) > cfg.min_workers and not starting \
                and now - self._idle_since >= cfg.hold_s:
            bigger = max(Role, key=lambda r: len(pool(snapshot, r)))
            worker = least_loaded(snapshot, bigger) if len(pool(snapshot, bigger)) > 1 \
                else None
            cap = self.capacity.get(bigger)
            if cap and tput[bigger] > cfg.give_back_utilization * cap * (n[bigger] - 1):
                note(f"hold: idle by latency, but {bigger.value} throughput "
                     f"{tput[bigger]:.0f} tok/s needs more than {n[bigger] - 1} workers at "
                     f"{cfg.give_back_utilization:.0%} of the {cap:.0f} tok/s each sustained")
                return []
            if worker is not None:
                self._idle_since = now
                why = (f"scale down: both pools under load {cfg.idle_load} for "
                       f"{cfg.hold_s:.0f}s; {worker.name} ({bigger.value}) goes back")
                note(why)
                return [ScaleAction("down", why, worker=worker.name)]

        def scale_up(role: Role, why: str) -> list[FlipAction | ScaleAction]:
            if len(live) >= cfg.max_workers:
                note(f"hold: {why}, but already {len(live)} of max {cfg.max_workers} workers")
                return []
            if not waited or starting:
                note(f"hold: {why}; a worker asked for at {self._last_scale_at:.0f}s is "
                     f"still starting (start time {start:.0f}s)")
                return []
            self._last_scale_at = now
            text = f"scale up: add a {role.value} worker: {why}"
            note(text)
            return [ScaleAction("up", text, role=role)]

        if cfg.mode == "scale-only":
            hot = [r for r in Role if over_for[r] >= cfg.sustain_s]
            if hot:
                role = max(hot, key=lambda r: load[r])
                return scale_up(role, f"{role.value} load {load[role]:.2f} over target for "
                                      f"{over_for[role]:.0f}s >= {cfg.sustain_s:.0f}s")
            note("hold: no pool over target long enough (scale-only)")
            return []

        flips = self.inner.decide(snapshot)
        inner_note = getattr(self.inner, "last_note", None)
        inner_text = inner_note.summary if inner_note is not None else ""
        if cfg.mode == "flip-only":
            self.last_note = inner_note or PolicyNote("hold", numbers)
            return list(flips)
        if short is not None and both_for >= start:
            # Sustained shortfall: new workers are the fix; flips meanwhile would chase
            # whichever pool looks worst (a prefill backlog hides decode demand) and leave
            # the other short when the backlog moves on.
            return scale_up(busiest, f"{short} for {both_for:.0f}s >= start time "
                                     f"{start:.0f}s: flips cannot fix it")
        if flips:
            why = f"; short of capacity for {both_for:.0f}s, less than a start" if short \
                else ""
            note(f"flip (lands in seconds, a new worker in ~{start:.0f}s){why}: {inner_text}")
            return list(flips)
        if short is not None:
            note(f"hold: {short} for {both_for:.0f}s < start time {start:.0f}s: a new worker "
                 f"would likely arrive after the burst")
            return []
        note(f"hold: {inner_text or 'within target'}")
        return []


class BackendScaler:
    """Applies scale actions live: `start_worker(role)` on the back end, removal through the
    registry (drain first). Feeds the back end's measured start times to the policy."""

    def __init__(self, backend: Any, registry: Any) -> None:
        self.backend = backend
        self.registry = registry
        self._removals: set[asyncio.Task] = set()

    def measured_start_s(self) -> float | None:
        starts = getattr(self.backend, "start_seconds", None)
        return statistics.median(starts) if starts else None

    async def apply(self, action: ScaleAction) -> str:
        if action.direction == "up":
            assert action.role is not None
            name = await self.backend.start_worker(action.role)
            return f"starting {name}" if name else "refused: no free slot on the back end"
        assert action.worker is not None
        task = asyncio.create_task(self.registry.remove(action.worker))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        return f"draining {action.worker}, then giving it back"


def attach(controller: Any, backend: Any, registry: Any) -> BackendScaler | None:
    """Wire a back end that can start workers into a controller whose policy scales."""
    if controller is None or not hasattr(backend, "start_worker"):
        return None
    scaler = BackendScaler(backend, registry)
    controller.scaler = scaler
    if isinstance(controller.policy, FlipOrScale):
        controller.policy.start_time_source = scaler.measured_start_s
    return scaler
