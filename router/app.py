"""The FastAPI gateway: OpenAI-compatible endpoints in front of the worker pool.

All state hangs off `app.state` (cluster, dispatcher, metrics, HTTP client); build
as many independent apps as you like with `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from core.driver import PolicyDriver
from core.slo import SLOTargets
from core.workers import WorkerState
from instance_manager.controller.loop import Controller
from instance_manager.controller.registry import make_control_policy
from instance_manager.flip import FlipCoordinator, FlipMetrics
from instance_manager.metrics_collector import MetricsCollector
from router import admin, admin_control
from router.cluster import Cluster
from router.dispatch import DispatchConfig, Dispatcher, UpstreamReply
from router.engine_stats import poll_engine_stats
from router.errors import GatewayError
from router.metrics import GatewayMetrics
from router.policy import make_policy
from router.rebalance import default_planner, rebalance_forever
from router.request_mix import RequestMix
from router.validation import CHAT, COMPLETIONS, parse_request

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


def _make_controller(control: ControlConfig, flips: FlipCoordinator,
                     mix: RequestMix) -> Controller | None:
    if control.policy is None:
        return None
    policy = make_control_policy(control.policy, **dict(control.knobs))
    collector = MetricsCollector(window_s=control.window_s, slo=control.slo)
    return Controller(collector, flips, policy, interval_s=control.interval_s,
                      advisory=control.advisory, drain_timeout_s=control.drain_timeout_s,
                      request_mix=mix.means)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(config: GatewayConfig, cluster: Cluster,
               supervisor: WorkerSupervisor | None = None) -> FastAPI:
    """Build a gateway over `cluster`; `supervisor` (optional) starts/stops workers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
        async with httpx.AsyncClient(limits=limits, timeout=None) as client:
            app.state.client = client
            planner = default_planner() if config.rebalance_interval_s > 0 else None
            driver = PolicyDriver(make_policy(config.policy), config.control.slo, planner)
            app.state.dispatcher = Dispatcher(cluster, driver, client, app.state.metrics,
                                              config.dispatch, app.state.request_mix)
            stats = asyncio.create_task(poll_engine_stats(cluster, client,
                                                          config.stats_interval_s))
            rebalance = None
            if planner is not None and driver.tracks_residents:
                rebalance = asyncio.create_task(rebalance_forever(
                    app.state.dispatcher, config.rebalance_interval_s))
            hook = getattr(app.state, "on_workers_started", None)
            announcer = None
            controller = app.state.controller
            control_loop = asyncio.create_task(controller.run(client)) if controller else None
            if supervisor is not None:
                await supervisor.start()
                if hook is not None:
                    announcer = asyncio.create_task(hook())
            try:
                yield
            finally:
                stats.cancel()
                if rebalance is not None:
                    rebalance.cancel()
                if control_loop is not None:
                    control_loop.cancel()
                if announcer is not None:
                    announcer.cancel()
                if supervisor is not None:
                    await supervisor.stop()

    app = FastAPI(title="Fulcrum gateway", lifespan=lifespan)
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
    app.include_router(admin.router)
    app.include_router(admin_control.router)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return GatewayError(400, str(exc)).response()

    async def serve(request: Request, route: str) -> Response:
        metrics: GatewayMetrics = app.state.metrics
        request_id = request.headers.get("x-request-id") or f"fulcrum-{uuid.uuid4().hex}"
        headers = {"X-Request-Id": request_id}
        started = time.monotonic()
        try:
            parsed = parse_request(route, await request.body(), config.served_models)
            work = asyncio.ensure_future(app.state.dispatcher.dispatch(parsed, request_id))
            gone = asyncio.ensure_future(_wait_for_disconnect(request))
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                log.info("client left before a reply; aborted %s", request_id)
                metrics.requests.labels(route, "499").inc()
                return Response(status_code=499)
            gone.cancel()
            response = work.result()
        except GatewayError as exc:
            response = exc.response(headers)
        except UpstreamReply as exc:
            response = exc.response(headers)
        metrics.requests.labels(route, str(response.status_code)).inc()
        if response.status_code != 200:
            metrics.e2e.labels(route).observe(time.monotonic() - started)
        return response

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await serve(request, COMPLETIONS)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await serve(request, CHAT)

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
