"""The OpenAI request routes on a lean ASGI path, beside FastAPI.

`POST /v1/completions` and `POST /v1/chat/completions` carry every token a client
sees, so they skip FastAPI's routing, middleware and response classes: the body is read
straight from `receive`, the dispatcher's `Reply` is written straight to `send`. Every
other route (admin, `/v1/models`, `/metrics`, `/health`, OpenAPI) stays on FastAPI.

A client that goes away is noticed at once, whether the gateway is waiting for a worker
or relaying its stream: one watcher task per request cancels the request's task, which
closes the worker connection (vLLM then aborts the request and frees its KV blocks).

The same rules as every other route apply: admission (429 when full; a stream holds
its slot until it ends), API keys, the body limit (413), OpenAI-shaped errors, never a
bare 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from router.admission import Admission
from router.dispatch import Dispatcher, UpstreamReply
from router.errors import GatewayError
from router.limits import client_request_id, new_request_id, too_large
from router.metrics import ERROR, GatewayMetrics
from router.replies import JsonReply, Reply, StreamReply
from router.security import AuthConfig
from router.validation import CHAT, COMPLETIONS, parse_client_cap, parse_request

log = logging.getLogger("fulcrum.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

ROUTES = frozenset((COMPLETIONS, CHAT))
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache")]
_JSON = (b"content-type", b"application/json")


def is_openai_request(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ROUTES


class _ClientLeft(Exception):
    """The client disconnected before its request body arrived."""


class _Watch:
    """Cancels the request's task when the client disconnects (until `stop`)."""

    __slots__ = ("gone", "stopped", "_task", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self.stopped = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.stopped and self._task is not None:
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        self.stopped = True
        self._watcher.cancel()


async def _read_body(receive: Receive, content_length: bytes | None, limit: int) -> bytes:
    """The request body; 413 as soon as it is known to exceed `limit`."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise GatewayError(400, "Content-Length is not a number") from None
        if declared > limit:
            raise too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientLeft
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise too_large(limit)
        return body
    buffer = bytearray(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        buffer += message.get("body", b"")
        if len(buffer) > limit:
            raise too_large(limit)
    return bytes(buffer)


def _header_list(headers: dict[str, str], extra: tuple[bytes, bytes]) -> list:
    out = [extra]
    out.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    return out


class OpenAIEndpoints:
    """The ASGI handler of the OpenAI request routes."""

    def __init__(self, served_models: tuple[str, ...], metrics: GatewayMetrics,
                 admission: Admission, auth: AuthConfig, max_body_bytes: int) -> None:
        self.served_models = served_models
        self.metrics = metrics
        self.admission = admission
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.dispatcher: Dispatcher | None = None  # set once the app's lifespan starts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["path"]
        raw_id = authorization = content_length = client_cap = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                raw_id = value.decode("latin-1")
            elif key == b"x-fulcrum-client-cap":
                client_cap = parse_client_cap(value.decode("latin-1"))
            elif key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == b"content-length":
                content_length = value
        request_id = new_request_id()  # ours: unique, what workers and /admin see
        client_id = client_request_id(raw_id)
        headers = {"X-Request-Id": client_id or request_id, "X-Fulcrum-Request-Id": request_id}
        started = time.monotonic()
        watch = None
        admitted = False
        model = ""
        try:
            self.admission.enter()  # first: overload is answered before the body is read
            admitted = True
            self.auth.check_client(authorization)
            body = await _read_body(receive, content_length, self.max_body_bytes)
            parsed = parse_request(route, body, self.served_models, client_cap)
            model = parsed.model
            del body  # one copy of the body from here on: the parsed one
            if self.dispatcher is None:
                raise GatewayError(503, "the gateway is starting", code="not_ready")
            watch = _Watch(receive)
            reply: Reply = await self.dispatcher.dispatch(
                parsed, request_id, client_id, self.auth.worker_headers(authorization))
            reply.headers.update(headers)
        except _ClientLeft:
            self._finish(route, 499, admitted)
            return
        except GatewayError as exc:
            reply = exc.reply(headers)
        except UpstreamReply as exc:
            reply = exc.reply(headers)
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                if admitted:
                    self.admission.leave()
                raise
            asyncio.current_task().uncancel()
            log.info("client left before a reply; aborted %s", request_id)
            self._finish(route, 499, admitted)
            return
        except Exception as exc:  # never a bare 500: OpenAI-shaped and counted
            log.error("unexpected error serving %s: %r", request_id, exc, exc_info=exc)
            reply = GatewayError(500, "internal error in the gateway",
                                 code="internal_error").reply(headers)
        self.metrics.count_request(route, reply.status)
        if isinstance(reply, StreamReply):
            try:
                await self._stream(reply, send, watch)
            finally:
                if admitted:  # the slot lasts as long as the stream
                    self.admission.leave()
            return
        if watch is not None:
            watch.stop()
        if admitted:
            self.admission.leave()
        if reply.status != 200:
            self.metrics.latency(route, model, ERROR, "").e2e.observe(time.monotonic() - started)
        await self._send_json(reply, send)

    def _finish(self, route: str, status: int, admitted: bool) -> None:
        self.metrics.count_request(route, status)
        if admitted:
            self.admission.leave()

    @staticmethod
    async def _send_json(reply: JsonReply, send: Send) -> None:
        headers = _header_list(reply.headers, _JSON)
        headers.append((b"content-length", str(len(reply.body)).encode()))
        try:
            await send({"type": "http.response.start", "status": reply.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})
        except OSError:  # the client went away
            pass

    @staticmethod
    async def _stream(reply: StreamReply, send: Send, watch: _Watch) -> None:
        relay = reply.relay
        chunks = relay.chunks()
        headers = _SSE_HEADERS + _header_list(reply.headers, _SSE_HEADERS[1])[1:]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for data in chunks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            watch.stop()
            await send({"type": "http.response.body", "body": b""})
        except OSError:  # the client went away while we were sending
            pass
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            asyncio.current_task().uncancel()
        finally:
            watch.stop()
            await chunks.aclose()
            await relay.close()
