"""Run ASGI apps on real sockets in background threads, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app, port: int | None = None) -> Iterator[str]:  # noqa: ANN001
    """Serve `app` on 127.0.0.1 until the block ends; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextmanager
def fake_pd_cluster(model: str) -> Iterator:
    """Two fake workers served here, registered READY as prefill `p0` and decode `d0`."""
    from benchmarks.fake_worker import create_fake_worker
    from core.workers import Role, WorkerState
    from router.cluster import Cluster

    with serve_in_thread(create_fake_worker("P", model)) as p_url, \
            serve_in_thread(create_fake_worker("D", model)) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        yield cluster


def eventually(check, timeout_s: float = 5.0) -> bool:  # noqa: ANN001
    """Poll `check()` every 20 ms until it is truthy or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
