"""One spelling per concept across `fulcrum` commands, help text, exit codes, verbs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy import options
from deploy.cli import build_parser, main
from deploy.options import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE
from router.build_info import fulcrum_version
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
DEAD_URL = "http://127.0.0.1:9"  # discard port: nothing listens


def _sub(name: str) -> argparse.ArgumentParser:
    for p in options.all_parsers(build_parser()):
        if p.prog.endswith(f" {name}"):
            return p
    raise KeyError(name)


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def test_every_option_has_help_and_no_doubled_default() -> None:
    for p in options.all_parsers(build_parser()):
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{p.prog} {action.option_strings[0]} has no help"
        text = p.format_help()
        for line in text.splitlines():
            assert line.count("default") <= 1, f"{p.prog}: {line}"
        assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("command", ["up", "gateway", "sim"])
def test_one_name_per_concept(command: str) -> None:
    opts = _options(_sub(command))
    for canonical in ("--policy", "--control-policy", "--control-knob", "--slo-ttft-ms",
                      "--slo-tpot-ms", "--log-level"):
        assert canonical in opts, (command, canonical)
        assert opts[canonical].help != argparse.SUPPRESS
    for hidden in ("--routing", "--control", "--knob"):
        assert opts[hidden].help == argparse.SUPPRESS
    help_text = _sub(command).format_help()
    assert "--routing" not in help_text and "--knob " not in help_text


def test_old_spellings_still_work_with_a_note(capsys) -> None:
    parser = build_parser()
    new = parser.parse_args(["sim", "--policy", "arrow", "--control-policy", "dopd",
                             "--control-knob", "a=1", "--slo-ttft-ms", "250"])
    old = parser.parse_args(["sim", "--routing", "arrow", "--control", "dopd", "--knob", "a=1",
                             "--slo-ttft-ms", "250"])
    for key in ("policy", "control_policy", "control_knob", "slo_ttft_ms"):
        assert getattr(new, key) == getattr(old, key)
    assert "--routing is deprecated; use --policy" in capsys.readouterr().err
    up = parser.parse_args(["up", "--slo-ttft", "0.5", "--slo-tpot", "0.04"])
    assert (up.slo_ttft_ms, up.slo_tpot_ms) == (500.0, 40.0)
    knobs = parser.parse_args(["policy", "set", "--knob", "x=1", "--control-knob", "y=2",
                               "--tpot", "0.05"])
    assert knobs.control_knob == ["x=1", "y=2"] and knobs.slo_tpot_ms == 50.0


def test_slos_are_milliseconds_everywhere() -> None:
    parser = build_parser()
    up = parser.parse_args(["up"])
    assert (up.slo_ttft_ms, up.slo_tpot_ms) == (1000.0, 100.0)
    sim = parser.parse_args(["sim", "--slo-tpot-ms", "40"])
    assert options.goodput_items(sim) == ["ttft:1000", "tpot:40"]
    bench = parser.parse_args(["bench", "--goodput", "ttft:300", "--slo-e2el-ms", "2000"])
    assert options.goodput_items(bench) == ["ttft:300", "e2el:2000"]
    from deploy.cli import _control_config

    cfg = _control_config(parser.parse_args(["gateway", "--worker", "decode=http://x",
                                             "--model", "m", "--slo-ttft-ms", "400"]))
    assert cfg.slo.ttft_s == 0.4 and cfg.slo.tpot_s == 0.1


def test_help_never_shows_a_secret(monkeypatch) -> None:
    monkeypatch.setenv("FULCRUM_ADMIN_TOKEN", "s3cret-token")
    monkeypatch.setenv("FULCRUM_WORKER_API_KEY", "s3cret-key")
    for p in options.all_parsers(build_parser()):
        text = p.format_help()
        assert "s3cret" not in text, p.prog


def test_every_read_verb_has_json() -> None:
    for verb in ("status", "watch", "explain", "flips", "streams", "logs", "show"):
        assert "--json" in _options(_sub(verb)), verb


def test_version_and_log_level() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith(f"fulcrum {fulcrum_version()}")
    parser = build_parser()
    assert parser.parse_args(["--log-level", "debug", "status"]).log_level == "debug"
    assert parser.parse_args(["status", "--log-level", "warning"]).log_level == "warning"
    assert parser.parse_args(["flips"]).log_level == "info"


@pytest.mark.parametrize("argv", [["status"], ["watch", "--once"], ["flips"], ["streams"],
                                  ["explain"], ["policy", "show"],
                                  ["migrate", "r1", "--to", "w1"]])
def test_unreachable_gateway_is_one_exit_code(argv, capsys) -> None:
    assert main([*argv, "--url", DEAD_URL]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "is it up?" in err and "Traceback" not in err


def test_bench_against_a_dead_or_wrong_url_has_no_traceback(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for url in (DEAD_URL, "http://127.0.0.1:1/not-here"):
        out = subprocess.run([sys.executable, "-m", "deploy.cli", "bench", "--base-url", url,
                              "--dataset", "random", "--num-prompts", "2", "--no-progress"],
                             cwd=tmp_path, capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == EXIT_UNREACHABLE, out.stderr
        assert "Traceback" not in out.stderr and "no OpenAI-compatible server" in out.stderr


def test_logs_reads_the_recorded_folder(tmp_path, capsys) -> None:
    (tmp_path / "w0.log").write_text("".join(f"w0 line {i}\n" for i in range(100)))
    (tmp_path / "w1.log").write_text("w1 ready\n")
    assert main(["logs", "--log-dir", str(tmp_path), "-n", "3"]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out == ["w0 | w0 line 97", "w0 | w0 line 98", "w0 | w0 line 99", "w1 | w1 ready"]
    assert main(["logs", "w1", "--log-dir", str(tmp_path), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["logs"] == {"w1": ["w1 ready"]}
    assert main(["logs", "w9", "--log-dir", str(tmp_path)]) == EXIT_FAILED


def test_down_stops_a_plain_gateway(tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FULCRUM_CACHE_DIR": str(tmp_path)}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "gateway", "--worker", "decode=http://127.0.0.1:9",
         "--model", "m", "--port", str(port), "--health-interval", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state = tmp_path / "run" / f"gateway-{port}.json"
        deadline = time.monotonic() + 60
        while not state.exists() and time.monotonic() < deadline and gateway.poll() is None:
            time.sleep(0.2)
        assert state.exists(), gateway.stdout.read() if gateway.poll() is not None else ""
        while time.monotonic() < deadline:  # serving: uvicorn's signal handlers are in place
            try:
                httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        down = subprocess.run([sys.executable, "-m", "deploy.cli", "down", "--port", str(port),
                               "--timeout", "30"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert down.returncode == EXIT_OK, down.stdout + down.stderr
        assert gateway.wait(timeout=10) is not None and not state.exists()
    finally:
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGKILL)
            gateway.wait()


def test_streams_and_migrate_verbs_drive_the_admin_api(capsys) -> None:
    from benchmarks.fake_worker import create_fake_worker
    from router.cluster import Cluster, Role, WorkerState
    from tests.servers import serve_in_thread
    from tests.test_gateway_fake import MODEL, _gateway

    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    d0.state.behaviour.token_delay_s = 0.05
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        cluster.add("d1", d1_url, Role.DECODE, WorkerState.DRAINING)  # not picked at first
        with serve_in_thread(_gateway(cluster)) as url:
            body = {"model": MODEL, "prompt": "one two", "max_tokens": 40, "stream": True}
            texts: list[str] = []
            checked = False
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
                sid = resp.headers["x-fulcrum-request-id"]
                for line in resp.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                        texts.append(json.loads(line[6:])["choices"][0]["text"])
                    if len(texts) >= 3 and not checked:
                        checked = True
                        capsys.readouterr()
                        assert main(["streams", "--url", url, "--json"]) == EXIT_OK
                        (listed,) = json.loads(capsys.readouterr().out)["streams"]
                        assert listed["request_id"] == sid and listed["worker"] == "d0"
                        assert main(["migrate", sid, "--to", "d1", "--url", url]) == \
                            EXIT_FAILED  # d1 is draining: the gateway refuses (409)
                        cluster.set_state("d1", WorkerState.READY)
                        assert main(["migrate", sid, "--to", "d1", "--url", url,
                                     "--json"]) == EXIT_OK
                        moved = json.loads(capsys.readouterr().out)
                        assert (moved["from"], moved["to"]) == ("d0", "d1")
            assert checked and "".join(texts) == "".join(f" t{i}" for i in range(40))
            assert main(["streams", "--url", url]) == EXIT_OK
            assert "0 live stream(s)" in capsys.readouterr().out
