"""What a routing policy tells the controller when no worker can meet an SLO (a type
both `router` and `instance_manager` use, so it lives below them).

The policy never flips roles itself (Arrow Algorithm 1 step 3 hands that to the
controller). It records an `SLOPressure` and, if given one, calls a sink; the controller
either passes that sink in or drains the policy's buffer on its own tick.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from core.workers import Role


@dataclass(frozen=True)
class SLOPressure:
    """No candidate for `leg` met its target; the request went to `fallback` anyway."""

    leg: Role
    request_id: str
    fallback: str | None
    predicted_s: float
    target_s: float
    at: float


PressureSink = Callable[[SLOPressure], None]


class PressureLog:
    """A bounded buffer of pressure signals plus an optional push callback."""

    def __init__(self, sink: PressureSink | None = None, maxlen: int = 1024) -> None:
        self.sink = sink
        self._buffer: deque[SLOPressure] = deque(maxlen=maxlen)

    def report(self, signal: SLOPressure) -> None:
        self._buffer.append(signal)
        if self.sink is not None:
            self.sink(signal)

    def drain(self) -> list[SLOPressure]:
        """Signals since the last drain, oldest first."""
        out = list(self._buffer)
        self._buffer.clear()
        return out
