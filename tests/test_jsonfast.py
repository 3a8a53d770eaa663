"""JSON on the request path: what orjson refuses still goes through, exactly."""

from __future__ import annotations

import json

import pytest

from router import jsonfast


@pytest.mark.parametrize("value", [{"seed": 10**30}, {"prompt": "\ud800 lone"},
                                   {"n": -(2**70), "x": [1.5, "é"]}])
def test_what_orjson_refuses_is_written_by_json(value: dict) -> None:
    assert json.loads(jsonfast.dumps(value)) == value


def test_reads_lone_surrogate_escapes_and_rejects_non_json() -> None:
    assert jsonfast.loads(b'{"t": "\\ud800"}') == {"t": "\ud800"}
    assert jsonfast.loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(ValueError):
        jsonfast.loads(b"{not json")
