"""Admin endpoints of the control plane: flips, drains, the policy, and its explanations.

Mounted next to `router.admin` and guarded by the same `require_admin` (bearer token;
off on a non-loopback bind without one). Reads `app.state.cluster`, `app.state.flips`
(a `core.flips.FlipCoordinator`) and `app.state.controller` (a
`router.control_port.RoleController`, optional: without it flips and drains still work,
policy/explain answer 503).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from core.flips import FlipCoordinator, FlipMode, FlipRefused
from core.workers import Role
from router.admin import require_admin
from router.control_port import RoleController
from router.errors import GatewayError

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class FlipBody(BaseModel):
    worker: str
    to: Role
    dry_run: bool = False
    force: bool = False
    drain_timeout_s: float | None = Field(default=None, gt=0)
    mode: FlipMode | None = None
    """`drain` or `relabel`; the gateway's `--flip-mode` when left out."""


class DrainBody(BaseModel):
    worker: str
    force: bool = False
    wait: bool = False
    timeout_s: float | None = Field(default=None, gt=0)


class WorkerBody(BaseModel):
    worker: str


class PolicyBody(BaseModel):
    name: str | None = None
    knobs: dict[str, Any] = Field(default_factory=dict)
    advisory: bool | None = None
    ttft_s: float | None = Field(default=None, gt=0)
    tpot_s: float | None = Field(default=None, gt=0)
    interval_s: float | None = Field(default=None, gt=0)


def _flips(request: Request) -> FlipCoordinator:
    flips = getattr(request.app.state, "flips", None)
    if flips is None:
        raise GatewayError(503, "this gateway has no flip coordinator", code="no_control_plane")
    return flips


def _controller(request: Request) -> RoleController:
    controller = getattr(request.app.state, "controller", None)
    if controller is None:
        raise GatewayError(503, "no controller is running on this gateway (start it with "
                           "--control-policy)", code="no_controller")
    return controller


def _refused(exc: FlipRefused) -> GatewayError:
    return GatewayError(exc.status, str(exc), code="flip_refused")


@router.get("/control")
async def control_state(request: Request) -> dict:
    """Everything `fulcrum watch` shows: workers with their latest windowed metrics."""
    cluster = request.app.state.cluster.snapshot()
    controller: RoleController | None = getattr(request.app.state, "controller", None)
    flips: FlipCoordinator | None = getattr(request.app.state, "flips", None)
    scraped = controller.latest_rows() if controller is not None else {}
    rows = []
    for view in cluster.workers:
        row = dict(scraped.get(view.name, {}))
        row.update(name=view.name, role=view.role.value, state=view.state.value,
                   in_flight_prefill=view.in_flight_prefill,
                   in_flight_decode=view.in_flight_decode,
                   flipping=flips is not None and view.name in flips.active)
        rows.append(row)
    last = next(iter(controller.decision_log(1)), None) if controller else None
    return {
        "workers": rows,
        "pools": {role.value: len(cluster.routable(role)) for role in Role},
        "controller": controller.state() if controller else None,
        "last_decision": last,
        "scrape_errors": dict(controller.scrape_errors) if controller else {},
    }


@router.post("/flip")
async def flip(body: FlipBody, request: Request) -> dict:
    """Flip a worker now (same transaction the controller uses); `dry_run` only checks."""
    try:
        record = await _flips(request).flip(body.worker, body.to, dry_run=body.dry_run,
                                            force=body.force,
                                            drain_timeout_s=body.drain_timeout_s,
                                            mode=body.mode)
    except FlipRefused as exc:
        raise _refused(exc) from None
    return record.to_dict()


@router.post("/drain")
async def drain(body: DrainBody, request: Request) -> dict:
    try:
        result = await _flips(request).drain(body.worker, force=body.force, wait=body.wait,
                                             timeout_s=body.timeout_s)
    except FlipRefused as exc:
        raise _refused(exc) from None
    return result.to_dict()


@router.post("/undrain")
async def undrain(body: WorkerBody, request: Request) -> dict:
    try:
        return _flips(request).undrain(body.worker).to_dict()
    except FlipRefused as exc:
        raise _refused(exc) from None


@router.get("/policy")
async def get_policy(request: Request) -> dict:
    return _controller(request).state()


@router.put("/policy")
async def set_policy(body: PolicyBody, request: Request) -> dict:
    """Switch the policy or change its knobs, the SLO targets, the mode or the interval.

    Knobs given for the current policy are merged into its current ones; a new policy
    starts from its defaults plus the knobs given.
    """
    controller = _controller(request)
    if body.name is not None or body.knobs:
        try:
            controller.use_policy(body.name, body.knobs)
        except (ValueError, TypeError) as exc:
            raise GatewayError(400, str(exc), code="bad_policy") from None
    if body.ttft_s is not None or body.tpot_s is not None:
        controller.set_slo(body.ttft_s, body.tpot_s)
        dispatcher = getattr(request.app.state, "dispatcher", None)
        if dispatcher is not None:  # routing policies defend the same targets
            dispatcher.driver.use_slo(controller.slo)
    if body.advisory is not None:
        controller.advisory = body.advisory
    if body.interval_s is not None:
        controller.interval_s = body.interval_s
    return controller.state()


@router.get("/explain")
async def explain(request: Request, limit: int = Query(default=10, ge=1, le=1000)) -> dict:
    """The controller's last decisions, newest last, with the numbers behind each."""
    controller = _controller(request)
    return {"policy": controller.state(), "decisions": controller.decision_log(limit)}


@router.get("/flips")
async def flip_history(request: Request, limit: int = Query(default=50, ge=1, le=1000)) -> dict:
    flips = _flips(request)
    return {"active": list(flips.active),
            "flips": [r.to_dict() for r in flips.history[-limit:]]}
