"""The OpenAI request routes on a lean ASGI path, beside FastAPI.

`POST /v1/completions` and `POST /v1/chat/completions` carry every token a client
sees, so they skip FastAPI's routing, middleware and response classes: the body is read
straight from `receive`, the dispatcher's `Reply` is written straight to `send`. Every
other route (admin, `/v1/models`, `/metrics`, `/health`, OpenAPI) stays on FastAPI.

A client that goes away is noticed at once, whether the gateway is waiting for a worker
or relaying its stream: one watcher task per request cancels the request's task, which
closes the worker connection (vLLM then aborts the request and frees its KV blocks).

Checks that run before a request is parsed (API keys, admission, body limits) are
`RequestCheck` functions in `OpenAIEndpoints.checks`; each raises `GatewayError`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from router.dispatch import Dispatcher, UpstreamReply
from router.errors import GatewayError
from router.metrics import GatewayMetrics
from router.replies import JsonReply, Reply, StreamReply
from router.validation import CHAT, COMPLETIONS, parse_request

log = logging.getLogger("fulcrum.gateway")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
RequestCheck = Callable[[Scope, bytes], None]

ROUTES = frozenset((COMPLETIONS, CHAT))
MAX_BODY_BYTES = 32 * 1024 * 1024
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


async def _read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientLeft
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientLeft
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise GatewayError(413, f"request body is larger than {limit} bytes")
        parts.append(part)
    return b"".join(parts)


def _header_list(headers: dict[str, str], extra: tuple[bytes, bytes]) -> list:
    out = [extra]
    out.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
    return out


class OpenAIEndpoints:
    """The ASGI handler of the OpenAI request routes."""

    def __init__(self, served_models: tuple[str, ...], metrics: GatewayMetrics,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.served_models = served_models
        self.metrics = metrics
        self.dispatcher: Dispatcher | None = None  # set once the app's lifespan starts
        self.max_body_bytes = max_body_bytes
        self.checks: list[RequestCheck] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["path"]
        request_id = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")
                break
        request_id = request_id or f"fulcrum-{uuid.uuid4().hex}"
        headers = {"X-Request-Id": request_id}
        started = time.monotonic()
        watch = None
        try:
            body = await _read_body(receive, self.max_body_bytes)
            for check in self.checks:
                check(scope, body)
            parsed = parse_request(route, body, self.served_models)
            watch = _Watch(receive)
            if self.dispatcher is None:
                raise GatewayError(503, "the gateway is starting", code="not_ready")
            reply: Reply = await self.dispatcher.dispatch(parsed, request_id)
        except _ClientLeft:
            self.metrics.count_request(route, 499)
            return
        except GatewayError as exc:
            reply = exc.reply(headers)
        except UpstreamReply as exc:
            reply = exc.reply(headers)
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                raise
            asyncio.current_task().uncancel()
            log.info("client left before a reply; aborted %s", request_id)
            self.metrics.count_request(route, 499)
            return
        self.metrics.count_request(route, reply.status)
        if isinstance(reply, StreamReply):
            await self._stream(reply, send, watch)
            return
        if watch is not None:
            watch.stop()
        if reply.status != 200:
            self.metrics.for_route(route).e2e.observe(time.monotonic() - started)
        await self._send_json(reply, send)

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
