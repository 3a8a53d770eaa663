"""Admin endpoints that add and remove workers at run time (see `router.worker_registry`).

    POST   /admin/workers            {"url", "role", "name"?, "wait"?}   202 (201 with wait)
    DELETE /admin/workers/{name}     ?force=&timeout_s=                   200 once removed
    GET    /admin/registry           every worker with its KV endpoint and join facts
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from core.flips import FlipCoordinator
from core.membership import RegistryError
from router.admin import require_admin
from router.cluster import Cluster
from router.errors import GatewayError
from router.worker_registry import JoinConfig, WorkerRegistry

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class AddWorkerBody(BaseModel):
    url: str
    role: str = "decode"
    name: str | None = None
    wait: bool = False  # answer only once the worker is READY (or failed to join)
    timeout_s: float | None = Field(None, gt=0)


def _registry(request: Request) -> WorkerRegistry:
    return request.app.state.registry


def _error(exc: RegistryError) -> GatewayError:
    return GatewayError(exc.status, str(exc), code=exc.code)


@router.post("/workers")
async def add_worker(body: AddWorkerBody, request: Request) -> JSONResponse:
    """Register a running vLLM server; it takes traffic once healthy and warmed up."""
    registry = _registry(request)
    try:
        entry = registry.add(body.url, body.role, name=body.name)
        if body.wait:
            await registry.wait_joined(entry.name, body.timeout_s)
    except RegistryError as exc:
        raise _error(exc) from None
    except TimeoutError:
        raise GatewayError(504, f"{body.url} not ready within {body.timeout_s}s; it keeps "
                           "joining", code="worker_join_timeout") from None
    view = registry.cluster.view(entry.name)
    return JSONResponse(
        {"name": entry.name, "url": view.url, "role": view.role.value,
         "state": view.state.value, "kv_endpoint": str(entry.kv) if entry.kv else None},
        status_code=201 if body.wait else 202)


@router.delete("/workers/{name}")
async def remove_worker(name: str, request: Request, force: bool = False,
                        timeout_s: float | None = Query(None, gt=0)) -> dict:
    """Drain the worker (in-flight legs finish), then deregister it."""
    try:
        return await _registry(request).remove(name, force=force, timeout_s=timeout_s)
    except RegistryError as exc:
        raise _error(exc) from None


@router.get("/registry")
async def registry_listing(request: Request) -> dict:
    return {"workers": await _registry(request).describe()}


def install_worker_registry(app: FastAPI, cluster: Cluster, flips: FlipCoordinator,
                            served_model: str, config: JoinConfig | None = None
                            ) -> WorkerRegistry:
    """Give `app` a registry and its admin routes."""
    registry = WorkerRegistry(cluster, flips, served_model, config)
    app.state.registry = registry
    app.include_router(router)
    return registry
