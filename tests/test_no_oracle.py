"""Requests carry what a real client sends: the true output length stays in the engine
unless a run asks for the length oracle."""

from __future__ import annotations

from benchmarks.arrivals import TraceEntry
from benchmarks.bench import Endpoint, request_body
from benchmarks.dataset import BenchRequest
from benchmarks.sim.perf import FittedModel
from benchmarks.sim.simulator import SimConfig, Simulator
from benchmarks.workload import DEFAULT_CLIENT_MAX_TOKENS
from core.request import RequestInfo
from core.workers import ClusterSnapshot
from router.policy import LeastLoadedPolicy

REQ = BenchRequest("some prompt text", 30, 77)


class SeesCaps(LeastLoadedPolicy):
    def __init__(self) -> None:
        self.caps: list[int | None] = []

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        self.caps.append(request.max_tokens)
        return super().pick_decode(request, cluster, exclude)


def _run(**config) -> tuple[list, object]:
    trace = [TraceEntry(i * 5.0, BenchRequest(REQ.prompt, 30, out))
             for i, out in enumerate((77, 5, 300))]
    perf = FittedModel((0.0, 1e-5, 0.001), (0.002, 0.0, 0.0), 10**6, 0.0, 1e9)
    policy = SeesCaps()
    result = Simulator(SimConfig(prefill=1, decode=1, **config), perf, policy).run(trace)
    return policy.caps, result


def test_simulated_requests_hide_their_length_by_default() -> None:
    caps, result = _run()
    assert caps == [DEFAULT_CLIENT_MAX_TOKENS] * 3
    assert result.output_tokens.tolist() == [77, 5, 300]  # the engine still ends each one


def test_the_client_cap_bounds_what_the_engine_generates() -> None:
    caps, result = _run(client_max_tokens=100)
    assert caps == [100] * 3 and result.output_tokens.tolist() == [77, 5, 100]
    caps, _ = _run(client_max_tokens=None)
    assert caps == [None] * 3


def test_the_length_oracle_is_explicit() -> None:
    caps, _ = _run(length_oracle=True)
    assert caps == [77, 5, 300]


def test_harness_sends_a_client_cap_and_no_ignore_eos_by_default() -> None:
    hidden = request_body(Endpoint("http://x", "m", client_max_tokens=512), REQ)
    assert hidden["max_tokens"] == 512 and "ignore_eos" not in hidden
    uncapped = request_body(Endpoint("http://x", "m", chat=True), REQ)
    assert "max_completion_tokens" not in uncapped and "ignore_eos" not in uncapped
    oracle = request_body(Endpoint("http://x", "m", length_oracle=True, ignore_eos=True), REQ)
    assert oracle["max_tokens"] == 77 and oracle["ignore_eos"] is True
