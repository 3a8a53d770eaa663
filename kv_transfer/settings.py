"""Per-worker KV-transfer settings: what a vLLM worker needs on its command line and in its
environment so that its KV cache can move to and from other workers.

A registry maps connector names to builders, so another transport slots in by adding one
entry to ``CONNECTORS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

NIXL_CPU_MODULE = "kv_transfer.nixl_cpu"
"""Module vLLM imports (``kv_connector_module_path``) for our CPU-fixed NixlConnector."""

FULCRUM_MODULE = "kv_transfer.fulcrum.connector"
"""Module vLLM imports (``kv_connector_module_path``) for our own connector."""

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class KVSettings:
    """KV-transfer settings of one worker.

    ``kv_transfer_config`` is the JSON object for ``--kv-transfer-config`` (empty: no KV
    transfer); ``env`` holds extra environment variables for the worker process. Each call of
    :func:`worker_kv_settings` builds fresh dicts; treat them as read-only.
    """

    connector: str
    kv_transfer_config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.kv_transfer_config)

    def cli_args(self) -> list[str]:
        """The vLLM command-line arguments for these settings (none when disabled)."""
        if not self.enabled:
            return []
        return ["--kv-transfer-config", json.dumps(self.kv_transfer_config, sort_keys=True)]


def _no_kv_transfer(*, side_channel_port: int, host: str) -> KVSettings:
    """Aggregated worker: no connector at all."""
    return KVSettings(connector="none")


def _nixl(*, side_channel_port: int, host: str) -> KVSettings:
    """vLLM's NixlConnector with our CPU fixes, over UCX (tcp on loopback for a local host).

    ``kv_both`` keeps the worker role-flippable per request. ``recompute``: if the KV cannot be
    pulled (e.g. the prefill worker died), the decode worker recomputes the prompt itself and
    the request still succeeds with the same output; with ``fail`` it would end in HTTP 500
    (or, when streaming, an HTTP 200 stream holding one error event). Either way the decode
    leg first waits for NIXL: ~0.1-0.2 s against a peer it has already talked to, up to vLLM's
    5 s handshake timeout against one it has not.
    """
    config = {
        "kv_connector": "NixlConnector",
        "kv_connector_module_path": NIXL_CPU_MODULE,
        "kv_role": "kv_both",
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
    }
    env = {
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port),
        "VLLM_NIXL_SIDE_CHANNEL_HOST": host,
    }
    if host in LOOPBACK_HOSTS:
        env["UCX_NET_DEVICES"] = "lo"
    return KVSettings(connector="nixl", kv_transfer_config=config, env=env)


def _fulcrum(*, side_channel_port: int, host: str) -> KVSettings:
    """Our own connector (``kv_transfer/fulcrum``): per-request roles under ``kv_both``.

    The block server listens on ``side_channel_port``; decoders reach it at ``host``. The
    transport follows the KV cache's device (NCCL for CUDA, otherwise single-copy reads on
    one host with a TCP fallback). ``recompute``: a decode leg whose pull fails computes
    the prompt itself.
    """
    config = {
        "kv_connector": "FulcrumConnector",
        "kv_connector_module_path": FULCRUM_MODULE,
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "host": host,
            "port": side_channel_port,
            "transport": "auto",
            "lease_seconds": 30,
        },
    }
    return KVSettings(connector="fulcrum", kv_transfer_config=config, env={})


CONNECTORS: Mapping[str, Callable[..., KVSettings]] = MappingProxyType(
    {
        "none": _no_kv_transfer,
        "nixl": _nixl,
        "fulcrum": _fulcrum,
    }
)
"""Known connector names and the builders of their per-worker settings."""


def worker_kv_settings(
    connector: str, *, side_channel_port: int, host: str = "127.0.0.1"
) -> KVSettings:
    """KV-transfer settings for one worker.

    ``side_channel_port`` must be distinct per worker on a host (NIXL's handshake listener);
    ``host`` is the address other workers reach this one on.
    """
    try:
        build = CONNECTORS[connector]
    except KeyError:
        known = ", ".join(sorted(CONNECTORS))
        raise ValueError(f"unknown KV connector {connector!r}; known: {known}") from None
    if not 0 < side_channel_port < 65536:
        raise ValueError(f"side_channel_port out of range: {side_channel_port}")
    return build(side_channel_port=side_channel_port, host=host)
