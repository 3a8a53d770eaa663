"""Workers as policies see them: a role, a life-cycle state, and immutable views.

The mutable registry (`router.cluster.Cluster`) hands out `ClusterSnapshot` values built
from these types, and so does the simulator, so one policy object runs in both.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    """What the router sends to a worker. Every worker runs `kv_role=kv_both`."""

    PREFILL = "prefill"
    DECODE = "decode"


class WorkerState(enum.StrEnum):
    """Life-cycle state of a worker as the router sees it."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass(frozen=True)
class WorkerView:
    """An immutable picture of one worker, as handed to policies."""

    name: str
    url: str
    role: Role
    state: WorkerState = WorkerState.READY
    in_flight_prefill: int = 0
    in_flight_decode: int = 0
    prefill_tokens_in_flight: int = 0
    decode_tokens_in_flight: int = 0
    kv_cache_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    healthy: bool = True  # False while the gateway's circuit breaker holds it out

    @property
    def in_flight(self) -> int:
        return self.in_flight_prefill + self.in_flight_decode

    @property
    def routable(self) -> bool:
        return self.state == WorkerState.READY and self.healthy


@dataclass(frozen=True)
class ClusterSnapshot:
    """Every worker at one instant."""

    workers: tuple[WorkerView, ...]
    taken_at: float = field(default_factory=time.monotonic)

    def routable(self, role: Role | None = None) -> tuple[WorkerView, ...]:
        return tuple(
            w for w in self.workers if w.routable and (role is None or w.role == role)
        )

    def decode_candidates(self, exclude: frozenset[str] = frozenset()
                          ) -> tuple[WorkerView, ...]:
        """The decode pool minus `exclude`; with that empty, any routable worker (every
        worker can decode, computing the prompt itself)."""
        pool = tuple(w for w in self.routable(Role.DECODE) if w.name not in exclude)
        return pool or tuple(w for w in self.routable() if w.name not in exclude)

    def by_name(self, name: str) -> WorkerView | None:
        return next((w for w in self.workers if w.name == name), None)
