"""The ceiling for adaptive P/D: a controller that is told the phase schedule in advance.

`OracleSchedule` holds a list of (start time, prefill workers) and, at each control tick,
flips every worker needed to reach the split for the current time at once. It knows what
no deployment knows (when each phase starts and which split serves it best), so an
adaptive system near it has little left to gain; one far below it is losing to its own
reaction time or targets, not to the workload.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from core.workers import Role, WorkerState
from instance_manager.controller.base import ControlSnapshot, FlipAction


class OracleSchedule:
    """Moves the cluster to a precomputed split at each phase boundary (see module doc)."""

    name = "oracle-schedule"

    def __init__(self, schedule: Sequence[tuple[float, int]], lead_s: float = 0.0) -> None:
        """`schedule`: (phase start time s, prefill workers) sorted by time; `lead_s`
        moves each switch earlier (to hide a known re-warm time)."""
        if not schedule:
            raise ValueError("the oracle needs at least one (time, prefill) entry")
        self.times = [t - lead_s for t, _ in schedule]
        self.targets = [n for _, n in schedule]

    def target(self, now: float) -> int:
        i = bisect.bisect_right(self.times, now) - 1
        return self.targets[max(i, 0)]

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        want = self.target(snapshot.time)
        workers = snapshot.cluster.workers
        # a draining worker is already on its way to the other role (drain-mode flips)
        moving = [w for w in workers if w.state == WorkerState.DRAINING]
        settled = [w for w in workers if w.state != WorkerState.DRAINING]
        prefill = [w for w in settled if w.role == Role.PREFILL]
        decode = [w for w in settled if w.role == Role.DECODE]
        n_prefill = len(prefill) + sum(1 for w in moving if w.role == Role.DECODE)
        want = max(0, min(want, len(workers)))
        if n_prefill < want:
            # least resident decode work first: it empties soonest
            movers = sorted(decode, key=lambda w: (w.decode_tokens_in_flight, w.name))
            return [FlipAction(w.name, Role.PREFILL, "oracle schedule")
                    for w in movers[:want - n_prefill]]
        if n_prefill > want:
            movers = sorted(prefill, key=lambda w: (w.prefill_tokens_in_flight, w.name))
            return [FlipAction(w.name, Role.DECODE, "oracle schedule")
                    for w in movers[:n_prefill - want]]
        return []
