"""First-token handoff: the prefill leg's token goes to the client at once.

The prefill leg (``max_tokens=1``) samples the request's first token anyway. Without the
handoff it is thrown away and the decode worker, after pulling the KV, runs one more step
to recompute the last prompt token and sample that same token again; the client waits for
the decode leg's HTTP round, admission, KV pull and that extra step. With the handoff the
gateway streams the prefill's token as the first event, and the decode leg continues from
``prompt ids + [first token]`` with one token fewer to generate: like a stream migrated
after one token (see :mod:`router.relay`). The decode worker loads the prompt's KV and
computes the first token's KV in the step that samples the second token, so the whole
request also runs one engine step less. Sending token ids also spares the decode worker
a second tokenisation of the prompt.

Chat streams too: the prefill reply carries the chat-templated prompt's ids, the first
event is vLLM's opening role chunk plus a content chunk with the prefill's token, and the
decode leg continues as a ``/v1/completions`` request whose chunks the relay rewrites into
chat chunks, exactly as a migrated chat stream continues. A prefill reply whose message
carries anything but plain content (a reasoning or tool parser at work) is not handed off.

Used only where a stream could migrate (same sampling on both sides), the first token
cannot end the request, and the prefill worker runs the Fulcrum connector, which loads the
``remote_num_tokens`` it was given and lets vLLM compute the rest (NIXL assumes the decode
leg's prompt is the prefill leg's); otherwise the decode leg recomputes the first token.
``FULCRUM_FIRST_TOKEN_HANDOFF=0`` in the gateway's environment turns it off (A/B runs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from router.relay import as_completion_body, migration_blocker
from router.validation import CHAT, ParsedRequest

# Reply fields vLLM also puts in a chat stream's opening chunk (null unless asked for).
_CHAT_HEAD_FIELDS = ("prompt_text",)

HANDOFF_CONNECTOR = "fulcrum"
"""The ``connector`` tag in the prefill reply's ``kv_transfer_params`` that allows it."""


@dataclass(frozen=True)
class FirstToken:
    """What the prefill leg generated, as the decode leg and the client need it."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: Any
    stream_id: str
    created: int
    model: str
    chat_role: str | None = None  # set for a chat stream: the role its first chunk names
    chat_head: dict[str, Any] | None = None  # top-level fields of vLLM's opening chat chunk


def handoff_blocker(req: ParsedRequest) -> str | None:
    """Why this request's first token cannot come from the prefill leg (None: it can)."""
    if os.environ.get("FULCRUM_FIRST_TOKEN_HANDOFF", "1") == "0":
        return "turned off"
    why = migration_blocker(req)  # also: only completions and chat streams
    if why:
        return why
    if (req.max_tokens or 16) < 2:
        return "max_tokens < 2"
    if req.body.get("stop"):
        return "stop strings"  # one spanning the first two tokens would go unseen
    if req.body.get("min_tokens"):
        return "min_tokens"  # the prefill leg does not get it; its token could be EOS
    options = req.body.get("stream_options")
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return "continuous usage stats"  # every chunk would need the worker's counts
    if req.route == CHAT:
        return None
    prompt = req.body.get("prompt")
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                        and all(isinstance(t, int) for t in prompt))):
        return "not a single prompt"
    return None


def prefill_fields(req: ParsedRequest) -> dict[str, Any]:
    """Extra prefill-leg fields a handoff needs (empty when it is not possible)."""
    return {"return_token_ids": True} if handoff_blocker(req) is None else {}


def from_prefill_reply(req: ParsedRequest, reply: dict) -> FirstToken | None:
    """The first token of a prefill reply, or None when the decode leg must recompute it
    (no handoff for this request, the token ended the request, or ids are missing)."""
    if handoff_blocker(req) is not None:
        return None
    params = reply.get("kv_transfer_params")
    if not isinstance(params, dict) or params.get("connector") != HANDOFF_CONNECTOR:
        return None
    chat_role, chat_head = None, None
    try:
        choice = reply["choices"][0]
        token_ids = [int(t) for t in choice["token_ids"]]
        if req.route == CHAT:  # chat: prompt ids at the top level, text in the message
            prompt_ids = [int(t) for t in reply["prompt_token_ids"]]
            message = choice["message"]
            if any(v for k, v in message.items() if k not in ("role", "content")):
                return None  # reasoning or tool calls: a parser shapes this stream
            text, chat_role = message.get("content") or "", str(message.get("role"))
            chat_head = {k: reply[k] for k in _CHAT_HEAD_FIELDS if k in reply}
        else:
            prompt_ids = [int(t) for t in choice["prompt_token_ids"]]
            text = choice.get("text") or ""
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    if len(token_ids) != 1 or not prompt_ids or choice.get("finish_reason") != "length":
        return None  # EOS or a stop token: let the decode worker finish it the usual way
    if not text or text.endswith("\ufffd"):
        # no text of its own (a skipped special token) or inside a UTF-8 character: what
        # the worker streams for it depends on its detokenizer's state
        return None
    return FirstToken(prompt_ids=prompt_ids, token_ids=token_ids, text=text,
                      logprobs=choice.get("logprobs"), stream_id=str(reply.get("id", "")),
                      created=int(reply.get("created") or 0),
                      model=str(reply.get("model") or req.model), chat_role=chat_role,
                      chat_head=chat_head)


def decode_body(body: dict, first: FirstToken, max_tokens: int) -> dict:
    """The decode leg continues after the first token, as a completion of the prompt's
    ids (a chat request's chat-only fields dropped: its template is already applied)."""
    out = as_completion_body(body) if "messages" in body else dict(body)
    out.pop("max_completion_tokens", None)
    out.update(prompt=first.prompt_ids + first.token_ids, max_tokens=max_tokens - 1,
               return_token_ids=True)
    return out


def first_event(first: FirstToken) -> bytes:
    """The SSE event(s) of the first token, shaped like vLLM's own first chunks (ids
    included; the relay hides them unless the client asked)."""
    if first.chat_role is not None:
        return _first_chat_events(first)
    chunk = {"id": first.stream_id, "object": "text_completion", "created": first.created,
             "model": first.model,
             "choices": [{"index": 0, "text": first.text, "logprobs": first.logprobs,
                          "finish_reason": None, "stop_reason": None,
                          "prompt_token_ids": first.prompt_ids,
                          "token_ids": first.token_ids}],
             "usage": None}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _first_chat_events(first: FirstToken) -> bytes:
    """vLLM's opening chat chunk (the role, prompt ids) and the first content chunk."""
    head = {"id": first.stream_id, "object": "chat.completion.chunk", "created": first.created,
            "model": first.model}
    role = {**head, "choices": [{"index": 0, "delta": {"role": first.chat_role, "content": ""},
                                 "logprobs": None, "finish_reason": None}],
            "prompt_token_ids": first.prompt_ids, **(first.chat_head or {})}
    token = {**head, "choices": [{"index": 0, "delta": {"content": first.text},
                                  "logprobs": None, "finish_reason": None,
                                  "token_ids": first.token_ids}]}
    return b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"
                    for c in (role, token))
