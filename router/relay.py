"""Relays a worker's token stream to the client, and can move it to another worker.

A live stream is *migratable* (ARES-style decode rebalancing) when it is a
`/v1/completions` stream: the relay asks the worker for token ids, and on
`request_migration(target)` it aborts the request on the current worker and
continues it on `target` with prompt = original prompt ids + ids generated so far
(the target recomputes that context; a KV-moving migration can replace this
later). The client sees one stream with one id; only latency changes. At
temperature 0 the output equals an unmigrated run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx

from router.cluster import Role
from router.errors import GatewayError
from router.sse import StreamObserver, is_usage_only
from router.validation import COMPLETIONS, ParsedRequest

if TYPE_CHECKING:
    from router.dispatch import Dispatcher

log = logging.getLogger("fulcrum.relay")

_ID_FIELDS = ("token_ids", "prompt_token_ids")


def migratable(req: ParsedRequest) -> bool:
    """Streams the relay can move: completions, one choice, no echo."""
    body = req.body
    return (req.stream and req.route == COMPLETIONS and body.get("n", 1) in (1, None)
            and not body.get("echo"))


class StreamRelay:
    """Passes SSE events through, watching them; cleans up exactly once."""

    progress_every = 32  # content events between length-predictor refreshes

    def __init__(self, dispatcher: Dispatcher, worker: str, upstream: httpx.Response,
                 req: ParsedRequest, request_id: str, body: dict, tokens: int,
                 started: float) -> None:
        self.d = dispatcher
        self.worker = worker
        self.request_id = request_id
        self.upstream = upstream
        self.req = req
        self.body = body  # what the current worker was sent
        self.tokens = tokens
        self.started = started
        self.obs = StreamObserver(started=started)
        self.migratable = migratable(req)
        self.client_wants_ids = bool(req.body.get("return_token_ids"))
        self.prompt_ids: list[int] = []
        self.generated_ids: list[int] = []
        self.stream_id: str | None = None
        self.migrations = 0
        self._completion_before = 0  # tokens generated on earlier workers
        self._prompt_tokens: int | None = None
        self._migrate_to: str | None = None
        self._migrate_after = 0  # move once this many tokens were generated
        self._closed = False

    # -- migration ----------------------------------------------------------------
    def request_migration(self, target: str, after_tokens: int = 0) -> None:
        """Move this stream to `target` at the first event boundary at which at least
        `after_tokens` tokens have been generated."""
        if not self.migratable:
            raise ValueError("only single-choice /v1/completions streams can migrate")
        self._migrate_to = target
        self._migrate_after = max(0, after_tokens)

    def _should_switch(self) -> bool:
        return (self._migrate_to is not None and not self.obs.saw_done
                and len(self.generated_ids) >= self._migrate_after and self._remaining() > 0)

    def _remaining(self) -> int:
        limit = self.req.max_tokens or 16
        return limit - len(self.generated_ids)

    async def _switch(self, target: str) -> None:
        await self.upstream.aclose()  # the old worker aborts the request
        self.d.cluster.end(self.worker, Role.DECODE, self.tokens)
        self._completion_before = len(self.generated_ids)
        body = {k: v for k, v in self.body.items() if k != "kv_transfer_params"}
        body.update(prompt=self.prompt_ids + self.generated_ids, max_tokens=self._remaining(),
                    stream=True, return_token_ids=True,
                    stream_options={**(body.get("stream_options") or {}), "include_usage": True})
        body.pop("max_completion_tokens", None)
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(0, body["min_tokens"] - self._completion_before)
        source = self.worker
        self.worker, self.body = target, body
        self.d.cluster.begin(target, Role.DECODE, self.tokens)
        self.migrations += 1
        self.obs.discard_pending()
        request = self.d.client.build_request(
            "POST", self.d.cluster.view(target).url + COMPLETIONS, json=body,
            headers={"X-Request-Id": f"{self.request_id}-m{self.migrations}"},
            timeout=self.d.stream_timeout())
        self.upstream = await self.d.client.send(request, stream=True)
        if self.upstream.status_code != 200:
            detail = (await self.upstream.aread())[:200]
            raise httpx.HTTPStatusError(f"migration target answered "
                                        f"{self.upstream.status_code}: {detail!r}",
                                        request=request, response=self.upstream)
        log.info("migrated %s from %s to %s after %d tokens", self.request_id, source, target,
                 self._completion_before)
        self.d.metrics.migrations.inc()
        self.d.feedback("observe_migrated", self.request_id, target)

    # -- relaying -------------------------------------------------------------------
    def _rewrite(self, raw: bytes, chunk: dict | None) -> bytes | None:
        """The event as the client should see it (None: drop it)."""
        if chunk is None:
            return raw
        if not self.req.include_usage and is_usage_only(chunk):
            return None
        changed = False
        if self.stream_id is None and chunk.get("id"):
            self.stream_id = chunk["id"]
        elif self.migrations and chunk.get("id") != self.stream_id:
            chunk["id"] = self.stream_id
            changed = True
        for choice in chunk.get("choices") or ():
            if "prompt_token_ids" in choice and choice["prompt_token_ids"] and \
                    not self.prompt_ids:
                self.prompt_ids = list(choice["prompt_token_ids"])
                self._prompt_tokens = len(self.prompt_ids)
            if choice.get("token_ids"):
                self.generated_ids.extend(choice["token_ids"])
            if not self.client_wants_ids:
                for key in _ID_FIELDS:
                    if key in choice:
                        del choice[key]
                        changed = True
            elif self.migrations and "prompt_token_ids" in choice:
                del choice["prompt_token_ids"]  # the client saw the real prompt already
                changed = True
        usage = chunk.get("usage")
        if self.migrations and usage:
            prompt = self._prompt_tokens or usage.get("prompt_tokens", 0)
            completion = self._completion_before + (usage.get("completion_tokens") or 0)
            chunk["usage"] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}
            changed = True
        if not changed:
            return raw
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    async def chunks(self) -> AsyncIterator[bytes]:
        reported = 0
        try:
            while True:
                async for data in self.upstream.aiter_raw():
                    events = self.obs.feed(data)
                    if self.obs.content_events - reported >= self.progress_every:
                        reported = self.obs.content_events
                        self.d.feedback("observe_progress", self.request_id, reported)
                    out = [r for r in (self._rewrite(raw, c) for raw, c in events) if r]
                    if out:
                        yield b"".join(out)
                    if self._should_switch():
                        break
                if self._should_switch():
                    target, self._migrate_to = self._migrate_to, None
                    await self._switch(target)
                    continue
                break
            if self.obs.pending.strip():
                yield self.obs.pending
            if not self.obs.saw_done:
                raise httpx.RemoteProtocolError("stream ended without [DONE]")
        except httpx.HTTPError as exc:
            log.warning("decode stream from %s broke: %r", self.worker, exc)
            self.d.metrics.leg_failures.labels("decode", "stream_error").inc()
            yield GatewayError(502, f"worker {self.worker} failed mid-stream: {exc!r}",
                               code="upstream_stream_error").sse_event()
            yield b"data: [DONE]\n\n"
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the worker connection (aborting its request) and release the leg."""
        if self._closed:
            return
        self._closed = True
        self.d.streams.pop(self.request_id, None)
        await self.upstream.aclose()
        self.d.cluster.end(self.worker, Role.DECODE, self.tokens)
        self.d.observe_stream(self.worker, self.req, self.request_id, self.obs, self.started)
