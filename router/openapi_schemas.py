"""JSON Schemas of the /v1/* request bodies, for the gateway's OpenAPI document.

The handlers read raw bodies (one copy, size-limited) and check them in
`router.validation`, so FastAPI does not validate against these: they describe the
OpenAI fields the gateway understands, for clients and for schema-driven tests.
Unknown fields are allowed and passed to the workers (vLLM's extensions).
"""

from __future__ import annotations

from router.validation import COMPLETIONS

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}

_SAMPLING: dict[str, dict] = {
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 16},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {
        "include_usage": {"type": "boolean"}}},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                             "maxItems": 4}, {"type": "null"}]},
    "seed": {"type": ["integer", "null"]},
    "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "user": {"type": "string"},
}


def _completions_schema(models: list[str] | None) -> dict:
    model = {"type": "string", "minLength": 1, **({"enum": models} if models else {})}
    prompt = {"oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ]}
    return {"type": "object", "required": ["model", "prompt"], "additionalProperties": True,
            "properties": {"model": model, "prompt": prompt, **_SAMPLING,
                           "echo": {"type": "boolean"},
                           "logprobs": {"type": ["integer", "null"], "minimum": 0,
                                        "maximum": 5}}}


def _chat_schema(models: list[str] | None) -> dict:
    model = {"type": "string", "minLength": 1, **({"enum": models} if models else {})}
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part},
                              {"type": "null"}]},
        "name": {"type": "string"}}}
    return {"type": "object", "required": ["model", "messages"], "additionalProperties": True,
            "properties": {"model": model,
                           "messages": {"type": "array", "items": message, "minItems": 1},
                           **_SAMPLING,
                           "max_completion_tokens": {"type": ["integer", "null"],
                                                     "minimum": 1},
                           "logprobs": {"type": ["boolean", "null"]},
                           "top_logprobs": {"type": ["integer", "null"], "minimum": 0,
                                            "maximum": 20}}}


def request_body_schema(route: str, models: list[str] | None = None) -> dict:
    """`openapi_extra` for a route: its request body, required, as application/json."""
    schema = _completions_schema(models) if route == COMPLETIONS else _chat_schema(models)
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}
