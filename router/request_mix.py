"""What the gateway itself saw of recent requests: their length mix, and how long each
prefill leg took, per prefill worker.

Worker-side counters mix roles (a worker that just flipped still reports the legs of
its old role), so the length mix the controller plans with comes from here: one
record per finished request, prompt and completion tokens from its usage.

A worker's own TTFT histogram starts when its engine sees the request; the gateway's
clock starts when the request reaches the gateway, so its prefill legs also carry the
HTTP hops, the worker's API server and the gateway's own routing: on a busy host that
is most of the TTFT the client sees.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from router.quantile import linear_quantile


class RequestMix:
    """A time-windowed log of (prompt tokens, completion tokens) per finished request,
    and the prefill legs' latencies as the gateway measured them (`prefill_legs`)."""

    def __init__(self, horizon_s: float = 600.0, max_records: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._records: deque[tuple[float, int, int]] = deque(maxlen=max_records)
        self.prefill_legs = LegLatencies(horizon_s, max_records, clock)

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


class LegLatencies:
    """A time-windowed log of (worker, seconds) per finished leg of one kind."""

    def __init__(self, horizon_s: float = 600.0, max_records: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self._clock = clock
        self._records: deque[tuple[float, str, float]] = deque(maxlen=max_records)

    def record(self, worker: str, seconds: float) -> None:
        self._records.append((self._clock(), worker, seconds))

    def quantiles(self, window_s: float, q: float = 0.9) -> dict[str, tuple[float, int]]:
        """Per worker with legs in the last `window_s`: (their q-quantile, how many)."""
        now = self._clock()
        while self._records and now - self._records[0][0] > self.horizon_s:
            self._records.popleft()
        by_worker: dict[str, list[float]] = {}
        for t, worker, seconds in self._records:
            if now - t <= window_s:
                by_worker.setdefault(worker, []).append(seconds)
        return {w: (linear_quantile(sorted(v), q), len(v)) for w, v in by_worker.items()}
