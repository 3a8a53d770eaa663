"""First-token handoff (router.handoff): who qualifies, and what the decode leg is sent."""

from __future__ import annotations

import json

import pytest

from router.handoff import (
    decode_body,
    first_event,
    from_prefill_reply,
    handoff_blocker,
    prefill_fields,
)
from router.validation import parse_request

MODEL = "m"


def parsed(**body: object):
    full = {"model": MODEL, "prompt": "hello there", "max_tokens": 8, "stream": True, **body}
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if "messages" in body:
        full.pop("prompt")
    return parse_request(route, json.dumps(full).encode(), (MODEL,))


def reply(finish: str = "length", text: str = " a", connector: str = "fulcrum") -> dict:
    return {"id": "cmpl-1", "created": 7, "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None,
                         "token_ids": [42], "prompt_token_ids": [1, 2, 3]}],
            "kv_transfer_params": {"do_remote_prefill": True, "connector": connector}}


def test_a_plain_streamed_completion_qualifies() -> None:
    req = parsed()
    assert handoff_blocker(req) is None
    assert prefill_fields(req) == {"return_token_ids": True}
    first = from_prefill_reply(req, reply())
    assert first is not None and first.token_ids == [42] and first.prompt_ids == [1, 2, 3]


@pytest.mark.parametrize(("body", "why"), [
    ({"stream": False}, "not a stream"),
    ({"max_tokens": 1}, "max_tokens < 2"),
    ({"stop": ["x"]}, "stop strings"),
    ({"min_tokens": 3}, "min_tokens"),
    ({"echo": True}, "echo"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"seed": 3, "temperature": 0.8}, "seed"),
    ({"prompt": ["a", "b"]}, "not a single prompt"),
    ({"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "continuous usage stats"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": None},
     "no max_tokens"),
])
def test_requests_whose_first_token_must_be_recomputed(body: dict, why: str) -> None:
    req = parsed(**body)
    assert why in (handoff_blocker(req) or "")
    assert prefill_fields(req) == {}
    assert from_prefill_reply(req, reply()) is None


@pytest.mark.parametrize("bad", [reply(finish="stop"), reply(text="\ufffd"), reply(text=""),
                                 reply(connector="nixl"), {"choices": []},
                                 {**reply(), "choices": [{"finish_reason": "length"}]}])
def test_replies_that_cannot_hand_off(bad: dict) -> None:
    assert from_prefill_reply(parsed(), bad) is None


def test_decode_leg_continues_after_the_first_token() -> None:
    req = parsed(max_completion_tokens=8)
    first = from_prefill_reply(req, reply())
    assert first is not None
    body = decode_body(req.body, first, 8)
    assert body["prompt"] == [1, 2, 3, 42]
    assert body["max_tokens"] == 7 and "max_completion_tokens" not in body
    assert body["return_token_ids"] is True
    assert req.body["prompt"] == "hello there"  # the client's body is left alone


def test_first_event_is_a_completion_chunk_with_the_prefill_token() -> None:
    first = from_prefill_reply(parsed(), reply())
    assert first is not None
    raw = first_event(first)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    chunk = json.loads(raw[6:])
    assert chunk["id"] == "cmpl-1" and chunk["object"] == "text_completion"
    choice = chunk["choices"][0]
    assert choice["text"] == " a" and choice["token_ids"] == [42]
    assert choice["finish_reason"] is None


def chat_reply(message: dict | None = None, finish: str = "length") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": MODEL,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": message or {"role": "assistant", "content": " a",
                                                "tool_calls": [], "reasoning": None},
                         "token_ids": [42]}],
            "prompt_token_ids": [1, 2, 3],
            "kv_transfer_params": {"do_remote_prefill": True, "connector": "fulcrum"}}


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8,
        "temperature": 0, "stream_options": {"include_usage": True}}


def test_a_chat_stream_hands_off_and_continues_as_a_completion_of_its_ids() -> None:
    req = parsed(**CHAT)
    assert handoff_blocker(req) is None and prefill_fields(req) == {"return_token_ids": True}
    first = from_prefill_reply(req, chat_reply())
    assert first is not None and first.prompt_ids == [1, 2, 3] and first.token_ids == [42]
    body = decode_body(req.body, first, 8)
    assert body["prompt"] == [1, 2, 3, 42] and body["max_tokens"] == 7
    assert "messages" not in body and "max_completion_tokens" not in body
    assert body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}


def test_chat_first_events_are_the_role_chunk_then_the_token() -> None:
    first = from_prefill_reply(parsed(**CHAT), chat_reply())
    assert first is not None
    raw = first_event(first)
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e]
    assert [e["object"] for e in events] == ["chat.completion.chunk"] * 2
    assert {e["id"] for e in events} == {"chatcmpl-1"}
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["prompt_token_ids"] == [1, 2, 3]
    assert events[1]["choices"][0]["delta"] == {"content": " a"}
    assert events[1]["choices"][0]["token_ids"] == [42]


@pytest.mark.parametrize("bad", [
    chat_reply(finish="stop"),
    chat_reply({"role": "assistant", "content": None, "reasoning": "hm"}),
    chat_reply({"role": "assistant", "content": ""}),
    chat_reply({"role": "assistant", "content": "", "tool_calls": [{"id": "t"}]}),
    {**chat_reply(), "prompt_token_ids": None},
])
def test_chat_replies_that_cannot_hand_off(bad: dict) -> None:
    assert from_prefill_reply(parsed(**CHAT), bad) is None
