"""ARES decode rebalancing in the live gateway: every few seconds ask the dispatcher's
`PolicyDriver` (its migration planner over the policy's residents) whether moving one
running stream off the most loaded decode worker pays for itself (predicted remaining
tokens x step-time gain > migration cost), and if so move it (`Dispatcher.migrate`). Only
policies that track residents (ARES) take part; the simulator drives the same planner
through the same driver call.
"""

from __future__ import annotations

import asyncio
import logging

from core.feedback import ResidentRequest
from core.workers import Role
from router.dispatch import Dispatcher
from router.policies.ares import MigrationPlanner, RecomputeCost
from router.policies.latency_model import DecodeLatencyModel, PrefillLatencyModel

log = logging.getLogger("fulcrum.rebalance")


def default_planner() -> MigrationPlanner:
    """A planner pricing decode steps with the default linear step-time model and a move
    as the recompute it is (`Dispatcher.migrate` resubmits the stream to the target, which
    prefills prompt + generated tokens again)."""
    model = DecodeLatencyModel()
    return MigrationPlanner(lambda worker, tokens: model.predict(tokens),
                            RecomputeCost(PrefillLatencyModel()))


def rebalance_once(dispatcher: Dispatcher) -> str | None:
    """One planning round; returns the moved request id, if any."""

    def movable(worker: str, r: ResidentRequest) -> bool:
        relay = dispatcher.streams.get(r.request_id)
        return relay is not None and relay.migratable and relay.worker == worker

    decoders = [v.name for v in dispatcher.cluster.snapshot().routable(Role.DECODE)]
    decision = dispatcher.driver.plan_migration(decoders, movable)
    if decision is None:
        return None
    try:
        dispatcher.migrate(decision.request_id, decision.target)
    except (KeyError, ValueError) as exc:  # finished or target gone meanwhile
        log.debug("planned migration skipped: %s", exc)
        return None
    log.info("rebalance: moving %s %s -> %s", decision.request_id, decision.source,
             decision.target)
    return decision.request_id


async def rebalance_forever(dispatcher: Dispatcher, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            rebalance_once(dispatcher)
        except Exception:  # noqa: BLE001 - the loop must outlive one bad round
            log.exception("rebalance round failed")
