"""Overload: a burst of concurrent streams, with and without admission control.

    python -m benchmarks.overload            # ~1 minute, fake workers, no vLLM
    python -m benchmarks.overload --clients 100 --probes 50 --out /tmp/o.json  # short

Starts two fake workers (paced tokens) and two gateways over them, one with
`--max-inflight`/`--max-worker-queue` and one with both off. First, at capacity: the
limited gateway is filled with `--max-inflight` streams (held by another process) and
`--probes` requests are sent one by one on new connections, with the gateway's CPU time
per refusal. Then the same burst of concurrent streams goes to each gateway, one after
the other. Every client is a raw socket (an HTTP client library's own overhead would be
most of what is measured), timed from its connect to its status line. Writes
benchmarks/results/overload.json.
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
    """`clients` streams at once, each on its own raw connection: when each got its
    status line (0: none within `patience_s`), then read to the end."""
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "fake-model", "prompt": "one two three",
                       "max_tokens": max_tokens, "stream": True}).encode()

    async def one() -> tuple[int, float]:
        started = time.monotonic()
        try:
            return await asyncio.wait_for(_request(port, body, read_all=True), patience_s)
        except (TimeoutError, OSError):
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


async def _hold(url: str, hold: int) -> None:
    """Open `hold` long streams and read them until killed; print "open" once all are."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600)) as client:
        body = {"model": "fake-model", "prompt": "one two", "max_tokens": 1000,
                "stream": True}
        count = 0

        async def holder() -> None:
            nonlocal count
            async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    print(f"status {resp.status_code}", flush=True)
                    return
                count += 1
                if count == hold:
                    print("open", flush=True)
                async for _ in resp.aiter_raw():
                    pass

        await asyncio.gather(*(holder() for _ in range(hold)))
        print("ended", flush=True)


_PROBE_BODY = b'{"model":"fake-model","prompt":"one two","max_tokens":16}'


async def _request(port: int, body: bytes, read_all: bool = False) -> tuple[int, float]:
    """One POST on a new connection, raw: (status, seconds from connect to status line),
    the rest of the answer read to the end if `read_all`. No HTTP client library: its own
    overhead would be most of what is measured."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        line = await reader.readline()
        at = time.monotonic() - started
        if read_all:
            while await reader.read(65536):
                pass
    finally:
        writer.close()
    return int(line.split()[1]) if line.startswith(b"HTTP/") else 0, at


async def _probe(port: int) -> tuple[int, float]:
    return await _request(port, _PROBE_BODY)


def _cpu_s(pid: int) -> float:
    """CPU seconds the process's main thread (the gateway's event loop) ran so far, from
    the scheduler's nanosecond count (`/proc/PID/stat` ticks are too coarse here)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _at_capacity(url: str, gateway_pid: int, hold: int, probes: int) -> dict:
    """Fill the gateway with `hold` long streams (from another process, so their reading
    does not delay the probes), then send `probes` requests one by one, each on a new
    connection, and time each until its status line: what a client meets at capacity.
    Also the gateway's CPU time per refused request (its CPU over the probes minus what
    relaying the streams took over as long a quiet stretch just before)."""
    holders = subprocess.Popen(
        [sys.executable, "-c", f"import asyncio; from benchmarks.overload import _hold; "
         f"asyncio.run(_hold({url!r}, {hold}))"], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1])
    try:
        line = holders.stdout.readline().strip()
        if line != "open":
            raise RuntimeError(f"the holding streams did not open: {line!r}")
        time.sleep(2)
        port = int(url.rsplit(":", 1)[1])
        cpu0, wall0 = _cpu_s(gateway_pid), time.monotonic()
        time.sleep(3)
        relaying_share = (_cpu_s(gateway_pid) - cpu0) / (time.monotonic() - wall0)
        results = []
        cpu0, wall0 = _cpu_s(gateway_pid), time.monotonic()
        for _ in range(probes):
            results.append(asyncio.run(_probe(port)))
        used = _cpu_s(gateway_pid) - cpu0 - relaying_share * (time.monotonic() - wall0)
    finally:
        holders.kill()
        holders.wait()
    statuses = [s for s, _ in results]
    times = [t for _, t in results]
    return {"held_streams": hold, "probes": probes,
            "probe_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "probe_ms": {"p50": _pct(times, 0.5), "p99": _pct(times, 0.99),
                         "max": _pct(times, 1.0)},
            "gateway_cpu_ms_per_probe": round(1000 * max(0.0, used) / probes, 3),
            "gateway_cpu_share_relaying": round(relaying_share, 3)}


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
    parser.add_argument("--probes", type=int, default=300,
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
        result["at_capacity"] = _at_capacity(limited_url, procs[2].pid, args.max_inflight,
                                             args.probes)
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
        "at_capacity_gateway_cpu_ms_per_429": result["at_capacity"]["gateway_cpu_ms_per_probe"],
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
