"""The gateway's HTTP/1.1 client to workers: reuse, a stale kept-alive connection,
chunked streams, timeouts, and aborting a request by closing its connection."""

from __future__ import annotations

import asyncio

import pytest

from router.upstream import Timeouts, UpstreamError, UpstreamPool, UpstreamTimeout


class RawServer:
    """A tiny HTTP server whose behaviour each test scripts."""

    def __init__(self, handler) -> None:  # noqa: ANN001
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.handler(writer, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer.set()
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def _reply(body: bytes, keep_alive: bool = True) -> bytes:
    conn = b"keep-alive" if keep_alive else b"close"
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: " + conn + b"\r\n\r\n" + body)


async def test_connections_are_reused_and_headers_sent() -> None:
    async def handler(writer, body):  # noqa: ANN001, ANN202
        writer.write(_reply(b'{"echo": ' + body + b"}"))
        return True

    server = RawServer(handler)
    async with server as url, UpstreamPool() as pool:
        for i in range(3):
            resp = await pool.post(url + "/v1/completions", b'{"n": %d}' % i,
                                   {"X-Request-Id": f"r{i}"}, Timeouts(total=5))
            assert resp.status == 200
            assert await resp.read() == b'{"echo": {"n": %d}}' % i
            resp.release()
    assert server.connections == 1
    assert b"POST /v1/completions HTTP/1.1" in server.requests[0]
    assert b"X-Request-Id: r2" in server.requests[2]


async def test_a_connection_the_worker_closed_is_retried_on_a_fresh_one() -> None:
    async def handler(writer, body):  # noqa: ANN001, ANN202
        writer.write(_reply(b"{}"))  # says keep-alive, then hangs up (idle timeout)
        await writer.drain()
        return False

    server = RawServer(handler)
    async with server as url, UpstreamPool() as pool:
        first = await pool.post(url + "/x", b"{}", {}, Timeouts(total=5))
        await first.read()
        first.release()
        await asyncio.sleep(0.1)  # the close arrives while the connection sits idle
        second = await pool.post(url + "/x", b"{}", {}, Timeouts(total=5))
        assert second.status == 200 and await second.read() == b"{}"
        second.release()
    assert server.connections == 2


async def test_a_chunked_stream_arrives_piece_by_piece() -> None:
    async def handler(writer, body):  # noqa: ANN001, ANN202
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        return True

    async with RawServer(handler) as url, UpstreamPool() as pool:
        resp = await pool.post(url + "/s", b"{}", {}, Timeouts(idle=5))
        pieces = [chunk async for chunk in resp.iter_chunks()]
        resp.release()
    assert b"".join(pieces) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert len(pieces) >= 2  # not buffered to the end


async def test_a_silent_stream_times_out_and_closing_aborts_it() -> None:
    async def handler(writer, body):  # noqa: ANN001, ANN202
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(30)  # then nothing
        return False

    server = RawServer(handler)
    async with server as url, UpstreamPool() as pool:
        resp = await pool.post(url + "/s", b"{}", {}, Timeouts(idle=0.3))
        with pytest.raises(UpstreamTimeout):
            async for _ in resp.iter_chunks():
                pass
        resp.close()


async def test_no_worker_is_an_upstream_error() -> None:
    async with UpstreamPool() as pool:
        with pytest.raises(UpstreamError):
            await pool.post("http://127.0.0.1:9/x", b"{}", {}, Timeouts(connect=1, total=2))


async def test_closing_mid_stream_reaches_the_worker() -> None:
    async def handler(writer, body):  # noqa: ANN001, ANN202
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
        return False

    server = RawServer(handler)
    async with server as url, UpstreamPool() as pool:
        resp = await pool.post(url + "/s", b"{}", {}, Timeouts(idle=5))
        async for _ in resp.iter_chunks():
            break
        resp.close()
        await asyncio.wait_for(server.closed_by_peer.wait(), 5)
