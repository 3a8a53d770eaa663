"""A lean pooled HTTP/1.1 client for the request path: the gateway's legs to workers.

Every request a client makes becomes one or two POSTs to workers, so this client does
only that: keep-alive connections per worker, a request written in one call, the
response parsed by httptools (chunked bodies decoded), a body read whole or as the
chunks arrive. Reading pauses when a slow client lets more than `_HIGH_WATER` bytes
pile up. Every wait is bounded: connect, idle read (streams) and total (whole
answers) timeouts. Control-plane calls (scrapes, admin) use httpx instead.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 1 << 20


class UpstreamError(Exception):
    """A worker connection failed, broke off or sent something that is not HTTP."""


class WorkerLost(UpstreamError):
    """The gateway gave up on a worker's answer (its worker left rotation, or its stream
    stalled) and moves the request elsewhere."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """A worker did not connect or answer in time."""


@dataclass(frozen=True)
class Timeouts:
    """`total`: the whole exchange; `idle`: the longest wait for the next bytes."""

    connect: float = 5.0
    total: float | None = None
    idle: float | None = None


@lru_cache(maxsize=1024)
def _split(url: str) -> tuple[str, int, str, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, port, path, f"Host: {parts.netloc}\r\n".encode("latin-1")


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"worker sent invalid HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamError(f"worker closed the connection{f': {exc!r}' if exc else ''}"))

    def _fail(self, exc: Exception) -> None:
        if self.response is not None and not self.response.complete:
            self.response._fail(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if self.response is not None:
            self.response._head(self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._done()


class UpstreamResponse:
    """A worker's answer: `status`, then the body via `read()` or `iter_chunks()`.
    Finish with `release()` (connection reused if the body was read to the end) or
    `close()` (the worker sees the connection go, and aborts the request)."""

    def __init__(self, conn: _Connection, pool: UpstreamPool, key: tuple[str, int],
                 timeouts: Timeouts) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._conn = conn
        self._pool = pool
        self._key = key
        self._timeouts = timeouts
        self.status = 0
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self._headers = loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future | None = None
        self._finished = False
        self.last_data_at = loop.time()  # when bytes last arrived (the loop's monotonic clock)
        self._deadline = None
        if timeouts.total is not None:
            self._deadline = loop.call_later(timeouts.total, self._fail,
                                             UpstreamTimeout("worker did not answer in time"))

    # fed by the connection
    def _head(self, status: int, keep_alive: bool) -> None:
        self.status, self.keep_alive, self.got_bytes = status, keep_alive, True
        if not self._headers.done():
            self._headers.set_result(None)

    def _feed(self, data: bytes) -> None:
        self.last_data_at = self._loop.time()
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and not self._conn.closed:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _done(self) -> None:
        self.complete = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self.complete or self._error is not None:
            return
        self._error = exc
        if not self._headers.done():
            self._headers.set_exception(exc)
        self._wake()

    def abort(self, exc: UpstreamError) -> None:
        """Stop waiting: what arrived is still read, then `exc` is raised to the reader."""
        self._fail(exc)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _headers_arrived(self) -> None:
        timer = None
        if self._timeouts.idle is not None:
            timer = self._loop.call_later(self._timeouts.idle, self._fail,
                                          UpstreamTimeout("worker sent no answer in time"))
        try:
            await self._headers
        finally:
            if timer is not None:
                timer.cancel()

    async def _next(self) -> bytes | None:
        """The bytes received so far (at least one), or None at the end of the body."""
        while True:
            if self._chunks:
                data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused and not self._conn.closed:
                    self._paused = False
                    self._conn.transport.resume_reading()
                return data
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            self._waiter = self._loop.create_future()
            timer = None
            if self._timeouts.idle is not None:
                timer = self._loop.call_later(self._timeouts.idle, self._fail,
                                              UpstreamTimeout("worker went silent"))
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while (data := await self._next()) is not None:
            yield data

    async def read(self) -> bytes:
        parts = []
        while (data := await self._next()) is not None:
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: keep the connection if the answer was read whole."""
        if self._finished:
            return
        self._finished = True
        if self._deadline is not None:
            self._deadline.cancel()
        conn = self._conn
        conn.response = None
        if self.complete and self.keep_alive and not self._chunks and not conn.closed:
            self._pool._put(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (a worker aborts a request whose connection goes)."""
        self._finished = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._conn.response = None
        self._conn.close()


class UpstreamPool:
    """Keep-alive connections to workers, by host and port."""

    def __init__(self, max_idle_per_host: int = 512) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._max_idle = max_idle_per_host
        self._closed = False

    def _put(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= self._max_idle:
            conn.close()
        else:
            idle.append(conn)

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, host: str, port: int, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, host, port), timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"no connection to {host}:{port} in {timeout}s") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: {exc}") from None
        return conn

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   timeouts: Timeouts) -> UpstreamResponse:
        """POST `body` (JSON) and wait for the response's status line and headers."""
        host, port, path, host_line = _split(url)
        key = (host, port)
        head = [f"POST {path} HTTP/1.1\r\n".encode("latin-1"), host_line,
                b"Content-Type: application/json\r\n",
                f"Content-Length: {len(body)}\r\n".encode("latin-1")]
        head.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
        head.append(b"\r\n")
        head.append(body)
        payload = b"".join(head)
        for attempt in (0, 1):
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(host, port, timeouts.connect)
            response = UpstreamResponse(conn, self, key, timeouts)
            conn.response = response
            conn.transport.write(payload)
            try:
                await response._headers_arrived()
            except UpstreamTimeout:
                response.close()
                raise
            except UpstreamError:
                response.close()
                # A kept-alive connection the worker had just closed: the request never
                # reached it, so one fresh try is safe.
                if reused and not response.got_bytes and attempt == 0:
                    continue
                raise
            except BaseException:
                response.close()
                raise
            return response
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
