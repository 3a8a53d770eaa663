"""Checks the gateway makes before any worker sees a request.

vLLM validates sampling parameters and prompt length itself and answers with
OpenAI-style 400s, which the gateway passes through. Here we catch what must
never reach a worker: bodies that are not JSON objects, unknown models, missing
prompts, wrong types for the fields the gateway itself reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from router.errors import GatewayError
from router.limits import loads_strict

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class ParsedRequest:
    """A validated client request and what the router needs to know about it."""

    route: str
    body: dict
    model: str
    stream: bool
    max_tokens: int | None
    prompt_chars: int
    # What routing and control policies are told the cap is. Only a benchmark sets it apart
    # from `max_tokens` (`X-Fulcrum-Client-Cap`): a random-weight model never stops on its own,
    # so the engine gets the trace's length while the policies see the client's large cap.
    client_cap: int | None = None

    @property
    def policy_max_tokens(self) -> int | None:
        """The cap policies see: the client's, unless a benchmark hides the engine's."""
        return self.client_cap if self.client_cap is not None else self.max_tokens

    @property
    def prompt_tokens_estimate(self) -> int:
        """A cheap guess (about four characters a token) for load accounting only."""
        return max(1, self.prompt_chars // 4)

    @property
    def prompt_text(self) -> str | None:
        """The completion prompt, or the last user message of a chat, when it is text."""
        if self.route == COMPLETIONS:
            prompt = self.body.get("prompt")
            return prompt if isinstance(prompt, str) else None
        for message in reversed(self.body.get("messages") or []):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"]
        return None

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options") or {}
        return bool(opts.get("include_usage"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_chars(route: str, body: dict) -> int:
    if route == COMPLETIONS:
        prompt = body.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise GatewayError(400, "'prompt' is required", param="prompt")
        if isinstance(prompt, str):
            return len(prompt)
        if isinstance(prompt, list):
            return sum(len(p) if isinstance(p, str) else 4 for p in prompt)
        raise GatewayError(400, "'prompt' must be a string, a list of strings or token ids",
                           param="prompt")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "'messages' must be a non-empty list", param="messages")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GatewayError(400, f"messages[{i}] must be an object with a 'role'",
                               param=f"messages[{i}]")
        content = message.get("content")
        total += len(content) if isinstance(content, str) else len(json.dumps(content))
    return total


def parse_client_cap(raw: str | None) -> int | None:
    """`X-Fulcrum-Client-Cap`: a positive integer, or None when absent or malformed."""
    if raw is None or not raw.isdigit() or len(raw) > 9:
        return None
    return int(raw) or None


def parse_request(route: str, raw: bytes, served_models: tuple[str, ...],
                  client_cap: int | None = None) -> ParsedRequest:
    """Parse and check a request body; raise `GatewayError` with a 4xx on bad input."""
    body = loads_strict(raw)  # no NaN/Infinity, bounded depth: 400s, not encoder crashes
    if not isinstance(body, dict):
        raise GatewayError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "'model' is required", param="model")
    if model not in served_models:
        raise GatewayError(404, f"The model `{model}` does not exist. Served models: "
                           f"{', '.join(served_models) or 'none'}", code="model_not_found",
                           param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(400, "'stream' must be a boolean", param="stream")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:  # absent or null: fall back to the older field
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise GatewayError(400, "'max_tokens' must be a positive integer", param="max_tokens")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n < 1):
        raise GatewayError(400, "'n' must be a positive integer", param="n")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise GatewayError(400, "'stream_options' must be an object", param="stream_options")
    if "kv_transfer_params" in body:
        raise GatewayError(400, "'kv_transfer_params' is set by the gateway, not by clients",
                           param="kv_transfer_params")
    return ParsedRequest(route=route, body=body, model=model, stream=stream,
                         max_tokens=max_tokens, prompt_chars=_prompt_chars(route, body),
                         client_cap=client_cap)
