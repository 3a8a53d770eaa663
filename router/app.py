"""The FastAPI gateway: OpenAI-compatible endpoints in front of the worker pool.

All state hangs off `app.state` (cluster, dispatcher, metrics, HTTP client); build
as many independent apps as you like with `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from core.driver import PolicyDriver
from core.slo import SLOTargets
from core.workers import Role
from instance_manager.controller.loop import Controller
from instance_manager.controller.metrics import ControllerMetrics
from instance_manager.controller.registry import make_control_policy
from instance_manager.flip import FlipCoordinator, FlipMetrics
from instance_manager.metrics_collector import MetricsCollector
from router import admin, admin_control
from router.admin_workers import install_worker_registry
from router.admission import Admission, AdmissionCollector, AdmissionConfig
from router.cluster import Cluster
from router.dispatch import DispatchConfig, Dispatcher, UpstreamReply
from router.engine_stats import poll_engine_stats
from router.error_handlers import BodyLimitMiddleware, install_error_handlers
from router.errors import GatewayError
from router.health import HealthCollector, HealthConfig, HealthMonitor
from router.limits import client_request_id, new_request_id, read_limited
from router.metrics import ERROR, GatewayMetrics
from router.openapi_schemas import request_body_schema
from router.policy import make_policy
from router.rebalance import default_planner, rebalance_forever
from router.request_mix import RequestMix
from router.security import AuthConfig
from router.streaming import ProxyStreamResponse
from router.validation import CHAT, COMPLETIONS, ParsedRequest, parse_request

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
    max_body_mb: float = 32.0
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


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
                                              config.dispatch, app.state.request_mix,
                                              app.state.health, app.state.admission)
            probes = (asyncio.create_task(app.state.health.run(client))
                      if config.health.interval_s > 0 else None)
            stats = asyncio.create_task(poll_engine_stats(cluster, client,
                                                          config.stats_interval_s))
            rebalance = None
            if planner is not None and driver.tracks_residents:
                rebalance = asyncio.create_task(rebalance_forever(
                    app.state.dispatcher, config.rebalance_interval_s))
            hook = getattr(app.state, "on_workers_started", None)
            announcer = None
            controller = app.state.controller
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
                stats.cancel()
                if probes is not None:
                    probes.cancel()
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
    app.state.health = HealthMonitor(cluster, config.health)
    app.state.admission = Admission(config.admission)
    app.state.config = config
    app.state.metrics = GatewayMetrics(cluster)
    app.state.admin_token = config.admin_token
    app.state.admin_open = config.admin_open
    app.state.flips = FlipCoordinator(cluster, drain_timeout_s=config.control.drain_timeout_s)
    app.state.metrics.registry.register(FlipMetrics(app.state.flips))
    app.state.metrics.registry.register(AdmissionCollector(app.state.admission))
    app.state.metrics.registry.register(HealthCollector(app.state.health))
    app.state.request_mix = RequestMix()
    app.state.controller = _make_controller(config.control, app.state.flips,
                                            app.state.request_mix)
    app.state.metrics.registry.register(
        ControllerMetrics(lambda: getattr(app.state, "controller", None)))
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
    admission: Admission = app.state.admission

    async def serve(request: Request, route: str) -> Response:
        metrics: GatewayMetrics = app.state.metrics
        request_id = new_request_id()  # ours: unique, what workers and /admin see
        client_id = client_request_id(request.headers.get("x-request-id"))
        headers = {"X-Request-Id": client_id or request_id, "X-Fulcrum-Request-Id": request_id}
        started = time.monotonic()
        parsed: ParsedRequest | None = None
        admitted = False
        try:
            admission.enter()  # first: overload is answered before the body is read
            admitted = True
            authorization = request.headers.get("authorization")
            config.auth.check_client(authorization)
            raw = await read_limited(request.stream(), request.headers.get("content-length"),
                                     config.max_body_bytes)
            parsed = parse_request(route, raw, config.served_models)
            del raw  # one copy of the body from here on: the parsed one
            work = asyncio.ensure_future(app.state.dispatcher.dispatch(
                parsed, request_id, client_id, config.auth.worker_headers(authorization)))
            gone = asyncio.ensure_future(_wait_for_disconnect(request))
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                log.info("client left before a reply; aborted %s", request_id)
                metrics.count_request(route, 499)
                admission.leave()
                return Response(status_code=499)
            gone.cancel()
            response = work.result()
            response.headers.update(headers)
        except GatewayError as exc:
            response = exc.response(headers)
        except UpstreamReply as exc:
            response = exc.response(headers)
        except Exception as exc:  # never a bare 500: OpenAI-shaped and counted
            log.error("unexpected error serving %s: %r", request_id, exc, exc_info=exc)
            response = GatewayError(500, "internal error in the gateway",
                                    code="internal_error").response(headers)
        if admitted:
            if isinstance(response, ProxyStreamResponse):
                response.also_on_close(admission.leave)  # the slot lasts as long as the stream
            else:
                admission.leave()
        metrics.count_request(route, response.status_code)
        if response.status_code != 200:
            model = parsed.model if parsed is not None else ""
            metrics.latency(route, model, ERROR, "").e2e.observe(time.monotonic() - started)
        return response

    models_list = list(config.served_models)

    @app.post(COMPLETIONS, openapi_extra=request_body_schema(COMPLETIONS, models_list))
    async def completions(request: Request) -> Response:
        return await serve(request, COMPLETIONS)

    @app.post(CHAT, openapi_extra=request_body_schema(CHAT, models_list))
    async def chat_completions(request: Request) -> Response:
        return await serve(request, CHAT)

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
