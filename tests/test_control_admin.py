"""The control admin API (on an app built here) and the operator CLI that drives it."""

from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from core.flips import FlipCoordinator
from core.slo import SLOTargets
from core.workers import Role, WorkerState
from deploy.operator_cli import register
from instance_manager.controller.loop import Controller
from instance_manager.controller.registry import make_control_policy
from instance_manager.metrics_collector import MetricsCollector
from router import admin_control
from router.cluster import Cluster
from router.errors import GatewayError
from tests.test_collector import vllm_text

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_app(*, token: str | None = TOKEN, admin_open: bool = True,
             with_controller: bool = True) -> FastAPI:
    cluster = Cluster()
    for name, role in (("p0", Role.PREFILL), ("p1", Role.PREFILL), ("d0", Role.DECODE),
                       ("d1", Role.DECODE)):
        cluster.add(name, f"http://{name}:8000", role, WorkerState.READY)
    app = FastAPI()
    app.state.cluster = cluster
    app.state.flips = FlipCoordinator(cluster, poll_interval_s=0.001, drain_timeout_s=1.0)
    app.state.controller = Controller(
        MetricsCollector(slo=SLOTargets(ttft_s=1.0, tpot_s=0.1)), app.state.flips,
        make_control_policy("arrow"), interval_s=5.0) if with_controller else None
    app.state.admin_token = token
    app.state.admin_open = admin_open
    app.include_router(admin_control.router)

    @app.exception_handler(GatewayError)
    async def _error(request: Request, exc: GatewayError):  # noqa: ANN202
        return exc.response()

    return app


def tick_controller(app: FastAPI, ticks: int = 2) -> None:
    scrapes: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        n = scrapes[request.url.host] = scrapes.get(request.url.host, 0) + 1
        return httpx.Response(200, text=vllm_text(
            ttft=[0, 5 * n, 5 * n, 5 * n, 5 * n], itl=[0, 9 * n, 9 * n, 9 * n, 9 * n],
            prompt=100 * n, generation=10 * n, finished=5 * n, running=2))

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            for _ in range(ticks):
                await app.state.controller.tick(client)

    asyncio.run(run())


def test_token_is_required_when_configured():
    client = TestClient(make_app())
    assert client.get("/admin/policy").status_code == 401
    wrong = client.get("/admin/policy", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert client.get("/admin/policy", headers=AUTH).status_code == 200


def test_admin_is_off_without_a_token_on_a_public_bind():
    client = TestClient(make_app(token=None, admin_open=False))
    resp = client.post("/admin/flip", json={"worker": "p0", "to": "decode"})
    assert resp.status_code == 403
    assert "admin API is off" in resp.json()["error"]["message"]


def test_flip_dry_run_then_real_flip_and_history():
    app = make_app()
    client = TestClient(app, headers=AUTH)
    before = app.state.cluster.snapshot().workers
    dry = client.post("/admin/flip", json={"worker": "p0", "to": "decode", "dry_run": True})
    assert dry.status_code == 200 and dry.json()["outcome"] == "dry-run"
    assert app.state.cluster.snapshot().workers == before
    assert client.get("/admin/flips").json()["flips"] == []
    done = client.post("/admin/flip", json={"worker": "p0", "to": "decode"}).json()
    assert done["outcome"] == "done" and done["from_role"] == "prefill"
    assert app.state.cluster.view("p0").role == Role.DECODE
    history = client.get("/admin/flips").json()["flips"]
    assert [(h["worker"], h["outcome"]) for h in history] == [("p0", "done")]


def test_flip_refusals_map_to_http_errors():
    client = TestClient(make_app(), headers=AUTH)
    assert client.post("/admin/flip", json={"worker": "p0", "to": "decode"}).status_code == 200
    last = client.post("/admin/flip", json={"worker": "p1", "to": "decode"})
    assert last.status_code == 409
    assert "no READY worker" in last.json()["error"]["message"]
    missing = client.post("/admin/flip", json={"worker": "zz", "to": "decode"})
    assert missing.status_code == 404


def test_drain_and_undrain_over_http():
    app = make_app()
    client = TestClient(app, headers=AUTH)
    resp = client.post("/admin/drain", json={"worker": "d1"})
    assert resp.json()["state"] == "draining"
    assert app.state.cluster.view("d1").state == WorkerState.DRAINING
    assert client.post("/admin/undrain", json={"worker": "d1"}).json()["state"] == "ready"
    assert client.post("/admin/undrain", json={"worker": "d1"}).status_code == 409


def test_policy_show_and_set():
    app = make_app()
    client = TestClient(app, headers=AUTH)
    shown = client.get("/admin/policy").json()
    assert shown["name"] == "arrow" and shown["mode"] == "act"
    assert shown["knobs"]["cooldown_s"] == 10.0
    changed = client.put("/admin/policy", json={"knobs": {"cooldown_s": "5"}, "ttft_s": 2.0,
                                                "advisory": True}).json()
    assert changed["knobs"]["cooldown_s"] == 5.0 and changed["knobs"]["sustain_ticks"] == 2
    assert changed["slo"] == {"ttft_s": 2.0, "tpot_s": 0.1} and changed["mode"] == "advisory"
    assert app.state.controller.advisory is True
    switched = client.put("/admin/policy", json={"name": "dopd"}).json()
    assert switched["name"] == "dopd" and "forecast_horizon_s" in switched["knobs"]
    bad = client.put("/admin/policy", json={"knobs": {"bogus": 1}})
    assert bad.status_code == 400 and "no knob" in bad.json()["error"]["message"]
    assert app.state.controller.policy.name == "dopd"


def test_explain_and_control_state_show_the_numbers():
    app = make_app()
    tick_controller(app)
    client = TestClient(app, headers=AUTH)
    decisions = client.get("/admin/explain", params={"limit": 1}).json()["decisions"]
    assert len(decisions) == 1 and decisions[0]["tick"] == 2
    assert decisions[0]["numbers"]["ttft_target_s"] == 1.0
    assert decisions[0]["note"].startswith("hold:")
    state = client.get("/admin/control").json()
    assert state["pools"] == {"prefill": 2, "decode": 2}
    p0 = next(w for w in state["workers"] if w["name"] == "p0")
    assert p0["scraped"] and p0["num_running"] == 2
    assert p0["ttft_p90_s"] == pytest.approx(0.01 + 0.09 * 0.9)  # 5 TTFTs in (10, 100] ms


def test_without_a_controller_policy_endpoints_say_so():
    client = TestClient(make_app(with_controller=False), headers=AUTH)
    resp = client.get("/admin/explain")
    assert resp.status_code == 503 and "no controller" in resp.json()["error"]["message"]
    assert client.get("/admin/control").json()["controller"] is None
    assert client.post("/admin/flip", json={"worker": "d0", "to": "prefill"}).status_code == 200


def run_cli(app: FastAPI, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fulcrum")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*argv, "--token", TOKEN])
    args.http = TestClient(app)
    return args.func(args)


def test_cli_flip_dry_run_changes_nothing(capsys):
    app = make_app()
    before = app.state.cluster.snapshot().workers
    assert run_cli(app, "flip", "d0", "--to", "prefill", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run (nothing changed)" in out and "would drain 0 decode legs" in out
    assert app.state.cluster.snapshot().workers == before


def test_cli_flip_drain_undrain_and_refusal(capsys):
    app = make_app()
    assert run_cli(app, "flip", "d0", "--to", "prefill", "--timeout", "1") == 0
    assert app.state.cluster.view("d0").role == Role.PREFILL
    assert run_cli(app, "flip", "d1", "--to", "prefill") == 1  # refused (409)
    assert "no READY worker" in capsys.readouterr().err
    assert run_cli(app, "drain", "p1") == 0
    assert app.state.cluster.view("p1").state == WorkerState.DRAINING
    assert run_cli(app, "undrain", "p1") == 0
    assert app.state.cluster.view("p1").state == WorkerState.READY


def test_cli_flip_that_rolls_back_exits_nonzero(capsys):
    app = make_app()
    app.state.cluster.begin("p0", Role.PREFILL, 10)  # never finishes
    assert run_cli(app, "flip", "p0", "--to", "decode", "--timeout", "0.02") == 1
    assert "rolled-back" in capsys.readouterr().out
    assert app.state.cluster.view("p0").role == Role.PREFILL


def test_cli_flip_mode_relabels_a_busy_worker_at_once_or_drains_it(capsys):
    app = make_app()  # the coordinator drains unless told otherwise
    app.state.cluster.begin("p0", Role.PREFILL, 10)  # never finishes
    assert run_cli(app, "flip", "p0", "--to", "decode", "--mode", "relabel") == 0
    assert "relabel: 1 prefill legs finish in place" in capsys.readouterr().out
    view = app.state.cluster.view("p0")
    assert (view.role, view.in_flight_prefill) == (Role.DECODE, 1)
    app.state.cluster.begin("d0", Role.DECODE, 10)
    assert run_cli(app, "flip", "d0", "--to", "prefill", "--mode", "drain",
                   "--timeout", "0.02") == 1
    assert app.state.cluster.view("d0").role == Role.DECODE
    bad = TestClient(app, headers=AUTH).post(
        "/admin/flip", json={"worker": "d1", "to": "prefill", "mode": "teleport"})
    assert bad.status_code == 422 and app.state.cluster.view("d1").role == Role.DECODE


def test_cli_policy_set_show_explain_watch(capsys):
    app = make_app()
    assert run_cli(app, "policy", "set", "arrow", "--knob", "cooldown_s=7", "--tpot", "0.05",
                   "--advisory") == 0
    assert app.state.controller.advisory is True
    assert app.state.controller.slo.tpot_s == 0.05
    assert app.state.controller.policy.config.cooldown_s == 7.0
    capsys.readouterr()
    assert run_cli(app, "policy", "show") == 0
    shown = capsys.readouterr().out
    assert "cooldown_s" in shown and "SLO TPOT ms" in shown and "50" in shown
    tick_controller(app)
    assert run_cli(app, "explain") == 0
    assert "ttft_target_s=1.0" in capsys.readouterr().out
    assert run_cli(app, "watch", "--once") == 0
    out = capsys.readouterr().out
    assert "p0" in out and "policy arrow (advisory)" in out
    assert run_cli(app, "policy", "set", "--knob", "oops") == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cli_commands_are_registered_in_fulcrum():
    from deploy.cli import build_parser

    args = build_parser().parse_args(["flip", "w1", "--to", "decode", "--dry-run"])
    assert (args.worker, args.to, args.dry_run) == ("w1", "decode", True)
    args = build_parser().parse_args(["policy", "set", "dopd", "--knob", "hysteresis=0.5"])
    assert args.name == "dopd" and args.control_knob == ["hysteresis=0.5"]


@pytest.mark.parametrize("argv", [["flip", "x", "--to", "sideways"], ["flip", "x"]])
def test_cli_rejects_bad_flip_arguments(argv):
    parser = argparse.ArgumentParser(prog="fulcrum")
    register(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
