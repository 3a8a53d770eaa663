"""SLAI inside vLLM 0.32: a scheduler class each worker loads through `--scheduler-cls`.

    --scheduler-cls instance_manager.engine_plugins.slai_scheduler.SLAIAsyncScheduler
    --additional-config '{"slai": {"theta": 10, "aging_tokens_per_s": 100}}'

(`SLAIScheduler` is the same on top of the synchronous `Scheduler`, for
`--no-async-scheduling`; vLLM enables async scheduling by default.) The repository root
must be on the engine's `PYTHONPATH`.

What changes relative to vLLM's FCFS scheduler, and nothing else:
- the waiting queues become shortest-prompt-first with aging (`slai_policy.waiting_key`);
- before each step the running list is ordered critical decodes (by deadline), then
  unfinished prefills, then non-critical decodes, so a tight token budget goes to the
  decodes about to miss their TBT target; with `defer_noncritical`, non-critical decodes
  sit out a step while prefills wait;
- batch times and each request's previous-batch end are measured to compute deadlines.

Per-request TBT targets: send `"vllm_xargs": {"tbt_tier": "strict"}` or
`{"tbt_ms": 100}` in the OpenAI request body; vLLM forwards them as
`SamplingParams.extra_args`.
"""

from __future__ import annotations

import time
from collections import deque

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from instance_manager.engine_plugins.slai_policy import (
    BatchTimer,
    KeyedQueue,
    RunningItem,
    SLAIConfig,
    running_order_key,
    waiting_key,
)

logger = init_logger("vllm.fulcrum.slai")


class SLAIWaitingQueue(KeyedQueue[Request], RequestQueue):
    """vLLM's RequestQueue served shortest-prompt-first with aging."""


class SLAIMixin:
    """The SLAI behaviour; mixed in front of vLLM's Scheduler or AsyncScheduler."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        extra = self.vllm_config.additional_config
        self.slai = SLAIConfig.from_mapping(
            extra.get("slai") if isinstance(extra, dict) else None)
        self.waiting = SLAIWaitingQueue(self._waiting_key)
        self.kv_holding_waiting = SLAIWaitingQueue(self._waiting_key)
        self.batch_timer = BatchTimer()
        self._tbt_s: dict[str, float] = {}
        self._prev_batch_end: dict[str, float] = {}
        self._step_starts: deque[float] = deque()
        self._last_update_end = 0.0
        self.admission_log: deque[tuple[str, int, float]] = deque(maxlen=1024)
        logger.info("SLAI scheduler active: %s", self.slai)

    # -- per-request targets ------------------------------------------------------------
    def _tbt_of(self, request: Request) -> float:
        tbt = self._tbt_s.get(request.request_id)
        if tbt is None:
            params = request.sampling_params
            tbt = self.slai.tbt_target(params.extra_args if params is not None else None)
            self._tbt_s[request.request_id] = tbt
        return tbt

    def _waiting_key(self, request: Request) -> tuple:
        return waiting_key(request.num_tokens, request.arrival_time, self._tbt_of(request),
                           self.slai)

    # -- ordering and deferral ------------------------------------------------------------
    def _order_running(self, now: float) -> None:
        theta = self.slai.theta_for(self.get_kv_cache_usage())
        mean = self.batch_timer.mean_s
        keys = {}
        for r in self.running:
            item = RunningItem(prefilling=r.num_computed_tokens < r.num_prompt_tokens,
                               prev_batch_end=self._prev_batch_end.get(r.request_id),
                               tbt_s=self._tbt_of(r))
            keys[r.request_id] = running_order_key(item, now, theta, mean)
        self.running.sort(key=lambda r: keys[r.request_id])
        if self.slai.defer_noncritical and (self.waiting or self.kv_holding_waiting):
            for r in self.running:
                if keys[r.request_id][0] == 2:
                    # schedule() increments current_step first: skip exactly that step.
                    r.next_decode_eligible_step = max(r.next_decode_eligible_step,
                                                      self.current_step + 2)

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        now = time.monotonic()
        self._order_running(now)
        waiting_before = {r.request_id for r in self.waiting}
        output = super().schedule(*args, **kwargs)
        if output.total_num_scheduled_tokens > 0:
            self._step_starts.append(time.monotonic())
        for r in self.running:
            if r.request_id in waiting_before:
                self.admission_log.append((r.request_id, r.num_prompt_tokens, self._tbt_of(r)))
                if self.slai.log_admissions:
                    logger.info("SLAI admit prompt_tokens=%d tbt_s=%.3f waiting=%d",
                                r.num_prompt_tokens, self._tbt_of(r), len(self.waiting))
        return output

    # -- measurements ---------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if scheduler_output.total_num_scheduled_tokens > 0:
            end = time.monotonic()
            if self._step_starts:
                start = max(self._step_starts.popleft(), self._last_update_end)
                self.batch_timer.add(end - start)
            self._last_update_end = end
            for req_id in scheduler_output.num_scheduled_tokens:
                if req_id in self.requests:
                    self._prev_batch_end[req_id] = end
        if len(self._tbt_s) > 2 * len(self.requests) + 64:
            self._tbt_s = {k: v for k, v in self._tbt_s.items() if k in self.requests}
            self._prev_batch_end = {k: v for k, v in self._prev_batch_end.items()
                                    if k in self.requests}
        return outputs


class SLAIScheduler(SLAIMixin, Scheduler):
    """SLAI on vLLM's synchronous scheduler (use with `--no-async-scheduling`)."""


class SLAIAsyncScheduler(SLAIMixin, AsyncScheduler):
    """SLAI on vLLM's async scheduler (vLLM's default mode)."""
