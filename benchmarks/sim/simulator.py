"""The discrete-event loop: arrivals, engine iterations, KV transfers, control ticks.

Routing goes through a `router.policy.RoutingPolicy` (pick_prefill at arrival, pick_decode
when the prompt's KV is ready, on a `ClusterSnapshot` of simulated state), role flips
through an `instance_manager.controller.base.ControlPolicy` (decide(ControlSnapshot) every
`control_interval_s`). Policies with `observe_prefill`, `observe_decode`, `observe_prompt`
or `observe_finished` methods are fed the same measurements the live gateway sees.

Flip pricing: `relabel` (Arrow-style: the worker takes new work of its new role at once,
in-flight work finishes in the same batches) or `drain` (unroutable until in-flight work of
the old role is gone); either way it is unroutable for `flip_rewarm_s` afterwards.
KV transfer takes prompt_tokens * kv_bytes_per_token / link bandwidth + link latency, and
needs KV room on the decode worker before it starts.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.arrivals import Trace
from benchmarks.metrics import DEFAULT_PERCENTILES, SLO, summarize_arrays
from benchmarks.sim.engine import Engine, EngineConfig, SimRequest
from benchmarks.sim.fastinit import fast_constructor
from benchmarks.sim.perf import PerfModel
from benchmarks.sim.snapshots import SnapshotCache
from core.request import RequestInfo
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState
from instance_manager.controller.base import (
    ControlPolicy,
    ControlSnapshot,
    FlipAction,
    WorkerMetrics,
)
from instance_manager.controller.scaling import ScaleAction
from router.policy import RoutingPolicy
from router.quantile import linear_quantile

_make_info = fast_constructor(RequestInfo, ("request_id", "prompt_tokens", "max_tokens",
                                             "arrival_time", "tbt_target_s", "prompt_text"))
_heappush, _heappop = heapq.heappush, heapq.heappop
ARRIVAL, ITER_END, XFER_DONE, CONTROL, FLIP_DONE = range(5)


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
    spare: int = 0  # workers provisioned switched off, for scale actions to start
    start_time_s: float = 60.0  # from a scale-up to the new worker's first request

    def __post_init__(self) -> None:
        if self.flip_mode not in ("relabel", "drain"):
            raise ValueError("flip_mode must be 'relabel' or 'drain'")
        if self.prefill + self.decode <= 0:
            raise ValueError("the cluster needs at least one worker")


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
    worker_seconds: float = 0.0  # time workers were on (starting included): the cost
    scales: list[tuple[float, str, str, str]] = field(default_factory=list)

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

    def metrics(self, slo: SLO | None = None,
                percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
        ok = ~self.failed
        result = summarize_arrays(
            duration_s=self.duration, prompt_tokens=self.prompt_tokens.astype(float),
            output_tokens=self.output_tokens.astype(float), success=ok,
            ttft_s=np.where(ok, self.ttft, 0.0), latency_s=np.where(ok, self.latency, 0.0),
            slo=slo, percentiles=percentiles)
        result["num_prompts"] = int(self.arrival.size)
        result["flips"] = len(self.flips)
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
        self._tbt = config.slo.tpot_ms / 1000 if config.slo.tpot_ms else None
        self.link_bytes_s = float(getattr(perf, "link_bytes_s", math.inf))
        eff = getattr(perf, "eff", None)
        self.link_latency_s = float(getattr(eff, "link_latency_s", 0.0))
        self.kv_bytes = float(perf.kv_bytes_per_token)
        self._obs_prefill = getattr(routing, "observe_prefill", None)
        self._obs_decode = getattr(routing, "observe_decode", None)
        self._obs_prompt = getattr(routing, "observe_prompt", None)
        self._obs_finished = getattr(routing, "observe_finished", None)
        self.roles: list[tuple[float, int, int]] = []
        self.flips: list[tuple[float, str, str, str]] = []
        self._recent_prompts: deque[tuple[float, int, int]] = deque()
        # outputs are known when a request finishes (as the gateway's RequestMix sees them)
        self._recent_outputs: deque[tuple[float, int]] = deque()
        pressure = getattr(routing, "pressure", None)
        self._drain_pressure = getattr(pressure, "drain", None)
        self._last_counters: dict[str, tuple[int, int, int]] = {}

    # ---- plumbing ------------------------------------------------------------------
    def _push(self, t: float, kind: int, a: object = None, b: object = None) -> None:
        seq = self._seq = self._seq + 1
        _heappush(self._heap, (t, seq, kind, a, b))

    def _changed(self, e: Engine) -> None:
        self._views.mark(e.idx)

    def _changed_role_or_state(self, e: Engine) -> None:
        self._views.mark_role_or_state(e.idx)

    def snapshot(self, now: float) -> ClusterSnapshot:
        """The cluster as policies see it; cached until a worker changes."""
        return self._views.get(now)

    def _kick(self, e: Engine, now: float) -> None:
        if e.plan is None:
            plan = e.start(now)
            if plan is not None:
                if plan.first_tokens or plan.chunks:  # joins or KV reservations
                    self._views.mark(e.idx)
                seq = self._seq = self._seq + 1
                _heappush(self._heap, (now + plan.steps * plan.step_s, seq, ITER_END, e,
                                       e.version))
        else:
            end = e.interrupt(now)
            if end is not None:
                self._push(end, ITER_END, e, e.version)

    def _record_roles(self, now: float) -> None:
        on = [e for e in self.engines if e.state != WorkerState.DEAD]
        n_p = sum(1 for e in on if e.role == Role.PREFILL)
        self.roles.append((now, n_p, len(on) - n_p))

    # ---- request life cycle ------------------------------------------------------------
    def _arrive(self, req: SimRequest, now: float) -> None:
        info = req.info = _make_info(str(req.rid), req.prompt, req.output, now, self._tbt,
                                     None)
        if self._obs_prompt is not None:
            self._obs_prompt(req.prompt)
        if self.control is not None:
            self._recent_prompts.append((now, req.prompt, req.output))
        snap = self.snapshot(now)
        pname = self.routing.pick_prefill(info, snap)
        if pname is None:
            dname = self.routing.pick_decode(info, snap)
            if dname is None:
                return self._fail(req)
            e = self.by_name[dname]
            req.local_decode = True
            if req.prompt + req.output > e.kv_cap:
                return self._fail(req)
            req.decode_worker = e.idx
            e.in_flight_decode += 1
            e.decode_tokens_in_flight += req.prompt + req.output
        else:
            e = self.by_name[pname]
            if req.prompt > e.kv_cap:
                return self._fail(req)
            e.in_flight_prefill += 1
            e.prefill_tokens_in_flight += req.prompt
        req.prefill_worker = e.idx
        e.enqueue_prefill(req, now)
        self._changed(e)
        self._kick(e, now)

    def _fail(self, req: SimRequest) -> None:
        req.failed = True
        self._finished += 1

    def _prefill_done(self, e: Engine, req: SimRequest, now: float) -> None:
        if self._obs_prefill is not None and req.prefill_start == req.prefill_start:
            self._obs_prefill(e.name, req.prompt, now - req.prefill_start)
        if req.local_decode:  # aggregated: the prefill iteration emits the first token
            self._start_local_decode(e, req, now)
            return
        e.in_flight_prefill -= 1
        e.prefill_tokens_in_flight -= req.prompt
        dname = self.routing.pick_decode(req.info, self.snapshot(now))
        if dname is None or dname == e.name:
            req.local_decode = True
            req.kv_held += req.output
            e.kv_used += req.output
            e.in_flight_decode += 1
            e.decode_tokens_in_flight += req.prompt + req.output
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
        d.decode_tokens_in_flight += req.prompt + req.output
        d.decode_wait.append(req)
        self._changed(d)
        self._admit_pulls(d, now)

    def _start_local_decode(self, e: Engine, req: SimRequest, now: float) -> None:
        req.first_token = now
        self._sample_ttft(e, req, now)
        if req.output <= 1:
            self._finish(e, req, now)
        else:
            e.join_local(req, req.output - 1, now)

    def _sample_ttft(self, e: Engine, req: SimRequest, now: float) -> None:
        if self.control is not None:
            e.samples_ttft.append((now, now - req.arrival))

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
        self._changed(src)
        self._kick(src, now)  # its queue may have been waiting for KV room
        self._check_drained(src, now)
        d = self.engines[req.decode_worker]
        d.transferring -= 1
        d.ready.append(req)
        self._changed(d)
        self._kick(d, now)

    def _finish(self, e: Engine, req: SimRequest, now: float) -> None:
        req.finish = now
        self._finish_count[req.rid] += 1
        self._finished += 1
        e.kv_used -= req.kv_held
        req.kv_held = 0
        e.in_flight_decode -= 1
        e.decode_tokens_in_flight -= req.prompt + req.output
        e.requests_finished += 1
        if self.control is not None and req.output > 1:
            e.samples_itl.append((now, (now - req.first_token) / (req.output - 1)))
        if self.control is not None:
            self._recent_outputs.append((now, req.output))
        if self._obs_finished is not None:
            self._obs_finished(req.info.request_id)

    def _iteration_end(self, e: Engine, now: float) -> None:
        plan = e.plan
        n = len(e.running)
        prefilled, finished = e.complete(now)
        if self._obs_decode is not None and n and plan is not None and not plan.chunks:
            self._obs_decode(e.name, e.ctx_total, plan.step_s)
        if plan is not None and plan.first_tokens and self.control is not None:
            for req in plan.first_tokens:
                self._sample_ttft(self.engines[req.prefill_worker], req, req.first_token)
        for req in prefilled:
            self._prefill_done(e, req, now)
        for req in finished:
            self._finish(e, req, now)
        if prefilled or finished or (plan is not None and plan.first_tokens):
            self._views.mark(e.idx)
        if finished and e.decode_wait:
            self._admit_pulls(e, now)
        self._kick(e, now)
        if e.pending_role is not None:
            self._check_drained(e, now)

    # ---- control -----------------------------------------------------------------------
    def _worker_metrics(self, e: Engine, now: float, interval: float) -> WorkerMetrics:
        horizon = now - self.config.window_s
        for samples in (e.samples_ttft, e.samples_itl):
            while samples and samples[0][0] < horizon:
                samples.popleft()
        ttft = sorted([s[1] for s in e.samples_ttft]) if e.samples_ttft else None
        itl = sorted([s[1] for s in e.samples_itl]) if e.samples_itl else None
        prev = self._last_counters.get(e.name, (0, 0, 0))
        cur = (e.prompt_tokens_done, e.tokens_generated, e.requests_finished)
        self._last_counters[e.name] = cur
        return WorkerMetrics(
            name=e.name,
            ttft_p50_s=linear_quantile(ttft, 0.5) if ttft else None,
            ttft_p90_s=linear_quantile(ttft, 0.9) if ttft else None,
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
            recent.popleft()
        outputs = self._recent_outputs
        while outputs and outputs[0][0] < horizon:
            outputs.popleft()
        span = min(self.config.window_s, now)
        slo = self.config.slo
        snap = ControlSnapshot(
            time=now, cluster=self.snapshot(now),
            metrics={e.name: self._worker_metrics(e, now, interval) for e in self.engines},
            window_s=self.config.window_s,
            slo=SLOTargets(ttft_s=(slo.ttft_ms or 1000.0) / 1000,
                           tpot_s=(slo.tpot_ms or 100.0) / 1000),
            mean_prompt_tokens=float(np.mean([r[1] for r in recent])) if recent else None,
            mean_output_tokens=float(np.mean([r[1] for r in outputs])) if outputs else None,
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

    def _rewarm(self, e: Engine, now: float) -> None:
        if self.config.flip_rewarm_s > 0:
            e.state = WorkerState.STARTING
            self._push(now + self.config.flip_rewarm_s, FLIP_DONE, e, None)
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
        return events

    # ---- main loop -----------------------------------------------------------------------
    def run(self, trace: Trace) -> SimResult:
        """Simulate the trace to completion (every request finishes or fails once)."""
        wall0 = time.perf_counter()
        cpu0 = time.process_time()
        n = len(trace)
        reqs = [SimRequest(i, float(t), max(1, r.prompt_tokens), max(1, r.output_tokens))
                for i, (t, r) in enumerate(trace)]
        self._finish_count = [0] * n
        self._finished = 0
        self._on_since = {e.idx: 0.0 for e in self.engines if e.state != WorkerState.DEAD}
        self._record_roles(0.0)
        self._seq += 1  # the first arrival's place in the event order
        first_seq = self._seq
        if self.control is not None:
            self._push(self.config.control_interval_s, CONTROL)
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
            prompt_tokens=np.array([r.prompt for r in reqs]),
            output_tokens=np.array([r.output for r in reqs]),
            failed=np.array([r.failed for r in reqs], dtype=bool),
            finish_count=np.array(self._finish_count, dtype=np.int64), roles=self.roles,
            flips=self.flips,
            events=events, wall_s=time.perf_counter() - wall0,
            cpu_s=time.process_time() - cpu0,
            busy_s={e.name: e.busy_s for e in self.engines},
            worker_seconds=self.worker_seconds, scales=self.scales)
