"""Arrow's SLO-aware request dispatch (arXiv 2505.11916 §5.3, Algorithm 1).

Prefill: predicted TTFT on worker i is the time to drain its queued prompts plus this
prompt, `Σ_{queued} T_i(L) + T_i(L_new)` (prefill instances work sequentially, §4.1). Among
workers that meet the TTFT target, the lowest predicted TTFT wins, preferring workers with no
resident decode work (the paper's first cost term).

Decode: predicted TPOT on worker i is one step with the new request resident,
`τ_i(B_i + L_new)`. Among workers under the TPOT target, the lowest predicted TPOT wins,
preferring workers with no queued prefill work. (The paper ranks by headroom
`(B_i + L_new) − MT(i)`; on identical workers that is the same order, but with per-worker
fitted slopes it chases fit noise: in `benchmarks.sim` at 120 req/s, 2P+4D, Llama-3.1-8B/H100
roofline, p90 TPOT was 10.97 ms by headroom vs 9.24 ms by predicted TPOT.) Before that,
decodes pack: the busiest worker (most streams) whose predicted TPOT stays within
`decode_fill` of the target takes the request, so whole decode workers stay idle and free to
change role, and on a host whose cores the workers share, fewer busy engines contend for
them.

A decode worker whose batch slots are all taken (`decode_slots`), or whose KV cache has no
room for the request's footprint (`kv_full` usage, or `kv_tokens` when set), cannot start it
now: the request waits for a slot, about `(queued + 1) · τ · E[OSL] / slots` seconds (one
slot frees every `τ · E[OSL] / slots` on average; with KV full, `slots` is the residents),
and that wait lands in its first
inter-token gap (Arrow §4.3: t2 absorbs the decode queueing). The predicted gap is
`τ + wait`, so a full decode pool misses the target while a full batch's step time alone
would still meet it. E[OSL] is `min(max_tokens, expected_output_tokens)`: the client's cap,
not the true length.

When nothing qualifies, the policy reports `SLOPressure` (the controller may flip a
worker) and falls back to the candidate with the lowest prediction.

The snapshot gives counts and token sums per worker, not each queued prompt's length, so
queued prefill time is estimated as `n · T(tokens / n)` (a lower bound of the true sum,
T being convex).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from core.pressure import PressureLog, PressureSink, SLOPressure
from core.routing import RoutingPolicy
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerView
from router.policies.latency_model import LatencyModelBook, LatencyPriors

if TYPE_CHECKING:
    from core.request import RequestInfo


@dataclass(frozen=True)
class ArrowTargets:
    """Default SLOs in seconds (a request's own `tbt_target_s` overrides the TPOT one)."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1
    decode_slots: int = 256
    """Batch slots per decode worker (vLLM's max_num_seqs); 0 = unlimited."""
    kv_tokens: int = 0
    """KV cache room per worker in tokens (0 = judge by the reported usage alone)."""
    kv_full: float = 0.98
    """A worker reporting at least this KV usage has no room for a new request."""
    expected_output_tokens: float = 256.0
    """Output length assumed for queueing when the request's cap is larger."""
    decode_fill: float = 0.5
    """Decodes pack: the busiest decode worker (most streams) whose predicted TPOT stays
    within this fraction of the target takes the request; past it on every worker, the
    lowest predicted TPOT wins (0 = always that: spread). Packing leaves whole decode
    workers idle, and an idle worker changes role with nothing to drain; where workers
    share a host's cores, each busy decode engine steps on its own and takes CPU from the
    rest, so fewer busy engines serve more. The unused fraction is the margin for contexts
    that grow and outputs longer than expected."""
    min_fit_samples: int = 20
    """A worker whose own model has fewer samples is predicted with the best-fitted
    worker's model (workers of one deployment are alike). With its prior alone, a worker
    that has not yet served a role looks slower than the fitted ones, so lowest-prediction
    routing never sends it work and it never gets the samples to look better (a flipped or
    idle decode worker then sits empty while the others fill their KV caches)."""


class ArrowRouting(RoutingPolicy):
    """SLO-aware dispatch over per-worker latency models fitted online."""

    name = "arrow"

    def __init__(self, targets: ArrowTargets | None = None,
                 priors: LatencyPriors | None = None,
                 pressure_sink: PressureSink | None = None) -> None:
        self.targets = targets or ArrowTargets()
        self.models = LatencyModelBook(priors)
        self.pressure = PressureLog(pressure_sink)

    # -- feeding measured data ------------------------------------------------------
    def pressure_log(self) -> PressureLog:
        return self.pressure

    def use_slo(self, slo: SLOTargets) -> None:
        self.targets = replace(self.targets, ttft_s=slo.ttft_s, tpot_s=slo.tpot_s)

    def observe_prefill(self, worker: str, prompt_tokens: int, seconds: float) -> None:
        """One prefill's compute time on `worker` (queueing excluded)."""
        self.models.prefill(worker).observe(prompt_tokens, seconds)

    def observe_decode(self, worker: str, resident_tokens: int, seconds_per_token: float
                       ) -> None:
        """A finished request's time per output token at `resident_tokens` load."""
        self.models.decode(worker).observe(resident_tokens, seconds_per_token)

    # -- predictions ------------------------------------------------------------------
    def _prefill_model(self, name: str):
        own = self.models.prefill(name)
        if own.samples >= self.targets.min_fit_samples:
            return own
        return self.models.best_fitted("prefill", self.targets.min_fit_samples) or own

    def _decode_model(self, name: str):
        own = self.models.decode(name)
        if own.samples >= self.targets.min_fit_samples:
            return own
        return self.models.best_fitted("decode", self.targets.min_fit_samples) or own

    def predicted_ttft(self, worker: WorkerView, prompt_tokens: int) -> float:
        model = self._prefill_model(worker.name)
        n = worker.in_flight_prefill
        queued = n * model.predict(worker.prefill_tokens_in_flight / n) if n > 0 else 0.0
        return queued + model.predict(prompt_tokens)

    def predicted_tpot(self, worker: WorkerView, prompt_tokens: int,
                       max_tokens: int | None = None) -> float:
        """Predicted first inter-token gap: one step with the request resident, plus the
        wait for a batch slot or KV room when the worker has none free."""
        t = self.targets
        output = min(max_tokens or t.expected_output_tokens, t.expected_output_tokens)
        step = self._decode_model(worker.name).predict(
            worker.decode_tokens_in_flight + prompt_tokens)
        slots = t.decode_slots or worker.in_flight_decode + 1
        queued = worker.in_flight_decode + 1 - slots
        no_room = worker.kv_cache_usage >= t.kv_full or (
            t.kv_tokens > 0
            and worker.decode_tokens_in_flight + prompt_tokens + output > t.kv_tokens)
        if queued <= 0 and not no_room:
            return step
        if no_room:  # KV binds before the slots do: only the residents free room
            slots = min(slots, max(1, worker.in_flight_decode))
        return step + (max(queued, 0) + 1) * step * output / slots

    # -- RoutingPolicy ----------------------------------------------------------------
    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        pool = cluster.routable(Role.PREFILL) or cluster.routable()
        if not pool:
            return None
        target = self.targets.ttft_s
        scored = [(self.predicted_ttft(w, request.prompt_tokens), w) for w in pool]
        feasible = [(ttft, w) for ttft, w in scored if ttft <= target]
        if feasible:
            _, best = min(feasible, key=lambda s: (s[1].decode_tokens_in_flight > 0,
                                                   s[0], s[1].name))
            return best.name
        ttft, best = min(scored, key=lambda s: (s[0], s[1].name))
        self.pressure.report(SLOPressure(Role.PREFILL, request.request_id, best.name,
                                         ttft, target, cluster.taken_at))
        return best.name

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        pool = cluster.decode_candidates(exclude)
        if not pool:
            return None
        target = request.tbt_target_s or self.targets.tpot_s
        predicted = [(self.predicted_tpot(w, request.prompt_tokens, request.max_tokens), w)
                     for w in pool]
        fill = self.targets.decode_fill * target
        packable = [(w.prefill_tokens_in_flight > 0, -w.in_flight_decode, w.name)
                    for tpot, w in predicted if tpot <= fill] if fill > 0 else []
        if packable:
            return min(packable)[2]
        feasible = [(w.prefill_tokens_in_flight > 0, tpot, w.name)
                    for tpot, w in predicted if tpot <= target]
        if feasible:
            return min(feasible)[2]
        tpot, best = min(predicted, key=lambda s: (s[0], s[1].name))
        self.pressure.report(SLOPressure(Role.DECODE, request.request_id, best.name,
                                         tpot, target, cluster.taken_at))
        return best.name
