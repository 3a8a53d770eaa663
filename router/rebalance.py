"""ARES decode rebalancing in the live gateway: every few seconds ask the migration
planner whether moving one running stream off the most loaded decode worker pays
for itself (predicted remaining tokens x step-time gain > migration cost), and if
so move it (`Dispatcher.migrate`). Only policies that track residents (ARES) take
part; the planner is the same object the simulator would use.
"""

from __future__ import annotations

import asyncio
import logging

from core.workers import Role
from router.dispatch import Dispatcher
from router.policies.ares import MigrationPlanner, RecomputeCost, ResidentRequest
from router.policies.latency_model import DecodeLatencyModel, PrefillLatencyModel

log = logging.getLogger("fulcrum.rebalance")


def default_planner() -> MigrationPlanner:
    """A planner pricing decode steps with the default linear step-time model and a move
    as the recompute it is (`Dispatcher.migrate` resubmits the stream to the target, which
    prefills prompt + generated tokens again)."""
    model = DecodeLatencyModel()
    return MigrationPlanner(lambda worker, tokens: model.predict(tokens),
                            RecomputeCost(PrefillLatencyModel()))


def live_residents(dispatcher: Dispatcher) -> dict[str, list[ResidentRequest]] | None:
    """The policy's residents, limited to streams that can still move, plus idle workers."""
    residents = getattr(dispatcher.policy, "residents", None)
    if residents is None:
        return None
    out: dict[str, list[ResidentRequest]] = {
        v.name: [] for v in dispatcher.cluster.snapshot().routable(Role.DECODE)}
    for worker, requests in residents().items():
        if worker not in out:
            continue
        out[worker] = [r for r in requests
                       if (relay := dispatcher.streams.get(r.request_id)) is not None
                       and relay.migratable and relay.worker == worker]
    return out


def rebalance_once(dispatcher: Dispatcher, planner: MigrationPlanner) -> str | None:
    """One planning round; returns the moved request id, if any."""
    residents = live_residents(dispatcher)
    if not residents:
        return None
    decision = planner.decide(residents)
    if decision is None:
        return None
    try:
        dispatcher.migrate(decision.request_id, decision.target)
    except (KeyError, ValueError) as exc:  # finished or target gone meanwhile
        log.debug("planned migration skipped: %s", exc)
        return None
    log.info("rebalance: moving %s %s -> %s (gain %.2fs > cost %.2fs)", decision.request_id,
             decision.source, decision.target, decision.gain_s, decision.cost_s)
    return decision.request_id


async def rebalance_forever(dispatcher: Dispatcher, planner: MigrationPlanner,
                            interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            rebalance_once(dispatcher, planner)
        except Exception:  # noqa: BLE001 - the loop must outlive one bad round
            log.exception("rebalance round failed")
