"""Prometheus view of the role controller: what it aims for, what it forecasts, its SLOs.

Read from the controller's last decision at scrape time, so the numbers on a dashboard
are the very ones `fulcrum explain` prints. Register on the gateway's registry with a
getter (the admin API may replace the policy, not the controller object).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from instance_manager.controller.loop import Controller, Decision

# A policy's own name for its prefill-pool target, in its decision numbers.
_TARGET_KEYS = ("target_prefill_workers", "target_prefill")


def target_prefill_workers(decision: Decision) -> int | None:
    """The prefill-pool size the policy aims for at this tick.

    Policies that state a target (dopd, static) are taken at their word; otherwise the
    target is the current pool moved by the tick's actions (arrow flips one at a time).
    """
    numbers = decision.numbers
    for key in _TARGET_KEYS:
        if isinstance(numbers.get(key), int | float):
            return int(numbers[key])
    current = numbers.get("prefill_workers")
    if not isinstance(current, int | float):
        return None
    moves = sum(1 if a.to.value == "prefill" else -1 for a in decision.actions)
    return int(current) + moves


class ControllerMetrics(Collector):
    """`fulcrum_controller_*` series; none but the SLOs before the first tick."""

    def __init__(self, controller: Callable[[], Controller | None]) -> None:
        self._controller = controller

    def collect(self) -> Iterator:
        ctl = self._controller()
        if ctl is None:
            return
        info = GaugeMetricFamily("fulcrum_controller_info", "Always 1: the control policy "
                                 "and whether it acts or only advises",
                                 labels=["policy", "mode"])
        info.add_metric([ctl.policy.name, "advisory" if ctl.advisory else "act"], 1)
        yield info
        slo = GaugeMetricFamily("fulcrum_controller_slo_target_seconds",
                                "Latency targets the controller defends", labels=["metric"])
        slo.add_metric(["ttft"], ctl.slo.ttft_s)
        slo.add_metric(["tpot"], ctl.slo.tpot_s)
        yield slo
        decisions = ctl.decisions
        ticks = CounterMetricFamily("fulcrum_controller_ticks", "Controller decisions made")
        ticks.add_metric([], decisions[-1].tick if decisions else 0)
        yield ticks
        yield from decision_metrics(decisions[-1] if decisions else None)


def decision_metrics(last: Decision | None) -> Iterator[GaugeMetricFamily]:
    """Target pools, dopd's share forecast and arrow's pool load of one decision.

    Every family is declared even when the policy does not state its numbers (no
    samples then), so dashboards and alerts see one stable set of names.
    """
    numbers = last.numbers if last is not None else {}
    pools = GaugeMetricFamily("fulcrum_controller_target_workers",
                              "Pool sizes the control policy aims for", labels=["role"])
    target = target_prefill_workers(last) if last is not None else None
    total = sum(numbers.get(k, 0) or 0 for k in ("prefill_workers", "decode_workers"))
    if target is not None and total:
        pools.add_metric(["prefill"], target)
        pools.add_metric(["decode"], total - target)
    yield pools
    share = GaugeMetricFamily("fulcrum_controller_prefill_share_ratio",
                              "Share of work that is prefill: observed over the window, "
                              "and forecast ahead (dopd)", labels=["kind"])
    if "prefill_share_now" in numbers:
        share.add_metric(["observed"], numbers["prefill_share_now"])
        share.add_metric(["forecast"], numbers.get("prefill_share_forecast",
                                                   numbers["prefill_share_now"]))
    yield share
    load = GaugeMetricFamily("fulcrum_controller_pool_load_ratio",
                             "Pool latency over its SLO target; above 1 misses (arrow)",
                             labels=["role"])
    if "prefill_load" in numbers:
        load.add_metric(["prefill"], numbers["prefill_load"])
        load.add_metric(["decode"], numbers.get("decode_load", 0.0))
    yield load
