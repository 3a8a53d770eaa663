"""Routing policies: pick a prefill worker and a decode worker for one request.

A policy subclasses `core.routing.RoutingPolicy`: two pick methods on an immutable
`ClusterSnapshot` and a `RequestInfo`, returning a worker name (or None when nothing
fits), plus the `core.feedback` hooks it learns from. The live gateway and the simulator
drive the very same objects through `router.driver.PolicyDriver`.
"""

from __future__ import annotations

from operator import attrgetter

from core.request import RequestInfo
from core.routing import RoutingPolicy
from core.workers import ClusterSnapshot, Role, WorkerView
from router.policies.ares import AresDecodePolicy
from router.policies.arrow import ArrowRouting
from router.policies.dopd_match import DOPDMatchPolicy

# sort keys as C-level getters (the simulator calls these per request)
_PREFILL_KEY = attrgetter("prefill_tokens_in_flight", "in_flight", "num_waiting", "name")
_DECODE_KEY = attrgetter("in_flight_decode", "decode_tokens_in_flight", "kv_cache_usage", "name")


def _least_loaded(candidates: tuple[WorkerView, ...], leg: Role) -> WorkerView | None:
    if not candidates:
        return None
    return min(candidates, key=_PREFILL_KEY if leg == Role.PREFILL else _DECODE_KEY)


class LeastLoadedPolicy(RoutingPolicy):
    """Baseline: the prefill worker with the fewest queued prompt tokens, the decode
    worker with the fewest running decodes. With no prefill pool it runs aggregated."""

    name = "least-loaded"

    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        chosen = _least_loaded(cluster.routable(Role.PREFILL), Role.PREFILL)
        return chosen.name if chosen else None

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        chosen = _least_loaded(cluster.decode_candidates(exclude), Role.DECODE)
        return chosen.name if chosen else None


POLICIES: dict[str, type[RoutingPolicy]] = {
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    ArrowRouting.name: ArrowRouting,
    DOPDMatchPolicy.name: DOPDMatchPolicy,
    AresDecodePolicy.name: AresDecodePolicy,
}


def make_policy(name: str) -> RoutingPolicy:
    """Build a registered policy by name."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
