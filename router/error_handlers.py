"""Every error the gateway itself answers is OpenAI-shaped, counted, and short.

FastAPI's own answers (`{"detail": ...}` for 404/405/422, a plain-text 500) are
replaced here; a request body too large for `--max-body-mb` is refused before any
route reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import GatewayError, clip

log = logging.getLogger("fulcrum.gateway")

_MESSAGES = {404: "no such endpoint", 405: "method not allowed on this endpoint"}


def route_label(request: Request) -> str:
    """A bounded metrics label for the request's route (unknown paths share one)."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "other"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:  # never the offending input itself
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{clip(where, 60) or 'body'}: {clip(str(err.get('msg', '')), 100)}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; counts go to `app.state.metrics.requests`."""
    app.router.redirect_slashes = False  # its Location used the client's Host

    def count(request: Request, status: int) -> None:
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.requests.labels(route_label(request), str(status)).inc()

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return GatewayError(400, _validation_message(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        path = request.url.path
        if exc.status_code == 404 and path.endswith("/") and path != "/":
            target = _route_without_slash(request)
            if target is not None:  # relative Location: never the client's Host
                query = request.url.query
                return RedirectResponse(target + (f"?{query}" if query else ""),
                                        status_code=307)
        message = _MESSAGES.get(exc.status_code) or clip(str(exc.detail), 200)
        headers = dict(exc.headers or {})
        return GatewayError(exc.status_code, message, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s: %r", request.method,
                  clip(request.url.path, 100), exc, exc_info=exc)
        count(request, 500)
        return GatewayError(500, "internal error in the gateway", code="internal_error"
                            ).response()

    def _route_without_slash(request: Request) -> str | None:
        scope = {**request.scope, "path": request.url.path.rstrip("/")}
        for route in app.router.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return scope["path"]
        return None


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: at once when `Content-Length` says so,
    else when the streamed body passes the limit (the route's read then fails)."""

    def __init__(self, app: ASGIApp, max_bytes: int,
                 count: Callable[[str, int], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.count = count  # (path, status) of each refusal, for metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    status = 400 if not value.isdigit() else 413
                    if self.count is not None:
                        self.count(scope.get("path", ""), status)
                    await _send_error(send, GatewayError(
                        status, "bad Content-Length" if status == 400 else
                        f"request body exceeds the gateway's limit of "
                        f"{self.max_bytes / 2**20:g} MiB (--max-body-mb)",
                        code="request_too_large" if status == 413 else None))
                    return
                break
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise GatewayError(413, f"request body exceeds the gateway's limit of "
                                       f"{self.max_bytes / 2**20:g} MiB (--max-body-mb)",
                                       code="request_too_large")
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Send, error: GatewayError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
