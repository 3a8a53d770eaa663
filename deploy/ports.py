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
