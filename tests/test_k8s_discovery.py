"""Workers found by label selector through the Kubernetes API, against a fake API server on
loopback that answers pod list and watch requests as the real one does."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

kubernetes = pytest.importorskip("kubernetes")

from benchmarks.fake_worker import create_fake_worker  # noqa: E402
from core.workers import WorkerState  # noqa: E402
from instance_manager.backends.k8s import PodDiscovery, pod_worker  # noqa: E402
from router.app import GatewayConfig, create_app  # noqa: E402
from router.cluster import Cluster  # noqa: E402
from router.worker_registry import JoinConfig  # noqa: E402
from tests.servers import free_port, serve_in_thread  # noqa: E402

MODEL = "fake-model"
SELECTOR = "app.kubernetes.io/component=worker"


def pod(name: str, port: int, *, ready: bool = True, role: str | None = None,
        version: int = 1) -> dict:
    labels = {"app.kubernetes.io/component": "worker"}
    if role:
        labels["fulcrum.io/role"] = role
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "fulcrum", "labels": labels,
                         "annotations": {"fulcrum.io/port": str(port)},
                         "resourceVersion": str(version)},
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready",
                                       "status": "True" if ready else "False"}]}}


class FakeApiServer:
    """Pods of one namespace: a list answer and watch streams fed from a queue."""

    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.version = 10
        self.events: queue.Queue = queue.Queue()
        self.requests: list[tuple[str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                fake.requests.append((url.path, query))
                if url.path != "/api/v1/namespaces/fulcrum/pods" or \
                        query.get("labelSelector") != SELECTOR:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if query.get("watch") in ("true", "True", "1"):
                    deadline = time.monotonic() + float(query.get("timeoutSeconds", 5))
                    while time.monotonic() < deadline:
                        try:
                            event = fake.events.get(timeout=0.1)
                        except queue.Empty:
                            continue
                        self.wfile.write(json.dumps(event).encode() + b"\n")
                        self.wfile.flush()
                    return
                body = {"apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": str(fake.version)},
                        "items": list(fake.pods.values())}
                self.wfile.write(json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def emit(self, kind: str, obj: dict) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            self.pods.pop(obj["metadata"]["name"], None)
        else:
            self.pods[obj["metadata"]["name"]] = obj
        self.events.put({"type": kind, "object": obj})

    def close(self) -> None:
        self.server.shutdown()


def _wait(cond, timeout_s: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_pod_worker_needs_ready_and_an_ip() -> None:
    from kubernetes import client

    def pod_worker_of(obj: dict, port: int):  # noqa: ANN202 - as the client hands pods over
        return pod_worker(client.V1Pod.model_validate(obj), port)

    assert pod_worker_of(pod("w-0", 9000), 8000).url == "http://127.0.0.1:9000"
    assert pod_worker_of(pod("w-0", 9000), 8000).role == "prefill"  # even ordinal
    assert pod_worker_of(pod("w-3", 9000), 8000).role == "decode"
    assert pod_worker_of(pod("w-3", 9000, role="prefill"), 8000).role == "prefill"
    assert pod_worker_of(pod("w-1", 9000, ready=False), 8000) is None
    no_ip = pod("w-1", 9000)
    del no_ip["status"]["podIP"]
    assert pod_worker_of(no_ip, 8000) is None


@pytest.fixture()
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


def test_discovery_follows_pods_through_list_and_watch(api: FakeApiServer) -> None:
    from kubernetes import client

    workers = [create_fake_worker(f"W{i}", MODEL) for i in range(3)]
    with serve_in_thread(workers[0]) as u0, serve_in_thread(workers[1]) as u1, \
            serve_in_thread(workers[2]) as u2:
        ports = [int(u.rsplit(":", 1)[1]) for u in (u0, u1, u2)]
        api.pods["fulcrum-worker-0"] = pod("fulcrum-worker-0", ports[0])
        api.pods["fulcrum-worker-1"] = pod("fulcrum-worker-1", ports[1])
        api.pods["fulcrum-worker-2"] = pod("fulcrum-worker-2", ports[2], ready=False)
        cluster = Cluster()
        app = create_app(GatewayConfig(served_models=(MODEL,), stats_interval_s=0.2), cluster)
        app.state.registry.config = JoinConfig(probe_interval_s=0.05, kv_grace_s=0.01)
        config = client.Configuration(host=api.url)
        discovery = PodDiscovery(lambda: app.state.registry, namespace="fulcrum",
                                 selector=SELECTOR, api_client=client.ApiClient(config),
                                 watch_timeout_s=2, retry_s=0.1)
        app.router.lifespan_context = _with_supervisor(app.router.lifespan_context, discovery)

        def ready() -> set[str]:
            return {w.name for w in cluster.snapshot().workers
                    if w.state == WorkerState.READY}

        with serve_in_thread(app) as g_url:
            _wait(lambda: ready() == {"fulcrum-worker-0", "fulcrum-worker-1"})
            assert cluster.view("fulcrum-worker-0").role.value == "prefill"
            assert cluster.view("fulcrum-worker-1").role.value == "decode"
            import httpx
            out = httpx.post(g_url + "/v1/completions", timeout=10, json={
                "model": MODEL, "prompt": "a b", "max_tokens": 3}).json()
            assert out["usage"]["completion_tokens"] == 3
            # worker-2 passes its readiness probe: a watch event brings it in
            api.emit("MODIFIED", pod("fulcrum-worker-2", ports[2], role="decode"))
            _wait(lambda: "fulcrum-worker-2" in ready())
            # worker-1 is deleted: it is drained and removed
            api.emit("DELETED", pod("fulcrum-worker-1", ports[1]))
            _wait(lambda: "fulcrum-worker-1" not in cluster.names())
            # worker-0 turns NotReady: out as well
            api.emit("MODIFIED", pod("fulcrum-worker-0", ports[0], ready=False))
            _wait(lambda: "fulcrum-worker-0" not in cluster.names())
            assert ready() == {"fulcrum-worker-2"}
            # after a watch times out the discovery lists again and finds the same state
            lists = sum(1 for path, q in api.requests if "watch" not in q)
            _wait(lambda: sum(1 for path, q in api.requests if "watch" not in q) > lists,
                  timeout_s=6)
            assert ready() == {"fulcrum-worker-2"}
        assert all(q.get("labelSelector") == SELECTOR for _, q in api.requests)


def _with_supervisor(lifespan, supervisor):  # noqa: ANN001, ANN202
    """Wrap an app lifespan so `supervisor` starts after it and stops before it ends."""
    import contextlib

    @contextlib.asynccontextmanager
    async def wrapped(app):  # noqa: ANN001, ANN202
        async with lifespan(app):
            await supervisor.start()
            try:
                yield
            finally:
                await supervisor.stop()
    return wrapped
