"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from router.replies import JsonReply

MAX_MESSAGE_CHARS = 500  # errors never echo a whole request back

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def clip(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class GatewayError(Exception):
    """An error the gateway answers with a given status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, type_: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = None if param is None else clip(param, 100)
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else
                                        "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status,
                            headers={**self.headers, **(headers or {})})

    def reply(self, headers: dict[str, str] | None = None) -> JsonReply:
        """The error for the lean OpenAI path (no framework objects)."""
        from router.replies import JsonReply

        return JsonReply(self.status, json.dumps(self.body()).encode(),
                         {**self.headers, **(headers or {})})

    def sse_event(self) -> bytes:
        """The error as one server-sent event, for failures after a stream has begun."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def error_response(status: int, message: str, **kw: str | None) -> JSONResponse:
    return GatewayError(status, message, **kw).response()
