"""What a routing policy may know about a request before it runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestInfo:
    """A request as the client sent it: prompt size (and text, for length prediction) and
    the client's output cap; never the true output length."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_time: float = 0.0
    tbt_target_s: float | None = None
    prompt_text: str | None = None
