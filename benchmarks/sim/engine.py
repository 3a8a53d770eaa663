"""One simulated vLLM-like engine: a prefill queue, a decode batch, KV memory.

Every step is an iteration of a chunked-prefill scheduler: one token for each running
decode plus prompt chunks up to the token budget. While only decodes run and nothing new
arrives, consecutive steps are merged into one "macro step" that ends when the next
request finishes; step time is taken at the batch's mid-run context length (exact for a
linear cost, and within a fraction of a percent for the roofline's max()). New work
interrupts a macro step at the next step boundary, as a real engine would admit it.

KV memory is reserved up front (prompt, plus output for a local decode) and freed when
a request leaves; there is no preemption (documented simplification).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from benchmarks.sim.fastinit import fast_constructor
from benchmarks.sim.perf import PerfModel
from router.cluster import Role, WorkerState, WorkerView

NAN = math.nan
_make_view = fast_constructor(WorkerView, (
    "name", "url", "role", "state", "in_flight_prefill", "in_flight_decode",
    "prefill_tokens_in_flight", "decode_tokens_in_flight", "kv_cache_usage", "num_running",
    "num_waiting"))


class SimRequest:
    """Mutable per-request state inside the simulator."""

    __slots__ = ("rid", "arrival", "prompt", "output", "prefilled", "local_decode",
                 "prefill_worker", "decode_worker", "first_token", "finish", "finish_step",
                 "kv_held", "failed", "info", "prefill_start")

    def __init__(self, rid: int, arrival: float, prompt: int, output: int) -> None:
        self.rid = rid
        self.arrival = arrival
        self.prompt = prompt
        self.output = output
        self.prefilled = 0
        self.local_decode = False
        self.prefill_worker = -1
        self.decode_worker = -1
        self.first_token = NAN
        self.finish = NAN
        self.finish_step = 0
        self.kv_held = 0
        self.failed = False
        self.info = None
        self.prefill_start = NAN


@dataclass
class EngineConfig:
    """vLLM scheduler limits (defaults of vLLM v1 on GPU)."""

    max_num_seqs: int = 256
    token_budget: int = 8192  # max_num_batched_tokens with chunked prefill


@dataclass
class Plan:
    """What the iteration in flight does."""

    start: float
    step_s: float
    steps: int
    chunks: list[tuple[SimRequest, int]] = field(default_factory=list)
    first_tokens: list[SimRequest] = field(default_factory=list)


class Engine:
    """State of one worker; the simulator drives it with `plan` / `complete`."""

    def __init__(self, idx: int, name: str, role: Role, perf: PerfModel,
                 config: EngineConfig) -> None:
        self.idx, self.name, self.role, self.perf, self.config = idx, name, role, perf, config
        self.url = f"sim://{name}"
        self.state = WorkerState.READY
        self.pending_role: Role | None = None
        self.kv_cap = perf.kv_capacity_tokens
        self.kv_used = 0
        self.prefill_queue: deque[SimRequest] = deque()
        self.decode_wait: deque[SimRequest] = deque()   # waiting for KV room to pull
        self.transferring = 0
        self.ready: list[SimRequest] = []                # KV here, join at next boundary
        self.running: list[tuple[int, int, SimRequest]] = []  # heap (finish_step, rid, req)
        self.step = 0
        self.ctx_offset = 0   # sum(ctx_at_join - step_at_join) over running
        self.plan: Plan | None = None
        self.version = 0
        # router-visible counters (like router.cluster.Cluster.begin/end)
        self.in_flight_prefill = 0
        self.in_flight_decode = 0
        self.prefill_tokens_in_flight = 0
        self.decode_tokens_in_flight = 0
        self._view: WorkerView | None = None
        # windowed observations for control policies
        self.samples_ttft: deque[tuple[float, float]] = deque()
        self.samples_itl: deque[tuple[float, float]] = deque()
        self.prompt_tokens_done = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.busy_s = 0.0

    # ---- views -------------------------------------------------------------------------
    def touch(self) -> None:
        self._view = None

    def view(self) -> WorkerView:
        v = self._view
        if v is None:
            v = self._view = _make_view(
                self.name, self.url, self.role, self.state, self.in_flight_prefill,
                self.in_flight_decode, self.prefill_tokens_in_flight,
                self.decode_tokens_in_flight,
                self.kv_used / self.kv_cap if self.kv_cap else 1.0,
                len(self.running), len(self.prefill_queue) + len(self.decode_wait))
        return v

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def ctx_total(self) -> int:
        return self.ctx_offset + len(self.running) * self.step

    def idle(self) -> bool:
        return (not self.prefill_queue and not self.running and not self.ready
                and not self.decode_wait and self.transferring == 0)

    def has_role_work(self, role: Role) -> bool:
        if role == Role.PREFILL:
            return self.in_flight_prefill > 0
        return self.in_flight_decode > 0

    # ---- planning ----------------------------------------------------------------------
    def _join(self, req: SimRequest, steps: int) -> None:
        heapq.heappush(self.running, (self.step + steps, req.rid, req))
        req.finish_step = self.step + steps
        self.ctx_offset += req.prompt + req.output - steps - self.step

    def start(self, now: float) -> Plan | None:
        """Plan the next iteration at a step boundary (None: nothing to do)."""
        first: list[SimRequest] = []
        if self.ready:
            for req in self.ready:
                self._join(req, req.output)
                first.append(req)
            self.ready = []
        cfg = self.config
        n = len(self.running)
        budget = cfg.token_budget - n
        chunks: list[tuple[SimRequest, int]] = []
        pairs = 0.0
        tokens = 0
        seqs = n
        for req in self.prefill_queue:
            if budget <= 0 or seqs >= cfg.max_num_seqs:
                break
            if req.prefilled == 0 and req.kv_held == 0:
                need = req.prompt + (req.output if req.local_decode else 0)
                if self.kv_used + need > self.kv_cap:
                    break
                self.kv_used += need
                req.kv_held = need
                req.prefill_start = now
            chunk = min(req.prompt - req.prefilled, budget)
            chunks.append((req, chunk))
            pairs += chunk * (req.prefilled + chunk / 2)
            tokens += chunk
            budget -= chunk
            seqs += 1
        if chunks:
            step_s = self.perf.iteration_time(tokens, pairs, n, self.ctx_total)
            self.plan = Plan(now, step_s, 1, chunks, first)
        elif n:
            k = self.running[0][0] - self.step
            ctx_mid = self.ctx_total + n * (k - 1) / 2
            step_s = self.perf.iteration_time(0, 0.0, n, ctx_mid)
            self.plan = Plan(now, step_s, k, chunks, first)
        else:
            self.plan = None
        if self.plan is not None:
            self.version += 1
        return self.plan

    def interrupt(self, now: float) -> float | None:
        """Shorten a macro step to end at the first step boundary after `now`; returns
        the new end time, or None if the plan already ends at that boundary."""
        p = self.plan
        if p is None or p.steps <= 1:
            return None
        done = int((now - p.start) / p.step_s) + 1 if p.step_s > 0 else 1
        if done >= p.steps:
            return None
        p.steps = done
        self.version += 1
        return p.start + done * p.step_s

    def complete(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Finish the plan in flight: returns (prefills completed, decodes finished)."""
        p = self.plan
        assert p is not None
        self.plan = None
        self.busy_s += now - p.start
        n = len(self.running)
        self.step += p.steps
        self.tokens_generated += n * p.steps
        first_at = p.start + p.step_s
        for req in p.first_tokens:
            req.first_token = first_at
        prefilled: list[SimRequest] = []
        for req, chunk in p.chunks:
            req.prefilled += chunk
            self.prompt_tokens_done += chunk
            if req.prefilled >= req.prompt:
                prefilled.append(req)
        for _ in prefilled:  # chunks are taken from the head, so finished ones lead
            self.prefill_queue.popleft()
        finished: list[SimRequest] = []
        running = self.running
        while running and running[0][0] <= self.step:
            _, _, req = heapq.heappop(running)
            self.ctx_offset -= req.prompt + req.output - req.finish_step  # undo _join
            req.finish = now
            finished.append(req)
        return prefilled, finished

    def join_local(self, req: SimRequest, steps: int, first_token_at: float | None) -> None:
        """Start decoding a request whose KV is already here (joins at this boundary)."""
        if first_token_at is not None:
            req.first_token = first_token_at
            self._join(req, steps)
        else:
            self.ready.append(req)
