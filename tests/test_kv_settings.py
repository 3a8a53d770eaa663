"""Unit tests of kv_transfer.settings and of the CPU fixes in kv_transfer.nixl_cpu.

No vLLM server is started; the nixl_cpu tests import vLLM (several seconds, once per session)
and build real NIXL agents in-process.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from kv_transfer.settings import CONNECTORS, KVSettings, worker_kv_settings

# --------------------------------------------------------------------------- settings.py


def test_nixl_settings_config_and_env() -> None:
    settings = worker_kv_settings("nixl", side_channel_port=5701)

    assert settings.enabled
    assert settings.kv_transfer_config == {
        "kv_connector": "NixlConnector",
        "kv_connector_module_path": "kv_transfer.nixl_cpu",
        "kv_role": "kv_both",
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",
    }
    assert settings.env == {
        "VLLM_NIXL_SIDE_CHANNEL_PORT": "5701",
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "UCX_NET_DEVICES": "lo",
    }


def test_nixl_settings_non_loopback_host_leaves_ucx_device_choice_to_ucx() -> None:
    settings = worker_kv_settings("nixl", side_channel_port=5702, host="10.0.0.7")

    assert settings.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.7"
    assert "UCX_NET_DEVICES" not in settings.env


def test_each_call_builds_independent_settings() -> None:
    first = worker_kv_settings("nixl", side_channel_port=5700)
    second = worker_kv_settings("nixl", side_channel_port=5701)
    first.kv_transfer_config["kv_role"] = "kv_producer"

    assert second.kv_transfer_config["kv_role"] == "kv_both"
    assert first.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] != second.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]
    with pytest.raises(AttributeError):
        first.connector = "none"  # type: ignore[misc]


def test_cli_args_carry_the_config_as_json() -> None:
    settings = worker_kv_settings("nixl", side_channel_port=5700)
    flag, value = settings.cli_args()

    assert flag == "--kv-transfer-config"
    assert json.loads(value) == settings.kv_transfer_config


def test_none_connector_means_no_kv_transfer() -> None:
    settings = worker_kv_settings("none", side_channel_port=5700)

    assert settings == KVSettings(connector="none")
    assert not settings.enabled
    assert settings.cli_args() == []
    assert settings.env == {}


def test_unknown_connector_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as excinfo:
        worker_kv_settings("p2pnccl", side_channel_port=5700)

    message = str(excinfo.value)
    assert "p2pnccl" in message
    for name in CONNECTORS:
        assert name in message


@pytest.mark.parametrize("port", [0, 65536])
def test_side_channel_port_must_be_a_port(port: int) -> None:
    with pytest.raises(ValueError):
        worker_kv_settings("nixl", side_channel_port=port)


def test_config_is_accepted_by_vllm_and_loads_our_connector() -> None:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from kv_transfer import nixl_cpu

    settings = worker_kv_settings("nixl", side_channel_port=5700)
    config = KVTransferConfig(**settings.kv_transfer_config)

    assert config.is_kv_producer and config.is_kv_consumer
    assert config.kv_load_failure_policy == "recompute"
    assert KVConnectorFactory.get_connector_class(config) is nixl_cpu.NixlConnector


# --------------------------------------------------------------------------- nixl_cpu.py


@pytest.fixture(scope="module")
def nixl_cpu():
    from kv_transfer import nixl_cpu

    return nixl_cpu


@pytest.fixture(scope="module")
def base_worker():
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    return base_worker


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _threads_added_by_agent(base_worker, name: str) -> int:
    """Threads a real NIXL agent adds when built the way vLLM builds it (config from
    ``base_worker.nixl_agent_config``, as patched or not)."""
    before = _thread_count()
    config = base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True)
    agent = base_worker.NixlWrapper(name, config)
    added = _thread_count() - before
    del agent
    return added


def test_connector_class_is_a_vllm_kv_connector(nixl_cpu) -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, SupportsHMA
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector as VllmNixl

    assert issubclass(nixl_cpu.NixlConnector, KVConnectorBase_V1)
    assert issubclass(nixl_cpu.NixlConnector, VllmNixl)
    assert issubclass(nixl_cpu.NixlConnector, SupportsHMA)


def test_fix_removes_the_progress_thread_of_a_real_agent(nixl_cpu, base_worker) -> None:
    default_threads = _threads_added_by_agent(base_worker, "test-default")
    with nixl_cpu.cpu_friendly_nixl_worker_init():
        config = base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True)
        patched_threads = _threads_added_by_agent(base_worker, "test-patched")

    assert config.enable_pthread is False
    assert patched_threads == default_threads - 1
    # Restored afterwards: vLLM's own default is back.
    assert base_worker.nixl_agent_config(num_threads=4).enable_pthread is True


def test_fix_hides_numa_cores_only_during_construction(nixl_cpu, base_worker) -> None:
    platform = base_worker.current_platform
    with nixl_cpu.cpu_friendly_nixl_worker_init():
        base_worker.nixl_agent_config(num_threads=4)
        assert platform.discover_numa_topology() == []

    assert "discover_numa_topology" not in vars(platform)
    assert platform.discover_numa_topology == type(platform).discover_numa_topology


def test_fails_loudly_when_vllm_stops_using_the_agent_config_hook(nixl_cpu) -> None:
    with pytest.raises(nixl_cpu.NixlCpuPatchError, match="progress thread"):
        with nixl_cpu.cpu_friendly_nixl_worker_init():
            pass  # vLLM built its worker without nixl_agent_config(): we must notice


def test_fails_loudly_when_the_hook_is_missing(nixl_cpu, base_worker, monkeypatch) -> None:
    monkeypatch.setattr(base_worker, "nixl_agent_config", None)
    with pytest.raises(nixl_cpu.NixlCpuPatchError, match="missing"):
        with nixl_cpu.cpu_friendly_nixl_worker_init():
            pytest.fail("the block must not run without the hook")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to detect re-pinning")
def test_fails_loudly_when_the_thread_is_re_pinned_anyway(nixl_cpu, base_worker) -> None:
    original = os.sched_getaffinity(0)
    try:
        with pytest.raises(nixl_cpu.NixlCpuPatchError, match="re-pinned"):
            with nixl_cpu.cpu_friendly_nixl_worker_init():
                base_worker.nixl_agent_config(num_threads=4)
                os.sched_setaffinity(0, {max(original)})
    finally:
        os.sched_setaffinity(0, original)


class _WorkerLikeVllms:
    """Stand-in for vLLM's NixlPullConnectorWorker: does exactly the two things the fixes
    target, the way base_worker.py (vllm 0.32) does them, and nothing else."""

    def __init__(self, vllm_config, engine_id, kv_cache_config) -> None:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

        self.agent_config = base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True)
        cores = [max(node) for node in base_worker.current_platform.discover_numa_topology()]
        if cores:
            os.sched_setaffinity(0, cores)


def _worker_role_construction(connector_cls, monkeypatch):
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import connector as vllm_connector

    monkeypatch.setattr(vllm_connector, "NixlPullConnectorWorker", _WorkerLikeVllms)
    vllm_config = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(
            **worker_kv_settings("nixl", side_channel_port=5700).kv_transfer_config
        ),
        parallel_config=SimpleNamespace(
            prefill_context_parallel_size=1,
            decode_context_parallel_size=1,
            tensor_parallel_size=1,
        ),
    )
    return connector_cls(vllm_config, KVConnectorRole.WORKER, SimpleNamespace())


def test_worker_role_connector_gets_both_fixes(nixl_cpu, monkeypatch) -> None:
    original = os.sched_getaffinity(0)
    try:
        connector = _worker_role_construction(nixl_cpu.NixlConnector, monkeypatch)
        assert connector.connector_worker.agent_config.enable_pthread is False
        assert os.sched_getaffinity(0) == original
    finally:
        os.sched_setaffinity(0, original)


def test_plain_vllm_connector_would_have_been_affected(nixl_cpu, base_worker, monkeypatch) -> None:
    """Control: the same construction through vLLM's own class keeps the progress thread and,
    on a multi-core NUMA node, re-pins the thread (what the fixes exist for)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector as VllmNixl

    original = os.sched_getaffinity(0)
    try:
        connector = _worker_role_construction(VllmNixl, monkeypatch)
        assert connector.connector_worker.agent_config.enable_pthread is True
        reserved = {max(node) for node in base_worker.current_platform.discover_numa_topology()}
        if reserved and reserved != original:
            assert os.sched_getaffinity(0) == reserved
    finally:
        os.sched_setaffinity(0, original)
