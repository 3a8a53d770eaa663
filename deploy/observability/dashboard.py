"""Build the Grafana dashboard for a Fulcrum deployment (`fulcrum-dashboard.json`).

    python -m deploy.observability.dashboard          # rewrites the JSON next to this file

Every query reads a series the gateway exports, one a worker exports through Fulcrum's
KV connector, or a vLLM name listed in `vllm_metrics.txt` (tests check all three).
The scrape config in `prometheus.yml` gives gateway series `job="fulcrum-gateway"` and
worker series `job="vllm-workers"`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
DASHBOARD_PATH = HERE / "fulcrum-dashboard.json"
RATE = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    stack: bool = False
    options: dict = field(default_factory=dict, hash=False)


def _quantiles(metric: str, by: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)
               ) -> tuple[Query, ...]:
    return tuple(Query(f"histogram_quantile({q}, sum by (le, {by}) "
                       f"(rate({metric}_bucket[{RATE}])))", f"p{int(q * 100)} {{{{{by}}}}}")
                 for q in qs)


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Pools and flips", (
        Panel("Workers per pool (ready)", (
            Query('sum by (role) (fulcrum_worker_role{state="ready"})', "{{role}}"),
            Query('fulcrum_controller_target_workers', "target {{role}}"),
        ), description="Solid: ready workers in each pool; target: what the control "
                       "policy aims for."),
        Panel("Worker states", (Query("sum by (state) (fulcrum_worker_role)", "{{state}}"),),
              stack=True),
        Panel("Role flips", (
            Query(f"sum by (from_role, to_role, outcome) "
                  f"(increase(fulcrum_role_flips_total[{RATE}]))",
                  "{{from_role}} -> {{to_role}} {{outcome}}"),
        ), description="Flips per interval, manual and automatic, by outcome."),
        Panel("Flip duration", _quantiles("fulcrum_role_flip_duration_seconds", "job",
                                          (0.5, 0.9)), unit="s"),
    )),
    ("Latency as clients see it (gateway)", (
        Panel("TTFT by dispatch mode", _quantiles("fulcrum_time_to_first_token_seconds",
                                                  "mode"), unit="s"),
        Panel("TPOT by dispatch mode", _quantiles("fulcrum_time_per_output_token_seconds",
                                                  "mode"), unit="s"),
        Panel("ITL by worker (vLLM)", _quantiles("vllm:inter_token_latency_seconds",
                                                 "instance", (0.5, 0.9)), unit="s"),
        Panel("E2E latency by dispatch mode", _quantiles(
            "fulcrum_e2e_request_latency_seconds", "mode", (0.5, 0.99)), unit="s"),
        Panel("TTFT p90 by decode worker", (
            Query(f"histogram_quantile(0.9, sum by (le, worker) "
                  f"(rate(fulcrum_time_to_first_token_seconds_bucket[{RATE}])))",
                  "{{worker}}"),), unit="s"),
        Panel("SLO targets", (
            Query("fulcrum_controller_slo_target_seconds", "{{metric}} target"),),
              unit="s"),
    )),
    ("Traffic, failures and fallbacks", (
        Panel("Requests by status", (
            Query(f"sum by (status) (rate(fulcrum_requests_total[{RATE}]))", "{{status}}"),),
              unit="reqps", stack=True),
        Panel("Dispatch mode", (
            Query(f"sum by (mode) (rate(fulcrum_dispatch_total[{RATE}]))", "{{mode}}"),),
              unit="reqps", stack=True),
        Panel("P/D leg failures and fallbacks", (
            Query(f"sum by (leg, action) (rate(fulcrum_pd_leg_failures_total[{RATE}]))",
                  "{{leg}}: {{action}}"),
            Query(f"rate(fulcrum_stream_migrations_total[{RATE}])", "stream migrations"),
        ), unit="reqps", description="local_prefill: the decode worker computed the prompt; "
                                     "retry/gave_up: decode leg retries; stream_error: a "
                                     "stream broke mid-way."),
        Panel("Admission rejections", (
            Query(f"sum by (reason) (rate(fulcrum_rejected_total[{RATE}]))", "{{reason}}"),
        ), unit="reqps", description="429s the gateway answered at once because it or its "
                                     "workers were at capacity."),
        Panel("Tokens", (
            Query(f"rate(fulcrum_prompt_tokens_total[{RATE}])", "prompt tok/s"),
            Query(f"rate(fulcrum_completion_tokens_total[{RATE}])", "completion tok/s"),
        )),
        Panel("Worker restarts", (
            Query("increase(fulcrum_worker_restarts_total[1h])", "{{worker}}"),),
              description="Process restarts by the manager over the last hour."),
    )),
    ("KV transfer and worker load", (
        Panel("KV pulled", (
            Query(f"sum by (instance) (rate(vllm:fulcrum_kv_bytes_pulled_total[{RATE}]))",
                  "{{instance}}"),), unit="Bps",
              description="KV bytes/s each decode worker pulled with Fulcrum's connector."),
        Panel("KV pulls and failures", (
            Query(f"sum by (instance) (rate(vllm:fulcrum_kv_pulls_total[{RATE}]))",
                  "pulls {{instance}}"),
            Query(f"sum by (instance) "
                  f"(rate(vllm:fulcrum_kv_failed_transfers_total[{RATE}]))",
                  "failed {{instance}}"),
            Query(f"sum by (instance) (rate(vllm:fulcrum_kv_expired_leases_total[{RATE}]))",
                  "expired leases {{instance}}"),
        ), unit="ops"),
        Panel("KV pull time", _quantiles("vllm:fulcrum_kv_transfer_seconds", "instance",
                                         (0.5, 0.99)), unit="s"),
        Panel("KV cache usage", (
            Query("fulcrum_worker_kv_cache_usage_ratio", "{{worker}}"),),
              unit="percentunit"),
        Panel("Gateway legs in flight", (
            Query("fulcrum_worker_in_flight", "{{worker}} {{leg}}"),), stack=True),
        Panel("vLLM running / waiting", (
            Query("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
            Query("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
        )),
    )),
    ("Controller", (
        Panel("Prefill share of work (dopd)", (
            Query("fulcrum_controller_prefill_share_ratio", "{{kind}}"),),
              unit="percentunit", description="Observed over the window, and Holt's "
                                              "forecast the policy sizes pools for."),
        Panel("Pool load: latency / SLO (arrow)", (
            Query("fulcrum_controller_pool_load_ratio", "{{role}}"),),
              description="Above 1 the pool misses its target."),
        Panel("Controller ticks", (
            Query(f"rate(fulcrum_controller_ticks_total[{RATE}])", "ticks/s"),
            Query("fulcrum_controller_info", "{{policy}} ({{mode}})"),
        )),
        Panel("Build", (Query("fulcrum_build_info", "fulcrum {{version}}, vllm {{vllm}}"),)),
    )),
)


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    return {
        "id": pid, "type": "timeseries", "title": panel.title, "datasource": DS,
        "description": panel.description,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": {
            "stacking": {"mode": "normal" if panel.stack else "none"}}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": q.expr,
                     "legendFormat": q.legend} for i, q in enumerate(panel.queries)],
    }


def build() -> dict:
    """The dashboard as Grafana's JSON model (schema 39, Grafana 10+)."""
    panels: list[dict] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, panel in enumerate(row):
            panels.append(_panel_json(panel, pid, 8 * (i % 3), y + 8 * (i // 3)))
            pid += 1
        y += 8 * ((len(row) + 2) // 3)
    return {
        "title": "Fulcrum", "uid": "fulcrum-pd", "schemaVersion": 39, "version": 1,
        "tags": ["fulcrum", "vllm"], "timezone": "browser", "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression in a dashboard."""
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else DASHBOARD_PATH
    out.write_text(render())
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
