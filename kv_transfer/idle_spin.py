"""Stop vLLM's shared-memory queues from spinning a CPU core between engine steps.

vLLM's engine core and its workers hand each step to each other through shared-memory
queues. A reader that has read a message in the last second (``SpinCondition.busy_loop_s``)
waits for the next one by calling ``sched_yield()`` in a tight loop. On a GPU host that buys
microseconds. On a CPU host it is harmful: a decode worker waiting for a KV pull steps its
engine every millisecond, so its worker process spins a whole core; when another worker is
pinned to the same core (more workers than cores), the spinner starved it completely in our
measurements. If that other worker is the producer the pull waits for, neither makes
progress until the pull times out: the 30 s "post-flip KV stall" of issue 4, seen with NIXL
and with our connector (py-spy: the producer runnable with zero CPU ticks for seconds).

:func:`nap_instead_of_spin` replaces the ``sched_yield`` those loops call with a short sleep
(default 100 us). The loop keeps its shape and its timing guarantees (a message is picked up
within about one nap), but the waiting thread gives its core away for real. Simply turning
the busy period off is *not* an option: vLLM's fallback (blocking in ``zmq`` poll on a
conflated notification socket) can miss a wake-up, and we measured 16-20 s engine stalls
with it. Both of our CPU connectors call this in every process that builds them (engine
core and worker); GPU hosts keep vLLM's behaviour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_NAP_S = 1e-4


def make_nap(nap_s: float) -> Callable[[], None]:
    """A drop-in for vLLM's ``sched_yield`` that sleeps ``nap_s`` seconds."""
    if not 0 < nap_s <= 0.01:
        raise ValueError(f"nap_s must be in (0, 0.01] seconds, got {nap_s}")

    def nap() -> None:
        time.sleep(nap_s)

    nap.fulcrum_nap_s = nap_s  # type: ignore[attr-defined]
    return nap


def nap_instead_of_spin(nap_s: float = DEFAULT_NAP_S) -> bool:
    """Make vLLM's shm-queue wait loops in this process sleep ``nap_s`` instead of yielding.

    Returns False (and logs why) when vLLM no longer looks like what this was written for
    (vllm 0.32: ``shm_broadcast`` calls a module-level ``sched_yield`` from
    ``SpinCondition.wait``); serving still works, only the spinning stays.
    """
    nap = make_nap(nap_s)
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError as exc:
        log.warning("fulcrum: cannot calm vLLM's queue spinning (%s)", exc)
        return False
    wait: Any = getattr(getattr(shm_broadcast, "SpinCondition", None), "wait", None)
    uses_yield = wait is not None and "sched_yield" in wait.__code__.co_names
    if not uses_yield or not callable(getattr(shm_broadcast, "sched_yield", None)):
        log.warning("fulcrum: vLLM's shm_broadcast no longer spins through sched_yield; "
                    "left as is (co-located CPU workers may starve each other)")
        return False
    shm_broadcast.sched_yield = nap
    return True


def on_cpu(vllm_config: Any) -> bool:
    """Whether this vLLM instance computes on CPU (the only case where we calm the spin)."""
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    if device is not None:
        return str(device) == "cpu"
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())
