"""`X-Fulcrum-Client-Cap`: policies see the client's cap, the engine the request's own
`max_tokens` (how live benchmarks keep output lengths hidden on a model that never stops)."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.bench import Endpoint, request_body
from benchmarks.dataset import BenchRequest
from benchmarks.fake_worker import create_fake_worker
from core.request import RequestInfo
from core.routing import RoutingPolicy
from core.workers import ClusterSnapshot, Role, WorkerState
from router import policy as policy_registry
from router.app import GatewayConfig, create_app
from router.cluster import Cluster
from router.dispatch import DispatchConfig
from router.validation import parse_client_cap
from tests.servers import serve_in_thread

MODEL = "fake-model"


class SeenCaps(RoutingPolicy):
    """Routes prefill to w0 and decode to w1; remembers the cap each request showed."""

    name = "seen-caps"

    def __init__(self) -> None:
        self.caps: list[int | None] = []

    def pick_prefill(self, request: RequestInfo, cluster: ClusterSnapshot) -> str | None:
        return "w0"

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        self.caps.append(request.max_tokens)
        return "w1"


@pytest.mark.parametrize("raw, expected", [("4096", 4096), (None, None), ("0", None),
                                           ("-5", None), ("12x", None), ("9" * 12, None)])
def test_client_cap_header_parsing(raw: str | None, expected: int | None) -> None:
    assert parse_client_cap(raw) == expected


def test_policies_see_the_cap_and_the_engine_the_length(monkeypatch) -> None:
    monkeypatch.setitem(policy_registry.POLICIES, SeenCaps.name, SeenCaps)
    prefill, decode = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    with serve_in_thread(prefill) as p_url, serve_in_thread(decode) as d_url:
        cluster = Cluster()
        cluster.add("w0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("w1", d_url, Role.DECODE, WorkerState.READY)
        app = create_app(GatewayConfig(served_models=(MODEL,), policy=SeenCaps.name,
                                       dispatch=DispatchConfig(), stats_interval_s=60.0,
                                       rebalance_interval_s=0.0), cluster)
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
            for headers in ({"X-Fulcrum-Client-Cap": "4096"}, {}):
                resp = client.post("/v1/completions", headers=headers,
                                   json={"model": MODEL, "prompt": "a b c", "max_tokens": 7})
                assert resp.status_code == 200, resp.text
                assert resp.json()["usage"]["completion_tokens"] == 7
            assert app.state.dispatcher.policy.caps == [4096, 7]
    # the decode worker was asked for the request's own length both times
    decode_caps = [b.get("max_tokens") for b in decode.state.stats.bodies]
    assert decode_caps and all(c in (6, 7) for c in decode_caps)  # 6: first token handed off


def test_bench_engine_lengths_sends_the_length_and_the_cap_header() -> None:
    req = BenchRequest("hello there", 2, 33)
    endpoint = Endpoint("http://x", MODEL, engine_lengths=True, client_max_tokens=4096)
    body = request_body(endpoint, req)
    assert body["max_tokens"] == 33 and body["ignore_eos"] is True
    assert endpoint.http_headers()["X-Fulcrum-Client-Cap"] == "4096"
    assert endpoint.lengths == "hidden, engine-enforced"
    hidden = Endpoint("http://x", MODEL, client_max_tokens=4096)
    assert request_body(hidden, req)["max_tokens"] == 4096
    assert "X-Fulcrum-Client-Cap" not in hidden.http_headers()
