"""Relays a worker's token stream to the client, and can move it to another worker.

A live stream is *migratable* (ARES-style decode rebalancing) when it is a
single-choice `/v1/completions` or `/v1/chat/completions` stream: the relay asks the
worker for token ids, and on `request_migration(target)` it aborts the request on the
current worker and continues it on `target` with a `/v1/completions` request whose
prompt is the original prompt ids (for chat: the chat-templated prompt) + the ids
generated so far (the target recomputes that context; a KV-moving migration can
replace this later). For chat, the target's completion chunks are rewritten into
`chat.completion.chunk` events. The client sees one stream with one id; only latency
changes. At temperature 0 the output equals an unmigrated run.

The same move rescues a stream whose worker fails under it (`evacuate`, or the
connection breaking): when the breaker takes the worker out of rotation, when the
stream stalls far beyond the worker's usual token gaps, or when the worker's
connection drops mid-stream, the relay continues the stream on another ready decode
worker; a stream that sent the client nothing yet restarts whole there (any stream
kind). Only if no worker can take it does the client get an OpenAI error event.

What cannot migrate (see `migration_blocker`): n > 1, echo, beam search, structured
output (its grammar state would restart), prompt logprobs, prompt truncation, a seed with
temperature > 0 (the target's sampler would restart the seeded sequence), presence or
frequency penalties (they count output tokens, which the target sees as prompt); for chat
also a stream without max_tokens/max_completion_tokens (the completions default is 16,
not "the rest of the context"), logprobs/top_logprobs (the two APIs report them in
different formats), tools/functions (the server's tool parser shapes the deltas),
return_token_offsets, and non-text message parts (images are not in the token ids). A
chat stream also stops being migratable when the worker streams anything but plain
content (a reasoning or tool parser at work) or hides the token ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from core.workers import Role
from kv_transfer.fulcrum.params import MigrationHold
from router import jsonfast
from router.errors import GatewayError
from router.health import WorkerUnhealthy
from router.metrics import LOCAL, PD
from router.sse import StreamObserver, is_usage_only
from router.upstream import UpstreamError, UpstreamResponse, WorkerLost
from router.validation import CHAT, COMPLETIONS, ParsedRequest

if TYPE_CHECKING:
    from router.dispatch import Dispatcher
    from router.worker_registry import KVEndpoint

log = logging.getLogger("fulcrum.relay")

_ID_FIELDS = ("token_ids", "prompt_token_ids")


class UpstreamStreamError(Exception):
    """A worker's stream broke off, or a migration target refused to continue it."""


# Chat-only request fields; a chat stream continued as a completion drops them.
_CHAT_ONLY_FIELDS = (
    "messages", "max_completion_tokens", "add_generation_prompt", "continue_final_message",
    "chat_template", "chat_template_kwargs", "documents", "include_reasoning",
    "reasoning_effort", "media_io_kwargs", "mm_processor_kwargs", "parallel_tool_calls",
    "tool_choice", "tools", "top_logprobs", "return_prompt_text", "logprobs", "echo",
    "add_special_tokens",
)
# Fields that make any stream non-migratable when set (truthy).
_BLOCKING_FIELDS = ("echo", "use_beam_search", "structured_outputs", "prompt_logprobs",
                    "truncate_prompt_tokens")
_CHAT_BLOCKING_FIELDS = ("logprobs", "top_logprobs", "tools", "functions", "function_call",
                         "return_token_offsets")


def _text_only(messages: list) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(
                not isinstance(part, dict) or part.get("type") != "text" for part in content):
            return False
    return True


def migration_blocker(req: ParsedRequest) -> str | None:
    """Why this request's stream cannot move to another worker (None: it can)."""
    body = req.body
    if not req.stream:
        return "not a stream"
    if req.route not in (COMPLETIONS, CHAT):
        return f"route {req.route} cannot migrate"
    if body.get("n", 1) not in (1, None):
        return "n > 1"
    fields = _BLOCKING_FIELDS + (_CHAT_BLOCKING_FIELDS if req.route == CHAT else ())
    blocking = [key for key in fields if body.get(key)]
    if body.get("seed") is not None and body.get("temperature", 1.0) not in (0, 0.0):
        blocking.append("seed")  # the target's sampler would restart the seeded stream
    blocking += [key for key in ("presence_penalty", "frequency_penalty")
                 if body.get(key)]  # they count output tokens; the target sees a prompt
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        blocking.append("response_format")
    if req.route == CHAT:
        if body.get("tool_choice") not in (None, "none"):
            blocking.append("tool_choice")
        if req.max_tokens is None:
            blocking.append("no max_tokens/max_completion_tokens")
        if not _text_only(body.get("messages") or []):
            blocking.append("non-text message content")
    return ", ".join(blocking) or None


def pulls_kv(body: dict) -> bool:
    """This leg's worker pulls its prompt's KV from another (P/D), as opposed to
    computing it (a leg may carry other `kv_transfer_params`, e.g. a migration hold)."""
    return bool((body.get("kv_transfer_params") or {}).get("do_remote_prefill"))


def migratable(req: ParsedRequest) -> bool:
    """Streams the relay can move (see `migration_blocker`)."""
    return migration_blocker(req) is None


def as_completion_body(chat_body: dict) -> dict:
    """A chat request's sampling parameters, as a /v1/completions body (prompt not set)."""
    body = {k: v for k, v in chat_body.items() if k not in _CHAT_ONLY_FIELDS}
    body.pop("response_format", None)  # only {"type": "text"} gets here
    return body


class StreamRelay:
    """Passes SSE events through, watching them; cleans up exactly once."""

    progress_every = 32  # content events between length-predictor refreshes

    def __init__(self, dispatcher: Dispatcher, worker: str, upstream: UpstreamResponse,
                 req: ParsedRequest, request_id: str, body: dict, tokens: int,
                 started: float) -> None:
        self.d = dispatcher
        self.worker = worker
        self.request_id = request_id
        self.upstream = upstream
        self.req = req
        self.body = body  # what the current worker was sent
        self.mode = PD if pulls_kv(body) else LOCAL  # as dispatched
        self.tokens = tokens
        self.started = started
        self.obs = StreamObserver(started=started)
        self.why_not_migratable = migration_blocker(req)
        self.migratable = self.why_not_migratable is None
        self.is_chat = req.route == CHAT
        self.client_wants_ids = bool(req.body.get("return_token_ids"))
        logprobs = req.body.get("logprobs")  # completions' 0 still sends each token's logprob
        # the client sees every token as it comes, not only its text
        self._client_sees_tokens = self.client_wants_ids or \
            (logprobs is not None and logprobs is not False)
        self.prompt_ids: list[int] = []
        self.generated_ids: list[int] = []
        self.stream_id: str | None = None
        self._stamp: dict = {}  # created/model of the client's chunks
        # A chat stream's current worker answers /v1/completions (after a migration, or
        # after a first-token handoff): its chunks are rewritten into chat chunks.
        self._worker_speaks_completion = False
        self.migrations = 0
        self.kv_moves = 0  # migrations whose target was told to pull the source's KV
        self.restarts = 0  # resent whole to another worker (nothing had reached the client)
        self.rescues = 0  # times the stream left a failed worker
        self._yielded = False  # the client got bytes of this stream
        self._evacuate_why: str | None = None  # set: leave the current worker now
        self.last_chunk_at: float | None = None  # when the relay last read bytes (monotonic)
        self.info = None  # the policy's RequestInfo, to pick a rescue target
        self.kv_from: str | None = None  # the prefill worker the decode worker pulls KV from
        self._may_stay = False  # a rescue may continue on the same (healthy) worker
        self._completion_before = 0  # tokens generated on earlier workers
        self._prompt_tokens: int | None = None
        self._migrate_to: str | None = None
        self._migrate_after = 0  # move once this many tokens were generated
        # The last token's text came out whole. After a token that ends inside a UTF-8
        # character (its text held back, or "\ufffd"), a target primed with these ids
        # detokenizes wrongly (vLLM 0.32 streams the whole prompt's text as the first
        # delta), so a move waits for a clean boundary.
        self._text_caught_up = False
        # Generated ids up to the last clean boundary; None once the client saw part of a
        # character ("\ufffd"). A rescue drops the held-back tokens after it and lets the
        # target make them again: the client saw nothing of them.
        self._clean_ids: int | None = 0
        self._primer: bytes | None = None  # an event to send before the worker's
        self._closed = False
        self._upstream_done = False
        self.client_request_id: str | None = None  # the client's X-Request-Id, as echoed
        self.worker_headers: dict[str, str] = {}  # e.g. Authorization, for every worker

    def prime(self, event: bytes, generated: int) -> None:
        """Send `event` first: `generated` tokens made elsewhere (the prefill leg's first
        token, `router.handoff`); the worker continues after them, as after a migration."""
        self._primer = event
        self._completion_before = generated

    # -- migration ----------------------------------------------------------------
    def request_migration(self, target: str, after_tokens: int = 0) -> None:
        """Move this stream to `target` at the first event boundary at which at least
        `after_tokens` tokens have been generated."""
        if not self.migratable:
            raise ValueError(f"this stream cannot migrate: {self.why_not_migratable}")
        self._migrate_to = target
        self._migrate_after = max(0, after_tokens)

    def _should_switch(self) -> bool:
        return (self._migrate_to is not None and self.migratable and not self.obs.saw_done
                and bool(self.prompt_ids) and self._text_caught_up
                and len(self.generated_ids) >= self._migrate_after and self._remaining() > 0)

    def _lose_migratability(self, why: str) -> None:
        if self.migratable:
            log.info("stream %s can no longer migrate: %s", self.request_id, why)
        self.migratable, self.why_not_migratable = False, why

    def _remaining(self) -> int:
        limit = self.req.max_tokens or 16
        return limit - len(self.generated_ids)

    async def _switch(self, target: str, move_kv: bool = False) -> None:
        """Continue on `target`; with `move_kv` (a planned move off a healthy worker) the
        target pulls the KV the current worker holds for the aborted request."""
        self.upstream.close()  # the old worker aborts the request
        self.d.cluster.end(self.worker, Role.DECODE, self.tokens)
        made_here = len(self.generated_ids) - self._completion_before
        self._completion_before = len(self.generated_ids)
        old_params = self.body.get("kv_transfer_params")
        body = {k: v for k, v in self.body.items() if k != "kv_transfer_params"}
        if "messages" in body:  # a chat stream continues as a completion of its token ids
            body = as_completion_body(body)
        body.update(prompt=self.prompt_ids + self.generated_ids, max_tokens=self._remaining(),
                    stream=True, return_token_ids=True,
                    stream_options={**(body.get("stream_options") or {}), "include_usage": True})
        body.pop("max_completion_tokens", None)
        min_tokens = self.req.body.get("min_tokens")  # the client's, not a previous move's
        if isinstance(min_tokens, int):
            body["min_tokens"] = max(0, min_tokens - self._completion_before)
        source = self.worker
        params = await self._continuation_params(old_params, target,
                                                 len(body["prompt"]) - 1,
                                                 move_kv and made_here > 0)
        if params:
            body["kv_transfer_params"] = params
        self._worker_speaks_completion = self.is_chat
        self.migrations += 1
        await self._resend(target, COMPLETIONS, body, f"m{self.migrations}")
        if self.upstream.status != 200:
            detail = (await self.upstream.read())[:200]
            raise UpstreamStreamError(f"migration target answered {self.upstream.status}: "
                                      f"{detail!r}")
        log.info("migrated %s from %s to %s after %d tokens%s", self.request_id, source,
                 target, self._completion_before, " with its KV" if pulls_kv(body) else "")
        self.d.metrics.migrations.inc()
        if pulls_kv(body):
            self.d.metrics.kv_migrations.inc()
        self.d.driver.migrated(self.request_id, target)

    async def _continuation_params(self, old_params: dict | None, target: str, context: int,
                                   move_kv: bool) -> dict:
        """The target's `kv_transfer_params`: pull the context's KV from the source when
        it holds it (`move_kv`), else release the source's hold; and a hold of its own."""
        kv = self.d.kv
        if kv is None:
            return {}
        hold = MigrationHold.from_params(old_params)
        source = self._kv_endpoint(self.worker)
        to = None
        if target in self.d.cluster.names():
            to = await kv.resolve(target, self.d.cluster.view(target).url)
        params: dict = {}
        if hold is not None and source is not None:
            if move_kv and to is not None and context > 0:
                params.update(kv.continuation(hold, source, context))
                self.kv_moves += 1
            else:
                kv.release(source, hold)
        if to is not None:
            params.update(kv.new_hold(self.request_id).to_params())
        return params

    def _release_hold(self) -> None:
        """The stream ends off a worker that may hold its blocks for a migration."""
        kv, hold = self.d.kv, MigrationHold.from_params(self.body.get("kv_transfer_params"))
        source = self._kv_endpoint(self.worker)
        if kv is not None and hold is not None and source is not None:
            kv.release(source, hold)

    def _kv_endpoint(self, worker: str) -> KVEndpoint | None:
        if self.d.kv is None or worker not in self.d.cluster.names():
            return None
        return self.d.kv.endpoint(worker, self.d.cluster.view(worker).url)

    async def _resend(self, target: str, route: str, body: dict, suffix: str) -> None:
        """Send `body` to `target` as this stream's new upstream (a breaker opening on
        `target` meanwhile aborts the wait)."""
        self.worker, self.body = target, body
        self.d.cluster.begin(target, Role.DECODE, self.tokens)
        self.obs.discard_pending()
        self._upstream_done = False
        self.last_chunk_at = None
        self.upstream = await self.d.health.guard(target, self.d.post(
            self.d.cluster.view(target).url + route, body,
            {**self.worker_headers, "X-Request-Id": f"{self.request_id}-{suffix}"},
            self.d.stream_timeout))

    async def _restart(self, target: str) -> None:
        """Send the request whole to `target`: its worker failed before the client saw
        anything, so any stream can start over."""
        self.upstream.close()
        self._release_hold()
        self.d.cluster.end(self.worker, Role.DECODE, self.tokens)
        body = {k: v for k, v in self.body.items() if k != "kv_transfer_params"}
        self.mode = LOCAL
        self.restarts += 1
        self.stream_id = None
        self._worker_speaks_completion = self.is_chat and "messages" not in body
        await self._resend(target, self.req.route, body, f"r{self.restarts}")
        if self.upstream.status != 200:
            detail = (await self.upstream.read())[:200]
            raise UpstreamStreamError(f"restart target answered {self.upstream.status}: "
                                      f"{detail!r}")
        log.warning("restarted stream %s on %s", self.request_id, target)

    # -- rescue -------------------------------------------------------------------------
    def evacuate(self, why: str, may_stay: bool = False) -> None:
        """Leave the current request now (its worker left rotation, the stream stalled, or
        `may_stay`: its KV source left): the relay continues the stream on another worker
        (or, with `may_stay`, possibly the same one), or ends it with an error event."""
        if self._closed or self._upstream_done or self._evacuate_why is not None:
            return
        self._evacuate_why, self._may_stay = why, may_stay
        self.upstream.abort(WorkerLost(why))

    def stalled_for(self, now: float) -> float:
        """Seconds since the current worker last sent bytes (0 before its first)."""
        if self.last_chunk_at is None or self._evacuate_why is not None or self._closed:
            return 0.0
        return now - self.upstream.last_data_at

    def why_not_resumable(self) -> str | None:
        """Why the stream cannot continue on another worker now (None: it can)."""
        if not self._yielded and not self.migrations:
            return None  # nothing sent yet: restart it whole
        if not self.migratable:
            return self.why_not_migratable
        if self.obs.saw_done:
            return "it had ended"
        if not self.prompt_ids:
            return "its prompt token ids are unknown"
        if not self._text_caught_up and self._held_back_tokens() is None:
            return "its last token ends inside a UTF-8 character"
        if self._remaining() <= 0:
            return "every token was generated"
        return None

    def _held_back_tokens(self) -> int | None:
        """How many generated tokens after the last clean boundary the client saw nothing
        of (None: it saw some of them: their ids, logprobs or a partial character)."""
        if self._clean_ids is None or self._client_sees_tokens:
            return None
        return len(self.generated_ids) - self._clean_ids

    def _drop_held_back_tokens(self) -> None:
        """Resume after the last clean boundary: the next worker makes the held-back
        tokens again."""
        held = self._held_back_tokens()
        if self._text_caught_up or not held:
            return
        del self.generated_ids[len(self.generated_ids) - held:]
        self._text_caught_up = True
        log.info("stream %s resumes before %d held-back token(s)", self.request_id, held)

    async def _rescue(self, exc: Exception) -> None:
        """Continue on another worker after the current one failed (`exc`); raises
        `UpstreamStreamError` if none can."""
        failed = self.worker
        why = self._evacuate_why or repr(exc)
        tried = set() if self._evacuate_why is not None and self._may_stay else {failed}
        self._evacuate_why, self._may_stay = None, False
        last = f"worker {failed} failed mid-stream ({why})"
        if self.rescues >= self.d.config.decode_attempts:
            raise UpstreamStreamError(f"{last}; moved {self.rescues} times already")
        self.rescues += 1
        for _ in range(self.d.config.decode_attempts):
            blocker = self.why_not_resumable()
            if blocker is not None:
                raise UpstreamStreamError(f"{last}; the stream cannot move: {blocker}")
            self._drop_held_back_tokens()
            target = self.d.rescue_target(self, frozenset(tried))
            if target is None:
                target = await self.d.wait_for_rescue_target(self)
            if target is None:
                raise UpstreamStreamError(f"{last}; no other ready worker can continue it")
            tried.add(target)
            try:
                if not self._yielded and not self.migrations:
                    await self._restart(target)
                else:
                    await self._switch(target)
            except (UpstreamError, UpstreamStreamError, WorkerUnhealthy) as err:
                last = f"{last}; {target} failed too ({err!r})"
                self._evacuate_why = None
                continue
            self.d.metrics.leg_failures.labels("decode", "rescued").inc()
            log.warning("stream %s rescued from %s (%s) on %s", self.request_id, failed, why,
                        target)
            return
        raise UpstreamStreamError(last)

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
        elif self._continued and chunk.get("id") != self.stream_id:
            chunk["id"] = self.stream_id
            changed = True
        self._collect_ids(chunk)
        if "metrics" in chunk:  # the engine's per-request timings, asked for by the gateway only
            del chunk["metrics"]
            changed = True
        if not self._stamp and not self._worker_speaks_completion:
            self._stamp = {k: chunk[k] for k in ("created", "model") if k in chunk}
        if self.is_chat:
            changed = self._rewrite_chat(chunk) or changed
        else:
            changed = self._hide_completion_ids(chunk) or changed
        usage = chunk.get("usage")
        if self._continued and usage:
            prompt = self._prompt_tokens or usage.get("prompt_tokens", 0)
            completion = self._completion_before + (usage.get("completion_tokens") or 0)
            chunk["usage"] = {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                              "total_tokens": prompt + completion}
            changed = True
        if not changed:
            return raw
        return b"data: " + jsonfast.dumps(chunk) + b"\n\n"

    @property
    def _continued(self) -> bool:
        """The current worker continues tokens generated before it (its ids, prompt and
        usage counts need rewriting)."""
        return bool(self.migrations or self._completion_before)

    def _collect_ids(self, chunk: dict) -> None:
        """Learn the prompt ids (chat: top level; completions: in the choice) and the ids
        each choice generated."""
        if chunk.get("prompt_token_ids") and not self.prompt_ids:
            self._set_prompt_ids(chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or ():
            if choice.get("prompt_token_ids") and not self.prompt_ids:
                self._set_prompt_ids(choice["prompt_token_ids"])
            if choice.get("token_ids"):
                self.generated_ids.extend(choice["token_ids"])
                text = choice.get("text") if "text" in choice else \
                    (choice.get("delta") or {}).get("content")
                self._text_caught_up = bool(text) and not text.endswith("\ufffd")
                if self._text_caught_up:
                    self._clean_ids = len(self.generated_ids)
                elif text:
                    self._clean_ids = None

    def _set_prompt_ids(self, ids: list[int]) -> None:
        self.prompt_ids = list(ids)
        self._prompt_tokens = len(self.prompt_ids)

    def _hide_completion_ids(self, chunk: dict) -> bool:
        changed = False
        for choice in chunk.get("choices") or ():
            if not self.client_wants_ids:
                for key in _ID_FIELDS:
                    if key in choice:
                        del choice[key]
                        changed = True
            elif self._continued and "prompt_token_ids" in choice:
                del choice["prompt_token_ids"]  # the client saw the real prompt already
                changed = True
        return changed

    def _rewrite_chat(self, chunk: dict) -> bool:
        """Keep a chat stream looking like one: completion chunks from a migration target
        become chat chunks; token ids show only if the client asked (otherwise the keys are
        dropped, even vLLM's nulls: they are not part of OpenAI's chunk)."""
        if not self._worker_speaks_completion:  # the chat worker's own stream (or primer)
            self._check_chat_choices(chunk)
            changed = False
            if not self.client_wants_ids:  # not OpenAI's: drop them, nulls included
                if "prompt_token_ids" in chunk:
                    del chunk["prompt_token_ids"]
                    changed = True
                for choice in chunk.get("choices") or ():
                    if "token_ids" in choice:
                        del choice["token_ids"]
                        changed = True
            return changed
        if "choices" not in chunk:  # an error event: pass it on
            return False
        converted = self._chat_chunk_from_completion(chunk)
        chunk.clear()
        chunk.update(converted)
        return True

    def _check_chat_choices(self, chunk: dict) -> None:
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            extra = [k for k, v in delta.items() if k not in ("role", "content") and v]
            if extra:
                self._lose_migratability(f"the worker streams {', '.join(extra)}")
            elif delta.get("content") and not choice.get("token_ids"):
                self._lose_migratability("the worker hides the token ids")

    def _chat_chunk_from_completion(self, chunk: dict) -> dict:
        out = {"id": self.stream_id, "object": "chat.completion.chunk",
               "created": self._stamp.get("created", chunk.get("created")),
               "model": self._stamp.get("model", chunk.get("model")), "choices": []}
        for choice in chunk["choices"]:
            converted = {"index": choice.get("index", 0),
                         "delta": {"content": choice.get("text") or ""},
                         "logprobs": None, "finish_reason": choice.get("finish_reason")}
            if converted["finish_reason"] is not None:
                converted["stop_reason"] = choice.get("stop_reason")
            if self.client_wants_ids:
                converted["token_ids"] = choice.get("token_ids")
            out["choices"].append(converted)
        for key in ("usage", "system_fingerprint"):
            if key in chunk:
                out[key] = chunk[key]
        return out

    def _usage_event(self) -> bytes:
        """The usage chunk the client asked for, from the relay's own counts: for a worker
        lost after its last token but before its usage chunk."""
        prompt = self._prompt_tokens or self.req.prompt_tokens_estimate
        completion = len(self.generated_ids)
        chunk = {"id": self.stream_id,
                 "object": "chat.completion.chunk" if self.is_chat else "text_completion",
                 **self._stamp, "choices": [],
                 "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}}
        return b"data: " + jsonfast.dumps(chunk) + b"\n\n"

    def _every_token_sent(self) -> bool:
        """The client has every token the request asked for (only [DONE] may be missing)."""
        return self._yielded and self._remaining() <= 0 and self._text_caught_up

    async def chunks(self) -> AsyncIterator[bytes]:
        reported = 0
        missing_done = False
        try:
            if self._primer is not None:
                events = self.obs.feed(self._primer)
                out = [r for r in (self._rewrite(raw, c) for raw, c in events) if r]
                if out:
                    self._yielded = True
                    yield b"".join(out)
            if self.is_chat and "messages" not in self.body:  # handed off: a completion
                self._worker_speaks_completion = True
            while True:
                try:
                    async for data in self.upstream.iter_chunks():
                        self._saw_bytes()
                        events = self.obs.feed(data)
                        if self.obs.content_events - reported >= self.progress_every:
                            reported = self.obs.content_events
                            self.d.driver.progress(self.request_id, reported)
                        out = [r for r in (self._rewrite(raw, c) for raw, c in events) if r]
                        if out:
                            self._yielded = True
                            yield b"".join(out)
                        if self._should_switch():
                            break
                    if self._should_switch():  # a move asked for (/admin/migrate, rebalancing)
                        target, self._migrate_to = self._migrate_to, None
                        await self._switch(target, move_kv=True)
                        continue
                    if not self.obs.saw_done:
                        raise UpstreamStreamError("stream ended without [DONE]")
                except (UpstreamError, UpstreamStreamError, WorkerUnhealthy) as exc:
                    if self.obs.saw_done:
                        break  # whole already: only the connection's end went wrong
                    if self._every_token_sent():
                        # only the closing events were missing (a busy worker's breaker
                        # opened between its last token and [DONE]): end it cleanly here
                        log.warning("decode stream %s lost its worker after its last token: %r",
                                    self.request_id, exc)
                        missing_done = True
                        break
                    log.warning("decode stream from %s broke: %r", self.worker, exc)
                    await self._rescue(exc)
                    continue
                break
            self._upstream_done = True
            if self.obs.pending.strip():
                yield self.obs.pending
            if missing_done:
                if self.req.include_usage and self.obs.usage is None:
                    yield self._usage_event()
                yield b"data: [DONE]\n\n"
        except (UpstreamError, UpstreamStreamError, WorkerUnhealthy) as exc:
            log.warning("decode stream %s ends with an error: %r", self.request_id, exc)
            self.d.metrics.leg_failures.labels("decode", "stream_error").inc()
            yield GatewayError(502, f"the stream broke off: {exc}",
                               code="upstream_stream_error").sse_event()
            yield b"data: [DONE]\n\n"
        finally:
            await self.close()

    def _saw_bytes(self) -> None:
        now = time.monotonic()
        if self.last_chunk_at is not None:
            self.d.token_gap(self.worker, now - self.last_chunk_at)
        self.last_chunk_at = now
        self.d.health.saw_progress(self.worker)

    async def close(self) -> None:
        """Close the worker connection (aborting its request) and release the leg."""
        if self._closed:
            return
        self._closed = True
        self.d.streams.pop(self.request_id, None)
        if self._upstream_done and self.obs.saw_done:
            self.upstream.release()  # read to the end: the connection is reused
        else:
            self.upstream.close()  # the worker sees the connection go and aborts
            self._release_hold()
        self.d.cluster.end(self.worker, Role.DECODE, self.tokens)
        self.d.observe_stream(self.worker, self.req, self.request_id, self.obs, self.started,
                             self.mode)
