"""Finding free local ports for clusters started by tests and benchmarks."""

from __future__ import annotations

import socket


def free_port_block(count: int, start: int) -> int:
    """The first port p >= start such that p .. p+count-1 are all free on loopback."""
    port = start
    while port + count < 65536:
        socks: list[socket.socket] = []
        try:
            for p in range(port, port + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return port
        except OSError:
            port += count
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {count} free ports from {start}")


KV_PORT_OFFSET = 1000
"""A worker's KV block server listens on its HTTP port + this, unless told otherwise: every
port is derived from one the user chose, so two clusters on one host do not collide."""


def kv_port_for(http_port: int) -> int:
    return http_port + KV_PORT_OFFSET


def busy_ports(ports: list[int], host: str = "127.0.0.1") -> list[int]:
    """The ports of `ports` that something on `host` already listens on (or holds)."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host if host not in ("0.0.0.0", "::") else "", port))
            except OSError:
                busy.append(port)
    return busy
