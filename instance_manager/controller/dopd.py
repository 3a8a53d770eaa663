"""DOPD-style policy: size the pools from what the traffic needs (arXiv 2511.20982).

One request costs a prefill worker `t_p(ISL) = a·ISL² + ISL / prefill_tokens_per_s + c`
seconds and keeps a decode slot for OSL steps. At arrival rate λ the pools need

* prefill: `λ · t_p / ρ_P` workers, and at least `W / TTFT target`, W being the prefill
  seconds queued now (the window's mean prompt lags a shift; the queue does not). A queue
  past what the pool clears within one target marks a shift: the need is then `λ · t_p`
  at the queued prompts' mean length, not the queue's own W / TTFT, which overshoots;
* decode: `λ · OSL / (cap_D · ρ_D)` workers (when decodes queue for a slot, at least as
  many as the decodes in flight need slots for), where one decode worker's capacity `cap_D`
  (tokens/s) is the smallest of its TPOT-bound throughput (`decode_tokens_per_s`, B*/τ(B*))
  and what its batch slots and KV room allow: `slots / decode_step_s`, slots being
  `max_num_seqs`, and the sequences its KV cache holds at the window's mean context. The KV
  room is measured where decode workers report it (running sequences / KV usage) and taken
  from `kv_tokens_per_worker` otherwise.

When both pools have what they need, the policy holds. When one is short, it jumps to the
split that covers the short pool's need (several flips in one decision) as long as the
other pool keeps its own; when both cannot be covered (overload), it splits in proportion
to the two needs. Against flapping: a shortage must exceed `hysteresis` workers, a move
against the direction of the last one waits `reverse_hold_s`, and decisions are at least
`adjustment_interval_s` apart.

The needs are forecast `forecast_horizon_s` ahead (`forecast`: "last" value, or "holt"'s
linear smoothing); `benchmarks/dopd_forecast.py` reports the error of each on the phase
and ShareGPT traces. `target="share"` keeps the round-1 behaviour (a work-share target,
λ cancelled out, one flip per interval) for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.workers import Role
from instance_manager.controller.base import ControlSnapshot, FlipAction
from instance_manager.controller.common import (
    InFlightTrend,
    PolicyNote,
    describe_load,
    held,
    hold_reason_while_draining,
    metrics_of,
    pool,
    role_load_key,
)


@dataclass(frozen=True)
class DOPDConfig:
    """Knobs of the DOPD policy. The throughput constants default to a small model on one
    CPU core; `instance_manager.controller.calibrate.dopd_knobs` derives them from a
    performance model or a `fulcrum profile` file."""

    prefill_tokens_per_s: float = 4000.0
    """Prompt tokens per second one worker prefills (the linear cost term)."""
    prefill_quadratic_s: float = 0.0
    """Seconds per prompt token squared (attention's quadratic term), `a` above."""
    prefill_overhead_s: float = 0.0
    """Fixed seconds per prefill leg, `c` above."""
    decode_tokens_per_s: float = 400.0
    """Output tokens per second one worker sustains at the TPOT target (B*/tau(B*))."""
    decode_step_s: float = 0.0
    """Step time at that batch, tau(B*); 0 = unknown (slot and KV limits not applied)."""
    max_num_seqs: int = 256
    """Batch slots per decode worker (vLLM's max_num_seqs)."""
    kv_tokens_per_worker: int = 0
    """KV cache room per worker in tokens when workers do not report usage (0 = unknown)."""
    target: str = "need"
    """"need" (sizes from arrival rate and capacity) or "share" (round 1: work share)."""
    prefill_utilization: float = 0.85
    """rho_P: the busy fraction a prefill pool is sized for (queueing headroom)."""
    decode_utilization: float = 0.9
    """rho_D: the same for the decode pool."""
    forecast: str = "last"
    """"last" (the window's value) or "holt" (Holt's linear trend, extrapolated)."""
    level_smoothing: float = 0.5
    """Holt's alpha: weight of the newest value in the level."""
    trend_smoothing: float = 0.3
    """Holt's beta: weight of the newest slope in the trend."""
    forecast_horizon_s: float = 5.0
    """How far ahead Holt extrapolates (0 disables the extrapolation)."""
    hysteresis: float = 0.3
    """Workers of dead band: a shortage smaller than this is not acted on."""
    adjustment_interval_s: float = 2.0
    """At least this many seconds between two decisions that move workers."""
    reverse_hold_s: float = 10.0
    """A move against the direction of the previous one waits this long after it."""
    max_flips_per_decision: int = 0
    """Cap on workers moved at once (0 = jump straight to the target)."""
    size_backlog_by_queued_mix: bool = True
    """When the prompts queued exceed what the prefill pool clears within one TTFT target,
    size the pool for the queued prompts' mean length at the arrival rate, at full
    utilisation (False: for clearing the queue within one TTFT target, which overshoots a
    shift to long prompts)."""
    warmup_s: float = 10.0
    """For this long after the first traffic the decode pool does not shrink: the first
    finished requests are the short ones, and the decodes in flight are still climbing to
    their steady count, so both estimates start low."""
    max_extrapolation_s: float = 5.0
    """The trend extrapolates at most this far between two updates: after a gap (ticks
    that saw no finished request) a steep old trend must not fling the level past the
    data."""
    decode_estimate: str = "occupancy"
    """How the decode need is read: "occupancy" (the decodes in flight on the decode pool
    now, plus their growth over `occupancy_horizon_s`, over the slots a worker runs:
    Little's law, live), "flow" (arrival rate x mean output of finished requests over
    capacity: lags a shift by a whole output's duration), or "both" (the larger)."""
    occupancy_horizon_s: float = 10.0
    """How far ahead the growth of in-flight decodes is projected (a flip must land
    before the slots run out)."""
    growth_window_s: float = 3.0
    """The growth of in-flight decodes is measured over this many seconds of ticks."""

    def __post_init__(self) -> None:
        if self.target not in ("need", "share"):
            raise ValueError("target must be 'need' or 'share'")
        if self.decode_estimate not in ("occupancy", "flow", "both"):
            raise ValueError("decode_estimate must be 'occupancy', 'flow' or 'both'")
        if self.forecast not in ("last", "holt"):
            raise ValueError("forecast must be 'last' or 'holt'")


class HoltForecast:
    """Holt's linear smoothing of one series, extrapolated `horizon` seconds ahead."""

    def __init__(self, alpha: float, beta: float, max_extrapolation_s: float,
                 lower: float = 0.0, upper: float = math.inf) -> None:
        self.alpha, self.beta, self.max_gap = alpha, beta, max_extrapolation_s
        self.lower, self.upper = lower, upper
        self.level: float | None = None
        self.trend = 0.0
        self.seen_at: float | None = None

    def _clamp(self, x: float) -> float:
        return min(self.upper, max(self.lower, x))

    def update(self, value: float, now: float, horizon_s: float) -> float:
        if self.level is None or self.seen_at is None or now <= self.seen_at:
            self.level, self.trend = value, 0.0
        else:
            dt = now - self.seen_at
            predicted = self._clamp(self.level + self.trend * min(dt, self.max_gap))
            level = self.alpha * value + (1 - self.alpha) * predicted
            slope = (level - self.level) / dt
            self.trend = self.beta * slope + (1 - self.beta) * self.trend
            self.level = level
        self.seen_at = now
        return self._clamp(self.level + self.trend * horizon_s)


class LastValueForecast:
    """The naive forecast: the next value equals the last one."""

    def update(self, value: float, now: float, horizon_s: float) -> float:
        return value


@dataclass(frozen=True)
class Needs:
    """Workers each pool needs for the window's traffic, and the numbers behind them."""

    prefill: float
    decode: float
    prefill_s_per_request: float
    decode_capacity_tokens_per_s: float
    decode_slots: float
    prefill_backlog: float = 0.0
    """Workers that clear the prompts queued now within one TTFT target."""
    decode_queued: bool = False
    """Decodes are waiting for a batch slot (more in flight than the pool holds)."""
    decode_occupancy: float = 0.0
    """Workers the decodes in flight on the decode pool fill, projected ahead."""
    decode_flow: float = 0.0
    """Workers the arrival rate times the finished requests' mean output needs."""
    decode_growth_per_s: float = 0.0
    """Growth of the decodes in flight (all workers), per second."""


def choose_target(n_p: int, n_d: int, need_p: float, need_d: float,
                  hysteresis: float, prompts_backlogged: bool = False,
                  decodes_queued: bool = False) -> tuple[int, str]:
    """(target prefill workers, why) for pools of n_p + n_d workers and the two needs.

    `prompts_backlogged` (the queued prompts alone need more prefill workers) with no decode
    queued for a slot means the decode need is only the lagging flow estimate (output
    lengths are learnt when requests finish) while the prefill shortage is measured: the
    prefill pool then gets what it needs, the running decodes finishing where they are."""
    total = n_p + n_d
    if total < 2:
        return n_p, "one worker: nothing to split"
    short_p = need_p > n_p + hysteresis
    short_d = need_d > n_d + hysteresis
    if not short_p and not short_d:
        return n_p, "both pools have headroom"
    if need_p + need_d <= total:
        if short_d:
            target = total - min(total - 1, math.ceil(need_d))
            if target >= need_p:
                return max(1, target), "decode is short, prefill can spare workers"
        else:
            target = min(total - 1, math.ceil(need_p))
            if total - target >= need_d:
                return target, "prefill is short, decode can spare workers"
    if short_p and prompts_backlogged and not decodes_queued:
        return min(total - 1, math.ceil(need_p)), "prompts are queueing, no decode waits"
    ideal = total * need_p / (need_p + need_d)
    if abs(ideal - n_p) <= 0.5 + hysteresis:
        return n_p, f"overloaded, split {ideal:.2f} prefill is within the hysteresis band"
    return min(total - 1, max(1, round(ideal))), "overloaded: split in proportion to the needs"


class DOPDController:
    """Sizes the pools for the recent (forecast) traffic and jumps to that split."""

    name = "dopd"

    def __init__(self, config: DOPDConfig | None = None) -> None:
        self.config = config or DOPDConfig()
        self.last_note = PolicyNote("no tick yet")
        cfg = self.config
        self._forecasts = {
            key: (HoltForecast(cfg.level_smoothing, cfg.trend_smoothing, cfg.max_extrapolation_s,
                               upper=1.0 if key == "share" else math.inf)
                  if cfg.forecast == "holt" else LastValueForecast())
            for key in ("share", "prefill", "decode")}
        self._last_change_at: float | None = None
        self._last_direction: Role | None = None  # the pool that grew last time
        self._first_traffic_at: float | None = None
        self._in_flight = InFlightTrend(cfg.growth_window_s)

    # -- the cost model ---------------------------------------------------------------
    def prefill_seconds(self, prompt_tokens: float) -> float:
        cfg = self.config
        return (cfg.prefill_quadratic_s * prompt_tokens ** 2
                + prompt_tokens / cfg.prefill_tokens_per_s + cfg.prefill_overhead_s)

    def prefill_share(self, mean_prompt: float, mean_output: float) -> tuple[float, float, float]:
        """(prefill seconds, decode seconds, prefill share) of one average request."""
        t_p = self.prefill_seconds(mean_prompt)
        t_d = mean_output / self.config.decode_tokens_per_s
        total = t_p + t_d
        return t_p, t_d, (t_p / total if total > 0 else 0.5)

    def decode_slots(self, snapshot: ControlSnapshot, context_tokens: float) -> float:
        """Sequences one decode worker can run: batch slots, then KV room (measured where
        decode workers report usage, else from the knob), then the TPOT-bound batch."""
        cfg = self.config
        slots = float(cfg.max_num_seqs)
        measured = []
        for w in pool(snapshot, Role.DECODE):
            m = metrics_of(snapshot, w.name)
            if m.num_running > 0 and m.kv_cache_usage > 0.05:
                measured.append(m.num_running / m.kv_cache_usage)
        if measured:
            slots = min(slots, sum(measured) / len(measured))
        elif cfg.kv_tokens_per_worker > 0 and context_tokens > 0:
            slots = min(slots, cfg.kv_tokens_per_worker / context_tokens)
        if cfg.decode_step_s > 0:
            slots = min(slots, cfg.decode_tokens_per_s * cfg.decode_step_s)
        return max(1.0, slots)

    def needs(self, snapshot: ControlSnapshot, rate: float, isl: float, osl: float,
              growth_per_s: float = 0.0) -> Needs:
        """Workers each pool needs at `rate` requests/s of the given mean lengths, with the
        decodes in flight growing by `growth_per_s`."""
        cfg = self.config
        t_p = self.prefill_seconds(isl)
        slots = self.decode_slots(snapshot, isl + osl / 2)
        capacity = cfg.decode_tokens_per_s
        if cfg.decode_step_s > 0:
            capacity = min(capacity, slots / cfg.decode_step_s)
        flow = rate * osl / (capacity * cfg.decode_utilization)
        # Output lengths are known only when requests finish, so after a shift to long
        # outputs the flow estimate lags by a whole output's duration; decodes queued for a
        # slot (more in flight than the pool holds) show the shortage at once. Running
        # decodes alone do not: a flipped worker finishes those in place.
        n_d = len(pool(snapshot, Role.DECODE))
        on_pool = sum(w.in_flight_decode for w in pool(snapshot, Role.DECODE))
        if cfg.decode_estimate == "flow":
            held = sum(w.in_flight_decode for w in snapshot.cluster.workers) / slots
        else:  # a relabelled worker finishes its decodes in place: they queue for no slot
            held = on_pool / slots
        queued = held if held > n_d else 0.0
        # Likewise the window's mean prompt lags a shift to long prompts; the prompts queued
        # now show it at once: clearing them within one TTFT target takes W / TTFT workers.
        n_p = len(pool(snapshot, Role.PREFILL))
        queued_on = [w for w in pool(snapshot, Role.PREFILL) if w.in_flight_prefill > 0]
        backlog_s = sum(w.in_flight_prefill * self.prefill_seconds(
            w.prefill_tokens_in_flight / w.in_flight_prefill) for w in queued_on)
        backlog = backlog_s / snapshot.slo.ttft_s
        need_p = max(rate * t_p / cfg.prefill_utilization, backlog)
        if cfg.size_backlog_by_queued_mix and backlog > n_p + cfg.hysteresis:
            # A queue past what the pool clears within one TTFT says the prompt mix has
            # shifted. Size the pool for that mix (the queued prompts' mean length at the
            # arrival rate, at full utilisation), not for the queue itself: a pool sized to
            # clear the queue within one TTFT overshoots the new phase, and each worker taken
            # from decode then runs prefill chunks between the decodes it still carries,
            # while the decode workers left must hold those decodes and the new ones. The
            # utilisation margin follows through the regular need once the window has
            # caught up, and only where decode can spare the worker. A queued pool never
            # gives a worker away, whatever the mix says.
            queued_prompts = sum(w.in_flight_prefill for w in queued_on)
            queued_isl = sum(w.prefill_tokens_in_flight for w in queued_on) / queued_prompts
            need_p = max(rate * t_p, rate * self.prefill_seconds(queued_isl), float(n_p))
        start = self._first_traffic_at
        warming = start is None or snapshot.time - start < cfg.warmup_s
        if warming:
            flow = float(n_d)  # neither shrink nor grow on it
        # Little's law on the decodes in flight reacts within seconds of a shift either
        # way: a relabelled worker keeps its decodes, so only the decode pool's count
        # matters, and while decodes arrive faster than they finish the pool must hold
        # `growth x horizon` more by the time a flip lands.
        projected = on_pool + max(0.0, growth_per_s) * cfg.occupancy_horizon_s
        occupancy = projected / (slots * cfg.decode_utilization)
        need_d = {"flow": flow, "occupancy": occupancy,
                  "both": max(flow, occupancy)}[cfg.decode_estimate]
        if warming:  # the decodes in flight have not yet reached their steady count
            need_d = max(need_d, float(n_d))
        return Needs(need_p, max(need_d, queued), t_p, capacity, slots, backlog, queued > 0,
                     occupancy, flow, growth_per_s)

    # -- deciding ---------------------------------------------------------------------
    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        cfg = self.config
        n_p, n_d = len(pool(snapshot, Role.PREFILL)), len(pool(snapshot, Role.DECODE))
        total = n_p + n_d
        numbers: dict = {"prefill_workers": n_p, "decode_workers": n_d}
        growth = self._in_flight.observe(snapshot)
        isl, osl = snapshot.mean_prompt_tokens, snapshot.mean_output_tokens
        if isl is None or osl is None:
            self.last_note = PolicyNote("hold: no finished requests in the window", numbers)
            return []
        if self._first_traffic_at is None:
            self._first_traffic_at = snapshot.time
        numbers.update(mean_prompt_tokens=round(isl, 1), mean_output_tokens=round(osl, 1))
        rate = snapshot.arrival_rate_per_s
        if cfg.target == "need" and rate is not None:
            target, why, facts = self._need_target(snapshot, rate, isl, osl, n_p, n_d, numbers,
                                                   growth)
        else:
            target, why, facts = self._share_target(snapshot, isl, osl, n_p, total, numbers)
        numbers["target_prefill_workers"] = target

        def hold(reason: str) -> list[FlipAction]:
            self.last_note = held(reason, facts, numbers)
            return []

        if draining := hold_reason_while_draining(snapshot):
            return hold(draining)
        if target == n_p:
            return hold(why)
        grow = Role.PREFILL if target > n_p else Role.DECODE
        if self._last_change_at is not None:
            since = snapshot.time - self._last_change_at
            if since < cfg.adjustment_interval_s:
                return hold(f"one decision per {cfg.adjustment_interval_s:g}s, "
                            f"{cfg.adjustment_interval_s - since:.1f}s left")
            if grow != self._last_direction and since < cfg.reverse_hold_s:
                return hold(f"{why}, but the last move went the other way "
                            f"{since:.1f}s ago (reverse hold {cfg.reverse_hold_s:g}s)")
        source = Role.DECODE if grow == Role.PREFILL else Role.PREFILL
        moves = abs(target - n_p)
        if cfg.max_flips_per_decision > 0:
            moves = min(moves, cfg.max_flips_per_decision)
        members = sorted(pool(snapshot, source), key=lambda w: role_load_key(snapshot, w))
        moves = min(moves, len(members) - 1)
        if moves <= 0:
            return hold(f"the {source.value} pool cannot spare a worker")
        chosen = members[:moves]
        reason = (f"{why}: {facts}; moving {', '.join(w.name for w in chosen)} "
                  f"(least loaded: {describe_load(chosen[0])})")
        self._last_change_at = snapshot.time
        self._last_direction = grow
        self.last_note = PolicyNote(f"flip {len(chosen)} to {grow.value}: {reason}", numbers)
        return [FlipAction(w.name, grow, reason) for w in chosen]

    def _need_target(self, snapshot: ControlSnapshot, rate: float, isl: float, osl: float,
                     n_p: int, n_d: int, numbers: dict, growth: float = 0.0
                     ) -> tuple[int, str, str]:
        cfg = self.config
        now = self.needs(snapshot, rate, isl, osl, growth)
        need_p = self._forecasts["prefill"].update(now.prefill, snapshot.time,
                                                   cfg.forecast_horizon_s)
        need_d = self._forecasts["decode"].update(now.decode, snapshot.time,
                                                  cfg.forecast_horizon_s)
        target, why = choose_target(n_p, n_d, need_p, need_d, cfg.hysteresis,
                                    now.prefill_backlog > n_p + cfg.hysteresis,
                                    now.decode_queued)
        numbers.update({
            "arrival_rate_per_s": round(rate, 2),
            "prefill_s_per_request": round(now.prefill_s_per_request, 5),
            "decode_capacity_tokens_per_s": round(now.decode_capacity_tokens_per_s, 1),
            "decode_slots": round(now.decode_slots, 1),
            "prefill_need_now": round(now.prefill, 2), "decode_need_now": round(now.decode, 2),
            "prefill_need": round(need_p, 2), "decode_need": round(need_d, 2),
            "prefill_backlog_workers": round(now.prefill_backlog, 2),
            "decode_occupancy_need": round(now.decode_occupancy, 2),
            "decode_flow_need": round(now.decode_flow, 2),
            "decode_growth_per_s": round(now.decode_growth_per_s, 2),
            "decodes_queued": int(now.decode_queued)})
        facts = (f"{rate:.1f} req/s of ISL {isl:.0f} / OSL {osl:.0f}: prefill needs "
                 f"{need_p:.2f} workers ({now.prefill_s_per_request * 1000:.1f} ms each), "
                 f"decode {need_d:.2f} ({now.decode_capacity_tokens_per_s:.0f} tok/s, "
                 f"{now.decode_slots:.0f} slots per worker; in flight "
                 f"{now.decode_occupancy:.2f}, growing {now.decode_growth_per_s:+.1f}/s, "
                 f"flow {now.decode_flow:.2f}); have {n_p}P{n_d}D")
        return target, why, facts

    def _share_target(self, snapshot: ControlSnapshot, isl: float, osl: float, n_p: int,
                      total: int, numbers: dict) -> tuple[int, str, str]:
        """Round 1: the prefill share of one request's work, one flip per interval."""
        cfg = self.config
        t_p, t_d, share = self.prefill_share(isl, osl)
        forecast = self._forecasts["share"].update(share, snapshot.time, cfg.forecast_horizon_s)
        ideal = total * forecast
        target = min(total - 1, max(1, round(ideal))) if total >= 2 else n_p
        numbers.update({
            "prefill_s_per_request": round(t_p, 5), "decode_s_per_request": round(t_d, 5),
            "prefill_share_now": round(share, 3), "prefill_share_forecast": round(forecast, 3),
            "ideal_prefill_workers": round(ideal, 2)})
        facts = (f"mix ISL {isl:.0f} / OSL {osl:.0f} tokens -> prefill {t_p * 1000:.1f} ms vs "
                 f"decode {t_d * 1000:.1f} ms per request, prefill share {share:.2f} now, "
                 f"{forecast:.2f} forecast -> ideal {ideal:.2f} of {total} prefill, have {n_p}")
        if target != n_p and abs(ideal - n_p) <= 0.5 + cfg.hysteresis:
            return n_p, f"within the hysteresis band ({cfg.hysteresis:.2f})", facts
        return target, "the split matches", facts


ROUND1_KNOBS = {"target": "share", "forecast": "holt", "forecast_horizon_s": 10.0,
                "adjustment_interval_s": 10.0, "reverse_hold_s": 0.0,
                "max_flips_per_decision": 1, "warmup_s": 0.0}
"""Knobs that reproduce the round-1 policy (work-share target, one flip per interval)."""
