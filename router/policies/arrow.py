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
roofline, p90 TPOT was 10.97 ms by headroom vs 9.24 ms by predicted TPOT.)

When nothing qualifies, the policy reports `SLOPressure` (the controller may flip a
worker) and falls back to the candidate with the lowest prediction.

The snapshot gives counts and token sums per worker, not each queued prompt's length, so
queued prefill time is estimated as `n · T(tokens / n)` (a lower bound of the true sum,
T being convex).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.routing import RoutingPolicy
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerView
from router.policies.latency_model import LatencyModelBook, LatencyPriors
from router.policies.signals import PressureLog, PressureSink, SLOPressure

if TYPE_CHECKING:
    from core.request import RequestInfo


@dataclass(frozen=True)
class ArrowTargets:
    """Default SLOs in seconds (a request's own `tbt_target_s` overrides the TPOT one)."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1


class ArrowPolicy(RoutingPolicy):
    """SLO-aware dispatch over per-worker latency models fitted online."""

    name = "arrow"

    def __init__(self, targets: ArrowTargets | None = None,
                 priors: LatencyPriors | None = None,
                 pressure_sink: PressureSink | None = None) -> None:
        self.targets = targets or ArrowTargets()
        self.models = LatencyModelBook(priors)
        self.pressure = PressureLog(pressure_sink)

    # -- feeding measured data ------------------------------------------------------
    def use_slo(self, slo: SLOTargets) -> None:
        self.targets = ArrowTargets(ttft_s=slo.ttft_s, tpot_s=slo.tpot_s)

    def observe_prefill(self, worker: str, prompt_tokens: int, seconds: float) -> None:
        """One prefill's compute time on `worker` (queueing excluded)."""
        self.models.prefill(worker).observe(prompt_tokens, seconds)

    def observe_decode(self, worker: str, resident_tokens: int, seconds_per_token: float
                       ) -> None:
        """A finished request's time per output token at `resident_tokens` load."""
        self.models.decode(worker).observe(resident_tokens, seconds_per_token)

    # -- predictions ------------------------------------------------------------------
    def predicted_ttft(self, worker: WorkerView, prompt_tokens: int) -> float:
        model = self.models.prefill(worker.name)
        n = worker.in_flight_prefill
        queued = n * model.predict(worker.prefill_tokens_in_flight / n) if n > 0 else 0.0
        return queued + model.predict(prompt_tokens)

    def predicted_tpot(self, worker: WorkerView, prompt_tokens: int) -> float:
        return self.models.decode(worker.name).predict(
            worker.decode_tokens_in_flight + prompt_tokens)

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
        feasible = []
        for w in pool:
            tpot = self.predicted_tpot(w, request.prompt_tokens)
            if tpot <= target:
                feasible.append((w.prefill_tokens_in_flight > 0, tpot, w.name))
        if feasible:
            return min(feasible)[2]
        tpot, best = min(((self.predicted_tpot(w, request.prompt_tokens), w) for w in pool),
                         key=lambda s: (s[0], s[1].name))
        self.pressure.report(SLOPressure(Role.DECODE, request.request_id, best.name,
                                         tpot, target, cluster.taken_at))
        return best.name
