"""Role flips on a live CPU cluster: how long a flip takes, and a swinging workload.

    python -m benchmarks.flip_bench            # ~6 minutes on 2 cores

Starts `fulcrum up --model tiny` with three workers (1 prefill, 2 decode), then
1. flips a worker decode->prefill->decode repeatedly while idle, and again while it
   is decoding streams: command-to-ready latency from the flip records (`--flip-mode
   drain`, the default here and what `benchmarks/results/flip_bench.json` holds: the drain
   waits for the in-flight decodes; `relabel` switches at once);
2. runs a swinging workload (prompt-heavy phases alternating with output-heavy ones)
   under the `dopd` controller and records the pools over time next to the TTFT and
   TPOT each client saw.
Writes benchmarks/results/flip_bench.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from benchmarks.live_cluster import UpCluster

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny-llama"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()


def start_cluster(log_dir: Path, flip_mode: str = "drain") -> UpCluster:
    """Three tiny workers (1 prefill), the dopd controller advising until the swing starts."""
    return UpCluster(log_dir, 3, ["--flip-mode", flip_mode,
                                  "--prefill-workers", "1", "--max-model-len", "512",
                                  "--kv-cache-gib", "1", "--control-policy", "dopd",
                                  "--advisory", "--control-interval", "1",
                                  "--control-window", "6", "--control-knob",
                                  "adjustment_interval_s=5", "--control-knob",
                                  "forecast_horizon_s=0"])


class Load:
    """Closed-loop streaming clients; each records (start, ttft, tpot, ok)."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        self.shape = (150, 2)  # (prompt words, output tokens)
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(concurrency)]

    def _one(self, client: httpx.Client) -> dict:
        words, out = self.shape
        prompt = f"{random.random()} " + " ".join(random.choice(WORDS) for _ in range(words))
        body = {"model": MODEL, "prompt": prompt, "max_tokens": out, "ignore_eos": True,
                "stream": True}
        start = time.time()
        first = last = None
        n = 0
        with client.stream("POST", self.url + "/v1/completions", json=body) as r:
            ok = r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text"' in line:
                    now = time.time()
                    first = first or now
                    last = now
                    n += 1
                ok = ok and '"error"' not in line
        ttft = (first - start) if first else None
        tpot = (last - first) / (n - 1) if first and n > 1 else None
        return {"t": start, "ttft_s": ttft, "tpot_s": tpot, "ok": ok, "shape": [words, out]}

    def _run(self) -> None:
        with httpx.Client(timeout=180) as client:
            while not self._stop.is_set():
                try:
                    self.records.append(self._one(client))
                except httpx.HTTPError:
                    self.records.append({"t": time.time(), "ok": False})

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=200)


def _flip_cycle(cluster: UpCluster, worker: str, repeats: int) -> list[float]:
    durations = []
    for _ in range(repeats):
        for to in ("prefill", "decode"):
            record = cluster.admin("POST", "/flip", worker=worker, to=to)
            assert record["outcome"] == "done", record
            durations.append(record["duration_s"])
    return durations


def _summary(xs: list[float]) -> dict:
    return {"n": len(xs), "mean_ms": 1000 * statistics.mean(xs),
            "median_ms": 1000 * statistics.median(xs), "max_ms": 1000 * max(xs)}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result["swing"]["started"]
    fig, (roles_ax, ttft_ax, tpot_ax) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for phase in result["swing"]["phases"]:
        for ax in (roles_ax, ttft_ax, tpot_ax):
            ax.axvspan(phase["from"] - t0, phase["to"] - t0, alpha=0.08,
                       color="tab:blue" if phase["name"] == "prompt-heavy" else "tab:orange")
    samples = result["swing"]["pools"]
    xs = [s["t"] - t0 for s in samples]
    roles_ax.step(xs, [s["prefill"] for s in samples], where="post", label="prefill workers")
    roles_ax.step(xs, [s["decode"] for s in samples], where="post", label="decode workers")
    roles_ax.set_ylabel("workers")
    roles_ax.legend()
    roles_ax.set_title("dopd controller under a swinging workload "
                       "(blue: prompt-heavy, orange: output-heavy)")
    recs = [r for r in result["swing"]["requests"] if r.get("ok")]
    ttft_ax.scatter([r["t"] - t0 for r in recs if r["ttft_s"]],
                    [r["ttft_s"] for r in recs if r["ttft_s"]], s=6)
    ttft_ax.set_ylabel("TTFT (s)")
    ttft_ax.set_yscale("log")
    tpot_ax.scatter([r["t"] - t0 for r in recs if r["tpot_s"]],
                    [1000 * r["tpot_s"] for r in recs if r["tpot_s"]], s=6, color="tab:green")
    tpot_ax.set_ylabel("TPOT (ms)")
    tpot_ax.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="flip round trips per case")
    parser.add_argument("--phase-s", type=float, default=45.0, help="seconds per phase")
    parser.add_argument("--cycles", type=int, default=2, help="prompt/output phase pairs")
    parser.add_argument("--out", type=Path, default=RESULTS / "flip_bench.json")
    parser.add_argument("--flip-mode", choices=("drain", "relabel"), default="drain",
                        help="how the gateway flips (manual and controller flips alike)")
    args = parser.parse_args(argv)

    cluster = start_cluster(Path(".fulcrum/flip_bench"), args.flip_mode)
    try:
        print("starting 3 workers ...", flush=True)
        cluster.wait_ready()
        decode = sorted(n for n, r in cluster.roles().items() if r == "decode")[-1]
        idle = _flip_cycle(cluster, decode, args.repeats)
        print(f"idle flips: {_summary(idle)}", flush=True)
        load = Load(cluster.url, 6)
        load.shape = (5, 200)
        load.start()
        time.sleep(5)
        busy = _flip_cycle(cluster, decode, args.repeats)
        load.stop()
        print(f"busy flips: {_summary(busy)}", flush=True)

        cluster.admin("PUT", "/policy", advisory=False)
        load = Load(cluster.url, 6).start()
        started, phases, pools, watches = time.time(), [], [], []
        for _ in range(args.cycles):
            for name, shape in (("prompt-heavy", (150, 2)), ("output-heavy", (5, 100))):
                load.shape = shape
                begin = time.time()
                while time.time() - begin < args.phase_s:
                    roles = list(cluster.roles().values())
                    pools.append({"t": time.time(), "prefill": roles.count("prefill"),
                                  "decode": roles.count("decode")})
                    time.sleep(1)
                phases.append({"name": name, "from": begin, "to": time.time()})
                watch = subprocess.run(
                    [sys.executable, "-m", "deploy.cli", "watch", "--once", "--url",
                     cluster.url], capture_output=True, text=True, timeout=60).stdout
                watches.append({"phase": name, "table": watch})
                print(f"{name}: pools now {pools[-1]}\n{watch}", flush=True)
        load.stop()
        flips = cluster.admin("GET", "/flips")["flips"]
    finally:
        cluster.stop()
    requests = load.records
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
        "flip_mode": args.flip_mode,
        "flip_latency": {"idle": _summary(idle), "busy": _summary(busy),
                         "idle_s": idle, "busy_s": busy},
        "swing": {"started": started, "phases": phases, "pools": pools,
                  "requests": requests,
                  "requests_ok": sum(1 for r in requests if r.get("ok")),
                  "requests_failed": sum(1 for r in requests if not r.get("ok")),
                  "automatic_flips": [f for f in flips if f["reason"] != "manual"],
                  "fulcrum_watch": watches},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, args.out.with_suffix(".png"))
    print(json.dumps({"flip_latency": {k: result["flip_latency"][k] for k in ("idle", "busy")},
                      "requests_ok": result["swing"]["requests_ok"],
                      "requests_failed": result["swing"]["requests_failed"],
                      "automatic_flips": len(result["swing"]["automatic_flips"])}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
