"""A streaming response that always notices a client going away.

Starlette only listens for `http.disconnect` on ASGI servers older than spec 2.4;
on newer ones it waits for a failed send, which never comes while the upstream is
silent. A proxy must abort the worker-side request at once, so we always listen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ProxyStreamResponse(StreamingResponse):
    """`StreamingResponse` that cancels its body iterator on client disconnect.

    `on_close` runs exactly once when the response ends for any reason (done,
    failed, client gone, or cancelled before the body iterator ever started).
    """

    def __init__(self, content: AsyncIterator[bytes], *,
                 on_close: Callable[[], Awaitable[None]], **kw: object) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    def also_on_close(self, func: Callable[[], None]) -> None:
        """Run `func` (synchronous) after `on_close`, exactly once, whatever happens."""
        inner = self._on_close

        async def both() -> None:
            try:
                await inner()
            finally:
                func()
        self._on_close = both

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def run_then_cancel(func) -> None:  # noqa: ANN001
                try:
                    await func()
                except OSError:  # the client went away while we were sending
                    pass
                group.cancel_scope.cancel()

            group.start_soon(run_then_cancel, partial(self.stream_response, send))
            await run_then_cancel(partial(self.listen_for_disconnect, receive))
