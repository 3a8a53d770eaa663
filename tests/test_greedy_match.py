"""The comparison the real-vLLM tests use for two workers' temperature-0 runs."""

from __future__ import annotations

import pytest

from tests.greedy_match import (
    CROSS_WORKER_TOLERANCE,
    assert_follows_greedy_ids,
    assert_same_greedy_run,
    top_by_id,
)


def run(tokens: list[str], chosen: list[float], tops: list[dict[str, float]]) -> dict:
    """A /v1/completions response with the given per-token logprobs."""
    return {"choices": [{"logprobs": {"tokens": tokens, "token_logprobs": chosen,
                                      "top_logprobs": tops}}]}


REFERENCE = run(["a", "b", "c"], [-8.10, -8.20, -8.30],
                [{"a": -8.10, "x": -8.1004}, {"b": -8.20, "y": -8.25}, {"c": -8.30}])


def test_float_noise_passes() -> None:
    got = run(["a", "b", "c"], [-8.10002, -8.19999, -8.30], [{}, {}, {}])
    assert_same_greedy_run(got, REFERENCE, CROSS_WORKER_TOLERANCE)


def test_a_near_tie_may_flip_and_ends_the_comparison() -> None:
    got = run(["x", "q", "q"], [-8.1004, -1.0, -1.0], [{}, {}, {}])
    assert_same_greedy_run(got, REFERENCE, CROSS_WORKER_TOLERANCE)


@pytest.mark.parametrize("got", [
    run(["a", "b", "c"], [-8.10, -8.21, -8.30], [{}, {}, {}]),  # a logprob off by 1e-2
    run(["a", "y", "c"], [-8.10, -8.25, -8.30], [{}, {}, {}]),  # a flip that is no near tie
    run(["a", "z", "c"], [-8.10, -8.20, -8.30], [{}, {}, {}]),  # a token outside the top-k
    run(["a", "b"], [-8.10, -8.20], [{}, {}]),  # fewer tokens
])
def test_anything_else_fails(got: dict) -> None:
    with pytest.raises(AssertionError):
        assert_same_greedy_run(got, REFERENCE, CROSS_WORKER_TOLERANCE)


# the same reference by token id, as asked with return_tokens_as_token_ids
REFERENCE_IDS = [1, 2, 3]
TOP_BY_ID = top_by_id([{"token_id:1": -8.10, "token_id:9": -8.1004},
                       {"token_id:2": -8.20, "token_id:8": -8.25}, {"token_id:3": -8.30}])


@pytest.mark.parametrize("got", [[1, 2, 3], [9, 5, 5]])  # the same run; a near tie flipped
def test_ids_follow_a_greedy_run_up_to_a_near_tie(got: list[int]) -> None:
    assert_follows_greedy_ids(got, REFERENCE_IDS, TOP_BY_ID, CROSS_WORKER_TOLERANCE)


@pytest.mark.parametrize("got", [[1, 8, 3], [1, 7, 3], [1, 2], [1, 2, 3, 4]])
def test_ids_that_leave_the_run_otherwise_fail(got: list[int]) -> None:
    with pytest.raises(AssertionError):
        assert_follows_greedy_ids(got, REFERENCE_IDS, TOP_BY_ID, CROSS_WORKER_TOLERANCE)
