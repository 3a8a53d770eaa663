"""The Kubernetes manifests: both kustomize targets render, every object validates against
the Kubernetes API models (unknown fields rejected), and the pieces fit together."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

from deploy.cli import build_parser  # noqa: E402

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
TARGETS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}

# apiVersion/kind -> the client's model; the one CRD we ship is checked by hand below
MODELS = {
    ("v1", "Namespace"): client.V1Namespace,
    ("v1", "ConfigMap"): client.V1ConfigMap,
    ("v1", "ServiceAccount"): client.V1ServiceAccount,
    ("v1", "Service"): client.V1Service,
    ("apps/v1", "Deployment"): client.V1Deployment,
    ("apps/v1", "StatefulSet"): client.V1StatefulSet,
    ("rbac.authorization.k8s.io/v1", "Role"): client.V1Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): client.V1RoleBinding,
    ("policy/v1", "PodDisruptionBudget"): client.V1PodDisruptionBudget,
}


def render(target: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True,
                         text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(TARGETS))
def objects(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(TARGETS[request.param])


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_every_object_validates_against_the_api_models(objects) -> None:  # noqa: ANN001
    _, docs = objects
    kinds = set()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        kinds.add(doc["kind"])
        if key == ("monitoring.coreos.com/v1", "ServiceMonitor"):
            check_service_monitor(doc)
            continue
        assert key in MODELS, f"no model for {key}"
        MODELS[key].model_validate(doc)  # strict: unknown fields and bad types raise
        assert doc["metadata"]["namespace" if doc["kind"] != "Namespace" else "name"] \
            == "fulcrum"
    assert {"Deployment", "StatefulSet", "Service", "Role", "RoleBinding", "ServiceAccount",
            "PodDisruptionBudget", "ServiceMonitor"} <= kinds


def test_the_models_reject_what_they_should() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {"spec": {"containers": [
               {"name": "a", "imagee": "typo"}]}}}}
    with pytest.raises(ValueError, match="imagee"):
        client.V1Deployment.model_validate(bad)


def check_service_monitor(doc: dict) -> None:
    spec = doc["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    client.V1LabelSelector.model_validate(spec["selector"])
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"


def _container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def _selects(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        ok &= expr["operator"] == "In" and labels.get(expr["key"]) in expr["values"]
    return ok


def test_gateway_discovers_exactly_the_worker_pods(objects) -> None:  # noqa: ANN001
    _, docs = objects
    gateway = one(docs, "Deployment", "fulcrum-gateway")
    workers = one(docs, "StatefulSet", "fulcrum-worker")
    config = one(docs, "ConfigMap", "fulcrum-config")["data"]
    args = build_parser().parse_args(
        [a.replace("$(SERVED_MODEL_NAME)", config["SERVED_MODEL_NAME"])
          .replace("$(POD_NAMESPACE)", "fulcrum")
          .replace("$(WORKER_SELECTOR)", config["WORKER_SELECTOR"])
         for a in _container(gateway)["args"]])  # the real CLI accepts them
    assert args.discover == "k8s" and args.model == [config["SERVED_MODEL_NAME"]]
    key, value = args.k8s_selector.split("=")
    assert workers["spec"]["template"]["metadata"]["labels"][key] == value
    gw_pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert gw_pod_labels.get(key) != value  # the gateway does not discover itself
    assert gateway["spec"]["template"]["spec"]["serviceAccountName"] == "fulcrum-gateway"
    probe = _container(gateway)["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"


def test_rbac_lets_the_gateway_list_and_watch_pods(objects) -> None:  # noqa: ANN001
    _, docs = objects
    binding = one(docs, "RoleBinding", "fulcrum-gateway-pod-reader")
    role = one(docs, "Role", binding["roleRef"]["name"])
    assert {"kind": "ServiceAccount", "name": "fulcrum-gateway",
            "namespace": "fulcrum"} in binding["subjects"]
    rules = [r for r in role["rules"] if "pods" in r["resources"]]
    assert rules and {"list", "watch"} <= set(rules[0]["verbs"])
    assert "*" not in rules[0]["verbs"] and "delete" not in rules[0]["verbs"]


def test_workers_advertise_their_pod_ip_for_kv(objects) -> None:  # noqa: ANN001
    name, docs = objects
    workers = one(docs, "StatefulSet", "fulcrum-worker")
    container = _container(workers)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    kv_arg = next(a for a in container["args"] if a.startswith("--kv-transfer-config="))
    kv = json.loads(kv_arg.split("=", 1)[1].replace("$(KV_PORT)", "9000"))
    assert kv["kv_connector_extra_config"]["host"] == "$(POD_IP)"
    assert kv["kv_role"] == "kv_both" and kv["kv_connector"] == "FulcrumConnector"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["kv"] == kv["kv_connector_extra_config"]["port"]
    for var in ("POD_IP", "KV_PORT"):  # $(VAR) only expands for variables defined above
        assert var in env
    pdb = one(docs, "PodDisruptionBudget", "fulcrum-worker")
    assert _selects(pdb["spec"]["selector"], workers["spec"]["template"]["metadata"]["labels"])
    monitor = by_kind(docs, "ServiceMonitor")[0]
    for svc in by_kind(docs, "Service"):
        assert _selects(monitor["spec"]["selector"], svc["metadata"]["labels"])
        assert "http" in {p["name"] for p in svc["spec"]["ports"]}
    limits = container["resources"].get("limits", {})
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == "1" and workers["spec"]["replicas"] == 4
        assert "--enforce-eager" not in container["args"]
        assert "VLLM_CPU_KVCACHE_SPACE" not in env
    else:
        assert "nvidia.com/gpu" not in limits and "--enforce-eager" in container["args"]


def test_dockerfile_builds_on_the_vllm_image() -> None:
    text = (K8S.parent / "Dockerfile").read_text()
    assert text.splitlines()[0].startswith("ARG BASE_IMAGE=vllm/vllm-openai:")
    assert "FROM ${BASE_IMAGE}" in text and "PYTHONPATH" in text
