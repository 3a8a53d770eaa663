"""The Grafana dashboard and scrape config only name series that something exports."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import prometheus_client
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fake_worker import create_fake_worker
from deploy.observability import dashboard
from router.app import ControlConfig
from router.cluster import Cluster, Role, WorkerState
from tests.servers import serve_in_thread
from tests.test_gateway_fake import MODEL, _gateway

HERE = Path(dashboard.__file__).parent
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                               "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created"),
             "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "info": ("_info",)}
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "offset", "bool", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression reads (functions, labels and ranges removed)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or m.group() in _NOT_METRICS:
            continue  # a function call or a keyword
        names.add(m.group())
    return names


def series_names(text: str) -> set[str]:
    """Every series name a scrape declares, samples or not (a `# TYPE` suffices)."""
    out = set()
    for fam in text_string_to_metric_families(text):
        out |= {fam.name + s for s in _SUFFIXES.get(fam.type, ("",))}
        out |= {s.name for s in fam.samples}
    return out


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, mode) (rate(fulcrum_ttft_bucket'
            '{job="x"}[$__rate_interval]))) / on(worker) vllm:num_requests_running')
    assert metric_names(expr) == {"fulcrum_ttft_bucket", "vllm:num_requests_running"}


def test_committed_dashboard_is_the_generated_one() -> None:
    assert dashboard.DASHBOARD_PATH.read_text() == dashboard.render(), \
        "run: python -m deploy.observability.dashboard"


def _gateway_names() -> set[str]:
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        control = ControlConfig(policy="dopd", interval_s=3600.0)
        with serve_in_thread(_gateway(cluster, control=control)) as url:
            return series_names(httpx.get(url + "/metrics").text)


def _connector_names() -> set[str]:
    from kv_transfer.fulcrum.stats import FulcrumPromMetrics

    registry = prometheus_client.CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry) for cls in
             (prometheus_client.Gauge, prometheus_client.Counter, prometheus_client.Histogram)}
    FulcrumPromMetrics(SimpleNamespace(kv_transfer_config=None), types, ["engine"], {0: ["0"]})
    return series_names(prometheus_client.generate_latest(registry).decode())


def _vllm_names() -> set[str]:
    import vllm.v1.metrics.loggers as loggers

    source = Path(loggers.__file__).read_text()
    out = set()
    for line in (HERE / "vllm_metrics.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind = line.split()
        assert f'"{name}"' in source, f"{name} is not a metric of the installed vLLM"
        out |= {name + s for s in _SUFFIXES[kind]}
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return {"gateway": _gateway_names(), "connector": _connector_names(),
            "vllm": _vllm_names()}


def test_every_dashboard_query_reads_an_exported_series(exported) -> None:
    known = set().union(*exported.values())
    used = {n for q in dashboard.queries(dashboard.build()) for n in metric_names(q)}
    assert "fulcrum_controller_target_workers" in used and "fulcrum_rejected_total" in used
    assert sorted(used - known) == []


def test_dashboard_covers_what_operators_ask_for(exported) -> None:
    used = {n for q in dashboard.queries(dashboard.build()) for n in metric_names(q)}
    for must in ("fulcrum_worker_role", "fulcrum_role_flips_total",
                 "fulcrum_time_to_first_token_seconds_bucket",
                 "fulcrum_time_per_output_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "fulcrum_pd_leg_failures_total",
                 "vllm:fulcrum_kv_bytes_pulled_total",
                 "vllm:fulcrum_kv_failed_transfers_total",
                 "fulcrum_controller_prefill_share_ratio"):
        assert must in used
    assert exported["gateway"] & used and exported["connector"] & used


def test_panels_do_not_overlap_and_ids_are_unique() -> None:
    panels = dashboard.build()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def test_scrape_config_has_gateway_and_workers() -> None:
    config = yaml.safe_load((HERE / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"fulcrum-gateway", "vllm-workers"}
    assert all(j["metrics_path"] == "/metrics" for j in jobs.values())
