"""A control connection between two workers: framed JSON messages plus raw byte runs."""

from __future__ import annotations

import ctypes
import json
import socket
import struct
from typing import Any

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 << 20
SOCKET_BUFFER = 4 << 20


class ChannelError(ConnectionError):
    """The peer went away or broke the protocol."""


def raw_view(addr: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` at ``addr`` (memory the caller keeps alive)."""
    return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


def tune(sock: socket.socket) -> None:
    """Low latency, large buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


class Channel:
    """One TCP connection; blocking, used by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float) -> Channel:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            raise ChannelError(f"cannot reach {host}:{port}: {exc}") from exc
        tune(sock)
        return cls(sock)

    def settimeout(self, timeout_s: float | None) -> None:
        self.sock.settimeout(timeout_s)

    def send_msg(self, msg: dict[str, Any]) -> None:
        body = json.dumps(msg, separators=(",", ":")).encode()
        try:
            self.sock.sendall(_HEADER.pack(len(body)) + body)
        except OSError as exc:
            raise ChannelError(f"send failed: {exc}") from exc

    def recv_msg(self) -> dict[str, Any]:
        (size,) = _HEADER.unpack(self._recv_exact(_HEADER.size))
        if size > MAX_MESSAGE:
            raise ChannelError(f"message too large: {size}")
        msg = json.loads(self._recv_exact(size))
        if not isinstance(msg, dict):
            raise ChannelError("message is not an object")
        return msg

    def send_raw(self, view: memoryview) -> None:
        try:
            self.sock.sendall(view)
        except OSError as exc:
            raise ChannelError(f"send failed: {exc}") from exc

    def recv_into(self, view: memoryview) -> None:
        got = 0
        total = len(view)
        try:
            while got < total:
                n = self.sock.recv_into(view[got:], total - got)
                if n == 0:
                    raise ChannelError("peer closed the connection")
                got += n
        except OSError as exc:
            raise ChannelError(f"recv failed: {exc}") from exc

    def _recv_exact(self, size: int) -> bytes:
        buf = bytearray(size)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
