"""Schema-driven fuzzing of the gateway (schemathesis, bounded): whatever a client sends
to the documented endpoints, valid by the OpenAPI request schemas or not, the gateway
never answers with a 5xx. Runs over fake workers that answer instantly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from benchmarks.fake_worker import create_fake_worker
from core.workers import Role, WorkerState
from router.app import GatewayConfig, create_app
from router.cluster import Cluster
from router.health import HealthConfig
from tests.servers import serve_in_thread

MODEL = "fake-model"
MAX_EXAMPLES = 40  # per operation; bounded so the suite stays fast


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        app = create_app(GatewayConfig(served_models=(MODEL,), max_body_mb=1.0,
                                       health=HealthConfig(interval_s=0)), cluster)
        with serve_in_thread(app) as url:
            yield url


OPERATIONS = ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
              "GET /health", "GET /readyz", "GET /livez", "GET /metrics")


@pytest.fixture(scope="module")
def api_schema(gateway_url: str):  # noqa: ANN201 - schemathesis' schema type
    return schemathesis.openapi.from_url(gateway_url + "/openapi.json")


def test_the_schema_documents_the_request_bodies(api_schema) -> None:  # noqa: ANN001
    for label in OPERATIONS[:2]:
        op = api_schema.find_operation_by_label(label)
        assert op is not None and op.body, label  # a JSON request body with its schema


CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS[:2]]  # bodies to break


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_no_server_errors(api_schema, gateway_url: str, label: str,  # noqa: ANN001
                          mode: GenerationMode) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} missing from the OpenAPI document"
    seen: list[int] = []

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def check(case) -> None:  # noqa: ANN001
        response = case.call(base_url=gateway_url, timeout=30)
        seen.append(response.status_code)
        assert response.status_code < 500, (label, case.body, response.text[:500])
        if response.status_code >= 400 and case.path.startswith("/v1/"):
            error = response.json()["error"]  # OpenAI-shaped, whatever went wrong
            assert isinstance(error["message"], str) and len(error["message"]) <= 600

    check()
    assert seen  # it did send requests
