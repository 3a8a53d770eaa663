"""Read-only admin endpoints, stream migration, and the guard every admin endpoint shares.

The admin API is off on a non-loopback bind unless a token is configured; when a
token is configured, every admin call must carry `Authorization: Bearer <token>`.
See `router.security.check_admin_request` for the rest (Host, Origin, content type).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from router.errors import GatewayError
from router.security import check_admin_request


def require_admin(request: Request) -> None:
    """FastAPI dependency guarding admin routes."""
    check_admin_request(request, request.app.state.admin_token, request.app.state.admin_open)


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.get("/workers")
async def workers(request: Request) -> dict:
    """Every worker with its role, state, load and process facts."""
    cluster = request.app.state.cluster
    health = request.app.state.health
    out = []
    for view in cluster.snapshot().workers:
        rec = cluster.record(view.name)
        out.append({
            "name": view.name, "url": view.url, "role": view.role.value,
            "state": view.state.value, "in_flight_prefill": view.in_flight_prefill,
            "in_flight_decode": view.in_flight_decode, "kv_cache_usage": view.kv_cache_usage,
            "num_running": view.num_running, "num_waiting": view.num_waiting,
            "pid": rec.pid, "restarts": rec.restarts, "healthy": view.healthy,
            "breaker": health.breaker(view.name).state.value,
        })
    return {"workers": out, "policy": request.app.state.dispatcher.policy.name}


class MigrateBody(BaseModel):
    request_id: str = Field(max_length=256)
    to: str = Field(max_length=256)
    after_tokens: int = Field(0, ge=0)  # move once the stream has generated this many
    planned: bool = False  # the stream has not started yet: move it when it does


@router.get("/streams")
async def streams(request: Request) -> dict:
    """Live streams: where each runs and how far it got (migratable ones can move)."""
    relays = request.app.state.dispatcher.streams.values()
    return {"streams": [{"request_id": r.request_id,
                         "client_request_id": r.client_request_id, "worker": r.worker,
                         "generated": len(r.generated_ids), "migratable": r.migratable,
                         "why_not_migratable": r.why_not_migratable,
                         "migrations": r.migrations} for r in relays]}


@router.post("/migrate")
async def migrate(body: MigrateBody, request: Request) -> dict:
    """Move a live stream to another worker; it continues there without a break.

    `request_id` is the gateway's id of the stream (`X-Fulcrum-Request-Id` of its
    response, or `GET /admin/streams`), never the client's `X-Request-Id`, which two
    clients may share. With `planned`, the stream has not started yet, so `request_id`
    names the client's `X-Request-Id`: the first stream that arrives with it moves."""
    dispatcher = request.app.state.dispatcher
    try:
        if body.planned and body.request_id not in dispatcher.streams:
            dispatcher.plan_migration(body.request_id, body.to, body.after_tokens)
            return {"request_id": body.request_id, "to": body.to, "planned": True,
                    "after_tokens": body.after_tokens}
        relay = dispatcher.migrate(body.request_id, body.to, body.after_tokens)
    except KeyError as exc:
        raise GatewayError(404, str(exc), code="no_such_stream") from None
    except ValueError as exc:
        raise GatewayError(409, str(exc), code="cannot_migrate") from None
    return {"request_id": relay.request_id, "from": relay.worker, "to": body.to,
            "generated": len(relay.generated_ids)}
