"""Two-leg P/D dispatch: prefill on one worker, decode on another, KV moved between.

A P/D request is one transaction. The prefill leg asks a worker for the prompt's KV
(`max_tokens=1`, `kv_transfer_params={"do_remote_decode": true}`); the decode leg
carries the returned `kv_transfer_params` to the decode worker, which pulls the KV
instead of recomputing it. Both legs carry the same `X-Request-Id`.

Failure rules:
- prefill leg fails (worker down, 5xx, timeout): decode computes the prompt itself;
- decode leg fails before the first byte reaches the client: retry once, first on
  the same worker without KV (a failed KV pull), then on another worker;
- decode fails mid-stream (its worker leaves rotation, its connection breaks, or the
  stream stalls far beyond the worker's usual token gaps): the stream continues on
  another ready decode worker (`StreamRelay.evacuate`); only if none can take it does
  the client get an OpenAI-style error event and [DONE];
- a worker's 4xx (bad sampling params, prompt too long) goes to the client as is.

First-token handoff (`router.handoff`): where a stream could migrate (completions and
chat), the prefill leg's token is streamed to the client first and the decode leg
continues after it as a completion of the prompt's token ids.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from core.driver import PolicyDriver
from core.request import RequestInfo
from core.routing import RoutingPolicy
from core.workers import Role
from router import jsonfast
from router.admission import Admission, AdmissionConfig
from router.cluster import Cluster
from router.errors import GatewayError, clip
from router.handoff import FirstToken, decode_body, first_event, from_prefill_reply, prefill_fields
from router.health import HealthConfig, HealthMonitor, WorkerUnhealthy
from router.kv_migration import KVDirectory
from router.metrics import LOCAL, PD, GatewayMetrics
from router.relay import StreamRelay, migratable, pulls_kv
from router.replies import JsonReply, Reply, StreamReply
from router.request_mix import RequestMix
from router.sse import StreamObserver
from router.upstream import Timeouts, UpstreamError, UpstreamPool, UpstreamResponse
from router.validation import COMPLETIONS, ParsedRequest

log = logging.getLogger("fulcrum.dispatch")

_PREFILL_ONLY_FIELDS = ("stream_options", "min_tokens", "min_completion_tokens")


@dataclass(frozen=True)
class DispatchConfig:
    """Timeouts and retry limits; every leg is bounded.

    `request_timeout_s` bounds a non-streamed decode leg from sending to the last byte
    of its answer (headers and body together); a stream is bounded by the longest
    silence between two of its chunks, `stream_idle_timeout_s`."""

    connect_timeout_s: float = 5.0
    prefill_timeout_s: float = 60.0
    stream_idle_timeout_s: float = 120.0
    request_timeout_s: float = 300.0
    decode_attempts: int = 3
    pd_enabled: bool = True
    # a stream silent for max(stall_min_s, stall_factor x its worker's recent token gap)
    # moves to another worker (0 turns this off; a hung worker's breaker moves it anyway)
    stall_factor: float = 30.0
    stall_min_s: float = 5.0
    # a stream whose worker failed, with no other worker to take it, waits this long for
    # one (a worker whose breaker opened under a load spike is back within a second or two)
    rescue_wait_s: float = 5.0
    # a planned migration moves the stream's KV from the source worker (workers running
    # Fulcrum's connector) instead of recomputing it on the target; a source holds an
    # aborted stream's blocks this long for that
    kv_migration: bool = True
    migration_hold_s: float = 10.0


class UpstreamReply(Exception):
    """A worker's non-200 answer that should go to the client unchanged (4xx)."""

    def __init__(self, status: int, content: bytes) -> None:
        super().__init__(f"upstream status {status}")
        self.status = status
        self.content = content

    def reply(self, headers: dict[str, str]) -> JsonReply:
        try:
            body = jsonfast.loads(self.content)
        except ValueError:
            return GatewayError(self.status, self.content.decode(errors="replace")
                                ).reply(headers)
        if not isinstance(body, dict) or "error" not in body \
                or len(self.content) > 4096:  # FastAPI-style {"detail": ...}, or an echo
            return GatewayError(self.status, clip(json.dumps(body), 400)).reply(headers)
        return JsonReply(self.status, jsonfast.dumps(body), headers)


def prefill_seconds(metrics: object, leg_s: float) -> float:
    """The prefill leg's compute time: vLLM's own per-request split when the worker reports
    it (`time_to_first_token_ms` = scheduled to first token), else the leg minus the queue
    time it reports, else the whole leg (queueing included: a worker without
    `--enable-per-request-metrics`)."""
    if isinstance(metrics, dict):
        ttft_ms = metrics.get("time_to_first_token_ms")
        if isinstance(ttft_ms, int | float) and ttft_ms >= 0:
            return ttft_ms / 1000
        queue_ms = metrics.get("queue_time_ms")
        if isinstance(queue_ms, int | float) and queue_ms >= 0:
            return max(0.0, leg_s - queue_ms / 1000)
    return leg_s


def engine_seconds_per_token(metrics: object) -> float | None:
    """vLLM's per-request mean inter-token time (first to last token), if reported."""
    if isinstance(metrics, dict):
        itl_ms = metrics.get("mean_itl_ms")
        if isinstance(itl_ms, int | float) and itl_ms >= 0:
            return itl_ms / 1000
    return None


def _prefill_body(body: dict, extra: dict | None = None) -> dict:
    out = {k: v for k, v in body.items() if k not in _PREFILL_ONLY_FIELDS}
    out.update(extra or {})
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False}
    return out


@dataclass(frozen=True)
class _LegContext:
    """Per-request facts every leg needs besides the body."""

    client_request_id: str | None
    headers: dict[str, str]


class Dispatcher:
    """Routes one parsed request through the policy to one or two workers."""

    def __init__(self, cluster: Cluster, driver: PolicyDriver, client: UpstreamPool,
                 metrics: GatewayMetrics, config: DispatchConfig,
                 mix: RequestMix | None = None, health: HealthMonitor | None = None,
                 admission: Admission | None = None) -> None:
        self.cluster = cluster
        self.health = health or HealthMonitor(cluster, HealthConfig(interval_s=0))
        self.admission = admission or Admission(AdmissionConfig(0, 0))
        self.mix = mix or RequestMix()
        self.driver = driver
        self.client = client
        self.metrics = metrics
        self.config = config
        self.streams: dict[str, StreamRelay] = {}  # live streams, by the gateway's own id
        # client request id -> (target, after_tokens, expires_at): moves asked for before
        # the stream exists; the first stream with that client id takes it
        self.pending_migrations: dict[str, tuple[str, int, float]] = {}
        self.token_gaps: dict[str, float] = {}  # worker -> moving average of chunk gaps (s)
        # where workers serve KV blocks (set by the app: it owns the HTTP client that asks)
        self.kv: KVDirectory | None = None
        self.health.on_open.append(self.evacuate_worker)

        connect = config.connect_timeout_s
        self.prefill_timeout = Timeouts(connect, total=config.prefill_timeout_s)
        self.stream_timeout = Timeouts(connect, idle=config.stream_idle_timeout_s)
        # headers and body of a non-streamed answer share one deadline
        self.request_timeout = Timeouts(connect, total=config.request_timeout_s)

    @property
    def policy(self) -> RoutingPolicy:
        return self.driver.policy

    async def post(self, url: str, body: dict, headers: dict[str, str],
                   timeouts: Timeouts) -> UpstreamResponse:
        """POST `body` as JSON to a worker; the caller reads and releases the response."""
        return await self.client.post(url, jsonfast.dumps(body), headers, timeouts)

    async def _post_and_read(self, url: str, body: dict, headers: dict[str, str],
                             timeouts: Timeouts) -> tuple[int, bytes]:
        resp = await self.post(url, body, headers, timeouts)
        try:
            return resp.status, await resp.read()
        finally:
            resp.release()

    def migrate(self, request_id: str, target: str, after_tokens: int = 0) -> StreamRelay:
        """Ask a live stream to continue on `target` (a READY worker) once it has generated
        `after_tokens` tokens (at once by default)."""
        relay = self.streams.get(request_id)
        if relay is None:
            raise KeyError(f"no live stream {request_id!r}")
        self._check_target(target)
        if target == relay.worker:
            raise ValueError(f"stream {request_id!r} already runs on {target!r}")
        relay.request_migration(target, after_tokens)
        return relay

    def plan_migration(self, request_id: str, target: str, after_tokens: int,
                       ttl_s: float = 60.0) -> None:
        """Move a stream that has not started yet: when `request_id` starts streaming (within
        `ttl_s`), it moves to `target` after `after_tokens` tokens."""
        self._check_target(target)
        now = time.monotonic()
        self.pending_migrations = {k: v for k, v in self.pending_migrations.items()
                                   if v[2] > now}
        self.pending_migrations[request_id] = (target, after_tokens, now + ttl_s)

    # -- rescuing streams from failed workers ---------------------------------------------
    def evacuate_worker(self, worker: str, why: str) -> None:
        """Move every live stream off `worker` (its breaker opened), and restart those
        whose decode worker still waits to pull their KV from it (computed locally then,
        by any decode worker, the same one included)."""
        for relay in list(self.streams.values()):
            if relay.worker == worker:
                relay.evacuate(f"worker {worker} left rotation: {why}")
            elif relay.kv_from == worker and relay.last_chunk_at is None:
                relay.evacuate(f"its KV source {worker} left rotation: {why}",
                               may_stay=True)

    def rescue_target(self, relay: StreamRelay, exclude: frozenset[str]) -> str | None:
        """A ready decode worker with room to continue `relay`'s stream, by the policy."""
        snap = self.admission.with_room(self.cluster.snapshot())
        if relay.info is not None:
            return self.driver.retry_decode(relay.info, snap, exclude)
        pool = snap.decode_candidates(exclude)
        return min(pool, key=lambda w: w.in_flight).name if pool else None

    async def wait_for_rescue_target(self, relay: StreamRelay) -> str | None:
        """Any ready decode worker for `relay` (its failed one included, once back in
        rotation: the request there was aborted), waiting up to `rescue_wait_s`."""
        deadline = time.monotonic() + self.config.rescue_wait_s
        while True:
            target = self.rescue_target(relay, frozenset())
            if target is not None or time.monotonic() >= deadline:
                return target
            await asyncio.sleep(0.1)

    def token_gap(self, worker: str, gap_s: float) -> None:
        """Fold one gap between a worker's stream chunks into its moving average."""
        old = self.token_gaps.get(worker)
        self.token_gaps[worker] = gap_s if old is None else 0.9 * old + 0.1 * gap_s

    def stall_limit(self, worker: str) -> float:
        gap = self.token_gaps.get(worker, 0.0)
        return max(self.config.stall_min_s, self.config.stall_factor * gap)

    def sweep_stalled(self) -> int:
        """Move streams whose worker went silent far beyond its usual gaps; how many."""
        if self.config.stall_factor <= 0:
            return 0
        now, moved = time.monotonic(), 0
        for relay in list(self.streams.values()):
            silent = relay.stalled_for(now)
            limit = self.stall_limit(relay.worker)
            if silent > limit and relay.why_not_resumable() is None and \
                    self.rescue_target(relay, frozenset((relay.worker,))) is not None:
                relay.evacuate(f"no bytes for {silent:.1f}s (limit {limit:.1f}s)")
                moved += 1
        return moved

    async def watch_streams(self, interval_s: float = 0.5) -> None:
        """Forever: `sweep_stalled` every `interval_s`."""
        while True:
            await asyncio.sleep(interval_s)
            self.sweep_stalled()

    def _check_target(self, target: str) -> None:
        view = self.cluster.snapshot().by_name(target)
        if view is None or not view.routable:
            raise ValueError(f"worker {target!r} is not ready")

    def _apply_planned_migration(self, relay: StreamRelay) -> None:
        if relay.client_request_id is None:
            return
        planned = self.pending_migrations.pop(relay.client_request_id, None)
        if planned is None or planned[2] < time.monotonic():
            return
        target, after_tokens, _ = planned
        if target == relay.worker or not relay.migratable:
            log.warning("planned migration of %s to %s skipped (it runs on %s%s)",
                        relay.request_id, target, relay.worker,
                        "" if relay.migratable else " and cannot migrate")
            return
        relay.request_migration(target, after_tokens)

    async def dispatch(self, req: ParsedRequest, request_id: str,
                       client_request_id: str | None = None,
                       worker_headers: dict[str, str] | None = None) -> Reply:
        """Serve `req`; raises `GatewayError` or `UpstreamReply` for error answers.

        `request_id` is the gateway's own unique id (the one workers see);
        `worker_headers` go to every worker request (e.g. `Authorization`)."""
        started = time.monotonic()
        info = self.driver.request(request_id, req.prompt_tokens_estimate, req.policy_max_tokens,
                                   started, req.prompt_text)
        leg = _LegContext(client_request_id, worker_headers or {})
        try:
            return await self._dispatch(req, info, started, leg)
        except BaseException:
            self.driver.finished(request_id)
            raise

    async def _dispatch(self, req: ParsedRequest, info: RequestInfo,
                        started: float, leg: _LegContext) -> Reply:
        request_id = info.request_id
        full = self.cluster.snapshot()
        snap = self.admission.with_room(full)  # workers at their queue bound take no legs
        disaggregate = self.config.pd_enabled and req.body.get("n", 1) in (1, None)
        route = self.driver.route(info, snap, disaggregate)
        decode = route.decode
        if decode is None:
            if full.decode_candidates():
                raise self.admission.no_decode_room()
            raise GatewayError(503, "no worker is ready to serve this request; retry shortly",
                               code="no_ready_worker", headers={"Retry-After": "1"})
        kv_params, first = None, None
        if route.prefill is not None:
            kv_params, first = await self._prefill_leg(route.prefill, req, request_id, leg)
            if kv_params:  # the prefill leg as the client's clock runs: from arrival here
                self.mix.prefill_legs.record(route.prefill, time.monotonic() - started)
            decode = self.driver.decode_after_prefill(info, decode,
                                                      self.cluster.snapshot()) or decode
        return await self._decode_leg(decode, req, info, kv_params, started, leg, first,
                                      route.prefill if kv_params else None)

    def worker_headers(self, request_id: str, leg: _LegContext) -> dict[str, str]:
        return {**leg.headers, "X-Request-Id": request_id}

    async def _prefill_leg(self, worker: str, req: ParsedRequest, request_id: str,
                           leg: _LegContext) -> tuple[dict | None, FirstToken | None]:
        """Run the prefill leg: (KV params, its first token if handed off); no params
        means "decode computes the prompt itself"."""
        url = self.cluster.view(worker).url + req.route
        tokens = req.prompt_tokens_estimate
        self.cluster.begin(worker, Role.PREFILL, tokens)
        leg_started = time.monotonic()
        try:
            status, content = await self.health.guard(worker, self._post_and_read(
                url, _prefill_body(req.body, prefill_fields(req)),
                self.worker_headers(request_id, leg), self.prefill_timeout))
        except (UpstreamError, WorkerUnhealthy) as exc:
            if isinstance(exc, UpstreamError):
                self.health.report_failure(worker, f"prefill leg: {exc.__class__.__name__}")
            return self._prefill_failed(worker, request_id, repr(exc)), None
        finally:
            self.cluster.end(worker, Role.PREFILL, tokens)
        self.health.report_success(worker)
        if 400 <= status < 500:
            raise UpstreamReply(status, content)
        if status != 200:
            return self._prefill_failed(worker, request_id, f"HTTP {status}"), None
        try:
            reply = jsonfast.loads(content)
            params = reply.get("kv_transfer_params")
        except (ValueError, AttributeError):
            reply, params = {}, None
        if not params:
            return self._prefill_failed(worker, request_id, "no kv_transfer_params in reply"), None
        prompt_tokens = (reply.get("usage") or {}).get("prompt_tokens") or tokens
        self.driver.prefilled(worker, prompt_tokens,
                              prefill_seconds(reply.get("metrics"), time.monotonic() - leg_started))
        return params, from_prefill_reply(req, reply)

    def _prefill_failed(self, worker: str, request_id: str, why: str) -> None:
        log.warning("prefill leg on %s failed for %s (%s); decoding with local prefill",
                    worker, request_id, why)
        self.metrics.leg_failures.labels("prefill", "local_prefill").inc()
        return None

    async def _decode_leg(self, worker: str, req: ParsedRequest, info: RequestInfo,
                          kv_params: dict | None, started: float,
                          leg: _LegContext, first: FirstToken | None = None,
                          kv_from: str | None = None) -> Reply:
        request_id = info.request_id
        tried: set[str] = set()
        last_error = "no attempt made"
        tokens = info.decode_tokens
        for _ in range(self.config.decode_attempts):
            body, route = dict(req.body), req.route
            if kv_params:
                body["kv_transfer_params"] = kv_params
                if first is not None:  # continues after the first token, as a completion
                    body, route = decode_body(body, first, req.max_tokens or 16), COMPLETIONS
            if req.stream and not req.include_usage:  # we count tokens; the client won't see it
                body["stream_options"] = {**(body.get("stream_options") or {}),
                                          "include_usage": True}
            base = self.cluster.view(worker).url
            if migratable(req):  # token ids let the stream continue on another worker
                body["return_token_ids"] = True
                self._add_migration_hold(body, request_id, worker, base)
            url = base + route
            timeouts = self.stream_timeout if req.stream else self.request_timeout
            self.cluster.begin(worker, Role.DECODE, tokens)
            try:
                upstream = await self.health.guard(worker, self.post(
                    url, body, self.worker_headers(request_id, leg), timeouts))
            except (UpstreamError, WorkerUnhealthy) as exc:
                self.cluster.end(worker, Role.DECODE, tokens)
                if isinstance(exc, UpstreamError):
                    self.health.report_failure(worker, f"decode leg: {exc.__class__.__name__}")
                last_error = f"{worker}: {exc!r}"
                tried.add(worker)
            except BaseException:  # cancelled: the client went away
                self.cluster.end(worker, Role.DECODE, tokens)
                raise
            else:
                self.health.report_success(worker)
                if upstream.status == 200:
                    # counted here: a request whose KV pull failed and was retried is local
                    (self.metrics.pd_mode if kv_params else self.metrics.local_mode).inc()
                    return await self._reply(worker, upstream, req, info, body, tokens,
                                             started, leg, first if kv_params else None,
                                             kv_from if kv_params else None)
                try:
                    content = await upstream.read()
                except UpstreamError as exc:
                    content = repr(exc).encode()
                finally:
                    upstream.release()
                    self.cluster.end(worker, Role.DECODE, tokens)
                if 400 <= upstream.status < 500 and first is not None:
                    # The continuation was refused (e.g. a prompt one token short of the
                    # context: no room after the first token); the client's own request
                    # behaves as on one instance.
                    log.info("decode leg after the handoff refused for %s (HTTP %d); "
                             "sending the request as written", request_id, upstream.status)
                    first = None
                    continue
                if 400 <= upstream.status < 500:
                    raise UpstreamReply(upstream.status, content)
                last_error = f"{worker}: HTTP {upstream.status} {content[:200]!r}"
                if not kv_params:
                    tried.add(worker)
            log.warning("decode leg failed for %s (%s); retrying", request_id, last_error)
            self.metrics.leg_failures.labels("decode", "retry").inc()
            kv_params = None  # whatever failed, the next attempt computes the prompt itself
            first = None
            if worker in tried:
                nxt = self.driver.retry_decode(info, self.cluster.snapshot(), frozenset(tried))
                if nxt is None:
                    break
                worker = nxt
        self.metrics.leg_failures.labels("decode", "gave_up").inc()
        raise GatewayError(502, f"every decode attempt failed; last: {last_error}",
                           code="upstream_unavailable")

    def _add_migration_hold(self, body: dict, request_id: str, worker: str, url: str) -> None:
        """Let a later migration pull this stream's KV from `worker` (see `kv_migration`)."""
        if self.kv is None or not self.config.kv_migration or \
                self.kv.endpoint(worker, url) is None:
            return
        hold = self.kv.new_hold(request_id)
        body["kv_transfer_params"] = {**(body.get("kv_transfer_params") or {}),
                                      **hold.to_params()}

    async def _reply(self, worker: str, upstream: UpstreamResponse, req: ParsedRequest,
                     info: RequestInfo, body: dict, tokens: int, started: float,
                     leg: _LegContext, first: FirstToken | None = None,
                     kv_from: str | None = None) -> Reply:
        request_id = info.request_id
        headers = {"X-Fulcrum-Decode-Worker": worker}
        mode = PD if pulls_kv(body) else LOCAL
        if req.stream:
            relay = StreamRelay(self, worker, upstream, req, request_id, body, tokens, started)
            if first is not None:
                relay.prime(first_event(first), len(first.token_ids))
            relay.client_request_id = leg.client_request_id
            relay.info = info
            relay.kv_from = kv_from
            relay.worker_headers = leg.headers
            self.streams[request_id] = relay
            if self.pending_migrations:
                self._apply_planned_migration(relay)
            return StreamReply(relay, headers)
        try:  # bounded by request_timeout_s from the send (the leg's Timeouts)
            content = await upstream.read()
        except UpstreamError as exc:
            upstream.close()
            raise GatewayError(502, f"worker {worker} failed while answering: {exc!r}",
                               code="upstream_error") from None
        except BaseException:  # cancelled: the client went away; the worker aborts
            upstream.close()
            raise
        else:
            upstream.release()
        finally:
            self.cluster.end(worker, Role.DECODE, tokens)
        try:
            body = jsonfast.loads(content)
            body.pop("kv_transfer_params", None)
        except (ValueError, AttributeError):
            raise GatewayError(502, f"worker {worker} sent a body that is not a JSON object",
                               code="upstream_error") from None
        self.driver.finished(request_id, worker, self._resident(worker),
                             engine_seconds_per_token(body.pop("metrics", None)))
        self._record_usage(body.get("usage"))
        self.metrics.latency(req.route, req.model, mode, worker).e2e.observe(
            time.monotonic() - started)
        return JsonReply(200, jsonfast.dumps(body), headers)

    def _record_usage(self, usage: dict | None) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)
        self.mix.record(prompt, completion)

    def observe_stream(self, worker: str, req: ParsedRequest, request_id: str,
                       obs: StreamObserver, started: float, mode: str = LOCAL) -> None:
        """Record client-side latency of a finished stream and feed the policy."""
        e2e = time.monotonic() - started
        children = self.metrics.latency(req.route, req.model, mode, worker)
        children.e2e.observe(e2e)
        per_token = engine_seconds_per_token(obs.metrics)
        if obs.ttft is not None:
            children.ttft.observe(obs.ttft)
            n = obs.completion_tokens
            if n > 1:
                tpot = (e2e - obs.ttft) / (n - 1)
                children.tpot.observe(tpot)
                if per_token is None:  # the worker reports no timings: the client's view
                    per_token = tpot
        if obs.usage:
            self._record_usage(obs.usage)
        elif obs.content_events:  # no usage asked for: count what we relayed
            self.mix.record(req.prompt_tokens_estimate, obs.content_events)
        self.driver.finished(request_id, worker, self._resident(worker), per_token)

    def _resident(self, worker: str) -> int:
        view = self.cluster.snapshot().by_name(worker)
        return view.decode_tokens_in_flight if view is not None else 0
