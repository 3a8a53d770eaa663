"""Latency targets, shared by routing policies, control policies and the simulator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SLOTargets:
    """Per-request latency targets (seconds): time to first token and time per output token."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1
