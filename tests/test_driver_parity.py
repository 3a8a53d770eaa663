"""One scripted request sequence through the live gateway (over fake workers) and through
the simulator: the routing policy must receive the same calls, in the same order, with the
same arguments. Measured times differ by nature; they are compared by kind (a float >= 0).
Request ids too: the gateway makes its own unique ids, so each id is replaced by the order
in which it first appeared (the same request must keep one id across its calls).
"""

from __future__ import annotations

import httpx
import pytest

from benchmarks.arrivals import TraceEntry
from benchmarks.dataset import BenchRequest
from benchmarks.fake_worker import create_fake_worker
from benchmarks.metrics import SLO
from benchmarks.sim.perf import FittedModel
from benchmarks.sim.simulator import SimConfig, Simulator
from core.request import RequestInfo
from core.routing import RoutingPolicy
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState
from router import policy as policy_registry
from router.app import ControlConfig, GatewayConfig, create_app
from router.cluster import Cluster
from router.dispatch import DispatchConfig
from tests.servers import serve_in_thread

MODEL = "fake-model"
CAP = 24  # the client's max_tokens; below the relay's progress cadence (32 tokens)
# (prompt words, true output length, stream?) per request; words of "abc " are 4 chars,
# so the gateway's chars/4 estimate and the fake worker's word count agree
SCRIPT = [(12, 5, True), (40, 20, False), (7, 2, True), (25, 9, True), (3, 17, False)]


def _time(x: object) -> str:
    assert isinstance(x, float) and x >= 0, x
    return "seconds"


def _by_first_seen(calls: list[tuple]) -> list[tuple]:
    ids: dict[str, str] = {}

    def norm(x: object) -> object:
        if isinstance(x, tuple):
            return tuple(norm(v) for v in x)
        if isinstance(x, str) and (x.isdigit() or x.startswith("fulcrum-")):
            return ids.setdefault(x, f"request#{len(ids)}")
        return x

    return [norm(c) for c in calls]


class Recording(RoutingPolicy):
    """Prefill on w0 and decode on w1 (falling back to whatever is routable); records every
    call with its arguments, times replaced by their kind."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def _request(self, r: RequestInfo) -> tuple:
        assert isinstance(r.arrival_time, float)
        return (r.request_id, r.prompt_tokens, r.max_tokens, r.tbt_target_s, r.prompt_text)

    def _pool(self, cluster: ClusterSnapshot) -> tuple:
        return tuple((w.name, w.role.value) for w in cluster.routable())

    def use_slo(self, slo: SLOTargets) -> None:
        self.calls.append(("use_slo", slo.ttft_s, slo.tpot_s))

    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        self.calls.append(("pick_prefill", self._request(request), self._pool(cluster)))
        return "w0"

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        self.calls.append(("pick_decode", self._request(request), self._pool(cluster),
                           tuple(sorted(exclude))))
        return "w1"

    def observe_prompt(self, prompt_tokens: int) -> None:
        self.calls.append(("observe_prompt", prompt_tokens))

    def observe_prefill(self, worker: str, prompt_tokens: int, seconds: float) -> None:
        self.calls.append(("observe_prefill", worker, prompt_tokens, _time(seconds)))

    def observe_decode(self, worker: str, resident_tokens: int, seconds_per_token: float
                       ) -> None:
        self.calls.append(("observe_decode", worker, resident_tokens,
                           _time(seconds_per_token)))

    def observe_progress(self, request_id: str, generated: int) -> None:
        self.calls.append(("observe_progress", request_id, generated))

    def observe_migrated(self, request_id: str, target: str) -> None:
        self.calls.append(("observe_migrated", request_id, target))

    def observe_finished(self, request_id: str) -> None:
        self.calls.append(("observe_finished", request_id))


def _prompt(words: int) -> str:
    return "abc " * words


def live_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    monkeypatch.setitem(policy_registry.POLICIES, Recording.name, Recording)
    prefill, decode = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    prefill.state.behaviour.prefill_delay_s = 0.01
    decode.state.behaviour.token_delay_s = 0.001
    with serve_in_thread(prefill) as p_url, serve_in_thread(decode) as d_url:
        cluster = Cluster()
        cluster.add("w0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("w1", d_url, Role.DECODE, WorkerState.READY)
        config = GatewayConfig(
            served_models=(MODEL,), policy=Recording.name, dispatch=DispatchConfig(),
            stats_interval_s=60.0, rebalance_interval_s=0.0,
            control=ControlConfig(slo=SLOTargets(ttft_s=0.5, tpot_s=0.05)))
        app = create_app(config, cluster)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            for i, (words, _, stream) in enumerate(SCRIPT):
                body = {"model": MODEL, "prompt": _prompt(words), "max_tokens": CAP,
                        "stream": stream}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                resp = client.post("/v1/completions", json=body, headers={"X-Request-Id": str(i)})
                assert resp.status_code == 200, resp.text
            return app.state.dispatcher.policy.calls


def sim_calls() -> list[tuple]:
    trace = [TraceEntry(10.0 * i, BenchRequest(_prompt(words), words, out))
             for i, (words, out, _) in enumerate(SCRIPT)]
    perf = FittedModel((0.0, 1e-4, 0.005), (0.002, 0.0, 0.0), 10**6, 0.0, 1e9)
    policy = Recording()
    config = SimConfig(prefill=1, decode=1, slo=SLO(ttft_ms=500, tpot_ms=50),
                       client_max_tokens=CAP)
    Simulator(config, perf, policy).run(trace)
    return policy.calls


def test_gateway_and_simulator_make_the_same_policy_calls(monkeypatch) -> None:
    live, simulated = _by_first_seen(live_calls(monkeypatch)), _by_first_seen(sim_calls())
    assert live == simulated
    # the script really exercised every leg: both picks, both measurements, each finish
    kinds = [c[0] for c in simulated]
    assert kinds[0] == "use_slo"
    assert kinds.count("pick_decode") == kinds.count("observe_prefill") == len(SCRIPT)
    assert kinds.count("observe_decode") == kinds.count("observe_finished") == len(SCRIPT)
    assert kinds[1:5] == ["observe_prompt", "pick_decode", "pick_prefill", "observe_prefill"]
