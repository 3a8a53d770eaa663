"""Overload: a burst of concurrent streams, with and without admission control.

    python -m benchmarks.overload            # ~1 minute, fake workers, no vLLM

Starts two fake workers (paced tokens) and two gateways over them, one with
`--max-inflight`/`--max-worker-queue` and one with both off, then sends the same
burst of concurrent streams to each, one after the other. For every client: the time
until its status line, and the status. Writes benchmarks/results/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deploy.ports import free_port_block

RESULTS = Path(__file__).parent / "results"


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1)


async def _burst(url: str, clients: int, max_tokens: int, patience_s: float) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(patience_s)) as client:
        async def one() -> tuple[int, float]:
            body = {"model": "fake-model", "prompt": "one two three", "max_tokens": max_tokens,
                    "stream": True}
            started = time.monotonic()
            try:
                async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                    status, at = resp.status_code, time.monotonic() - started
                    await resp.aread()
                    return status, at
            except httpx.HTTPError:
                return 0, time.monotonic() - started

        results = await asyncio.gather(*(one() for _ in range(clients)))
    by_status: dict[str, list[float]] = {}
    for status, at in results:
        by_status.setdefault(str(status), []).append(at)
    return {"clients": clients,
            "status_counts": {k: len(v) for k, v in sorted(by_status.items())},
            "time_to_status_ms": {k: {"p50": _pct(v, 0.5), "p99": _pct(v, 0.99),
                                      "max": _pct(v, 1.0)} for k, v in by_status.items()},
            "no_status_line": by_status.get("0") and len(by_status["0"]) or 0}


async def _at_capacity(url: str, hold: int, probes: int) -> dict:
    """Fill the gateway with `hold` long streams, then send `probes` requests one by one
    (each on a new connection) and time their answers: what a client meets at capacity."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60)) as client:
        body = {"model": "fake-model", "prompt": "one two", "max_tokens": 1000,
                "stream": True}
        opened = asyncio.Event()
        count = 0

        async def holder() -> None:
            nonlocal count
            async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                count += 1
                if count >= hold:
                    opened.set()
                async for _ in resp.aiter_raw():
                    pass

        holders = [asyncio.create_task(holder()) for _ in range(hold)]
        await asyncio.wait_for(opened.wait(), 120)
        times, statuses = [], []
        for _ in range(probes):
            started = time.monotonic()
            resp = await client.post(url + "/v1/completions", json={**body, "stream": False})
            times.append(time.monotonic() - started)
            statuses.append(resp.status_code)
        for task in holders:
            task.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    return {"held_streams": hold, "probes": probes,
            "probe_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "probe_ms": {"p50": _pct(times, 0.5), "p99": _pct(times, 0.99),
                         "max": _pct(times, 1.0)}}


def _wait_up(url: str, path: str = "/health") -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--token-delay", type=float, default=0.2)
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--max-worker-queue", type=int, default=48)
    parser.add_argument("--patience", type=float, default=30.0,
                        help="a client gives up after this many seconds without an answer")
    parser.add_argument("--probes", type=int, default=100,
                        help="requests sent one by one while the limited gateway is full")
    parser.add_argument("--out", default=str(RESULTS / "overload.json"))
    args = parser.parse_args(argv)
    base = free_port_block(4, 19500)  # two fake workers, two gateways
    procs = []
    try:
        for port in (base, base + 1):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.fake_worker", "--port", str(port),
                 "--token-delay", str(args.token_delay)], stdout=subprocess.DEVNULL))
        workers = ["--worker", f"prefill=http://127.0.0.1:{base}",
                   "--worker", f"decode=http://127.0.0.1:{base + 1}"]
        gateways = {"limited": (base + 2, ["--max-inflight", str(args.max_inflight),
                                            "--max-worker-queue", str(args.max_worker_queue)]),
                    "unlimited": (base + 3, ["--max-inflight", "0", "--max-worker-queue", "0"])}
        for port, extra in gateways.values():
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "deploy.cli", "gateway", *workers, "--model", "fake-model",
                 "--port", str(port), *extra], stdout=subprocess.DEVNULL))
        for port in range(base, base + 4):
            _wait_up(f"http://127.0.0.1:{port}")
        result = {"config": vars(args), "load_average_at_start": os.getloadavg()}
        limited_url = f"http://127.0.0.1:{gateways['limited'][0]}"
        result["at_capacity"] = asyncio.run(_at_capacity(limited_url, args.max_inflight,
                                                         args.probes))
        time.sleep(3)
        for name, (port, _) in gateways.items():
            result[name] = asyncio.run(_burst(f"http://127.0.0.1:{port}", args.clients,
                                              args.max_tokens, args.patience))
            time.sleep(3)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
    result["load_average_at_end"] = os.getloadavg()  # 2 shared cores: read times with it
    limited = result["limited"]["time_to_status_ms"]
    result["summary"] = {
        "burst_limited_429_p99_ms": (limited.get("429") or {}).get("p99"),
        "at_capacity_429_p50_ms": result["at_capacity"]["probe_ms"]["p50"],
        "at_capacity_429_p99_ms": result["at_capacity"]["probe_ms"]["p99"],
        "limited_200_p50_ms": (limited.get("200") or {}).get("p50"),
        "unlimited_200_p50_ms": (result["unlimited"]["time_to_status_ms"].get("200")
                                 or {}).get("p50"),
        "unlimited_no_status_line": result["unlimited"]["no_status_line"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(json.dumps({k: result[k]["status_counts"] for k in gateways}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
