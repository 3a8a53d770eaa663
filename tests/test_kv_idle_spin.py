"""The CPU fix that stops vLLM's shm-queue wait loops from spinning (kv_transfer.idle_spin)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq
from vllm.distributed.device_communicators import shm_broadcast

from kv_transfer.idle_spin import make_nap, nap_instead_of_spin


@pytest.fixture
def reader(tmp_path, monkeypatch) -> Iterator[shm_broadcast.SpinCondition]:
    """A reader inside its busy period (it just read a message), as between engine steps."""
    from vllm.distributed import utils as vllm_dist_utils

    # vLLM's own yield, whatever an earlier test in this process installed; restored after.
    monkeypatch.setattr(shm_broadcast, "sched_yield", vllm_dist_utils.sched_yield)
    ctx = zmq.Context()
    cond = shm_broadcast.SpinCondition(is_reader=True, context=ctx,
                                       notify_address=f"ipc://{tmp_path}/notify")
    cond.record_read()
    yield cond
    for sock in (cond.local_notify_socket, cond.read_cancel_socket, cond.write_cancel_socket):
        sock.close(linger=0)
    ctx.term()


def test_the_busy_wait_sleeps_instead_of_yielding(reader, monkeypatch) -> None:
    naps: list[float] = []
    monkeypatch.setattr("time.sleep", naps.append)
    yields: list[int] = []
    monkeypatch.setattr("os.sched_yield", lambda: yields.append(1))

    reader.wait(timeout_ms=20)
    assert yields == [1] and naps == []  # vLLM's own loop: a bare yield, no sleep

    assert nap_instead_of_spin(2e-4) is True
    reader.wait(timeout_ms=20)
    assert naps == [2e-4] and yields == [1]  # the same loop now really sleeps


def test_nap_length_is_bounded() -> None:
    for bad in (0.0, -1.0, 0.5):
        with pytest.raises(ValueError):
            make_nap(bad)
    assert make_nap(1e-4).fulcrum_nap_s == 1e-4
