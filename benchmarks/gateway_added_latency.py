"""What the gateway adds to TTFT on real vLLM workers, unloaded, against direct requests.

    flock /tmp/fulcrum-vllm.lock python -m benchmarks.gateway_added_latency [--requests 60]

Starts `fulcrum up --model tiny` (two real vLLM CPU workers, P/D) and a second, single-leg
gateway (`fulcrum gateway --worker decode=<the decode worker>`), then sends one streamed
request at a time, rotating over three paths: straight to the decode worker, through the
single-leg gateway (same worker: the difference is the gateway's own cost), and through
the P/D gateway (adds a prefill leg on the other worker and the KV pull). Reports TTFT
p50/p99 per path, the added p50 against direct, the median of per-round paired
differences, and the host's load average (on a busy host every hop also waits for a core).

Writes benchmarks/results/gateway_added_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ttft(client: httpx.Client, url: str) -> float:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
            "stream": True}
    sent = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {") and '"text":""' not in line:
                first = time.perf_counter() - sent
    if first is None:
        raise RuntimeError(f"no token from {url}")
    return first


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("fulcrum up exited early")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            workers = httpx.get(url + "/admin/workers", timeout=2).json()["workers"]
            if workers and all(w["state"] == "ready" for w in workers):
                return {w["role"]: w["url"] for w in workers}
        time.sleep(1)
    raise TimeoutError("workers not ready")


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per path")
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway_added_latency.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = RESULTS / "tmp" / "gateway_added_latency"
    logs.mkdir(parents=True, exist_ok=True)
    pd_port, single_port = _free_port(), _free_port()
    pd_url, single_url = f"http://127.0.0.1:{pd_port}", f"http://127.0.0.1:{single_port}"
    up = subprocess.Popen([sys.executable, "-m", "deploy.cli", "up", "--model", "tiny",
                           "--port", str(pd_port), "--max-model-len", "512",
                           "--log-dir", str(logs)], cwd=ROOT, env=env,
                          stdout=open(logs / "up.log", "wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    single = None
    try:
        roles = _wait_ready(pd_url, up)
        direct_url = roles["decode"]
        single = subprocess.Popen([sys.executable, "-m", "deploy.cli", "gateway", "--model",
                                   MODEL, "--port", str(single_port), "--worker",
                                   f"decode={direct_url}"], cwd=ROOT, env=env,
                                  stdout=open(logs / "single.log", "wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        _wait_ready(single_url, single, 60)
        paths = {"direct": direct_url, "gateway (1 leg)": single_url,
                 "gateway (P/D)": pd_url}
        clients = {name: httpx.Client(timeout=60) for name in paths}
        for name, url in paths.items():  # warm-up: connections, first-request paths
            for _ in range(3):
                _ttft(clients[name], url)
        ttft: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        load_before = os.getloadavg()
        for i in range(args.requests):
            order = names[i % 3:] + names[:i % 3]
            for name in order:
                ttft[name].append(_ttft(clients[name], paths[name]) * 1000)
        load_after = os.getloadavg()
    finally:
        if single is not None:
            _stop(single)
        _stop(up)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    direct = ttft["direct"]
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
        "model": MODEL, "requests_per_path": args.requests, "max_tokens": 16,
        "note": "one request at a time, paths rotated each round; shared 2-core host",
        "ttft_ms": {name: {"p50": pct(v, 0.5), "p99": pct(v, 0.99)} for name, v in ttft.items()},
        "added_p50_ttft_ms": {name: pct(v, 0.5) - pct(direct, 0.5)
                              for name, v in ttft.items() if name != "direct"},
        "median_paired_difference_ms": {
            name: statistics.median(a - b for a, b in zip(v, direct, strict=True))
            for name, v in ttft.items() if name != "direct"},
        "load_average_1min": [load_before[0], load_after[0]],
        "samples_ms": ttft,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("ttft_ms", "added_p50_ttft_ms",
                                               "median_paired_difference_ms",
                                               "load_average_1min")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
