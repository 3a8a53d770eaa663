"""Types shared by every control policy, the live controller and the simulator.

A control policy is a small class with one method, `decide(snapshot) -> actions`.
It never acts: the controller (live) or the simulator applies the actions, so
`--dry-run`, `fulcrum explain` and simulation all run the same decision code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from core.pressure import SLOPressure
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role


@dataclass(frozen=True)
class WorkerMetrics:
    """One worker's windowed measurements (None where the window saw no samples)."""

    name: str
    ttft_p50_s: float | None = None
    ttft_p90_s: float | None = None
    itl_p50_s: float | None = None
    itl_p90_s: float | None = None
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    requests_finished_per_s: float = 0.0
    ttft_samples: int = 0
    itl_samples: int = 0
    gateway_ttft_p90_s: float | None = None
    """The prefill legs this worker served as the gateway timed them, p90 over the window:
    from the request's arrival at the gateway to the worker's reply (the HTTP hops, the
    worker's API server and the gateway's routing on top of `ttft_p90_s`, which starts
    when the engine sees the request). None where nothing measured it."""
    gateway_ttft_samples: int = 0


@dataclass(frozen=True)
class ControlSnapshot:
    """Everything a control policy may read at one tick; immutable."""

    time: float
    cluster: ClusterSnapshot
    metrics: Mapping[str, WorkerMetrics]
    window_s: float
    slo: SLOTargets = field(default_factory=SLOTargets)
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    arrival_rate_per_s: float | None = None
    """Requests per second over the window (None where the producer does not count them)."""
    pressure: tuple[SLOPressure, ...] = ()
    """Predicted SLO misses the routing policy reported since the previous tick."""


@dataclass(frozen=True)
class FlipAction:
    """Move one worker to the other pool, with the reason a person can read."""

    worker: str
    to: Role
    reason: str


@runtime_checkable
class ControlPolicy(Protocol):
    """Decides role flips from a snapshot; must not mutate anything."""

    name: str

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        ...
