"""The recent request length mix, as the gateway itself saw it.

Worker-side counters mix roles (a worker that just flipped still reports the legs of
its old role), so the length mix the controller plans with comes from here: one
record per finished request, prompt and completion tokens from its usage.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RequestMix:
    """A time-windowed log of (prompt tokens, completion tokens) per finished request."""

    def __init__(self, horizon_s: float = 600.0, max_records: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._records: deque[tuple[float, int, int]] = deque(maxlen=max_records)

    def record(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._records.append((self._clock(), prompt_tokens, completion_tokens))

    def means(self, window_s: float) -> tuple[float | None, float | None, int]:
        """(mean prompt tokens, mean completion tokens, requests) over the last `window_s`."""
        now = self._clock()
        while self._records and now - self._records[0][0] > self.horizon_s:
            self._records.popleft()
        recent = [(p, c) for t, p, c in self._records if now - t <= window_s]
        if not recent:
            return None, None, 0
        n = len(recent)
        return sum(p for p, _ in recent) / n, sum(c for _, c in recent) / n, n
