"""Arrow-style policy: flip a worker toward the pool that is missing its latency SLO.

Loads follow Arrow §5.5 (as reconstructed in notes/papers.md §1.3):

* prefill load of a worker = queue-inclusive TTFT / TTFT target, where queue-inclusive
  TTFT = windowed TTFT p90 + num_waiting / prefill completions per second (Little's law:
  how long the requests now queued will wait on top);
* decode load of a worker = windowed inter-token latency p90 / TPOT target;
* a pool's load is the mean over its READY workers.

A worker moves from pool S to pool T when T's load has stayed above `expand` for
`sustain_ticks` ticks and S would stay below `expand` after giving up one worker
(`L_S · n_S / (n_S − 1)`), so a flip never just moves the problem. The least-loaded
worker of S flips, S is never emptied, and nothing moves during `cooldown_s` after a
flip. When both pools are over target no flip helps: the note says to add workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.workers import Role
from instance_manager.controller.base import ControlSnapshot, FlipAction, WorkerMetrics
from instance_manager.controller.common import (
    PolicyNote,
    describe_load,
    held,
    hold_reason_while_draining,
    least_loaded,
    metrics_of,
    pool,
)


@dataclass(frozen=True)
class ArrowConfig:
    """Knobs of the Arrow policy (Narwhal's reading of the paper gives the defaults)."""

    expand: float = 1.0
    """A pool whose load (latency / SLO target) stays above this wants another worker."""
    sustain_ticks: int = 2
    """Consecutive ticks of pressure before a flip (filters one-tick spikes)."""
    cooldown_s: float = 20.0
    """No flip for this long after one; keep it near the metrics window so the next
    decision sees the effect of the last one."""
    min_samples: int = 3
    """A worker's latency percentile counts only with this many samples in the window
    (a producer that reports no sample count, i.e. 0 with a percentile, is trusted)."""


def _too_few(value: float | None, samples: int, min_samples: int) -> bool:
    return value is None or 0 < samples < min_samples


def prefill_latency_s(m: WorkerMetrics, min_samples: int) -> float:
    """Queue-inclusive TTFT estimate of one prefill worker (0 when it saw nothing)."""
    ttft = 0.0 if _too_few(m.ttft_p90_s, m.ttft_samples, min_samples) else m.ttft_p90_s
    queue = m.num_waiting / m.requests_finished_per_s if m.requests_finished_per_s > 0 else 0.0
    return ttft + queue


def decode_latency_s(m: WorkerMetrics, min_samples: int) -> float:
    """Inter-token latency p90 of one decode worker (0 when it saw nothing)."""
    return 0.0 if _too_few(m.itl_p90_s, m.itl_samples, min_samples) else m.itl_p90_s


def pool_load(snapshot: ControlSnapshot, role: Role, min_samples: int) -> tuple[float, float]:
    """(mean latency in seconds, mean load = latency / target) over a role's READY pool."""
    members = pool(snapshot, role)
    if not members:
        return 0.0, 0.0
    if role == Role.PREFILL:
        lat = [prefill_latency_s(metrics_of(snapshot, w.name), min_samples) for w in members]
        target = snapshot.slo.ttft_s
    else:
        lat, loads = [], []
        for w in members:
            m = metrics_of(snapshot, w.name)
            itl = decode_latency_s(m, min_samples)
            lat.append(itl)
            # A full decode pool keeps ITL in target while requests queue for admission:
            # that wait counts against TTFT, so it is decode pressure too.
            wait = m.num_waiting / m.requests_finished_per_s \
                if m.requests_finished_per_s > 0 else 0.0
            loads.append(max(itl / snapshot.slo.tpot_s, wait / snapshot.slo.ttft_s))
        return sum(lat) / len(lat), sum(loads) / len(loads)
    mean = sum(lat) / len(lat)
    return mean, mean / target


class ArrowPolicy:
    """Flips on SLO pressure: TTFT on the prefill side, inter-token latency on decode."""

    name = "arrow"

    def __init__(self, config: ArrowConfig | None = None) -> None:
        self.config = config or ArrowConfig()
        self.last_note = PolicyNote("no tick yet")
        self._streak = {Role.PREFILL: 0, Role.DECODE: 0}
        self._last_flip_at: float | None = None

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        cfg = self.config
        n = {r: len(pool(snapshot, r)) for r in Role}
        lat_p, load_p = pool_load(snapshot, Role.PREFILL, cfg.min_samples)
        lat_d, load_d = pool_load(snapshot, Role.DECODE, cfg.min_samples)
        load = {Role.PREFILL: load_p, Role.DECODE: load_d}
        for role in Role:
            self._streak[role] = self._streak[role] + 1 if load[role] > cfg.expand else 0
        numbers = {
            "prefill_workers": n[Role.PREFILL], "decode_workers": n[Role.DECODE],
            "ttft_queue_incl_s": round(lat_p, 4), "ttft_target_s": snapshot.slo.ttft_s,
            "prefill_load": round(load_p, 3), "itl_p90_s": round(lat_d, 4),
            "tpot_target_s": snapshot.slo.tpot_s, "decode_load": round(load_d, 3),
            "expand": cfg.expand,
        }
        facts = (f"prefill: TTFT incl. queue {lat_p:.3f}s vs target {snapshot.slo.ttft_s:.3f}s "
                 f"(load {load_p:.2f}, {n[Role.PREFILL]} workers); decode: ITL p90 "
                 f"{lat_d:.3f}s vs TPOT target {snapshot.slo.tpot_s:.3f}s "
                 f"(load {load_d:.2f}, {n[Role.DECODE]} workers)")

        def hold(why: str) -> list[FlipAction]:
            self.last_note = held(why, facts, numbers)
            return []

        if draining := hold_reason_while_draining(snapshot):
            return hold(draining)
        if self._last_flip_at is not None:
            left = cfg.cooldown_s - (snapshot.time - self._last_flip_at)
            if left > 0:
                return hold(f"cooldown, {left:.0f}s left")
        hot = [r for r in Role if load[r] > cfg.expand]
        if not hot:
            return hold("both pools within target")
        if len(hot) == 2:
            return hold("both pools over target, a flip cannot help (add workers)")
        target = hot[0]
        source = Role.DECODE if target == Role.PREFILL else Role.PREFILL
        if self._streak[target] < cfg.sustain_ticks:
            return hold(f"{target.value} pressure for {self._streak[target]} of "
                        f"{cfg.sustain_ticks} ticks")
        if n[source] < 2:
            return hold(f"the {source.value} pool has one worker and is never emptied")
        after = load[source] * n[source] / (n[source] - 1)
        numbers["source_load_after"] = round(after, 3)
        if after >= cfg.expand:
            return hold(f"the {source.value} pool would reach load {after:.2f} without one "
                        f"worker (>= {cfg.expand:.2f})")
        worker = least_loaded(snapshot, source)
        if worker is None:
            return hold(f"no READY {source.value} worker can be spared")
        reason = (f"{target.value} pressure for {self._streak[target]} ticks; {source.value} "
                  f"load {load[source]:.2f} -> {after:.2f} after the flip; {worker.name} is "
                  f"least loaded ({describe_load(worker)}); {facts}")
        self._last_flip_at = snapshot.time
        self._streak = {Role.PREFILL: 0, Role.DECODE: 0}
        self.last_note = PolicyNote(f"flip {worker.name} to {target.value}: {reason}", numbers)
        return [FlipAction(worker.name, target, reason)]
