"""Reads the few vLLM gauges the router itself needs (KV usage, running, waiting)."""

from __future__ import annotations

import asyncio
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

from core.exposition import filter_exposition
from core.workers import WorkerState
from router.cluster import Cluster

log = logging.getLogger("fulcrum.engine_stats")

_GAUGES = {
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:num_requests_running": "num_running",
    "vllm:num_requests_waiting": "num_waiting",
}
_NAMES = tuple(_GAUGES)


def parse_engine_gauges(text: str) -> dict[str, float]:
    """Sum each gauge of interest over its label sets (one engine per worker here)."""
    found = {field: 0.0 for field in _GAUGES.values()}
    for family in text_string_to_metric_families(filter_exposition(text, _NAMES)):
        field = _GAUGES.get(family.name)
        if field is None:
            continue
        found[field] = sum(s.value for s in family.samples if s.name == family.name)
    return found


async def poll_engine_stats(cluster: Cluster, client: httpx.AsyncClient,
                            interval_s: float) -> None:
    """Forever: refresh every live worker's gauges in the registry. Runs only when no
    role controller scrapes the workers (one scraper per worker); parsing runs off the
    event loop."""
    while True:
        for view in cluster.snapshot().workers:
            if view.state not in (WorkerState.READY, WorkerState.DRAINING):
                continue
            try:
                resp = await client.get(view.url + "/metrics", timeout=2.0)
                resp.raise_for_status()
                g = await asyncio.to_thread(parse_engine_gauges, resp.text)
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("metrics scrape of %s failed: %r", view.name, exc)
                continue
            cluster.set_engine_stats(view.name, kv_cache_usage=g["kv_cache_usage"],
                                     num_running=int(g["num_running"]),
                                     num_waiting=int(g["num_waiting"]))
        await asyncio.sleep(interval_s)
