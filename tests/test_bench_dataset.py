"""ShareGPT recovery, vLLM's filter and synthetic requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.dataset import (
    BenchRequest,
    approx_token_count,
    is_valid_pair,
    iter_json_array_entries,
    load_sharegpt,
    sample_requests,
    synthetic_requests,
)


@pytest.fixture(scope="module")
def sharegpt() -> list[dict]:
    return load_sharegpt()


def test_packaged_sharegpt_recovers_all_complete_entries(sharegpt):
    assert len(sharegpt) == 17_671
    assert sharegpt[-1]["id"] == "hlWUIwT_0"
    assert all("conversations" in e for e in sharegpt)


def test_truncated_array_drops_only_the_partial_tail():
    text = '[{"a": 1}, {"b": [2, 3]},\n {"c": "unfinished str'
    assert list(iter_json_array_entries(text)) == [{"a": 1}, {"b": [2, 3]}]
    assert list(iter_json_array_entries('[ {"a": 1} , {"b": 2} ]')) == [{"a": 1}, {"b": 2}]


def test_load_sharegpt_from_a_complete_file(tmp_path: Path):
    entries = [{"id": "x", "conversations": [{"from": "human", "value": "hi"},
                                             {"from": "gpt", "value": "hello"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(entries))
    assert load_sharegpt(path) == entries


def test_vllm_filter_bounds():
    assert is_valid_pair(4, 4)
    assert not is_valid_pair(3, 100)
    assert not is_valid_pair(100, 3)
    assert is_valid_pair(100, 3, skip_min_output_check=True)
    assert is_valid_pair(1024, 1024)
    assert not is_valid_pair(1025, 10)
    assert not is_valid_pair(1000, 1049)


def _words(text: str) -> int:
    return len(text.split())


def test_sample_requests_respects_filter_and_is_seeded(sharegpt):
    a = sample_requests(sharegpt, _words, 300, seed=7)
    b = sample_requests(sharegpt, _words, 300, seed=7)
    c = sample_requests(sharegpt, _words, 300, seed=8)
    assert a == b and a != c
    assert len(a) == 300 and all(isinstance(r, BenchRequest) for r in a)
    for r in a:
        assert r.prompt_tokens == _words(r.prompt)
        assert is_valid_pair(r.prompt_tokens, r.output_tokens)


def test_sample_requests_skips_single_turn_and_oversamples():
    entries = [
        {"conversations": [{"value": "one two three four five"}, {"value": "a b c d e f"}]},
        {"conversations": [{"value": "only one turn here at all"}]},
        {"conversations": [{"value": "too short"}, {"value": "a b c d e"}]},
    ]
    out = sample_requests(entries, _words, 5, seed=0)
    assert len(out) == 5
    assert {r.prompt for r in out} == {"one two three four five"}
    assert sample_requests(entries, _words, 5, seed=0, oversample=False) == out[:1]


def test_fixed_output_length_overrides_completion(sharegpt):
    out = sample_requests(sharegpt, approx_token_count, 50, seed=1, fixed_output_tokens=2)
    assert {r.output_tokens for r in out} == {2}


def test_synthetic_requests_lengths():
    out = synthetic_requests(200, 100, 50, seed=3, range_ratio=0.5)
    assert all(50 <= r.prompt_tokens <= 150 and 25 <= r.output_tokens <= 75 for r in out)
    assert all(_words(r.prompt) == r.prompt_tokens for r in out)
    fixed = synthetic_requests(10, 64, 8)
    assert {(r.prompt_tokens, r.output_tokens) for r in fixed} == {(64, 8)}
