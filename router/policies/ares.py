"""ARES-style decode balancing on predicted remaining work (arXiv 2510.13668).

`AresDecodePolicy` places a decode on the worker with the least *current + predicted
future* tokens: resident tokens from the snapshot plus the predicted remaining output of
every request it already placed there, plus the new request's own prompt and predicted
output. The gateway (or simulator) feeds progress with `observe_progress` and completion with
`observe_finished`; the predictor's refresh keeps each estimate current.

`MigrationPlanner` is the decision half of rebalancing, a pure function of per-worker
resident requests: which request to move, from where, to where, and only when the predicted
decode time saved beats the migration cost. Nothing here performs a migration. The cost is
priced as what the gateway's migration does, a recompute of the context on the target
(`RecomputeCost`); `MigrationCost` prices a KV pull instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from core.feedback import ResidentRequest
from core.routing import RoutingPolicy
from core.workers import ClusterSnapshot, Role
from router.length_predictor import (
    LengthTracker,
    PromptFeatures,
    RemainingLengthPredictor,
    load_default_predictor,
)
from router.policies.latency_model import PrefillLatencyModel

if TYPE_CHECKING:
    from core.request import RequestInfo


@dataclass
class _Placed:
    worker: str
    tracker: LengthTracker
    max_tokens: int | None
    migrations: int = 0
    counted: float = 0.0  # what this request adds to its worker's running total

    @property
    def predicted_remaining(self) -> float:
        if self.max_tokens is None:
            return self.tracker.estimate
        return min(self.tracker.estimate, max(0, self.max_tokens - self.tracker.generated))


class AresDecodePolicy(RoutingPolicy):
    """Decode placement by current + predicted remaining tokens; prefill least-loaded."""

    name = "ares"

    def __init__(self, predictor: RemainingLengthPredictor | None = None) -> None:
        self.predictor = predictor if predictor is not None else load_default_predictor()
        self._placed: dict[str, _Placed] = {}
        self._future: dict[str, float] = {}  # worker -> Σ predicted remaining, kept current

    def _place(self, request_id: str, placed: _Placed) -> None:
        self._placed[request_id] = placed
        placed.counted = placed.predicted_remaining
        self._future[placed.worker] = self._future.get(placed.worker, 0.0) + placed.counted

    def _unplace(self, request_id: str) -> _Placed | None:
        placed = self._placed.pop(request_id, None)
        if placed is not None:
            left = self._future[placed.worker] - placed.counted
            self._future[placed.worker] = left if left > 1e-6 else 0.0  # no float dust
        return placed

    # -- feeding progress -------------------------------------------------------------
    def observe_progress(self, request_id: str, generated_so_far: int) -> None:
        placed = self._placed.get(request_id)
        if placed is not None:
            placed.tracker.refresh(generated_so_far)
            now = placed.predicted_remaining
            self._future[placed.worker] += now - placed.counted
            placed.counted = now

    def observe_finished(self, request_id: str) -> None:
        self._unplace(request_id)

    def predicted_future_tokens(self, worker: str) -> float:
        """Σ predicted remaining output tokens of the requests this policy placed on worker
        (a running total, updated as requests are placed, refreshed, moved or finished)."""
        return self._future.get(worker, 0.0)

    def residents(self) -> dict[str, list[ResidentRequest]]:
        """This policy's placed requests grouped by worker, for `MigrationPlanner.decide`."""
        out: dict[str, list[ResidentRequest]] = {}
        for rid, p in self._placed.items():
            ctx = p.tracker.prompt.prompt_tokens + p.tracker.generated
            out.setdefault(p.worker, []).append(
                ResidentRequest(rid, ctx, p.predicted_remaining, p.migrations))
        return out

    def observe_migrated(self, request_id: str, target: str) -> None:
        """A migration was carried out: the request now lives on `target`."""
        placed = self._unplace(request_id)
        if placed is not None:
            placed.worker = target
            placed.migrations += 1
            self._place(request_id, placed)

    def _features(self, request: RequestInfo) -> PromptFeatures:
        return PromptFeatures(request.prompt_tokens, request.prompt_text)

    # -- RoutingPolicy ----------------------------------------------------------------
    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        pool = cluster.routable(Role.PREFILL)
        if not pool:
            return None
        return min(pool, key=lambda w: (w.prefill_tokens_in_flight, w.in_flight, w.name)).name

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        pool = cluster.decode_candidates(exclude)
        if not pool:
            return None
        best = min(pool, key=lambda w: (
            w.decode_tokens_in_flight + self.predicted_future_tokens(w.name),
            w.in_flight_decode, w.name))
        tracker = LengthTracker(self.predictor, self._features(request))
        self._unplace(request.request_id)  # a re-placed id (retry) is counted once
        self._place(request.request_id, _Placed(best.name, tracker, request.max_tokens))
        return best.name


# ---------------------------------------------------------------------------------------
# Migration decision (design only: the mechanism is a later step)


@dataclass(frozen=True)
class MigrationCost:
    """A KV pull: the moved request stalls a fixed part plus a per-context-token part (the
    transfer at a measured bandwidth); the target computes nothing, so its residents do not
    stall."""

    fixed_s: float = 0.05
    per_token_s: float = 2e-5

    def seconds(self, context_tokens: int, target_residents: int = 0) -> float:
        return self.fixed_s + self.per_token_s * context_tokens


@dataclass(frozen=True)
class RecomputeCost:
    """A migration that re-prefills the context on the target (what the gateway does
    today: the stream is resubmitted there with prompt + generated tokens). The moved
    request stalls for the prefill `T(ctx)`, and every request already decoding on the
    target shares its iterations with that prefill, so each is delayed about as long:
    `fixed + T(ctx) · (1 + target residents)` request-seconds, the units of the gain."""

    prefill: PrefillLatencyModel = field(default_factory=PrefillLatencyModel)
    fixed_s: float = 0.05

    def seconds(self, context_tokens: int, target_residents: int = 0) -> float:
        return self.fixed_s + self.prefill.predict(context_tokens) * (1 + target_residents)


class PricesMigration(Protocol):
    def seconds(self, context_tokens: int, target_residents: int = 0) -> float: ...


@dataclass(frozen=True)
class MigrationConfig:
    horizon_steps: int = 256        # H: how far ahead predicted load counts
    imbalance_trigger: float = 0.25  # act only if max W > (1 + this) · mean W
    min_remaining: float = 64.0     # never move a request about to finish
    max_migrations_per_request: int = 1
    gain_margin: float = 1.0        # require gain > margin · cost


@dataclass(frozen=True)
class MigrationDecision:
    request_id: str
    source: str
    target: str
    gain_s: float
    cost_s: float


StepTime = Callable[[str, float], float]
"""(worker, resident tokens) -> seconds per decode step, e.g. a DecodeLatencyModel."""


class MigrationPlanner:
    """Picks at most one (request, source, target) move per call, or None.

    Predicted load over the horizon: `W_i = Σ_r ctx_r + min(H, R̂_r)`. The hottest worker is
    the source, the coolest the target. Moving r for h = min(H, R̂_r) steps saves, per step,
    the step-time drop for the n_s − 1 requests left on the source plus r's own
    `τ_s(W_s) − τ_d(W_d + w_r)`, minus the step-time rise for the n_d requests on the target.
    The best positive `gain − cost` that clears `gain_margin` wins; the cost is in the same
request-seconds (see `RecomputeCost`).
    """

    def __init__(self, step_time: StepTime, cost: PricesMigration | None = None,
                 config: MigrationConfig | None = None) -> None:
        self.step_time = step_time
        self.cost: PricesMigration = cost or RecomputeCost()
        self.config = config or MigrationConfig()

    def load(self, requests: Sequence[ResidentRequest]) -> float:
        h = self.config.horizon_steps
        return float(sum(r.context_tokens + min(h, r.predicted_remaining) for r in requests))

    def gain_seconds(self, r: ResidentRequest, source: str, target: str,
                     w_src: float, n_src: int, w_dst: float, n_dst: int) -> float:
        steps = min(self.config.horizon_steps, r.predicted_remaining)
        weight = r.context_tokens + steps
        tau = self.step_time
        src_before, src_after = tau(source, w_src), tau(source, w_src - weight)
        dst_before, dst_after = tau(target, w_dst), tau(target, w_dst + weight)
        per_step = ((n_src - 1) * (src_before - src_after)
                    + (src_before - dst_after)
                    - n_dst * (dst_after - dst_before))
        return steps * per_step

    def decide(self, residents: Mapping[str, Sequence[ResidentRequest]]
               ) -> MigrationDecision | None:
        if len(residents) < 2:
            return None
        loads = {w: self.load(rs) for w, rs in residents.items()}
        mean = sum(loads.values()) / len(loads)
        source = max(loads, key=lambda w: (loads[w], w))
        target = min(loads, key=lambda w: (loads[w], w))
        if mean <= 0 or loads[source] <= (1 + self.config.imbalance_trigger) * mean:
            return None
        cfg = self.config
        best: MigrationDecision | None = None
        for r in residents[source]:
            if (r.predicted_remaining < cfg.min_remaining
                    or r.migrations >= cfg.max_migrations_per_request):
                continue
            gain = self.gain_seconds(r, source, target, loads[source], len(residents[source]),
                                     loads[target], len(residents[target]))
            cost = self.cost.seconds(r.context_tokens, len(residents[target]))
            if gain <= cfg.gain_margin * cost:
                continue
            if best is None or gain - cost > best.gain_s - best.cost_s:
                best = MigrationDecision(r.request_id, source, target, gain, cost)
        return best


__all__ = [
    "AresDecodePolicy",
    "MigrationConfig",
    "MigrationCost",
    "MigrationDecision",
    "MigrationPlanner",
    "RecomputeCost",
]
