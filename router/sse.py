"""Watch an OpenAI server-sent-event stream as it passes through, without changing it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from router import jsonfast


def _has_content(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if any(v for k, v in delta.items() if k != "role"):
            return True
    return False


@dataclass
class StreamObserver:
    """Finds the first content token, counts content events, and keeps the usage block."""

    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    content_events: int = 0
    usage: dict | None = None
    metrics: dict | None = None  # vLLM's per-request timings (--enable-per-request-metrics)
    saw_done: bool = False
    saw_error: bool = False
    _buffer: bytes = b""

    def feed(self, data: bytes) -> list[tuple[bytes, dict | None]]:
        """Take raw bytes; return the events they completed, each with its parsed chunk."""
        buffer = self._buffer + data if self._buffer else data
        if b"\n\n" not in buffer:
            self._buffer = buffer
            return []
        parts = buffer.split(b"\n\n")
        self._buffer = parts.pop()
        return [(event + b"\n\n", self._on_event(event)) for event in parts if event]

    def discard_pending(self) -> None:
        """Forget a partial event (its stream was closed mid-event)."""
        self._buffer = b""

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete."""
        return self._buffer

    def _on_event(self, event: bytes) -> dict | None:
        if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
            return self._on_data(event[6:])
        chunk = None
        for line in event.splitlines():
            if line.startswith(b"data:"):
                chunk = self._on_data(line[5:].strip()) or chunk
        return chunk

    def _on_data(self, payload: bytes) -> dict | None:
        if payload == b"[DONE]":
            self.saw_done = True
            return None
        try:
            chunk = jsonfast.loads(payload)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            self.saw_error = True
        if chunk.get("usage"):
            self.usage = chunk["usage"]
            if isinstance(chunk.get("metrics"), dict):
                self.metrics = chunk["metrics"]
        if _has_content(chunk):
            self.content_events += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
        return chunk

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def completion_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return self.content_events


def is_usage_only(chunk: dict | None) -> bool:
    """The final chunk vLLM sends for `stream_options.include_usage`: usage, no choices."""
    return bool(chunk) and bool(chunk.get("usage")) and not chunk.get("choices")
