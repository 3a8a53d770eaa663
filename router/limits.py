"""Limits on what a client may send: body size, JSON depth and constants, request ids.

Everything here turns hostile input into an OpenAI-style 4xx before any worker (or
any encoder that would choke on it later) sees it.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import AsyncIterator

from router.errors import GatewayError

MAX_JSON_DEPTH = 64
MAX_CLIENT_ID_CHARS = 128
_SAFE_ID = re.compile(r"[^A-Za-z0-9._:@/+=-]")


async def read_limited(chunks: AsyncIterator[bytes], content_length: str | None,
                       max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `max_bytes`.

    Reads into one growing buffer (no list of chunks joined at the end)."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise GatewayError(400, "Content-Length is not a number") from None
        if declared > max_bytes:
            raise too_large(max_bytes)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise too_large(max_bytes)
    return bytes(body)


def too_large(max_bytes: int) -> GatewayError:
    return GatewayError(413, f"request body exceeds the gateway's limit of "
                        f"{max_bytes / 2**20:g} MiB (--max-body-mb)",
                        code="request_too_large")


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: valid JSON syntax, but no JSON encoder can send it on
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads_strict(raw: bytes) -> object:
    """Parse JSON as RFC 8259 says: no NaN/Infinity, bounded nesting; 400 otherwise."""
    try:
        value = json.loads(raw, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}",
                           code="invalid_json") from None
    check_depth(value)
    return value


def _too_deep() -> GatewayError:
    return GatewayError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels",
                        code="invalid_json")


def check_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise a 400 if `value` nests lists/objects deeper than `limit` (iterative)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise _too_deep()
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))


def new_request_id() -> str:
    """The gateway's own id for a request: unique, the only key it files requests under."""
    return f"fulcrum-{uuid.uuid4().hex}"


def client_request_id(raw: str | None) -> str | None:
    """The client's `X-Request-Id`, made safe to echo: printable ASCII only, capped."""
    if not raw:
        return None
    safe = _SAFE_ID.sub("_", raw[:MAX_CLIENT_ID_CHARS])
    return safe or None
