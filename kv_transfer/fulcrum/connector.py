"""``FulcrumConnector``: the class vLLM instantiates (``kv_connector = "FulcrumConnector"``,
``kv_connector_module_path = "kv_transfer.fulcrum.connector"``, ``kv_role = "kv_both"``).

vLLM builds one instance in the scheduler (role SCHEDULER) and one per worker (role WORKER);
each delegates to its half. Settings come from ``kv_connector_extra_config``:

* ``host`` / ``port``: where decoders reach this worker's block server (port per worker).
* ``transport``: ``auto`` (NCCL for CUDA KV caches, else CPU), ``cpu`` or ``nccl``.
* ``node_id``: the cluster node this worker runs on (Ray's); on CPU, workers on different
  nodes move KV over TCP even when the nodes share a machine.
* ``lease_seconds``: how long held prefill blocks wait for their decoder (default 30).
* ``direct_holds``: the scheduler registers a finished prefill's lease with its worker over
  loopback at once (default true; see :mod:`kv_transfer.fulcrum.notify`), instead of in
  the next engine step's metadata.
* ``max_concurrent``: bound on simultaneous transfers per direction (default 4).
* ``queue_nap_s``: on CPU hosts, vLLM's queue wait loops sleep this long instead of spinning
  (default 1e-4; see :mod:`kv_transfer.idle_spin`). Not applied on GPUs.
* ``gil_switch_interval_s``: the worker process's ``sys.setswitchinterval`` (default 1 ms,
  Python's is 5 ms; also ``$FULCRUM_KV_GIL_SWITCH_S``). The transfer threads share the GIL
  with the forward pass's Python code; each of the few times a transfer needs the GIL it
  otherwise waits up to 5 ms while a step runs, which made pulls under load take tens of ms.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.logger import init_logger

from kv_transfer.fulcrum.metadata import FulcrumMetadata
from kv_transfer.fulcrum.notify import HoldNotifier
from kv_transfer.fulcrum.scheduler_side import FulcrumScheduler
from kv_transfer.fulcrum.stats import FulcrumPromMetrics, FulcrumStats
from kv_transfer.fulcrum.transport import make_transport
from kv_transfer.fulcrum.worker_side import FulcrumWorker
from kv_transfer.idle_spin import DEFAULT_NAP_S, nap_instead_of_spin, on_cpu

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

DEFAULT_PORT = 5900
DEFAULT_LEASE_S = 30.0
DEFAULT_GIL_SWITCH_S = 0.001


class FulcrumConnector(KVConnectorBase_V1):
    """Pull-mode P/D KV transfer with per-request roles; see the package docstring."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        cfg = self._kv_transfer_config
        extra = cfg.kv_connector_extra_config or {}
        dp_index = vllm_config.parallel_config.data_parallel_index
        self._host = str(extra.get("host", "127.0.0.1"))
        self._port = int(extra.get("port", DEFAULT_PORT)) + dp_index
        self._transport_kind = str(extra.get("transport", "auto"))
        self._node_id = str(extra.get("node_id", ""))
        if on_cpu(vllm_config):
            nap_instead_of_spin(float(extra.get("queue_nap_s", DEFAULT_NAP_S)))
        if len(kv_cache_config.kv_cache_groups) > 1:
            raise ValueError("FulcrumConnector supports one KV cache group; start vLLM with "
                             "--disable-hybrid-kv-cache-manager or a full-attention model")
        self._scheduler: FulcrumScheduler | None = None
        self._worker: FulcrumWorker | None = None
        lease_s = float(extra.get("lease_seconds", DEFAULT_LEASE_S))
        if role == KVConnectorRole.SCHEDULER:
            direct = str(extra.get("direct_holds", os.environ.get(
                "FULCRUM_KV_DIRECT_HOLDS", "1"))).lower() not in ("0", "false", "no")
            self._scheduler = FulcrumScheduler(
                engine_id=str(cfg.engine_id), host=self._host, port=self._port,
                block_size=vllm_config.cache_config.block_size,
                notifier=HoldNotifier("127.0.0.1", self._port, lease_s) if direct else None)
        else:
            switch = float(extra.get("gil_switch_interval_s") or os.environ.get(
                "FULCRUM_KV_GIL_SWITCH_S") or DEFAULT_GIL_SWITCH_S)
            if switch > 0:
                sys.setswitchinterval(switch)
            self._worker = FulcrumWorker(
                host=self._host, port=self._port, num_blocks=kv_cache_config.num_blocks,
                lease_s=lease_s,
                max_concurrent=int(extra.get("max_concurrent", 4)))

    # --- scheduler side --------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta()

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        self._scheduler.pulls_finished(connector_output.finished_recving or ())

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        return (0,)  # we move the request's own blocks: every group we support

    # --- worker side -----------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        kind = self._transport_kind
        if kind == "auto":
            first = next(iter(kv_caches.values()))
            kind = "nccl" if first.device.type == "cuda" else "cpu"
        options: dict[str, Any] = {"device": next(iter(kv_caches.values())).device,
                                   "host": self._host} if kind == "nccl" else {
                                       "node_id": self._node_id}
        self._worker.register_kv_caches(kv_caches, make_transport(kind, **options))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, FulcrumMetadata)
        self._worker.start_step(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole-request async loads; nothing per layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # pull mode: the producer's blocks are read in place after the request ends

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sent, received, failed = self._worker.finished()
        return KVConnectorTransferResults(finished_sending=sent, finished_recving=received,
                                          failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None and self._scheduler.notifier is not None:
            self._scheduler.notifier.close()

    # --- metrics ---------------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return FulcrumStats(data=data) if data is not None else FulcrumStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict,
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]
                           ) -> FulcrumPromMetrics:
        return FulcrumPromMetrics(vllm_config, metric_types, labelnames,
                                  per_engine_labelvalues)
