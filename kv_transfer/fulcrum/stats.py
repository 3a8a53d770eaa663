"""Transfer statistics: collected in the worker, exported by the API server to Prometheus.

Exports ``vllm:fulcrum_kv_bytes_pulled_total`` / ``..._bytes_served_total``,
``vllm:fulcrum_kv_pulls_total`` / ``..._serves_total``, ``vllm:fulcrum_kv_transfer_seconds``
(histogram, consumer side), ``vllm:fulcrum_kv_tcp_pulls_total`` (pulls that crossed hosts
or nodes), ``vllm:fulcrum_kv_failed_transfers_total`` and
``vllm:fulcrum_kv_expired_leases_total``.
"""

from __future__ import annotations

import threading
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

_KEYS_LIST = ("recv_seconds", "recv_bytes")
_KEYS_COUNT = ("sent_bytes", "sent_transfers", "failed", "expired", "tcp_pulls")


def _empty() -> dict[str, Any]:
    return {**{k: [] for k in _KEYS_LIST}, **{k: 0 for k in _KEYS_COUNT}}


class FulcrumStats(KVConnectorStats):
    """One interval's observations (serialisable: plain lists and ints)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.data = _empty()

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> FulcrumStats:
        for key in _KEYS_LIST:
            self.data[key] = list(self.data.get(key, [])) + list(other.data.get(key, []))
        for key in _KEYS_COUNT:
            self.data[key] = self.data.get(key, 0) + other.data.get(key, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        secs, nbytes = self.data["recv_seconds"], self.data["recv_bytes"]
        total_s = sum(secs)
        return {
            "num_pulls": len(secs),
            "pulled_MB": round(sum(nbytes) / 1e6, 3),
            "avg_pull_ms": round(1e3 * total_s / len(secs), 3) if secs else 0.0,
            "pull_GBps": round(sum(nbytes) / total_s / 1e9, 3) if total_s else 0.0,
            "num_served": self.data["sent_transfers"],
            "served_MB": round(self.data["sent_bytes"] / 1e6, 3),
            "num_failed": self.data["failed"],
            "num_expired": self.data["expired"],
        }

    def is_empty(self) -> bool:
        return not self.data["recv_seconds"] and not any(
            self.data[k] for k in _KEYS_COUNT)


class StatsRecorder:
    """Thread-safe accumulator the transfer threads write into; drained each engine step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = _empty()

    def pulled(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._data["recv_bytes"].append(nbytes)
            self._data["recv_seconds"].append(seconds)

    def served(self, nbytes: int) -> None:
        with self._lock:
            self._data["sent_bytes"] += nbytes
            self._data["sent_transfers"] += 1

    def pulled_over_tcp(self) -> None:
        with self._lock:
            self._data["tcp_pulls"] += 1

    def failed(self) -> None:
        with self._lock:
            self._data["failed"] += 1

    def expired(self, count: int) -> None:
        if count:
            with self._lock:
                self._data["expired"] += count

    def drain(self) -> FulcrumStats | None:
        with self._lock:
            data, self._data = self._data, _empty()
        stats = FulcrumStats(data=data)
        return None if stats.is_empty() else stats


_DEFAULT_PORT = 5900  # the connector's default block-server port

_SECONDS_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                    5.0, 10.0]


class FulcrumPromMetrics(KVConnectorPromMetrics):
    """Registers the Prometheus series and feeds them from :class:`FulcrumStats` data."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric: Any) -> dict[int, Any]:
            return create_metric_per_engine(metric, per_engine_labelvalues)

        self.bytes = {
            direction: create_metric_per_engine(
                self._counter_cls(
                    name=f"vllm:fulcrum_kv_bytes_{direction}",
                    documentation=f"KV bytes {direction} by the Fulcrum connector.",
                    labelnames=labelnames),
                per_engine_labelvalues)
            for direction in ("pulled", "served")
        }
        self.pulls = per_engine(self._counter_cls(
            name="vllm:fulcrum_kv_pulls", labelnames=labelnames,
            documentation="KV transfers this worker pulled (consumer side)."))
        self.serves = per_engine(self._counter_cls(
            name="vllm:fulcrum_kv_serves", labelnames=labelnames,
            documentation="KV transfers this worker served (producer side)."))
        self.seconds = per_engine(self._histogram_cls(
            name="vllm:fulcrum_kv_transfer_seconds", labelnames=labelnames,
            buckets=_SECONDS_BUCKETS,
            documentation="Time to pull one request's KV (consumer side)."))
        self.tcp_pulls = per_engine(self._counter_cls(
            name="vllm:fulcrum_kv_tcp_pulls", labelnames=labelnames,
            documentation="KV pulls that streamed over TCP (peer on another host or node)."))
        self.failed = per_engine(self._counter_cls(
            name="vllm:fulcrum_kv_failed_transfers", labelnames=labelnames,
            documentation="KV pulls that failed (the request recomputed its prompt)."))
        self.expired = per_engine(self._counter_cls(
            name="vllm:fulcrum_kv_expired_leases", labelnames=labelnames,
            documentation="Held prefill blocks freed because no decoder came in time."))
        self._report_endpoint(vllm_config, labelnames, per_engine_labelvalues)

    def _report_endpoint(self, vllm_config: Any, labelnames: list[str],
                         per_engine_labelvalues: dict[int, list[object]]) -> None:
        """``vllm:fulcrum_kv_endpoint_info{host,port} 1``: where decoders reach this
        worker's block server, so a gateway learns it from the worker instead of assuming."""
        extra = getattr(vllm_config.kv_transfer_config, "kv_connector_extra_config",
                        None) or {}
        host = str(extra.get("host", "127.0.0.1"))
        base = int(extra.get("port", _DEFAULT_PORT))
        info = self._gauge_cls(name="vllm:fulcrum_kv_endpoint_info",
                               documentation="Address of this worker's KV block server.",
                               labelnames=[*labelnames, "host", "port"],
                               multiprocess_mode="mostrecent")
        for idx, values in per_engine_labelvalues.items():
            info.labels(*values, host, str(base + idx)).set(1)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for secs in data.get("recv_seconds", []):
            self.seconds[engine_idx].observe(secs)
        pulled = sum(data.get("recv_bytes", []))
        if pulled:
            self.bytes["pulled"][engine_idx].inc(pulled)
        if data.get("recv_seconds"):
            self.pulls[engine_idx].inc(len(data["recv_seconds"]))
        if data.get("sent_bytes"):
            self.bytes["served"][engine_idx].inc(data["sent_bytes"])
        if data.get("sent_transfers"):
            self.serves[engine_idx].inc(data["sent_transfers"])
        if data.get("failed"):
            self.failed[engine_idx].inc(data["failed"])
        if data.get("tcp_pulls"):
            self.tcp_pulls[engine_idx].inc(data["tcp_pulls"])
        if data.get("expired"):
            self.expired[engine_idx].inc(data["expired"])
