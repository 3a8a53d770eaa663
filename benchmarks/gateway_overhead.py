"""Gateway overhead: the same streaming load sent straight to a worker and through
the gateway, against fake workers that answer instantly, in one run.

    python -m benchmarks.gateway_overhead --streams 200 --requests 4000

Writes benchmarks/results/gateway_overhead.json and .png: p50/p99 added latency
(TTFT and end-to-end) with one stream at a time and at full concurrency, and the
request rate each path sustained at full concurrency. Every
process (fake workers, gateways, this load generator) shares the machine's
cores, so read the numbers as ratios measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"
MODEL = "fake-model"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(args: list[str], health_url: str) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health_url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{args} did not come up")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, float]:
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - start
    return (ttft or float("nan")), time.perf_counter() - start


async def _load(url: str, streams: int, requests: int, max_tokens: int,
                label: str) -> dict:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    results: list[tuple[float, float]] = []
    failures = 0
    errors: dict[str, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    bar = tqdm(total=requests, desc=label, unit="req", leave=False)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            queue.get_nowait()
            try:
                results.append(await _one(client, url, max_tokens))
            except httpx.HTTPError as exc:
                failures += 1
                kind = f"{type(exc).__name__}: {exc}"[:120]
                errors[kind] = errors.get(kind, 0) + 1
            bar.update()

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        wall = time.perf_counter() - started
    bar.close()
    ttft = np.array([r[0] for r in results]) * 1000
    e2e = np.array([r[1] for r in results]) * 1000
    return {"label": label, "completed": len(results), "failed": failures, "errors": errors,
            "duration_s": wall, "requests_per_s": len(results) / wall,
            "p50_ttft_ms": float(np.percentile(ttft, 50)),
            "p99_ttft_ms": float(np.percentile(ttft, 99)),
            "p50_e2el_ms": float(np.percentile(e2e, 50)),
            "p99_e2el_ms": float(np.percentile(e2e, 99)),
            "e2el_ms": e2e.tolist()}


def _plot(phases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for phase in phases:
        xs = np.sort(phase["e2el_ms"])
        cdf.plot(xs, np.linspace(0, 1, len(xs)), label=phase["label"])
    cdf.set_xlabel("end-to-end latency (ms)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("Latency CDF, same load")
    cdf.legend()
    bars.bar([p["label"] for p in phases], [p["requests_per_s"] for p in phases])
    bars.set_ylabel("requests/s at full concurrency")
    bars.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams")
    parser.add_argument("--requests", type=int, default=4000, help="requests per phase")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--idle-requests", type=int, default=200,
                        help="requests per path sent one at a time (added latency unloaded)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway_overhead.json")
    args = parser.parse_args(argv)

    p_port, d_port, g_pd, g_local = (_free_port() for _ in range(4))
    base = "http://127.0.0.1:{}".format
    fake = ["-m", "benchmarks.fake_worker", "--model", MODEL]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process([*fake, "--port", str(p_port), "--name", "P"],
                                     base(p_port) + "/health"))
        stack.enter_context(_process([*fake, "--port", str(d_port), "--name", "D"],
                                     base(d_port) + "/health"))
        stack.enter_context(_process(
            ["-m", "deploy.cli", "gateway", "--model", MODEL, "--port", str(g_pd),
             "--worker", f"prefill={base(p_port)}", "--worker", f"decode={base(d_port)}"],
            base(g_pd) + "/health"))
        stack.enter_context(_process(
            ["-m", "deploy.cli", "gateway", "--model", MODEL, "--port", str(g_local),
             "--worker", f"decode={base(d_port)}"], base(g_local) + "/health"))
        phases, idle = [], []
        for label, port in (("direct", d_port), ("gateway (1 leg)", g_local),
                            ("gateway (P/D, 2 legs)", g_pd)):
            asyncio.run(_load(base(port), args.streams, min(400, args.requests),
                              args.max_tokens, f"warm-up {label}"))
            idle.append(asyncio.run(_load(base(port), 1, args.idle_requests,
                                          args.max_tokens, f"{label}, one stream")))
            phases.append(asyncio.run(_load(base(port), args.streams, args.requests,
                                            args.max_tokens, label)))
    direct, direct_idle = phases[0], idle[0]
    metrics = ("p50_ttft_ms", "p99_ttft_ms", "p50_e2el_ms", "p99_e2el_ms")
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "streams": args.streams, "requests_per_phase": args.requests,
        "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
        "phases": [{k: v for k, v in p.items() if k != "e2el_ms"} for p in phases],
        "one_stream_phases": [{k: v for k, v in p.items() if k != "e2el_ms"} for p in idle],
        "added_latency_ms_one_stream": {
            p["label"]: {m: p[m] - direct_idle[m] for m in metrics} for p in idle[1:]},
        "added_latency_ms": {
            p["label"]: {m: p[m] - direct[m] for m in metrics} for p in phases[1:]},
        "throughput_ratio_vs_direct": {p["label"]: p["requests_per_s"] / direct["requests_per_s"]
                                       for p in phases[1:]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    _plot(phases, args.out.with_suffix(".png"))
    print(json.dumps({k: summary[k] for k in ("added_latency_ms_one_stream", "added_latency_ms",
                                              "throughput_ratio_vs_direct")}, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
