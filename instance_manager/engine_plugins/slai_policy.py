"""SLAI's scheduling rules (arXiv 2508.01002, Eq. 8), free of vLLM so they test in isolation.

- Decode deadline (last schedulable time) of a running request:
  `LST = end of the batch that produced its previous token + TBT target − θ · mean batch time`.
  A decode is *critical* once `now ≥ LST`.
- Waiting prefills: shortest prompt first, with aging. The key `prompt_tokens +
  aging_tokens_per_s · arrival_time` orders the queue exactly as "prompt length minus
  aging × time waited" would at any instant (the `now` term is common to all requests), so
  it never needs re-sorting, and a prompt of L tokens is overtaken by shorter newcomers for
  at most `L / aging_tokens_per_s` seconds.
- Per-request TBT targets come from the request's `vllm_xargs` (vLLM copies them into
  `SamplingParams.extra_args`): `{"tbt_ms": 100}` or `{"tbt_tier": "strict"}`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

T = TypeVar("T")

TBT_MS_ARG = "tbt_ms"
TBT_TIER_ARG = "tbt_tier"


def _default_tiers() -> dict[str, float]:
    return {"strict": 0.1, "standard": 0.2, "relaxed": 0.5}


@dataclass(frozen=True)
class SLAIConfig:
    """Knobs, read from vLLM's `--additional-config '{"slai": {...}}'`."""

    theta: float = 10.0               # Θ: offset in mean batch times
    theta_low: float | None = None    # dynamic Θ (paper: 5) while KV usage < memory_limit
    memory_limit: float = 0.96
    default_tbt_s: float = 0.2
    tiers: dict[str, float] = field(default_factory=_default_tiers)  # name -> TBT seconds
    aging_tokens_per_s: float = 100.0
    strict_tier_first: bool = False   # admit requests with tighter TBT targets first
    defer_noncritical: bool = False   # skip non-critical decodes while prefills wait
    log_admissions: bool = False      # one INFO line per admitted prefill

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> SLAIConfig:
        if not data:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SLAI settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def theta_for(self, kv_usage: float) -> float:
        if self.theta_low is not None and kv_usage < self.memory_limit:
            return self.theta_low
        return self.theta

    def tbt_target(self, extra_args: Mapping[str, Any] | None) -> float:
        """A request's TBT target in seconds from its extra args, else the default."""
        if extra_args:
            if TBT_MS_ARG in extra_args:
                value = float(extra_args[TBT_MS_ARG])
                if value <= 0:
                    raise ValueError(f"{TBT_MS_ARG} must be positive, got {value}")
                return value / 1000.0
            tier = extra_args.get(TBT_TIER_ARG)
            if tier is not None:
                try:
                    return self.tiers[str(tier)]
                except KeyError:
                    raise ValueError(f"unknown {TBT_TIER_ARG} {tier!r}; "
                                     f"known: {sorted(self.tiers)}") from None
        return self.default_tbt_s


def last_schedulable_time(prev_batch_end: float, tbt_s: float, theta: float,
                          mean_batch_s: float) -> float:
    """Eq. 8: the latest time a decode can be scheduled and still meet its TBT target."""
    return prev_batch_end + tbt_s - theta * mean_batch_s


def waiting_key(prompt_tokens: int, arrival_time: float, tbt_s: float,
                config: SLAIConfig) -> tuple[float, float, float]:
    """Sort key of a waiting prefill: (tier, aged length, arrival)."""
    tier = tbt_s if config.strict_tier_first else 0.0
    return (tier, prompt_tokens + config.aging_tokens_per_s * arrival_time, arrival_time)


class BatchTimer:
    """Running mean of batch execution time (cumulative mean, then an EWMA)."""

    def __init__(self, alpha: float = 0.05, warmup: int = 20) -> None:
        self.alpha = alpha
        self.warmup = warmup
        self.count = 0
        self.mean_s = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        weight = 1.0 / self.count if self.count <= self.warmup else self.alpha
        self.mean_s += weight * (seconds - self.mean_s)


@dataclass(frozen=True)
class RunningItem:
    """What decode ordering needs to know about one running request."""

    prefilling: bool
    prev_batch_end: float | None
    tbt_s: float


def running_order_key(item: RunningItem, now: float, theta: float,
                      mean_batch_s: float) -> tuple[int, float]:
    """Critical decodes (by LST), then unfinished prefills, then non-critical decodes.

    A decode that has not produced a token under this scheduler yet counts as critical."""
    if item.prefilling:
        return (1, 0.0)
    if item.prev_batch_end is None:
        return (0, float("-inf"))
    lst = last_schedulable_time(item.prev_batch_end, item.tbt_s, theta, mean_batch_s)
    return (0, lst) if lst <= now else (2, lst)


class KeyedQueue(Generic[T]):
    """A min-heap of items under a fixed key, with the method set of vLLM's RequestQueue.

    "Prepending" re-inserts by key: position comes from the key, never from history."""

    def __init__(self, key: Callable[[T], tuple]) -> None:
        self._key = key
        self._heap: list[tuple[tuple, int, T]] = []
        self._counter = itertools.count()

    def add_request(self, request: T) -> None:
        heapq.heappush(self._heap, (self._key(request), next(self._counter), request))

    def pop_request(self) -> T:
        if not self._heap:
            raise IndexError("pop from an empty queue")
        return heapq.heappop(self._heap)[2]

    def peek_request(self) -> T:
        if not self._heap:
            raise IndexError("peek from an empty queue")
        return self._heap[0][2]

    def prepend_request(self, request: T) -> None:
        self.add_request(request)

    def prepend_requests(self, requests: Iterable[T]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: T) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[T]) -> None:
        gone = {id(r) for r in requests}
        self._heap = [entry for entry in self._heap if id(entry[2]) not in gone]
        heapq.heapify(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[T]:
        return (entry[2] for entry in sorted(self._heap, key=lambda e: (e[0], e[1])))
