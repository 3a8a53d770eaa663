"""The FastAPI gateway: OpenAI-compatible endpoints in front of the worker pool.

All state hangs off `app.state` (cluster, dispatcher, metrics, HTTP client); build
as many independent apps as you like with `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from instance_manager.controller.base import ControlSnapshot, SLOTargets
from instance_manager.controller.loop import Controller
from instance_manager.controller.registry import make_control_policy
from instance_manager.flip import FlipCoordinator, FlipMetrics
from instance_manager.metrics_collector import MetricsCollector
from router import admin, admin_control
from router.cluster import Cluster, WorkerState
from router.dispatch import DispatchConfig, Dispatcher
from router.engine_stats import poll_engine_stats
from router.errors import GatewayError
from router.metrics import GatewayMetrics
from router.openai_asgi import OpenAIEndpoints, Receive, Scope, Send, is_openai_request
from router.peers import AdminForwarder, PeerConfig, PeerSync
from router.policy import make_policy
from router.rebalance import default_planner, rebalance_forever
from router.request_mix import RequestMix
from router.upstream import UpstreamPool

log = logging.getLogger("fulcrum.gateway")


class WorkerSupervisor(Protocol):
    """What the gateway needs from whoever runs the worker processes."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


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
    peers: PeerConfig | None = None  # one of several processes (`--gateway-workers`)


def _make_controller(control: ControlConfig, flips: FlipCoordinator,
                     mix: RequestMix) -> Controller | None:
    if control.policy is None:
        return None
    policy = make_control_policy(control.policy, **dict(control.knobs))
    collector = MetricsCollector(window_s=control.window_s, slo=control.slo)
    controller = Controller(collector, flips, policy, interval_s=control.interval_s,
                            advisory=control.advisory, drain_timeout_s=control.drain_timeout_s,
                            request_mix=mix.means)
    controller.on_snapshot = lambda snap: _store_engine_gauges(flips.cluster, snap)
    return controller


def _store_engine_gauges(cluster: Cluster, snapshot: ControlSnapshot) -> None:
    for name, m in snapshot.metrics.items():
        cluster.set_engine_stats(name, kv_cache_usage=m.kv_cache_usage,
                                 num_running=m.num_running, num_waiting=m.num_waiting)


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


def create_app(config: GatewayConfig, cluster: Cluster,
               supervisor: WorkerSupervisor | None = None) -> GatewayApp:
    """Build a gateway over `cluster`; `supervisor` (optional) starts/stops workers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=None) as client, \
                UpstreamPool() as session:
            app.state.client = client  # control plane: scrapes, flips, admin
            app.state.dispatcher = Dispatcher(cluster, make_policy(config.policy), session,
                                              app.state.metrics, config.dispatch,
                                              app.state.request_mix)
            app.openai.dispatcher = app.state.dispatcher
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
            if config.rebalance_interval_s > 0 and \
                    hasattr(app.state.dispatcher.policy, "residents"):
                rebalance = asyncio.create_task(rebalance_forever(
                    app.state.dispatcher, default_planner(), config.rebalance_interval_s))
            hook = getattr(app.state, "on_workers_started", None)
            announcer = None
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
    app.state.config = config
    app.state.metrics = GatewayMetrics(cluster)
    app.state.admin_token = config.admin_token
    app.state.admin_open = config.admin_open
    app.state.flips = FlipCoordinator(cluster, drain_timeout_s=config.control.drain_timeout_s)
    app.state.metrics.registry.register(FlipMetrics(app.state.flips))
    app.state.request_mix = RequestMix()
    app.state.controller = _make_controller(config.control, app.state.flips,
                                            app.state.request_mix)
    app.openai = OpenAIEndpoints(config.served_models, app.state.metrics)
    app.include_router(admin.router)
    app.include_router(admin_control.router)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return GatewayError(400, str(exc)).response()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "fulcrum"}
            for m in config.served_models]}

    @app.get("/health")
    async def health() -> JSONResponse:
        states = [w.state for w in cluster.snapshot().workers]
        ready = sum(s == WorkerState.READY for s in states)
        body = {"status": "ok" if ready else "unavailable", "ready_workers": ready,
                "workers": len(states)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(app.state.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
