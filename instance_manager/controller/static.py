"""The static policy: hold a fixed prefill:decode ratio (the baseline every paper beats)."""

from __future__ import annotations

from dataclasses import dataclass

from core.workers import Role
from instance_manager.controller.base import ControlSnapshot, FlipAction
from instance_manager.controller.common import (
    PolicyNote,
    describe_load,
    flip_in_progress,
    least_loaded,
    other,
    pool,
)


@dataclass(frozen=True)
class StaticConfig:
    """prefill:decode is the ratio to hold; each pool keeps at least one worker."""

    prefill: int = 1
    decode: int = 1

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 0 or self.prefill + self.decode == 0:
            raise ValueError("static ratio needs non-negative parts, not both zero")


def target_prefill_count(total: int, prefill: float, decode: float) -> int:
    """Workers the prefill pool should hold out of `total`, never emptying either pool."""
    if total < 2:
        return total
    ideal = round(total * prefill / (prefill + decode))
    return min(total - 1, max(1, ideal))


class StaticPolicy:
    """Moves one worker per tick toward a fixed ratio; otherwise does nothing."""

    name = "static"

    def __init__(self, config: StaticConfig | None = None) -> None:
        self.config = config or StaticConfig()
        self.last_note = PolicyNote("no tick yet")

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        busy = flip_in_progress(snapshot)
        n_p, n_d = len(pool(snapshot, Role.PREFILL)), len(pool(snapshot, Role.DECODE))
        target = target_prefill_count(n_p + n_d, self.config.prefill, self.config.decode)
        numbers = {"prefill_workers": n_p, "decode_workers": n_d, "target_prefill": target}
        if busy:
            self.last_note = PolicyNote(f"hold: {busy} is draining", numbers)
            return []
        if target == n_p:
            self.last_note = PolicyNote(
                f"hold: {n_p}P:{n_d}D matches ratio {self.config.prefill}:{self.config.decode}",
                numbers)
            return []
        source = Role.PREFILL if n_p > target else Role.DECODE
        worker = least_loaded(snapshot, source)
        if worker is None:
            self.last_note = PolicyNote(f"hold: the {source.value} pool cannot spare a worker",
                                        numbers)
            return []
        reason = (f"static ratio {self.config.prefill}:{self.config.decode} wants {target} "
                  f"prefill of {n_p + n_d}, have {n_p}; {worker.name} is least loaded "
                  f"({describe_load(worker)})")
        self.last_note = PolicyNote(reason, numbers)
        return [FlipAction(worker.name, other(source), reason)]
