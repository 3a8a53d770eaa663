"""The role controller as the gateway sees it: settings, the interface it runs and
exposes through the admin API, and the factory that builds it.

The gateway never builds a controller itself; whoever composes the app plugs one in
(`deploy.gateway_app.build_gateway` plugs in `instance_manager`'s). Without one the
gateway serves, flips and drains by hand; the policy endpoints answer 503.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from core.feedback import PolicyFeedback
from core.flips import FlipCoordinator, FlipMode
from core.slo import SLOTargets
from router.request_mix import RequestMix


@dataclass(frozen=True)
class ControlConfig:
    """The role controller. `policy=None`: no automatic flips (manual ones still work)."""

    policy: str | None = None
    knobs: tuple[tuple[str, str], ...] = ()
    slo: SLOTargets = field(default_factory=SLOTargets)
    interval_s: float = 5.0
    window_s: float = 20.0
    advisory: bool = False
    drain_timeout_s: float = 120.0
    flip_mode: FlipMode = FlipMode.RELABEL
    """How flips run unless a manual flip names a mode (`core.flips.FlipMode`)."""


class RoleController(Protocol):
    """What the gateway runs in its lifespan and what `/admin/policy`, `/admin/explain` and
    `/admin/control` read and change."""

    advisory: bool
    interval_s: float

    @property
    def slo(self) -> SLOTargets: ...

    @property
    def scrape_errors(self) -> Mapping[str, str]:
        """Workers whose last scrape failed, with why."""
        ...

    def set_slo(self, ttft_s: float | None = None, tpot_s: float | None = None
                ) -> SLOTargets: ...

    def use_policy(self, name: str | None, knobs: Mapping[str, Any]) -> None:
        """Switch policy or change knobs; ValueError or TypeError when they are bad."""
        ...

    def state(self) -> dict[str, Any]:
        """Policy, knobs, mode, interval, SLO, window and the policies available."""
        ...

    def latest_rows(self) -> dict[str, dict[str, Any]]:
        """Per worker, the numbers of the last scrape."""
        ...

    def decision_log(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` decisions, oldest first."""
        ...

    def listen(self, routing_policy: PolicyFeedback) -> None: ...

    async def run(self, client: httpx.AsyncClient) -> None: ...


ControllerFactory = Callable[[ControlConfig, FlipCoordinator, RequestMix], RoleController]
