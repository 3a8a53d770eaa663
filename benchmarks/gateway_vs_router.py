"""Fulcrum's gateway next to vllm-router (Rust), in front of the same fast fake workers.

    python -m benchmarks.gateway_vs_router [--duration 6] [--rounds 2]

Starts two lean fake vLLM workers (`benchmarks.lean_fake_worker`: P and D), then the
gateways under test over them: vllm-router 0.1.17 (installed into its own virtual
environment under the cache folder when missing) in P/D mode (`--vllm-pd-disaggregation`)
and single-leg mode, and Fulcrum's gateway in the same two modes (and with
`--gateway-workers 2`). A separate load-generator process (aiohttp on uvloop) drives each
phase at a fixed concurrency for a fixed time; phases are interleaved across gateways and
repeated for `--rounds` rounds. Per phase: requests/s, TTFT p50/p99 (first body bytes;
the whole answer when not streamed), and the CPU time every process spent per completed
request, read from /proc/<pid>/stat (utime+stime, the gateway's whole process tree) over
the measured window. CPU per request is robust on a shared host; requests/s is not.

Writes benchmarks/results/gateway_vs_router.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from instance_manager.models import cache_root

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
MODEL = "fake-model"
VLLM_ROUTER = "vllm-router==0.1.17"
PROMPT = " ".join(f"word{i}" for i in range(64))
_TICK = os.sysconf("SC_CLK_TCK")


# -- processes ------------------------------------------------------------------------
def vllm_router_bin() -> Path:
    """vllm-router's launcher, installed into its own venv under the cache folder."""
    venv = cache_root() / "anchors" / "vllm-router"
    exe = venv / "bin" / "vllm-router"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", VLLM_ROUTER], check=True)
    return exe


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def _process(cmd: list[str], health_url: str, log: Path) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
    try:
        _wait_http(health_url, proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(5)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime of `pids` (processes gone since count as 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


# -- load generator (its own process) -------------------------------------------------
async def _load(url: str, concurrency: int, stream: bool, warmup_s: float, duration_s: float,
                pids: dict[str, list[int]]) -> dict:
    import aiohttp

    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 16,
                       "stream": stream}).encode()
    headers = {"content-type": "application/json"}
    samples: list[tuple[float, float, float]] = []  # (done_at, ttft, e2e)
    failures: dict[str, int] = {}
    start = time.perf_counter()
    t0, t1 = start + warmup_s, start + warmup_s + duration_s

    async def one(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < t1:
            sent = time.perf_counter()
            ttft = None
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                        raise RuntimeError(f"HTTP {resp.status}")
                    if stream:
                        tail = b""
                        async for data in resp.content.iter_any():
                            if ttft is None:
                                ttft = time.perf_counter() - sent
                            tail = (tail + data)[-64:]
                        if b"[DONE]" not in tail:
                            raise RuntimeError("stream ended without [DONE]")
                    else:
                        reply = await resp.read()
                        if b'"choices"' not in reply:
                            raise RuntimeError("no choices in the reply")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                key = f"{type(exc).__name__}: {exc}"[:100]
                failures[key] = failures.get(key, 0) + 1
                await asyncio.sleep(0.01)
                continue
            done = time.perf_counter()
            samples.append((done, ttft if ttft is not None else done - sent, done - sent))

    async def meter() -> tuple[dict[str, float], float]:
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        before = {k: cpu_seconds(v) for k, v in pids.items()}
        own = time.process_time()
        await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
        after = {k: cpu_seconds(v) for k, v in pids.items()}
        return {k: after[k] - before[k] for k in pids}, time.process_time() - own

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu_task = asyncio.ensure_future(meter())
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
        cpu, load_cpu = await cpu_task
    window = [s for s in samples if t0 <= s[0] <= t1]
    n = len(window)
    ttft = sorted(s[1] * 1000 for s in window)
    e2e = sorted(s[2] * 1000 for s in window)

    def pct(values: list[float], q: float) -> float | None:
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    cpu["load_generator"] = load_cpu
    return {"completed": n, "failed": sum(failures.values()), "errors": failures,
            "requests_per_s": n / duration_s,
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "e2e_p50_ms": pct(e2e, 0.5), "e2e_p99_ms": pct(e2e, 0.99),
            "cpu_s": cpu,
            "cpu_ms_per_request": {k: (1000 * v / n if n else None) for k, v in cpu.items()}}


def _run_load(url: str, concurrency: int, stream: bool, warmup_s: float, duration_s: float,
              pids: dict[str, list[int]]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gateway_vs_router", "load", "--url", url,
           "--concurrency", str(concurrency), "--warmup", str(warmup_s),
           "--duration", str(duration_s), "--pids", json.dumps(pids)]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=warmup_s + duration_s + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the comparison ---------------------------------------------------------------------
def _gateways(p_url: str, d_url: str, logs: Path, workers: tuple[int, ...]
              ) -> list[tuple[str, str, list[str], str]]:
    """(name, mode, command, health path) of every gateway under test."""
    router = str(vllm_router_bin())
    common = ["--host", "127.0.0.1", "--log-level", "warning", "--policy", "round_robin",
              "--max-concurrent-requests", "4096", "--queue-size", "4096",
              "--request-timeout-secs", "60"]
    fulcrum = [sys.executable, "-m", "deploy.cli", "gateway", "--model", MODEL]
    out = [("vllm-router", "pd", [router, *common, "--prometheus-port", str(_free_port()),
                                  "--vllm-pd-disaggregation", "--prefill", p_url,
                                  "--decode", d_url], "/health"),
           ("vllm-router", "single", [router, *common, "--prometheus-port", str(_free_port()),
                                      "--worker-urls", d_url], "/health")]
    for n in workers:
        name = "fulcrum" if n == 1 else f"fulcrum x{n}"
        extra = [] if n == 1 else ["--gateway-workers", str(n)]
        out += [(name, "pd", [*fulcrum, *extra, "--worker", f"prefill={p_url}",
                              "--worker", f"decode={d_url}"], "/health"),
                (name, "single", [*fulcrum, *extra, "--worker", f"decode={d_url}"], "/health")]
    return out


def _summarise(phases: list[dict]) -> list[dict]:
    keys = sorted({(p["gateway"], p["mode"], p["stream"], p["concurrency"]) for p in phases},
                  key=lambda k: (k[1], k[2], k[3], k[0]))
    rows = []
    for gateway, mode, stream, conc in keys:
        runs = [p for p in phases if (p["gateway"], p["mode"], p["stream"], p["concurrency"])
                == (gateway, mode, stream, conc)]

        def med(f, runs=runs) -> float | None:  # noqa: ANN001
            vals = [f(r) for r in runs if f(r) is not None]
            return statistics.median(vals) if vals else None

        def spread(f, runs=runs) -> list[float]:  # noqa: ANN001
            vals = [f(r) for r in runs if f(r) is not None]
            return [min(vals), max(vals)] if vals else []

        def gw_cpu(r: dict) -> float | None:
            return r["cpu_ms_per_request"]["gateway"]

        rows.append({"gateway": gateway, "mode": mode, "stream": stream, "concurrency": conc,
                     "rounds": len(runs),
                     "requests_per_s": med(lambda r: r["requests_per_s"]),
                     "requests_per_s_range": spread(lambda r: r["requests_per_s"]),
                     "ttft_p50_ms": med(lambda r: r["ttft_p50_ms"]),
                     "ttft_p99_ms": med(lambda r: r["ttft_p99_ms"]),
                     "gateway_cpu_ms_per_request": med(gw_cpu),
                     "gateway_cpu_ms_range": spread(gw_cpu),
                     "workers_cpu_ms_per_request": med(
                         lambda r: r["cpu_ms_per_request"]["workers"]),
                     "load_generator_cpu_ms_per_request": med(
                         lambda r: r["cpu_ms_per_request"]["load_generator"]),
                     "failed": sum(r["failed"] for r in runs)})
    return rows


def _ratios(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        if row["gateway"] == "vllm-router":
            continue
        ref = next((r for r in rows if r["gateway"] == "vllm-router" and
                    (r["mode"], r["stream"], r["concurrency"]) ==
                    (row["mode"], row["stream"], row["concurrency"])), None)
        if ref is None or not ref["gateway_cpu_ms_per_request"] or not ref["requests_per_s"]:
            continue
        out.append({"gateway": row["gateway"], "mode": row["mode"], "stream": row["stream"],
                    "concurrency": row["concurrency"],
                    "cpu_per_request_vs_router": row["gateway_cpu_ms_per_request"]
                    / ref["gateway_cpu_ms_per_request"],
                    "requests_per_s_vs_router": row["requests_per_s"] / ref["requests_per_s"]})
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gateways = sorted({r["gateway"] for r in rows}, key=lambda g: (g != "vllm-router", g))
    cases = sorted({(r["mode"], r["stream"], r["concurrency"]) for r in rows})
    labels = [f"{m}{' stream' if s else ''}\n{c} conc." for m, s, c in cases]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    metrics = (("gateway_cpu_ms_per_request", "gateway CPU ms / request (lower is better)"),
               ("requests_per_s", "requests/s (shared 2-core host)"),
               ("ttft_p50_ms", "TTFT p50, ms"))
    width = 0.8 / len(gateways)
    for ax, (key, title) in zip(axes, metrics, strict=True):
        for i, g in enumerate(gateways):
            vals = []
            for case in cases:
                row = next((r for r in rows if r["gateway"] == g and
                            (r["mode"], r["stream"], r["concurrency"]) == case), None)
                vals.append(row[key] if row and row[key] is not None else 0)
            ax.bar([x + i * width for x in range(len(cases))], vals, width, label=g)
        ax.set_xticks([x + width * (len(gateways) - 1) / 2 for x in range(len(cases))])
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare(args: argparse.Namespace) -> dict:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the processes we started
    logs = RESULTS / "tmp" / "gateway_vs_router"
    logs.mkdir(parents=True, exist_ok=True)
    p_port, d_port = _free_port(), _free_port()
    p_url, d_url = f"http://127.0.0.1:{p_port}", f"http://127.0.0.1:{d_port}"
    fake = [sys.executable, "-m", "benchmarks.lean_fake_worker", "--model", MODEL]
    phases: list[dict] = []
    with contextlib.ExitStack() as stack:
        p = stack.enter_context(_process([*fake, "--port", str(p_port), "--name", "P"],
                                         p_url + "/health", logs / "fake_p.log"))
        d = stack.enter_context(_process([*fake, "--port", str(d_port), "--name", "D"],
                                         d_url + "/health", logs / "fake_d.log"))
        running = []
        for name, mode, cmd, health in _gateways(p_url, d_url, logs, tuple(args.gateway_workers)):
            if args.only and not any(o in f"{name}/{mode}" for o in args.only):
                continue
            port = _free_port()
            proc = stack.enter_context(_process(
                [*cmd, "--port", str(port)], f"http://127.0.0.1:{port}{health}",
                logs / f"{name.replace(' ', '_')}_{mode}.log"))
            running.append((name, mode, port, proc))
        time.sleep(2)  # gateways finish their start-up work (first scrapes, health checks)
        for rnd in range(args.rounds):
            for conc in args.concurrency:
                for stream in (True, False):
                    for name, mode, port, proc in running:
                        pids = {"gateway": process_tree(proc.pid), "workers": [p.pid, d.pid]}
                        result = _run_load(f"http://127.0.0.1:{port}/v1/completions", conc,
                                           stream, args.warmup, args.duration, pids)
                        result.update(gateway=name, mode=mode, stream=stream,
                                      concurrency=conc, round=rnd)
                        phases.append(result)
                        print(f"round {rnd} {name:>12} {mode:>6} stream={stream!s:5} "
                              f"c={conc:3}: {result['requests_per_s']:7.0f} req/s, TTFT p50 "
                              f"{result['ttft_p50_ms'] or 0:7.1f} ms, gateway CPU "
                              f"{result['cpu_ms_per_request']['gateway'] or 0:6.2f} ms/req, "
                              f"failed {result['failed']}", flush=True)
    rows = _summarise(phases)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": os.getloadavg()[0],
            "host_note": "shared 2-core host: requests/s and TTFT are noisy and capped by "
                         "the cores everyone shares; CPU ms per request is the robust number",
            "vllm_router": VLLM_ROUTER, "duration_s": args.duration, "warmup_s": args.warmup,
            "rounds": args.rounds, "max_tokens": 16, "summary": rows, "ratios": _ratios(rows),
            "phases": phases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("load", help="(internal) one load phase; prints JSON")
    load.add_argument("--url", required=True)
    load.add_argument("--concurrency", type=int, required=True)
    load.add_argument("--stream", action="store_true")
    load.add_argument("--warmup", type=float, default=1.0)
    load.add_argument("--duration", type=float, default=6.0)
    load.add_argument("--pids", default="{}", help="JSON {label: [pid, ...]} to meter")
    parser.add_argument("--duration", type=float, default=6.0, help="measured s per phase")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured s per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--gateway-workers", type=int, nargs="+", default=[1, 2],
                        help="Fulcrum gateway process counts to run")
    parser.add_argument("--only", nargs="*", help="run gateways whose 'name/mode' contains "
                                                  "one of these")
    parser.add_argument("--out", type=Path, default=RESULTS / "gateway_vs_router.json")
    args = parser.parse_args(argv)
    if args.command == "load":
        import uvloop

        result = uvloop.run(_load(args.url, args.concurrency, args.stream, args.warmup,
                                  args.duration, json.loads(args.pids)))
        print(json.dumps(result))
        return 0
    summary = compare(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary["summary"], args.out.with_suffix(".png"))
    print(json.dumps(summary["ratios"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
