"""Serve one gateway from N processes on one port (`--gateway-workers N`).

Every process opens its own listening socket with SO_REUSEPORT, so the kernel spreads
connections over them. Process 0 (this one) leads: it keeps the worker supervisor and
the role controller, and listens on a private loopback port too, where followers
forward admin calls. Followers are `fulcrum gateway --follow RUN_DIR` processes that
take the worker table from the leader (router/peers.py). They die with the leader.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

# uvloop and httptools: the event loop and HTTP parser in C; no per-request access log.
FAST_SERVER = {"loop": "uvloop", "http": "httptools", "access_log": False}


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def serve(app: object, sockets: list[socket.socket], log_level: str = "warning") -> None:
    """Run `app` on already-bound sockets until SIGINT/SIGTERM."""
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, **FAST_SERVER)).run(sockets=sockets)


def run_dir_for(port: int) -> Path:
    from instance_manager.models import cache_root

    return cache_root() / "run" / f"gateway-{port}-processes"


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def followers(count: int, run_dir: Path, follower_args: list[str],
              env: dict[str, str] | None = None) -> Iterator[None]:
    """Start `count` follower processes (indices 1..count); stop them on exit."""
    procs = []
    environment = {**os.environ, **(env or {})}
    for index in range(1, count + 1):
        cmd = [sys.executable, "-m", "deploy.cli", "gateway", "--follow", str(run_dir),
               "--process-index", str(index), *follower_args]
        procs.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent, env=environment))
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def fresh_run_dir(port: int) -> Path:
    run_dir = run_dir_for(port)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir
