"""The discrete-event loop: arrivals, engine iterations, KV transfers, control ticks.

Routing goes through a `core.routing.RoutingPolicy` driven by `core.driver.PolicyDriver`,
exactly as the live gateway drives it: at arrival `request` (observe_prompt) then `route`
(pick_decode, then pick_prefill, on a `ClusterSnapshot` of simulated state); when the
prompt's KV is ready `prefilled` (the engine's prefill time, queueing excluded) and
`decode_after_prefill`; at the end `finished` (the request's mean inter-token time on its
decode worker). Role flips go through an `instance_manager.controller.base.ControlPolicy`
(decide(ControlSnapshot) every `control_interval_s`).

No length oracle by default: a request carries the client's cap
(`SimConfig.client_max_tokens`, a large one by default; None = no cap) and its true output
length stays inside the engine; `length_oracle=True` sends the true length as `max_tokens`,
as a benchmark with `ignore_eos` does.

Flip pricing: `relabel` (Arrow-style: the worker takes new work of its new role at once,
in-flight work finishes in the same batches) or `drain` (unroutable until in-flight work of
the old role is gone); either way it is unroutable for `flip_rewarm_s` afterwards.
Flip cost: `flip_rewarm_s` is the median re-warm time; `flip_rewarm_sigma` > 0 draws each
flip's time from a log-normal around it (seeded, capped at `flip_rewarm_max_s`), to
replay a measured distribution rather than one number.

Timing per leg: `prefill_done` is the end of the prefill leg (arrival -> prefill on its
worker, what the prefill worker's own TTFT measures and what control policies are fed
for it, as the engine's TTFT and as the gateway's timing of the leg alike); `first_token`
is when the client sees the first token, after the KV transfer, decode admission and the
first decode step in P/D.
KV transfer takes prompt_tokens * kv_bytes_per_token / link bandwidth + link latency, and
needs KV room on the decode worker before it starts.

ARES migration (`SimConfig.migration`): `recompute` re-prefills prompt + generated tokens on
the target; `kv` moves the KV as a P/D hand-off does (the target pulls the context over the
link, the source holds its blocks until the pull is done), and the planner prices it with
that link's latency and bandwidth.
"""

from __future__ import annotations

import heapq
import math
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from benchmarks.arrivals import Trace
from benchmarks.metrics import DEFAULT_PERCENTILES, SLO, summarize_arrays
from benchmarks.sim.engine import Engine, EngineConfig, SimRequest
from benchmarks.sim.perf import PerfModel
from benchmarks.sim.snapshots import SnapshotCache
from benchmarks.workload import DEFAULT_CLIENT_MAX_TOKENS
from core.driver import PolicyDriver
from core.routing import RoutingPolicy
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState
from instance_manager.controller.base import (
    ControlPolicy,
    ControlSnapshot,
    FlipAction,
    WorkerMetrics,
)
from instance_manager.controller.scaling import ScaleAction
from router.quantile import linear_quantile

_heappush, _heappop = heapq.heappush, heapq.heappop
ARRIVAL, ITER_END, XFER_DONE, CONTROL, FLIP_DONE, REBALANCE = range(6)


@dataclass
class SimConfig:
    """Cluster shape and knobs of one simulated run."""

    prefill: int = 1
    decode: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    slo: SLO = field(default_factory=SLO)
    control_interval_s: float = 1.0
    window_s: float = 10.0
    flip_mode: str = "relabel"
    flip_rewarm_s: float = 0.0
    flip_rewarm_sigma: float = 0.0   # log-normal spread of the re-warm time (0: fixed)
    flip_rewarm_max_s: float = math.inf
    seed: int = 0                    # for sampled flip times
    length_oracle: bool = False  # True: max_tokens = the true output length
    client_max_tokens: int | None = DEFAULT_CLIENT_MAX_TOKENS  # the cap otherwise (None: none)
    rebalance_interval_s: float = 2.0  # ARES migration planning, as the gateway's default
    spare: int = 0  # workers provisioned switched off, for scale actions to start
    start_time_s: float = 60.0  # from a scale-up to the new worker's first request
    migration: str = "recompute"  # how a moved decode continues: "recompute" or "kv"

    def __post_init__(self) -> None:
        if self.flip_mode not in ("relabel", "drain"):
            raise ValueError("flip_mode must be 'relabel' or 'drain'")
        if self.prefill + self.decode <= 0:
            raise ValueError("the cluster needs at least one worker")
        if self.migration not in ("recompute", "kv"):
            raise ValueError("migration must be 'recompute' or 'kv'")


@dataclass
class SimResult:
    """Per-request outcomes plus cluster history."""

    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    failed: np.ndarray
    finish_count: np.ndarray
    roles: list[tuple[float, int, int]]
    flips: list[tuple[float, str, str, str]]
    events: int
    wall_s: float
    cpu_s: float
    busy_s: dict[str, float]
    prefill_done: np.ndarray | None = None
    slow_gaps: np.ndarray | None = None     # gaps above `tbt_limit_s`, per request
    tbt_limit_s: float = math.inf
    gap_log: np.ndarray | None = None       # rows (end time, gap s, count), all engines
    worker_seconds: float = 0.0  # time workers were on (starting included): the cost
    scales: list[tuple[float, str, str, str]] = field(default_factory=list)
    migrations: list[tuple[float, str, str, str]] = field(default_factory=list)

    @property
    def ttft(self) -> np.ndarray:
        return self.first_token - self.arrival

    @property
    def latency(self) -> np.ndarray:
        return self.finish - self.arrival

    @property
    def duration(self) -> float:
        ok = ~self.failed
        if not ok.any():
            return 0.0
        return float(np.nanmax(self.finish[ok]) - self.arrival.min())

    def tbt_ok(self, tbt_ms: float) -> np.ndarray:
        """Per request: its p99 inter-token gap (nearest rank) is <= tbt_ms."""
        if self.slow_gaps is None or abs(self.tbt_limit_s - tbt_ms / 1000) > 1e-12:
            raise ValueError(f"this run counted gaps above {self.tbt_limit_s * 1000} ms, "
                             f"not {tbt_ms} ms: set SimConfig.slo.tbt_ms before running")
        gaps = np.maximum(self.output_tokens - 1, 0)
        return self.slow_gaps <= gaps // 100

    def metrics(self, slo: SLO | None = None,
                percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                warmup_s: float = 0.0) -> dict:
        """vLLM-named metrics over requests arriving `warmup_s` or later after the first."""
        keep = self.arrival >= self.arrival.min() + warmup_s if warmup_s > 0 else \
            np.ones(self.arrival.size, dtype=bool)
        ok = ~self.failed[keep]
        arrival = self.arrival[keep]
        finish = self.finish[keep]
        done = ~np.isnan(finish) & ok
        duration = float(np.nanmax(finish[done]) - arrival.min()) if done.any() else 0.0
        ttft, latency = self.ttft[keep], self.latency[keep]
        itls = weights = None
        if self.gap_log is not None and self.gap_log.size:
            log = self.gap_log[self.gap_log[:, 0] >= arrival.min()] if warmup_s > 0 \
                else self.gap_log
            if log.size:
                itls, weights = log[:, 1], log[:, 2]
        tbt_ok = None
        if slo is not None and slo.tbt_ms is not None:
            tbt_ok = self.tbt_ok(slo.tbt_ms)[keep]
        result = summarize_arrays(
            duration_s=duration, prompt_tokens=self.prompt_tokens[keep].astype(float),
            output_tokens=self.output_tokens[keep].astype(float), success=ok,
            ttft_s=np.where(ok, ttft, 0.0), latency_s=np.where(ok, latency, 0.0),
            itls_s=itls, itl_weights=weights, tbt_ok=tbt_ok, slo=slo,
            percentiles=percentiles)
        if self.prefill_done is not None:
            leg = (self.prefill_done - self.arrival)[keep][ok]
            handoff = (self.first_token - self.prefill_done)[keep][ok]
            for name, values in (("ttft_prefill_leg", leg), ("ttft_handoff", handoff)):
                values = values[~np.isnan(values)]
                for p in (50, 90, 99):
                    result[f"p{p}_{name}_ms"] = \
                        float(np.percentile(values, p) * 1000) if values.size else None
        result["num_prompts"] = int(keep.sum())
        result["warmup_s"] = warmup_s
        result["flips"] = len(self.flips)
        result["migrations"] = len(self.migrations)
        result["scale_actions"] = len(self.scales)
        result["worker_seconds"] = self.worker_seconds
        result["sim_events"] = self.events
        result["sim_wall_s"] = self.wall_s
        result["sim_cpu_s"] = self.cpu_s
        result["sim_requests_per_cpu_s"] = self.arrival.size / self.cpu_s if self.cpu_s else None
        return result


class Simulator:
    """One run of one cluster configuration on one trace."""

    def __init__(self, config: SimConfig, perf: PerfModel, routing: RoutingPolicy,
                 control: ControlPolicy | None = None) -> None:
        self.config, self.perf, self.routing, self.control = config, perf, routing, control
        roles = [Role.PREFILL] * config.prefill + [Role.DECODE] * (config.decode + config.spare)
        self.engines = [Engine(i, f"w{i}", r, perf, config.engine) for i, r in enumerate(roles)]
        self._on_since: dict[int, float] = {}
        for e in self.engines[config.prefill + config.decode:]:
            e.state = WorkerState.DEAD  # off until a scale action starts it
        self.worker_seconds = 0.0
        self.scales: list[tuple[float, str, str, str]] = []
        self.start_time_s = config.start_time_s
        self.by_name = {e.name: e for e in self.engines}
        self._heap: list[tuple] = []
        self._seq = 0
        self._views = SnapshotCache(self.engines)
        self._mark = self._views.mark  # engine i changed: its view is rebuilt on next use
        self._snap = self._views.get
        self.tbt_limit_s = config.slo.tbt_ms / 1000 if config.slo.tbt_ms else math.inf
        for e in self.engines:
            e.tbt_limit_s = self.tbt_limit_s
        self._rng = np.random.default_rng(config.seed)
        slo = config.slo
        self.driver = PolicyDriver(routing, SLOTargets(ttft_s=(slo.ttft_ms or 1000.0) / 1000,
                                                       tpot_s=(slo.tpot_ms or 100.0) / 1000))
        self.link_bytes_s = float(getattr(perf, "link_bytes_s", math.inf))
        eff = getattr(perf, "eff", None)
        self.link_latency_s = float(getattr(eff, "link_latency_s", 0.0))
        self.kv_bytes = float(perf.kv_bytes_per_token)
        self.moves_kv = config.migration == "kv"
        if config.rebalance_interval_s > 0 and self.driver.tracks_residents:
            from router.rebalance import default_planner, link_move_cost  # the gateway's

            if self.moves_kv:  # priced as what a move does here: a pull over this link
                cost = link_move_cost(self.kv_bytes, self.link_bytes_s, self.link_latency_s)
                self.driver.planner = default_planner(moves_kv=True, kv_cost=cost)
            else:
                self.driver.planner = default_planner()
        self.migrations: list[tuple[float, str, str, str]] = []
        self._evictions: dict[int, tuple[SimRequest, Engine]] = {}
        self._reqs: list[SimRequest] = []
        self.roles: list[tuple[float, int, int]] = []
        self.flips: list[tuple[float, str, str, str]] = []
        self._recent_prompts: deque[tuple[float, int, int]] = deque()
        # outputs are known when a request finishes (as the gateway's RequestMix sees them)
        self._recent_outputs: deque[tuple[float, int]] = deque()
        self._recent_prompt_sum = 0  # sums of the two windows' token counts (ints)
        self._recent_output_sum = 0
        pressure = routing.pressure_log()
        self._drain_pressure = pressure.drain if pressure is not None else None
        self._last_counters: dict[str, tuple[int, int, int]] = {}

    # ---- plumbing ------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: object = None, b: object = None) -> None:
        seq = self._seq = self._seq + 1
        _heappush(self._heap, (t, seq, kind, a, b))

    def _changed(self, e: Engine) -> None:
        self._mark(e.idx)

    def _changed_role_or_state(self, e: Engine) -> None:
        self._views.mark_role_or_state(e.idx)

    def snapshot(self, now: float) -> ClusterSnapshot:
        """The cluster as policies see it; cached until a worker changes."""
        return self._views.get(now)

    def _kick(self, e: Engine, now: float) -> None:
        plan = e.plan
        if plan is None:
            if not (e.running or e.ready or e.prefill_queue or e.slai_waiting):
                return  # idle: nothing to plan (what start would find)
            plan = e.start(now)
            if plan is not None:
                if plan.first_tokens or plan.chunks:  # joins or KV reservations
                    self._mark(e.idx)
                seq = self._seq = self._seq + 1
                _heappush(self._heap, (now + plan.steps * plan.step_s, seq, ITER_END, e,
                                       e.version))
        elif plan.steps > 1:  # a one-step plan already ends at the next boundary
            end = e.interrupt(now)
            if end is not None:
                seq = self._seq = self._seq + 1
                _heappush(self._heap, (end, seq, ITER_END, e, e.version))

    def _touch(self, e: Engine, now: float) -> None:
        """Engine e changed (new work, KV freed): mark its view and plan its next step."""
        self._mark(e.idx)
        self._kick(e, now)

    def _record_roles(self, now: float) -> None:
        on = [e for e in self.engines if e.state != WorkerState.DEAD]
        n_p = sum(1 for e in on if e.role == Role.PREFILL)
        self.roles.append((now, n_p, len(on) - n_p))

    # ---- request life cycle ------------------------------------------------------------
    def _arrive(self, req: SimRequest, now: float) -> None:
        info = req.info = self.driver.request(str(req.rid), req.prompt, req.max_tokens, now,
                                              req.text)
        req.decode_tokens = info.decode_tokens  # fixed for its life: read once
        if self.control is not None:
            self._recent_prompts.append((now, req.prompt, req.output))
            self._recent_prompt_sum += req.prompt
        route = self.driver.route(info, self._snap(now))
        if route.decode is None:
            return self._fail(req)
        d = self.by_name[route.decode]
        if route.prefill is None:
            e = d
            req.local_decode = True
            if req.prompt + req.output > e.kv_cap:
                return self._fail(req)
            e.in_flight_decode += 1
            e.decode_tokens_in_flight += req.decode_tokens
        else:
            e = self.by_name[route.prefill]
            if req.prompt > e.kv_cap:
                return self._fail(req)
            e.in_flight_prefill += 1
            e.prefill_tokens_in_flight += req.prompt
        req.decode_worker = d.idx  # chosen now; confirmed when the KV is ready
        req.prefill_worker = e.idx
        e.enqueue_prefill(req, now)
        self._touch(e, now)

    def _fail(self, req: SimRequest) -> None:
        req.failed = True
        self._finished += 1
        if req.info is not None:
            self.driver.finished(req.info.request_id)

    def _prefill_done(self, e: Engine, req: SimRequest, now: float) -> None:
        if req.moved:  # a migrated decode recomputed its context here: it continues
            if req.output <= 1:
                self._finish(e, req, now)
                return
            streamed = req.first_token  # its first token reached the client before the move
            e.join_local(req, req.output - 1, now)
            req.first_token = streamed
            return
        req.prefill_done = now
        if self.control is not None:  # the prefill leg, as the prefill worker measures it
            ttft = now - req.arrival
            e.samples_ttft.append((now, ttft))
            insort(e.sorted_ttft, ttft)
        if self.driver.learns_prefill and req.prefill_start == req.prefill_start:
            self.driver.prefilled(e.name, req.prompt, now - req.prefill_start)
        if req.local_decode:  # aggregated: the prefill iteration emits the first token
            self._start_local_decode(e, req, now)
            return
        e.in_flight_prefill -= 1
        e.prefill_tokens_in_flight -= req.prompt
        dname = self.driver.decode_after_prefill(req.info, self.engines[req.decode_worker].name,
                                                 self._snap(now))
        if dname is None or dname == e.name:
            req.local_decode = True
            req.kv_held += req.output
            e.kv_used += req.output
            e.in_flight_decode += 1
            e.decode_tokens_in_flight += req.decode_tokens
            req.decode_worker = e.idx
            self._start_local_decode(e, req, now)
            return
        d = self.by_name[dname]
        if req.prompt + req.output > d.kv_cap:
            e.kv_used -= req.kv_held
            self._fail(req)
            return
        req.decode_worker = d.idx
        d.in_flight_decode += 1
        d.decode_tokens_in_flight += req.decode_tokens
        d.decode_wait.append(req)
        self._changed(d)
        self._admit_pulls(d, now)

    def _start_local_decode(self, e: Engine, req: SimRequest, now: float) -> None:
        req.first_token = now
        if req.output <= 1:
            self._finish(e, req, now)
        else:
            e.join_local(req, req.output - 1, now)

    def _admit_pulls(self, d: Engine, now: float) -> None:
        """Start KV pulls for waiting decodes while the decode worker has room."""
        limit = d.config.max_num_seqs
        while d.decode_wait:
            req = d.decode_wait[0]
            need = req.prompt + req.output
            if d.kv_used + need > d.kv_cap or \
                    len(d.running) + len(d.ready) + d.transferring >= limit:
                break
            d.decode_wait.popleft()
            d.kv_used += need
            d.transferring += 1
            secs = req.prompt * self.kv_bytes / self.link_bytes_s + self.link_latency_s
            self._push(now + secs, XFER_DONE, req, need)

    def _transfer_done(self, req: SimRequest, need: int, now: float) -> None:
        src = self.engines[req.prefill_worker]
        src.kv_used -= req.kv_held
        req.kv_held = need
        self._touch(src, now)  # its queue may have been waiting for KV room
        if req.moved and src.decode_wait:  # a KV move's source: its pulls may wait for room
            self._admit_pulls(src, now)
        self._check_drained(src, now)
        d = self.engines[req.decode_worker]
        d.transferring -= 1
        d.ready.append(req)
        self._touch(d, now)

    def _finish(self, e: Engine, req: SimRequest, now: float) -> None:
        req.finish = now
        self._finish_count[req.rid] += 1
        self._finished += 1
        e.kv_used -= req.kv_held
        req.kv_held = 0
        e.in_flight_decode -= 1
        e.decode_tokens_in_flight -= req.decode_tokens
        e.requests_finished += 1
        total = req.output + req.moved
        per_token = (now - req.first_token) / (total - 1) if total > 1 else None
        if self.control is not None:
            if per_token is not None:
                e.samples_itl.append((now, per_token))
                insort(e.sorted_itl, per_token)
            self._recent_outputs.append((now, total))
            self._recent_output_sum += total
        self.driver.finished(req.info.request_id, e.name, e.decode_tokens_in_flight, per_token)

    def _iteration_end(self, e: Engine, now: float) -> None:
        plan = e.plan
        prefilled, finished = e.complete(now)
        for req in prefilled:
            self._prefill_done(e, req, now)
        for req in finished:
            self._finish(e, req, now)
        if self._evictions and e.idx in self._evictions:
            moving, target = self._evictions.pop(e.idx)
            if moving.finish != moving.finish:  # still running: not finished meanwhile
                self._migrate(e, moving, target, now)
        if prefilled or finished or (plan is not None and plan.first_tokens):
            self._mark(e.idx)
        if finished and e.decode_wait:
            self._admit_pulls(e, now)
        self._kick(e, now)
        if e.pending_role is not None:
            self._check_drained(e, now)

    # ---- ARES rebalancing: the gateway's planner, driven the same way ------------------
    def _rebalance_tick(self, now: float) -> None:
        driver = self.driver
        if driver.learns_progress:
            for e in self.engines:
                step = e.step
                for finish_step, _, req in e.running:
                    generated = req.moved + req.output - (finish_step - step)
                    if generated > 0:
                        driver.progress(req.info.request_id, generated)
        reqs, by_name = self._reqs, self.by_name

        def movable(worker: str, r: object) -> bool:
            req = reqs[int(r.request_id)]  # type: ignore[attr-defined]
            e = by_name.get(worker)
            return (e is not None and req.decode_worker == e.idx and e.idx not in
                    self._evictions and req.finish != req.finish and req.prefilled >= req.prompt
                    and any(entry[2] is req for entry in e.running))

        decoders = [w.name for w in self._snap(now).routable(Role.DECODE)]
        decision = driver.plan_migration(decoders, movable)
        if decision is None:
            return
        src, dst = by_name[decision.source], by_name[decision.target]
        req = reqs[int(decision.request_id)]
        if req.prompt + req.output > dst.kv_cap:
            return
        self._evictions[src.idx] = (req, dst)  # taken out at src's next step boundary
        end = src.interrupt(now)
        if end is not None:
            self._push(end, ITER_END, src, src.version)

    def _migrate(self, src: Engine, req: SimRequest, dst: Engine, now: float) -> None:
        """Move a running decode, then decode the rest on the target, as the gateway does:
        with `recompute` the target prefills its context (prompt + generated, priced by the
        engine model); with `kv` it pulls the context's KV from the source like a P/D
        decode pulls a prompt's (`_admit_pulls`), and the source holds it until then."""
        kv = self.moves_kv
        slow_gaps = src.slow_steps - req.slow0 - req.first_step_slow  # so far, on src
        generated = src.evict(req, keep_kv=kv)
        if generated < 0:
            return
        src.in_flight_decode -= 1
        src.decode_tokens_in_flight -= req.decode_tokens
        self._changed(src)
        req.moved += generated
        req.prompt += generated
        req.output -= generated
        dst.in_flight_decode += 1
        dst.decode_tokens_in_flight += req.decode_tokens
        self.migrations.append((now, req.info.request_id, src.name, dst.name))
        self.driver.migrated(req.info.request_id, dst.name)
        if kv:
            req.prefilled = req.prompt  # the whole context has KV, on the source for now
            req.local_decode = False
            req.first_step_slow = -slow_gaps  # counted at its finish on the target
            req.prefill_worker = src.idx  # where `_transfer_done` frees the KV it holds
            req.decode_worker = dst.idx
            dst.decode_wait.append(req)
            self._changed(dst)
            self._admit_pulls(dst, now)
            return
        req.prefilled = 0
        req.local_decode = True
        req.prefill_worker = req.decode_worker = dst.idx
        dst.enqueue_prefill(req, now)
        self._touch(dst, now)

    # ---- control -----------------------------------------------------------------------
    def _worker_metrics(self, e: Engine, now: float, interval: float) -> WorkerMetrics:
        horizon = now - self.config.window_s
        for samples, ordered in ((e.samples_ttft, e.sorted_ttft), (e.samples_itl, e.sorted_itl)):
            while samples and samples[0][0] < horizon:
                del ordered[bisect_left(ordered, samples.popleft()[1])]  # one equal value
        ttft = e.sorted_ttft
        itl = e.sorted_itl
        prev = self._last_counters.get(e.name, (0, 0, 0))
        cur = (e.prompt_tokens_done, e.tokens_generated, e.requests_finished)
        self._last_counters[e.name] = cur
        ttft_p90 = linear_quantile(ttft, 0.9) if ttft else None
        return WorkerMetrics(
            name=e.name,
            ttft_p50_s=linear_quantile(ttft, 0.5) if ttft else None,
            ttft_p90_s=ttft_p90,
            # the gateway's clock on the prefill leg: no HTTP hop or API server here, so
            # it reads what the engine's own TTFT does (the live gateway adds them)
            gateway_ttft_p90_s=ttft_p90, gateway_ttft_samples=len(ttft),
            itl_p50_s=linear_quantile(itl, 0.5) if itl else None,
            itl_p90_s=linear_quantile(itl, 0.9) if itl else None,
            num_running=len(e.running), num_waiting=e.num_waiting_prefills + len(e.decode_wait),
            kv_cache_usage=e.kv_used / e.kv_cap if e.kv_cap else 1.0,
            prompt_tokens_per_s=(cur[0] - prev[0]) / interval,
            generation_tokens_per_s=(cur[1] - prev[1]) / interval,
            requests_finished_per_s=(cur[2] - prev[2]) / interval)

    def _control_tick(self, now: float) -> None:
        assert self.control is not None
        interval = self.config.control_interval_s
        horizon = now - self.config.window_s
        recent = self._recent_prompts
        while recent and recent[0][0] < horizon:
            self._recent_prompt_sum -= recent.popleft()[1]
        outputs = self._recent_outputs
        while outputs and outputs[0][0] < horizon:
            self._recent_output_sum -= outputs.popleft()[1]
        span = min(self.config.window_s, now)
        slo = self.config.slo
        snap = ControlSnapshot(
            time=now, cluster=self._snap(now),
            metrics={e.name: self._worker_metrics(e, now, interval) for e in self.engines},
            window_s=self.config.window_s,
            slo=SLOTargets(ttft_s=(slo.ttft_ms or 1000.0) / 1000,
                           tpot_s=(slo.tpot_ms or 100.0) / 1000),
            # exact integer sums: the same float as np.mean of the window's integers
            mean_prompt_tokens=float(self._recent_prompt_sum) / len(recent) if recent else None,
            mean_output_tokens=float(self._recent_output_sum) / len(outputs) if outputs
            else None,
            arrival_rate_per_s=len(recent) / span if span > 0 else None,
            pressure=tuple(self._drain_pressure()) if self._drain_pressure else ())
        for action in self.control.decide(snap):
            if isinstance(action, FlipAction):
                self.apply_flip(action.worker, action.to, action.reason, now)
            else:
                self.apply_scale(action, now)

    def apply_scale(self, action: ScaleAction, now: float) -> None:
        """Start a switched-off worker (ready after `start_time_s`) or retire one (drained
        first); worker-seconds count from the start request to the retirement."""
        if action.direction == "up":
            e = next((e for e in self.engines if e.state == WorkerState.DEAD), None)
            if e is None or action.role is None:
                return
            e.role, e.state = action.role, WorkerState.STARTING
            self._on_since[e.idx] = now
            self._push(now + self.start_time_s, FLIP_DONE, e, None)
        else:
            e = self.by_name.get(action.worker or "")
            if e is None or e.state != WorkerState.READY or e.pending_role is not None:
                return
            e.state, e.pending_role, e.retiring = WorkerState.DRAINING, e.role, True
        self.scales.append((now, action.direction, e.name, action.reason))
        self._changed_role_or_state(e)
        self._record_roles(now)
        self._check_drained(e, now)

    def apply_flip(self, worker: str, to: Role, reason: str, now: float) -> None:
        e = self.by_name.get(worker)
        if e is None or e.role == to or e.pending_role is not None:
            return
        self.flips.append((now, worker, to.value, reason))
        if self.config.flip_mode == "relabel":
            e.role = to
            self._record_roles(now)
            self._rewarm(e, now)
        else:
            e.state = WorkerState.DRAINING
            e.pending_role = to
            self._changed_role_or_state(e)
            self._check_drained(e, now)

    def _check_drained(self, e: Engine, now: float) -> None:
        if e.pending_role is None or e.state != WorkerState.DRAINING:
            return
        if getattr(e, "retiring", False):
            if e.has_role_work(Role.PREFILL) or e.has_role_work(Role.DECODE):
                return
            e.state, e.pending_role, e.retiring = WorkerState.DEAD, None, False
            self.worker_seconds += now - self._on_since.pop(e.idx, now)
            self._changed_role_or_state(e)
            self._record_roles(now)
            return
        if e.has_role_work(e.role):
            return
        e.role = e.pending_role
        e.pending_role = None
        self._record_roles(now)
        self._rewarm(e, now)

    def _rewarm_s(self) -> float:
        cfg = self.config
        if cfg.flip_rewarm_sigma <= 0 or cfg.flip_rewarm_s <= 0:
            return cfg.flip_rewarm_s
        drawn = cfg.flip_rewarm_s * math.exp(cfg.flip_rewarm_sigma * self._rng.standard_normal())
        return min(drawn, cfg.flip_rewarm_max_s)

    def _rewarm(self, e: Engine, now: float) -> None:
        secs = self._rewarm_s()
        if secs > 0:
            e.state = WorkerState.STARTING
            self._push(now + secs, FLIP_DONE, e, None)
        else:
            e.state = WorkerState.READY
        self._changed_role_or_state(e)

    def _loop(self, reqs: list[SimRequest], first_seq: int) -> int:
        """Run events to exhaustion; returns how many were handled.

        Arrivals are not kept in the heap: the next one waits beside it, ordered against
        the heap's head by (time, sequence number) with the sequence number it would have
        had as a heap entry (taken when the previous arrival is handled), so ties break
        exactly as if it were queued."""
        heap = self._heap
        n = len(reqs)
        events = 0
        i = 0
        arr_t, arr_seq = (reqs[0].arrival if n else math.inf), first_seq
        iteration_end, arrive = self._iteration_end, self._arrive
        while True:
            if i < n and (not heap or arr_t < heap[0][0]
                          or (arr_t == heap[0][0] and arr_seq < heap[0][1])):
                events += 1
                req = reqs[i]
                i += 1
                if i < n:
                    self._seq += 1
                    arr_t, arr_seq = reqs[i].arrival, self._seq
                arrive(req, req.arrival)
                continue
            if not heap:
                break
            now, _, kind, a, b = _heappop(heap)
            events += 1
            if kind == ITER_END:
                if b == a.version:
                    iteration_end(a, now)
            elif kind == XFER_DONE:
                self._transfer_done(a, b, now)
            elif kind == CONTROL:
                if self._finished < n:
                    self._control_tick(now)
                    self._push(now + self.config.control_interval_s, CONTROL)
            elif kind == FLIP_DONE:
                a.state = WorkerState.READY
                self._changed_role_or_state(a)
                self._kick(a, now)
            elif kind == REBALANCE:
                if self._finished < n:
                    self._rebalance_tick(now)
                    self._push(now + self.config.rebalance_interval_s, REBALANCE)
        return events

    # ---- main loop -----------------------------------------------------------------------
    def run(self, trace: Trace) -> SimResult:
        """Simulate the trace to completion (every request finishes or fails once)."""
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        n = len(trace)
        oracle, cap = self.config.length_oracle, self.config.client_max_tokens
        reqs = []
        for i, (t, r) in enumerate(trace):
            out = max(1, r.output_tokens)
            if not oracle and cap is not None:
                out = min(out, cap)  # the engine stops at the client's cap
            reqs.append(SimRequest(i, float(t), max(1, r.prompt_tokens), out,
                                   out if oracle else cap, r.prompt or None))
        self._reqs = reqs
        self._finish_count = [0] * n
        self._finished = 0
        self._on_since = {e.idx: 0.0 for e in self.engines if e.state != WorkerState.DEAD}
        self._record_roles(0.0)
        self._seq += 1  # the first arrival's place in the event order
        first_seq = self._seq
        if self.control is not None:
            self._push(self.config.control_interval_s, CONTROL)
        if self.driver.planner is not None or self.driver.learns_progress:
            if self.config.rebalance_interval_s > 0:
                self._push(self.config.rebalance_interval_s, REBALANCE)
        events = self._loop(reqs, first_seq)
        end = max((r.finish for r in reqs if r.finish == r.finish), default=0.0)
        self.worker_seconds += sum(max(0.0, end - t) for t in self._on_since.values())
        unfinished = [r.rid for r in reqs if not r.failed and r.finish != r.finish]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} requests never finished (simulator bug)")
        return SimResult(
            arrival=np.array([r.arrival for r in reqs]),
            first_token=np.array([r.first_token for r in reqs]),
            finish=np.array([r.finish for r in reqs]),
            prompt_tokens=np.array([r.prompt - r.moved for r in reqs]),
            output_tokens=np.array([r.output + r.moved for r in reqs]),
            failed=np.array([r.failed for r in reqs], dtype=bool),
            finish_count=np.array(self._finish_count, dtype=np.int64), roles=self.roles,
            flips=self.flips,
            events=events, wall_s=time.perf_counter() - wall0,
            cpu_s=time.process_time() - cpu0,
            busy_s={e.name: e.busy_s for e in self.engines},
            prefill_done=np.array([r.prefill_done for r in reqs]),
            slow_gaps=np.array([r.slow_gaps for r in reqs], dtype=np.int64),
            tbt_limit_s=self.tbt_limit_s,
            gap_log=np.fromiter(chain.from_iterable(e.gap_log for e in self.engines),
                                dtype=float, count=sum(len(e.gap_log) for e in self.engines)
                                ).reshape(-1, 3),
            worker_seconds=self.worker_seconds, scales=self.scales, migrations=self.migrations)
