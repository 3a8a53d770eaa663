"""KV-cache transfer between vLLM workers: per-worker settings and the connectors they load.

``kv_transfer.nixl_cpu`` is imported by vLLM itself (``kv_connector_module_path``), not here,
so that importing the settings stays cheap and free of vLLM.
"""

from kv_transfer.settings import CONNECTORS, KVSettings, worker_kv_settings

__all__ = ["CONNECTORS", "KVSettings", "worker_kv_settings"]
