"""What the dispatcher answers with, independent of any web framework.

The lean OpenAI path (`router.openai_asgi`) writes these to the ASGI `send` callable;
nothing on the request path builds Starlette responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.relay import StreamRelay


@dataclass(frozen=True)
class JsonReply:
    """A complete JSON answer (`body` already encoded)."""

    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class StreamReply:
    """A 200 server-sent-event stream, relayed from a worker by `relay`."""

    relay: StreamRelay
    headers: dict[str, str]

    status = 200


Reply = JsonReply | StreamReply
