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
from router.policies.ares import MigrationCost, MigrationPlanner, RecomputeCost
from router.policies.latency_model import DecodeLatencyModel, PrefillLatencyModel

log = logging.getLogger("fulcrum.rebalance")


KV_MOVE_COST = MigrationCost(fixed_s=0.06, per_token_s=3.5e-5)
"""A move whose target pulls the source's KV (`router.kv_migration`): the stream stalls for
the abort, the target's admission and the pull; the target prefills one token. The numbers
are the stall measured for SmolLM2-135M in float32 on CPU workers
(`benchmarks/migration_cost.py`: 71 ms at 272 tokens of context, 97 ms at 1040)."""


def link_move_cost(kv_bytes_per_token: float, link_bytes_s: float,
                   link_latency_s: float) -> MigrationCost:
    """The price of a KV pull over a link of known bandwidth and latency (the simulator's
    transfer model): the link's latency plus each context token's KV bytes at its rate."""
    return MigrationCost(fixed_s=link_latency_s, per_token_s=kv_bytes_per_token / link_bytes_s)


def default_planner(moves_kv: bool = False,
                    kv_cost: MigrationCost = KV_MOVE_COST) -> MigrationPlanner:
    """A planner pricing decode steps with the default linear step-time model and a move
    as what it costs: with `moves_kv`, a KV pull priced by `kv_cost` (the live gateway's
    measured stall unless told otherwise); else a recompute (the target prefills prompt +
    generated tokens again, as `Dispatcher.migrate` does without the KV)."""
    model = DecodeLatencyModel()
    cost = kv_cost if moves_kv else RecomputeCost(PrefillLatencyModel())
    return MigrationPlanner(lambda worker, tokens: model.predict(tokens), cost)


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
