"""Arrow-style policy: flip a worker toward the pool that is missing its latency SLO.

Loads follow Arrow §5.5 (as reconstructed in notes/papers.md §1.3):

* prefill load of a worker = queue-inclusive TTFT / TTFT target, where queue-inclusive
  TTFT = windowed TTFT p90 + num_waiting / prefill completions per second (Little's law:
  how long the requests now queued will wait on top); the TTFT p90 is the larger of the
  engine's own and the gateway's, timed from the request's arrival at the gateway to
  the prefill reply (the SLO is on the client's clock: on a loaded host the API server
  and the HTTP hops add more than the engine's queue and compute);
* decode load of a worker = windowed inter-token latency p90 / TPOT target;
* a pool's load is the mean over its READY workers.

A decode worker's load also counts its batch slots: in-flight decodes, plus the pool's
growth in decodes in flight over `occupancy_horizon_s` (shared evenly), over the
sequences it can run (`decode_slots`, the largest batch meeting TPOT, and the sequences
its KV cache holds at its current mix). A full batch can meet TPOT while new requests
queue for a slot, and after a shift to long outputs the decodes in flight grow for a whole
output's duration before any TPOT or finished-request signal shows it.

Two paths move workers from pool S to pool T:

* inline (Algorithm 1 step 3): the routing policy reports an `SLOPressure` when a request's
  predicted TTFT (or TPOT, slot and KV queueing included) misses on every candidate. With
  at least `pressure_signals` of them for one leg within `pressure_window_s` (and since
  the last flip), the policy flips toward that leg at once, `pressure_guard_s` after the
  last flip at the earliest; a D->P flip needs the decode side to be free of pressure (the
  paper flips D->P only when decode load is low);
* reactive (Algorithm 2): T's load has stayed above `expand` for `sustain_ticks` ticks,
  and `cooldown_s` has passed since the last flip (`repeat_s` when the last flip went to
  T too).

A move to decode is checked one metrics window later: if the decode ITL rose
`harm_factor`-fold with no more decodes per worker, and is over target, the moved workers
go back and moves to decode wait `harm_backoff_s` (doubling while such moves keep
hurting). Adding a worker to a pool normally adds capacity; where workers share cores, a
worker moved to decode steps its batch beside the others and every decode step slows down.

Either way S must stay below `expand` after giving up workers (`L_S · n_S / (n_S − k)`),
so a flip never just moves the problem, and S is never emptied. Far past target several
workers move at once: enough for T's load to fall to `expand` (`n_T · (L_T − 1)` more),
capped by what S can spare and `max_flips_per_decision`. The least-loaded workers of S
flip. When both pools are over target no flip helps: the note says to add workers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from core.pressure import SLOPressure
from core.workers import Role
from instance_manager.controller.base import ControlSnapshot, FlipAction, WorkerMetrics
from instance_manager.controller.common import (
    InFlightTrend,
    PolicyNote,
    describe_load,
    held,
    hold_reason_while_draining,
    kv_slots,
    metrics_of,
    other,
    pool,
    role_load_key,
)


@dataclass(frozen=True)
class ArrowConfig:
    """Knobs of the Arrow policy (Narwhal's reading of the paper gives the defaults)."""

    expand: float = 1.0
    """A pool whose load (latency / SLO target) stays above this wants another worker."""
    sustain_ticks: int = 2
    """Consecutive ticks of pressure before a flip (filters one-tick spikes)."""
    cooldown_s: float = 10.0
    """No flip the other way for this long after one; keep it near the metrics window so
    the next decision sees the effect of the last one."""
    repeat_s: float = 2.0
    """A further move the same way (the pool still over target) waits this long: decode
    slot load is read live, so the effect of the last move shows at once."""
    min_samples: int = 3
    """A worker's latency percentile counts only with this many samples in the window
    (a producer that reports no sample count, i.e. 0 with a percentile, is trusted)."""
    decode_slots: int = 256
    """Sequences per decode worker: the largest batch whose step meets TPOT, capped by
    vLLM's max_num_seqs (`calibrate.arrow_knobs` derives it); in-flight decodes beyond it
    queue for admission or miss TPOT."""
    occupancy_horizon_s: float = 10.0
    """How far ahead the growth of decodes in flight counts toward decode load
    (0 = count only the decodes in flight now)."""
    growth_window_s: float = 3.0
    """The growth of decodes in flight is measured over this many seconds of ticks."""
    inline_flips: bool = True
    """Act on the routing policy's SLO-pressure signals (Algorithm 1 step 3)."""
    pressure_signals: int = 3
    """Signals for one leg within `pressure_window_s` that make an inline flip..."""
    pressure_fraction: float = 0.1
    """...when they are also at least this fraction of the arrivals in that window."""
    pressure_window_s: float = 3.0
    """Signals count over this many seconds, not per tick: at a few requests per second a
    tick (woken early by each signal) rarely holds `pressure_signals` of them (0 = only
    those since the last tick)."""
    max_prefill_utilization: float = 0.95
    """The prefill pool gives up workers only while its busy fraction stays below this."""
    prefill_tokens_per_s: float = 0.0
    """One worker's prefill throughput for that busy fraction (0 = estimate it from TTFT);
    `calibrate.arrow_knobs` derives it from a performance model or profile."""
    inline_max_flips: int = 0
    """Cap on the workers one inline flip moves (0 = as many as the predicted miss ratio
    or the measured load asks for, within what the source pool can spare)."""
    pressure_guard_s: float = 2.0
    """No inline flip sooner than this after any flip."""
    max_flips_per_decision: int = 0
    """Cap on workers moved at once (0 = as many as the load asks for)."""
    harm_factor: float = 2.0
    """One metrics window after a move to decode, the decode pool is checked: if its ITL
    p90 rose this many times over the value before the move, is over target, and its
    workers run no more decodes each than before (so more demand does not explain it),
    the move made decoding slower (the workers share something a pool's size does not
    add, such as the host's cores): it is undone (0 = no check). Moves to prefill are not
    checked: TTFT with queue carries the backlog from before the move for a whole window,
    and a worker moved to prefill finishes its decodes there, so a rise says nothing."""
    harm_backoff_s: float = 30.0
    """After a harmful move, moves toward that pool wait this long; it doubles with each
    harmful move in a row that way and resets after a move that did not hurt."""
    harm_backoff_max_s: float = 240.0
    """The longest such wait."""


@dataclass
class _DecodeMoveCheck:
    """Moves to decode awaiting their check, with the pool as it was before the first."""

    itl_before_s: float
    decodes_per_worker_before: float
    last_move_at: float
    workers: list[str]


def decodes_per_worker(snapshot: ControlSnapshot) -> float:
    """Mean decode legs in flight per READY decode worker."""
    members = pool(snapshot, Role.DECODE)
    return sum(w.in_flight_decode for w in members) / len(members) if members else 0.0


def _too_few(value: float | None, samples: int, min_samples: int) -> bool:
    return value is None or 0 < samples < min_samples


def prefill_latency_s(m: WorkerMetrics, min_samples: int) -> float:
    """Queue-inclusive TTFT estimate of one prefill worker (0 when it saw nothing): the
    larger of the engine's TTFT p90 and the gateway's p90 of the legs it served (which
    adds the HTTP hops, the API server and the gateway: the part of the client's TTFT a
    busy host hides from the engine), plus the wait of the requests queued now."""
    ttft = 0.0 if _too_few(m.ttft_p90_s, m.ttft_samples, min_samples) else m.ttft_p90_s
    if not _too_few(m.gateway_ttft_p90_s, m.gateway_ttft_samples, min_samples):
        ttft = max(ttft, m.gateway_ttft_p90_s)
    queue = m.num_waiting / m.requests_finished_per_s if m.requests_finished_per_s > 0 else 0.0
    return ttft + queue


def gateway_ttft_s(snapshot: ControlSnapshot) -> float | None:
    """Mean over the prefill pool of the gateway's prefill-leg p90 (for the note; None
    where the producer reports none)."""
    values = [m.gateway_ttft_p90_s for m in
              (metrics_of(snapshot, w.name) for w in pool(snapshot, Role.PREFILL))
              if m.gateway_ttft_p90_s is not None]
    return round(sum(values) / len(values), 4) if values else None


def decode_latency_s(m: WorkerMetrics, min_samples: int) -> float:
    """Inter-token latency p90 of one decode worker (0 when it saw nothing)."""
    return 0.0 if _too_few(m.itl_p90_s, m.itl_samples, min_samples) else m.itl_p90_s


def pool_load(snapshot: ControlSnapshot, role: Role, min_samples: int,
              decode_slots: int = 0, growth: float = 0.0) -> tuple[float, float]:
    """(mean latency in seconds, mean load = latency / target) over a role's READY pool;
    a decode worker's load counts slot occupancy when `decode_slots` is set, with the
    pool's `growth` in decodes in flight (already times the horizon) shared evenly."""
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
            slots = (w.in_flight_decode + max(0.0, growth) / len(members)) / \
                kv_slots(m, decode_slots) if decode_slots > 0 else 0.0
            loads.append(max(itl / snapshot.slo.tpot_s, wait / snapshot.slo.ttft_s, slots))
        return sum(lat) / len(lat), sum(loads) / len(loads)
    mean = sum(lat) / len(lat)
    return mean, mean / target


def prefill_utilization(snapshot: ControlSnapshot, min_samples: int,
                        tokens_per_s: float = 0.0) -> float | None:
    """Mean busy fraction of the prefill pool: prompt tokens/s over one worker's prefill
    throughput (`tokens_per_s`, e.g. calibrated from a profile), else times the median
    TTFT per prompt token (that includes queueing and KV hand-off, so it errs high).
    TTFT is far from linear in load, so this, not TTFT, says how many workers can go."""
    isl = snapshot.mean_prompt_tokens
    members = pool(snapshot, Role.PREFILL)
    if not members or (not isl and tokens_per_s <= 0):
        return None
    busy = []
    for w in members:
        m = metrics_of(snapshot, w.name)
        if tokens_per_s > 0:
            busy.append(min(1.0, m.prompt_tokens_per_s / tokens_per_s))
        elif not _too_few(m.ttft_p50_s, m.ttft_samples, min_samples):
            busy.append(min(1.0, m.prompt_tokens_per_s * m.ttft_p50_s / isl))
    return sum(busy) / len(busy) if busy else None


ROUND1_KNOBS = {"inline_flips": False, "max_flips_per_decision": 1, "decode_slots": 0,
                "cooldown_s": 10.0, "repeat_s": 10.0, "max_prefill_utilization": 0.0,
                "occupancy_horizon_s": 0.0}
"""Knobs that reproduce the round-1 policy (measured misses only, one flip per cooldown)."""


def spare_workers(load: float, n: int, expand: float) -> int:
    """Workers a pool of n at `load` can give up and stay below `expand` (never all)."""
    k = 0
    while k + 1 < n and load * n / (n - k - 1) < expand:
        k += 1
    return k


def wanted_workers(load: float, n: int, expand: float) -> int:
    """Workers a pool of n at `load` needs added to fall to `expand` (at least one)."""
    return max(1, math.ceil(n * load / expand - n - 1e-9)) if n > 0 else 1


class ArrowController:
    """Flips on SLO pressure: predicted misses inline, measured misses on sustained load."""

    name = "arrow"

    def __init__(self, config: ArrowConfig | None = None) -> None:
        self.config = config or ArrowConfig()
        self.last_note = PolicyNote("no tick yet")
        self._streak = {Role.PREFILL: 0, Role.DECODE: 0}
        self._last_flip_at: float | None = None
        self._last_target: Role | None = None
        self._last_tick_at: float | None = None
        self._in_flight = InFlightTrend(self.config.growth_window_s)
        self._signals: deque[tuple[float, SLOPressure]] = deque()  # (tick time, signal)
        self._window_start: float | None = None  # the first tick, or the last flip
        self._check: _DecodeMoveCheck | None = None  # judged once the window has turned
        self._decode_blocked_until = 0.0
        self._decode_backoff_s = self.config.harm_backoff_s

    def _recent_signals(self, snapshot: ControlSnapshot) -> dict[Role, list[SLOPressure]]:
        """This tick's signals plus those of earlier ticks within the pressure window."""
        now = snapshot.time
        if self.config.pressure_window_s <= 0:
            self._signals.clear()
        self._signals.extend((now, s) for s in snapshot.pressure)
        while self._signals and self._signals[0][0] < now - self.config.pressure_window_s:
            self._signals.popleft()
        return {r: [s for _, s in self._signals if s.leg == r] for r in Role}

    def _arrivals_in_window(self, snapshot: ControlSnapshot) -> float | None:
        """Requests that arrived over the span the counted signals cover (None: unknown)."""
        if snapshot.arrival_rate_per_s is None or self._last_tick_at is None:
            return None
        span = snapshot.time - self._last_tick_at
        if self.config.pressure_window_s > 0 and self._window_start is not None:
            span = max(span, min(self.config.pressure_window_s,
                                 snapshot.time - self._window_start))
        return snapshot.arrival_rate_per_s * span

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        cfg = self.config
        n = {r: len(pool(snapshot, r)) for r in Role}
        lat_p, load_p = pool_load(snapshot, Role.PREFILL, cfg.min_samples)
        growth = self._in_flight.observe(snapshot)
        lat_d, load_d = pool_load(snapshot, Role.DECODE, cfg.min_samples, cfg.decode_slots,
                                  growth * cfg.occupancy_horizon_s)
        load = {Role.PREFILL: load_p, Role.DECODE: load_d}
        for role in Role:
            self._streak[role] = self._streak[role] + 1 if load[role] > cfg.expand else 0
        if self._window_start is None:
            self._window_start = snapshot.time
        signals = self._recent_signals(snapshot)
        numbers = {
            "prefill_workers": n[Role.PREFILL], "decode_workers": n[Role.DECODE],
            "ttft_queue_incl_s": round(lat_p, 4), "ttft_target_s": snapshot.slo.ttft_s,
            "prefill_load": round(load_p, 3), "itl_p90_s": round(lat_d, 4),
            "tpot_target_s": snapshot.slo.tpot_s, "decode_load": round(load_d, 3),
            "expand": cfg.expand, "prefill_pressure": len(signals[Role.PREFILL]),
            "decode_pressure": len(signals[Role.DECODE]),
            "decode_growth_per_s": round(growth, 2),
            "gateway_ttft_p90_s": gateway_ttft_s(snapshot),
        }
        facts = (f"prefill: TTFT incl. queue {lat_p:.3f}s vs target {snapshot.slo.ttft_s:.3f}s "
                 f"(load {load_p:.2f}, {n[Role.PREFILL]} workers); decode: ITL p90 "
                 f"{lat_d:.3f}s vs TPOT target {snapshot.slo.tpot_s:.3f}s "
                 f"(load {load_d:.2f}, {n[Role.DECODE]} workers); predicted misses: "
                 f"{len(signals[Role.PREFILL])} prefill, {len(signals[Role.DECODE])} decode")

        def hold(why: str) -> list[FlipAction]:
            self.last_note = held(why, facts, numbers)
            return []

        if draining := hold_reason_while_draining(snapshot):
            return hold(draining)
        since = None if self._last_flip_at is None else snapshot.time - self._last_flip_at
        arrivals = self._arrivals_in_window(snapshot)
        self._last_tick_at = snapshot.time
        if (undo := self._check_decode_moves(snapshot, lat_d, numbers, facts)) is not None:
            return undo
        inline = self._inline_target(signals, arrivals) if cfg.inline_flips else None
        if inline is not None:
            target, ratio, why = inline
            # the predicted miss says how far past target the leg is; the measured load
            # lags a shift, so the larger of the two sizes the move
            want = wanted_workers(max(load[target], ratio), n[target], cfg.expand)
            if cfg.inline_max_flips > 0:
                want = min(want, cfg.inline_max_flips)
            if since is not None and since < cfg.pressure_guard_s:
                return hold(f"{why}, guard {cfg.pressure_guard_s - since:.1f}s left")
            if since is not None and target != self._last_target and since < cfg.cooldown_s:
                return hold(f"{why}, but the last flip went the other way {since:.1f}s ago")
        else:
            hot = [r for r in Role if load[r] > cfg.expand]
            if since is not None and since < cfg.cooldown_s and (
                    len(hot) != 1 or hot[0] != self._last_target):
                return hold(f"cooldown, {cfg.cooldown_s - since:.0f}s left")
            if since is not None and since < cfg.repeat_s:
                return hold(f"{cfg.repeat_s - since:.0f}s before another move the same way")
            if not hot:
                return hold("both pools within target")
            if len(hot) == 2:
                return hold("both pools over target, a flip cannot help (add workers)")
            target = hot[0]
            if self._streak[target] < cfg.sustain_ticks:
                return hold(f"{target.value} pressure for {self._streak[target]} of "
                            f"{cfg.sustain_ticks} ticks")
            want = wanted_workers(load[target], n[target], cfg.expand)
            why = f"{target.value} pressure for {self._streak[target]} ticks"
        if target == Role.DECODE and snapshot.time < self._decode_blocked_until:
            return hold(f"{why}, but moves to decode wait "
                        f"{self._decode_blocked_until - snapshot.time:.0f}s more after one "
                        f"that made decode slower")
        source = other(target)
        if n[source] < 2:
            return hold(f"the {source.value} pool has one worker and is never emptied")
        spare = spare_workers(load[source], n[source], cfg.expand)
        if source == Role.DECODE and growth <= 0:
            # a relabelled worker takes its decodes along, and none are arriving faster
            # than they finish: the rest keep their slot load; only latency spreads
            _, lat_load = pool_load(snapshot, Role.DECODE, cfg.min_samples)
            spare = spare_workers(lat_load, n[source], cfg.expand)
        if source == Role.PREFILL and cfg.max_prefill_utilization > 0:
            busy = prefill_utilization(snapshot, cfg.min_samples, cfg.prefill_tokens_per_s)
            if busy is not None:
                numbers["prefill_utilization"] = round(busy, 3)
                # TTFT samples carry the KV hand-off and decode admission, so under decode
                # shortage they overstate prefill load: the busy fraction decides instead
                spare = spare_workers(busy, n[source], cfg.max_prefill_utilization)
        after = load[source] * n[source] / (n[source] - 1)
        numbers["source_load_after"] = round(after, 3)
        if spare == 0:
            return hold(f"the {source.value} pool would reach load {after:.2f} without one "
                        f"worker (>= {cfg.expand:.2f})")
        k = min(want, spare)
        if cfg.max_flips_per_decision > 0:
            k = min(k, cfg.max_flips_per_decision)
        members = sorted(pool(snapshot, source), key=lambda w: role_load_key(snapshot, w))[:k]
        after = load[source] * n[source] / (n[source] - k)
        numbers["workers_moved"] = k
        reason = (f"{why}; {source.value} load {load[source]:.2f} -> {after:.2f} after moving "
                  f"{', '.join(w.name for w in members)} ({describe_load(members[0])}); {facts}")
        self._moved(target, snapshot.time)
        if target == Role.DECODE:
            self._expect_check(snapshot, lat_d, [w.name for w in members])
        self.last_note = PolicyNote(f"flip {k} to {target.value}: {reason}", numbers)
        return [FlipAction(w.name, target, reason) for w in members]

    def _moved(self, target: Role, now: float) -> None:
        """Start the cooldowns and the pressure count afresh after a move toward `target`."""
        self._last_flip_at = now
        self._last_target = target
        self._streak = {Role.PREFILL: 0, Role.DECODE: 0}
        self._signals.clear()  # they were about the pools before this move
        self._window_start = now

    def _expect_check(self, snapshot: ControlSnapshot, itl_s: float, workers: list[str]
                      ) -> None:
        """Remember a move to decode for its check; further moves join the pending one."""
        if self.config.harm_factor <= 0:
            return
        if self._check is not None:
            self._check.last_move_at = snapshot.time
            self._check.workers.extend(workers)
        else:
            self._check = _DecodeMoveCheck(itl_s, decodes_per_worker(snapshot), snapshot.time,
                                           list(workers))

    def _check_decode_moves(self, snapshot: ControlSnapshot, itl_s: float, numbers: dict,
                            facts: str) -> list[FlipAction] | None:
        """Once a whole window has passed since the last move to decode, judge the moves:
        the flips back when they made decoding slower, else None."""
        check, cfg = self._check, self.config
        if check is None or snapshot.time - check.last_move_at < snapshot.window_s:
            return None
        self._check = None
        before = check.itl_before_s
        busier = decodes_per_worker(snapshot) > check.decodes_per_worker_before
        if before <= 0 or itl_s < cfg.harm_factor * before \
                or itl_s / snapshot.slo.tpot_s <= cfg.expand or busier:
            self._decode_backoff_s = cfg.harm_backoff_s
            return None
        wait = self._decode_backoff_s
        self._decode_blocked_until = snapshot.time + wait
        self._decode_backoff_s = min(2 * wait, cfg.harm_backoff_max_s)
        members = pool(snapshot, Role.DECODE)
        back = [w for w in members if w.name in check.workers][:len(members) - 1]
        numbers.update(latency_before_move_s=round(before, 4),
                       latency_after_move_s=round(itl_s, 4), blocked_for_s=wait)
        verdict = (f"the move of {', '.join(check.workers)} to decode made it slower (decode "
                   f"latency {before:.3f}s -> {itl_s:.3f}s); moves to decode wait {wait:.0f}s")
        if not back:
            self.last_note = held(verdict, facts, numbers)
            return []
        self._moved(Role.PREFILL, snapshot.time)
        numbers["workers_moved"] = len(back)
        reason = f"undo: {verdict}; {facts}"
        self.last_note = PolicyNote(f"flip {len(back)} to prefill: {reason}", numbers)
        return [FlipAction(w.name, Role.PREFILL, reason) for w in back]

    def _inline_target(self, signals: dict[Role, list[SLOPressure]], arrivals: float | None
                       ) -> tuple[Role, float, str] | None:
        """(pool to grow, median predicted/target, why) from predicted misses, or None.
        A leg qualifies with enough signals (a count, and a fraction of `arrivals` where
        known) while the other leg has none: then a flip cannot just move the misses."""
        cfg = self.config

        def enough(misses: list[SLOPressure]) -> bool:
            return len(misses) >= cfg.pressure_signals and (
                arrivals is None or len(misses) >= cfg.pressure_fraction * arrivals)

        decode, prefill = signals[Role.DECODE], signals[Role.PREFILL]
        if enough(decode) and not prefill:
            leg, misses = Role.DECODE, decode
        elif enough(prefill) and not decode:
            leg, misses = Role.PREFILL, prefill
        else:
            return None
        ratios = sorted(s.predicted_s / s.target_s for s in misses if s.target_s > 0)
        ratio = ratios[len(ratios) // 2] if ratios else 1.0
        return leg, ratio, (f"{len(misses)} requests predicted to miss on every "
                           f"{leg.value} worker (median {ratio:.2f}x target)")
