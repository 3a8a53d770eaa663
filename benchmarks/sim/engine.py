"""One simulated vLLM-like engine: a prefill queue, a decode batch, KV memory.

Every step is an iteration of a chunked-prefill scheduler: one token for each running
decode plus prompt chunks up to the token budget. While only decodes run and nothing new
arrives, consecutive steps are merged into one "macro step" that ends when the next
request finishes; step time is taken at the batch's mid-run context length (exact for a
linear cost, and within a fraction of a percent for the roofline's max()). New work
interrupts a macro step at the next step boundary, as a real engine would admit it.

Per-token timing: every decode in an iteration gets one token at its end, so a request's
inter-token gaps are the step times of the iterations it ran in. Each engine counts the
steps slower than the time-between-tokens target (`tbt_limit_s`) as it goes; a request
reads the counter when it joins and when it leaves, which gives its slow gaps exactly at
O(1) cost, macro steps included. The gap log (end time, step time, gaps) feeds the ITL
percentiles. A prefill chunk sharing a step stretches that step for every decode in it,
which is how a stall behind a long prompt shows up.

KV memory is reserved up front (prompt, plus output for a local decode) and freed when
a request leaves; there is no preemption (documented simplification).

Waiting prefills are admitted first come, first served, or, with `EngineConfig.slai`, in
the order of SLAI's `waiting_key` (shortest prompt first, with aging): the very function
the vLLM scheduler plugin sorts its waiting queue by. A prefill already admitted (KV
reserved, chunks under way) keeps its place ahead of every waiting one, as in vLLM's
running list. SLAI's decode deadlines change nothing here: this engine runs every
resident decode in every step (the token budget always covers them), so there is no
decode order to choose.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.sim.perf import PerfModel
from core.workers import Role, WorkerState
from instance_manager.engine_plugins.slai_policy import SLAIConfig, waiting_key

NAN = math.nan
_heappush, _heappop = heapq.heappush, heapq.heappop
_NO_CHUNKS: list = []  # shared, never mutated: a decode-only plan's chunks
_NONE: tuple = ()


class SimRequest:
    """Mutable per-request state inside the simulator."""

    __slots__ = ("rid", "arrival", "prompt", "output", "prefilled", "local_decode",
                 "prefill_worker", "decode_worker", "first_token", "finish", "finish_step",
                 "kv_held", "failed", "info", "prefill_start", "max_tokens", "text", "moved",
                 "prefill_done", "slow0", "first_step_slow", "slow_gaps", "decode_tokens")

    def __init__(self, rid: int, arrival: float, prompt: int, output: int,
                 max_tokens: int | None = None, text: str | None = None) -> None:
        self.rid = rid
        self.arrival = arrival
        self.prompt = prompt
        self.output = output  # the hidden true length: only the engine reads it
        self.max_tokens = max_tokens  # what the client sent as its cap
        self.text = text
        self.moved = 0  # tokens generated before a migration (now part of `prompt`)
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
        self.prefill_done = NAN  # end of the prefill leg (before KV transfer)
        self.slow0 = 0           # engine's slow-step counter when decoding started
        # slow steps on its engine's counter that end none of its gaps: its P/D first step
        # if slow, minus the slow gaps it had on the worker it moved from (KV moves)
        self.first_step_slow = 0
        self.slow_gaps = 0       # inter-token gaps above the tbt target
        self.decode_tokens = 0   # its RequestInfo.decode_tokens, set at arrival


@dataclass
class EngineConfig:
    """vLLM scheduler limits (defaults of vLLM v1 on GPU)."""

    # vLLM's defaults for the OpenAI server on a >= 70 GiB GPU that is not an A100 (H100,
    # H200): max_num_seqs 1024, max_num_batched_tokens 8192 (EngineArgs._set_default_args).
    max_num_seqs: int = 1024
    token_budget: int = 8192  # max_num_batched_tokens with chunked prefill
    slai: SLAIConfig | None = None  # None: FCFS admission of waiting prefills


class Plan:
    """What the iteration in flight does (`steps` > 1: a merged decode-only macro step).

    `first_tokens` are the requests joining the batch in it; the step gives each its first
    token, except a stream whose KV moved here mid-stream (`moved` > 0)."""

    __slots__ = ("start", "step_s", "steps", "chunks", "first_tokens")

    def __init__(self, start: float, step_s: float, steps: int,
                 chunks: list[tuple[SimRequest, int]], first_tokens: list[SimRequest]) -> None:
        self.start = start
        self.step_s = step_s
        self.steps = steps
        self.chunks = chunks
        self.first_tokens = first_tokens


class Engine:
    """State of one worker; the simulator drives it with `plan` / `complete`."""

    def __init__(self, idx: int, name: str, role: Role, perf: PerfModel,
                 config: EngineConfig) -> None:
        self.idx, self.name, self.role, self.perf, self.config = idx, name, role, perf, config
        self._step_time = perf.iteration_time
        self.url = f"sim://{name}"
        self.state = WorkerState.READY
        self.pending_role: Role | None = None
        self.kv_cap = perf.kv_capacity_tokens
        self.kv_used = 0
        self.prefill_queue: deque[SimRequest] = deque()  # admitted first, then FCFS waiting
        self.slai = config.slai
        self.slai_waiting: list[tuple[tuple, int, SimRequest]] = []  # heap by waiting_key
        self.decode_wait: deque[SimRequest] = deque()   # waiting for KV room to pull
        self.transferring = 0
        self.retiring = False  # draining to be switched off (a scale-down)
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
        # windowed observations for control policies
        self.samples_ttft: deque[tuple[float, float]] = deque()
        self.samples_itl: deque[tuple[float, float]] = deque()
        # the same samples' values kept sorted as they come and go (no sort per tick)
        self.sorted_ttft: list[float] = []
        self.sorted_itl: list[float] = []
        self.prompt_tokens_done = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.busy_s = 0.0
        # per-token timing (see module doc)
        self.tbt_limit_s = math.inf
        self.slow_steps = 0
        # (end, step_s, gaps) rows, flattened: one list extend per iteration
        self.gap_log: list[float] = []

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def ctx_total(self) -> int:
        return self.ctx_offset + len(self.running) * self.step

    def idle(self) -> bool:
        return (not self.prefill_queue and not self.slai_waiting and not self.running
                and not self.ready and not self.decode_wait and self.transferring == 0)

    @property
    def num_waiting_prefills(self) -> int:
        return len(self.prefill_queue) + len(self.slai_waiting)

    def enqueue_prefill(self, req: SimRequest, now: float) -> None:
        """A prompt arrives at this engine's waiting queue."""
        if self.slai is None:
            self.prefill_queue.append(req)
        else:
            key = waiting_key(req.prompt, now, self.slai.default_tbt_s, self.slai)
            _heappush(self.slai_waiting, (key, req.rid, req))

    def has_role_work(self, role: Role) -> bool:
        if role == Role.PREFILL:
            return self.in_flight_prefill > 0
        return self.in_flight_decode > 0

    # ---- planning ----------------------------------------------------------------------
    def _join(self, req: SimRequest, steps: int) -> None:
        req.slow0 = self.slow_steps
        heapq.heappush(self.running, (self.step + steps, req.rid, req))
        req.finish_step = self.step + steps
        self.ctx_offset += req.prompt + req.output - steps - self.step

    def start(self, now: float) -> Plan | None:
        """Plan the next iteration at a step boundary (None: nothing to do)."""
        running = self.running
        first = self.ready
        if not first:
            first = _NONE  # never the live `ready` list: join_local appends to that
        else:
            step = self.step
            offset = self.ctx_offset
            slow = self.slow_steps
            for req in first:
                req.slow0 = slow
                finish_step = step + req.output
                _heappush(running, (finish_step, req.rid, req))
                req.finish_step = finish_step
                offset += req.prompt - step  # _join with steps = output
            self.ctx_offset = offset
            self.ready = []
        n = len(running)
        queue = self.prefill_queue
        if self.slai_waiting:
            self._admit_slai(n)
        if queue:
            cfg = self.config
            budget = cfg.token_budget - n
            max_seqs = cfg.max_num_seqs
            chunks: list[tuple[SimRequest, int]] = []
            pairs = 0.0
            tokens = 0
            seqs = n
            kv_used, kv_cap = self.kv_used, self.kv_cap
            for req in queue:
                if budget <= 0 or seqs >= max_seqs:
                    break
                prefilled = req.prefilled
                if prefilled == 0 and req.kv_held == 0:
                    need = req.prompt + (req.output if req.local_decode else 0)
                    if kv_used + need > kv_cap:
                        break
                    kv_used += need
                    req.kv_held = need
                    req.prefill_start = now
                chunk = req.prompt - prefilled
                if chunk > budget:
                    chunk = budget
                chunks.append((req, chunk))
                pairs += chunk * (prefilled + chunk / 2)
                tokens += chunk
                budget -= chunk
                seqs += 1
            self.kv_used = kv_used
            if chunks:
                step_s = self._step_time(tokens, pairs, n,
                                                  self.ctx_offset + n * self.step)
                plan = self.plan = Plan(now, step_s, 1, chunks, first)
                self.version += 1
                return plan
        if n:
            k = running[0][0] - self.step
            ctx_mid = self.ctx_offset + n * self.step + n * (k - 1) / 2
            step_s = self._step_time(0, 0.0, n, ctx_mid)
            plan = self.plan = Plan(now, step_s, k, _NO_CHUNKS, first)
            self.version += 1
            return plan
        self.plan = None
        return None

    def _admit_slai(self, n_running: int) -> None:
        """Move waiting prefills, best SLAI key first, behind the admitted ones while this
        step has tokens and sequence slots for them (KV room is checked when planning)."""
        cfg = self.config
        budget = cfg.token_budget - n_running
        seqs = n_running
        kv_free = self.kv_cap - self.kv_used
        for req in self.prefill_queue:
            budget -= req.prompt - req.prefilled
            seqs += 1
            if req.kv_held == 0:
                kv_free -= req.prompt + (req.output if req.local_decode else 0)
        waiting = self.slai_waiting
        while waiting and budget > 0 and seqs < cfg.max_num_seqs:
            req = waiting[0][2]
            need = req.prompt + (req.output if req.local_decode else 0)
            if need > kv_free:  # vLLM stops admitting when the head cannot get blocks
                break
            _heappop(waiting)
            self.prefill_queue.append(req)
            kv_free -= need
            budget -= req.prompt
            seqs += 1

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

    def complete(self, now: float) -> tuple[Sequence[SimRequest], Sequence[SimRequest]]:
        """Finish the plan in flight: returns (prefills completed, decodes finished)."""
        p = self.plan
        assert p is not None
        self.plan = None
        self.busy_s += now - p.start
        running = self.running
        steps = p.steps
        step = self.step = self.step + steps
        n_tokens = len(running) * steps
        self.tokens_generated += n_tokens
        slow = p.step_s > self.tbt_limit_s
        if slow:
            self.slow_steps += steps
        if p.first_tokens:
            first_at = p.start + p.step_s
            firsts = 0
            for req in p.first_tokens:
                if req.moved:  # KV moved in: its first token was streamed before the move
                    continue
                req.first_token = first_at
                req.first_step_slow = slow
                firsts += 1
            n_tokens -= firsts  # a first token ends no gap
        if n_tokens > 0:
            self.gap_log.extend((now, p.step_s, n_tokens))
        prefilled: list[SimRequest] | tuple = _NONE  # shared empty: callers only read
        if p.chunks:
            prefilled = []
            done = 0
            for req, chunk in p.chunks:
                req.prefilled += chunk
                done += chunk
                if req.prefilled >= req.prompt:
                    prefilled.append(req)
            self.prompt_tokens_done += done
            queue = self.prefill_queue
            for _ in prefilled:  # chunks are taken from the head, so finished ones lead
                queue.popleft()
        finished: list[SimRequest] | tuple = _NONE
        if running and running[0][0] <= step:
            finished = []
            offset = self.ctx_offset
            slow_now = self.slow_steps
            while running and running[0][0] <= step:
                req = _heappop(running)[2]
                offset -= req.prompt + req.output - req.finish_step  # undo _join
                req.finish = now
                req.slow_gaps = slow_now - req.slow0 - req.first_step_slow
                finished.append(req)
            self.ctx_offset = offset
        return prefilled, finished

    def evict(self, req: SimRequest, keep_kv: bool = False) -> int:
        """Take a running decode out at this step boundary (no plan in flight), freeing its
        KV unless `keep_kv` (a KV move: freed when the target's pull is done); returns the
        tokens it generated so far in this run, or -1 if it is not running here."""
        running = self.running
        i = next((k for k, entry in enumerate(running) if entry[2] is req), -1)
        if i < 0:
            return -1
        running[i] = running[-1]
        running.pop()
        heapq.heapify(running)
        self.ctx_offset -= req.prompt + req.output - req.finish_step  # undo _join
        if not keep_kv:
            self.kv_used -= req.kv_held
            req.kv_held = 0
        return req.output - (req.finish_step - self.step)

    def join_local(self, req: SimRequest, steps: int, first_token_at: float | None) -> None:
        """Start decoding a request whose KV is already here (joins at this boundary)."""
        if first_token_at is not None:
            req.first_token = first_token_at
            self._join(req, steps)
        else:
            self.ready.append(req)
