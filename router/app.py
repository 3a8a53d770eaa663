"""The FastAPI gateway: OpenAI-compatible endpoints in front of the worker pool.

All state hangs off `app.state` (cluster, dispatcher, metrics, HTTP client); build
as many independent apps as you like with `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from core.driver import PolicyDriver
from core.flips import FlipCoordinator, FlipMetrics
from core.workers import Role
from router import admin, admin_control
from router.admin_workers import install_worker_registry
from router.admission import Admission, AdmissionCollector, AdmissionConfig
from router.cluster import Cluster
from router.control_port import ControlConfig, ControllerFactory, RoleController
from router.dispatch import DispatchConfig, Dispatcher
from router.engine_stats import poll_engine_stats
from router.error_handlers import BodyLimitMiddleware, install_error_handlers
from router.health import HealthCollector, HealthConfig, HealthMonitor
from router.kv_migration import KVDirectory
from router.metrics import GatewayMetrics
from router.openai_asgi import OpenAIEndpoints, Receive, Scope, Send, is_openai_request
from router.openapi_schemas import request_body_schema
from router.peers import AdminForwarder, PeerConfig, PeerSync
from router.policy import make_policy
from router.rebalance import default_planner, rebalance_forever
from router.request_mix import RequestMix
from router.security import AuthConfig
from router.upstream import UpstreamPool
from router.validation import CHAT, COMPLETIONS

log = logging.getLogger("fulcrum.gateway")


class WorkerSupervisor(Protocol):
    """What the gateway needs from whoever runs the worker processes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class GatewayConfig:
    """Gateway settings; see `fulcrum up --help` for the user-facing names."""

    served_models: tuple[str, ...]
    policy: str = "least-loaded"
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    admin_token: str | None = None
    admin_open: bool = True
    stats_interval_s: float = 2.0
    rebalance_interval_s: float = 2.0  # ARES decode rebalancing (policies with residents)
    control: ControlConfig = field(default_factory=ControlConfig)
    max_body_mb: float = 32.0
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    peers: PeerConfig | None = None  # one of several processes (`--gateway-workers`)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


async def _fetch_metrics(client: httpx.AsyncClient, url: str) -> str:
    resp = await client.get(url + "/metrics", timeout=2.0)
    resp.raise_for_status()
    return resp.text


def _make_controller(config: GatewayConfig, factory: ControllerFactory | None,
                     flips: FlipCoordinator, mix: RequestMix) -> RoleController | None:
    if config.control.policy is None:
        return None
    if factory is None:
        raise ValueError(f"control policy {config.control.policy!r} needs a controller: "
                         "build the gateway with deploy.gateway_app.build_gateway")
    return factory(config.control, flips, mix)


class GatewayApp(FastAPI):
    """FastAPI for admin, health, metrics and OpenAPI; the OpenAI request routes take
    the lean path (`router.openai_asgi`)."""

    openai: OpenAIEndpoints
    forward_admin: AdminForwarder | None = None  # set on follower processes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_openai_request(scope):
            await self.openai(scope, receive, send)
        elif self.forward_admin is not None and scope["type"] == "http" and \
                scope["path"].startswith("/admin"):
            await self.forward_admin(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class _LeanPath(Response):
    """Hands a request FastAPI routed (OpenAPI tooling, mounted apps) to the lean path."""

    def __init__(self, endpoint: OpenAIEndpoints) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoint(scope, receive, send)


def create_app(config: GatewayConfig, cluster: Cluster,
               supervisor: WorkerSupervisor | None = None,
               controller: ControllerFactory | None = None) -> GatewayApp:
    """Build a gateway over `cluster`; `supervisor` (optional) starts/stops workers;
    `controller` builds the role controller when `config.control.policy` names one."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=None) as client, \
                UpstreamPool() as pool:
            app.state.client = client  # control plane: probes, scrapes, admin forwarding
            planner = (default_planner(moves_kv=config.dispatch.kv_migration)
                       if config.rebalance_interval_s > 0 else None)
            driver = PolicyDriver(make_policy(config.policy), config.control.slo, planner)
            app.state.dispatcher = Dispatcher(cluster, driver, pool, app.state.metrics,
                                              config.dispatch, app.state.request_mix,
                                              app.state.health, app.state.admission)
            app.openai.dispatcher = app.state.dispatcher
            kv_watch = None
            if config.dispatch.kv_migration:
                kv = app.state.dispatcher.kv = KVDirectory(
                    functools.partial(_fetch_metrics, client), config.dispatch.migration_hold_s)
                kv_watch = asyncio.create_task(kv.watch(cluster))
            probes = (asyncio.create_task(app.state.health.run(client))
                      if config.health.interval_s > 0 else None)
            stalls = asyncio.create_task(app.state.dispatcher.watch_streams())
            controller = app.state.controller
            follower = config.peers is not None and not config.peers.leader
            peers = None
            if config.peers is not None:
                sync = PeerSync(cluster, config.peers)
                peers = asyncio.create_task(sync.run())
                if follower:
                    app.forward_admin = AdminForwarder(sync, client)
                    if not await sync.wait_for_leader(60.0):
                        log.warning("no leading gateway process after 60 s; serving anyway")
            stats = None
            # One scraper per worker: the controller's scrapes feed the gauges when it
            # runs, and followers take them from the leader.
            if controller is None and not follower:
                stats = asyncio.create_task(poll_engine_stats(cluster, client,
                                                              config.stats_interval_s))
            rebalance = None
            if planner is not None and driver.tracks_residents:
                rebalance = asyncio.create_task(rebalance_forever(
                    app.state.dispatcher, config.rebalance_interval_s))
            hook = getattr(app.state, "on_workers_started", None)
            announcer = None
            if controller is not None:
                controller.listen(app.state.dispatcher.policy)
            control_loop = asyncio.create_task(controller.run(client)) if controller else None
            if supervisor is not None:
                await supervisor.start()
                if hook is not None:
                    announcer = asyncio.create_task(hook())
            try:
                yield
            finally:
                if stats is not None:
                    stats.cancel()
                if peers is not None:
                    peers.cancel()
                if probes is not None:
                    probes.cancel()
                stalls.cancel()
                if kv_watch is not None:
                    kv_watch.cancel()
                if rebalance is not None:
                    rebalance.cancel()
                if control_loop is not None:
                    control_loop.cancel()
                if announcer is not None:
                    announcer.cancel()
                if supervisor is not None:
                    await supervisor.stop()

    app = GatewayApp(title="Fulcrum gateway", lifespan=lifespan)
    app.state.cluster = cluster
    app.state.health = HealthMonitor(cluster, config.health)
    app.state.admission = Admission(config.admission)
    app.state.config = config
    app.state.metrics = GatewayMetrics(cluster)
    app.state.admin_token = config.admin_token
    app.state.admin_open = config.admin_open
    app.state.flips = FlipCoordinator(cluster, mode=config.control.flip_mode,
                                      drain_timeout_s=config.control.drain_timeout_s)
    app.state.metrics.registry.register(FlipMetrics(app.state.flips))
    app.state.metrics.registry.register(AdmissionCollector(app.state.admission))
    app.state.metrics.registry.register(HealthCollector(app.state.health))
    app.state.request_mix = RequestMix()
    app.state.controller = _make_controller(config, controller, app.state.flips,
                                            app.state.request_mix)
    app.include_router(admin.router)
    app.include_router(admin_control.router)
    install_worker_registry(app, cluster, app.state.flips, config.served_models[0])

    install_error_handlers(app)
    routes = (COMPLETIONS, CHAT, "/v1/models")

    def count_refused(path: str, status: int) -> None:
        app.state.metrics.requests.labels(path if path in routes else "other",
                                          str(status)).inc()

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes,
                       count=count_refused)
    app.openai = OpenAIEndpoints(config.served_models, app.state.metrics,
                                 app.state.admission, config.auth, config.max_body_bytes)

    models_list = list(config.served_models)

    @app.post(COMPLETIONS, openapi_extra=request_body_schema(COMPLETIONS, models_list))
    async def completions(request: Request) -> Response:
        return _LeanPath(app.openai)

    @app.post(CHAT, openapi_extra=request_body_schema(CHAT, models_list))
    async def chat_completions(request: Request) -> Response:
        return _LeanPath(app.openai)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        config.auth.check_client(request.headers.get("authorization"))
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "fulcrum"}
            for m in config.served_models]}

    @app.get("/livez")
    async def livez() -> dict:
        """The gateway process answers (says nothing about workers)."""
        return {"status": "alive"}

    def readiness() -> JSONResponse:
        snap = cluster.snapshot()
        prefill, decode = len(snap.routable(Role.PREFILL)), len(snap.routable(Role.DECODE))
        if prefill and decode:
            status = "ok"
        elif prefill or decode:  # every worker can decode alone: served, without P/D
            status = "degraded"
        else:
            status = "unavailable"
        body = {"status": status, "ready_workers": prefill + decode,
                "ready_prefill": prefill, "ready_decode": decode, "workers": len(snap.workers),
                "breakers": app.state.health.summary()}
        return JSONResponse(body, status_code=503 if status == "unavailable" else 200)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 while some worker can serve ("ok": both pools; "degraded": one pool only,
        requests are computed whole on it); 503 when none can."""
        return readiness()

    @app.get("/health")
    async def health() -> JSONResponse:
        """Same answer as /readyz."""
        return readiness()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(app.state.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
