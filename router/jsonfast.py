"""JSON on the request path: orjson, with the standard library where orjson refuses.

orjson is several times faster, but it refuses to write integers beyond 64 bits and
strings with lone surrogates, and to read lone surrogate escapes; a client may send
either, and `json` takes both. Those cases fall back to `json`. (orjson reads integers
beyond 64 bits as floats; only workers' answers are read here, which carry none.)
"""

from __future__ import annotations

import json

import orjson


def dumps(value: object) -> bytes:
    """Compact JSON bytes of `value`."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def loads(raw: bytes) -> object:
    """The value of JSON `raw`; raises ValueError when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
