"""The routing policy interface: pick a prefill worker and a decode worker for a request.

A policy is a small class: two pick methods on an immutable `ClusterSnapshot` and a
`RequestInfo`, plus whichever `PolicyFeedback` hooks it learns from. The live gateway and
the simulator drive the same objects through `router.driver.PolicyDriver`.
"""

from __future__ import annotations

import abc

from core.feedback import PolicyFeedback
from core.request import RequestInfo
from core.workers import ClusterSnapshot


class RoutingPolicy(PolicyFeedback, abc.ABC):
    """Chooses workers for the two legs of a P/D request."""

    name: str = "?"

    @abc.abstractmethod
    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        """Name of the worker that computes the prompt's KV, or None to skip P/D."""

    @abc.abstractmethod
    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        """Name of the worker that generates the output tokens, or None if none is usable."""
