"""What moving a running stream costs: KV pulled from the old worker vs recomputed on the
new one (real vLLM CPU workers).

For each migration mode (``fulcrum up --migration kv`` and ``--migration recompute``) a
two-worker cluster is started: one prefill and one decode worker, Fulcrum's connector,
prefix caching off (the new worker must not find the context in its own cache). Every
request is a fresh prompt of ``--contexts`` tokens, streamed through the gateway with a
planned move to the other worker after ``--after`` tokens. The client timestamps every
token; the *stall* of a move is the longest gap between two tokens after the first,
minus the median gap of the rest (what the client waits beyond a normal token). Per mode
and context the JSON holds the median and p10/p90 stall over ``--rounds``, and a
least-squares fit ``stall = fixed + per_token x context`` (the time per migrated token);
the consumer's pull time comes from its ``vllm:fulcrum_kv_transfer_seconds``. The
gateway's counters, read around every request, say how it moved; one that did not move as
its mode does (no clean UTF-8 boundary before its end, a KV move falling back to
recompute) is counted under ``skipped``, not measured.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.migration_cost            # tiny model
    ... -m benchmarks.migration_cost --model default --dtype float32 --contexts 256,1024 \\
        --rounds 3 --out benchmarks/results/migration_cost_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.live_cluster import UpCluster
from benchmarks.pd_breakdown import MODEL, RESULTS, make_template, tag

MODES = ("kv", "recompute")


def counter(text: str, name: str) -> float:
    """A gateway counter's value in a /metrics text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def histogram_totals(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a worker histogram, over its label sets."""
    total, count = 0.0, 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "_sum"):
            total += float(line.split()[-1])
        elif line.startswith(name + "_count"):
            count += float(line.split()[-1])
    return total, count


def stream_times(url: str, prompt: str, request_id: str, max_tokens: int) -> list[float]:
    """Arrival time of every generated token of one streamed completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    times: list[float] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600,
                      headers={"X-Request-Id": request_id}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            now = time.perf_counter()
            for choice in chunk.get("choices") or ():
                times += [now] * len(choice.get("token_ids") or ())
    return times


def stall_of(times: list[float], after: int) -> dict[str, float]:
    """The move's extra wait: the longest gap between tokens (after the first, which the
    prefill leg hands over) minus the median of the others; and where it fell."""
    gaps = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    rest = gaps[:worst] + gaps[worst + 1:]
    typical = statistics.median(rest)
    return {"stall_s": gaps[worst] - typical, "gap_s": typical,
            "at_token": worst + 2, "after": after}


def fit(points: list[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares ``y = fixed + per_token * x``."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return {"fixed_s": my - slope * mx, "per_token_s": slope}


def quantiles(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {"p10": q(0.1), "median": statistics.median(s), "p90": q(0.9), "n": len(s)}


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    extra = ["--prefill-workers", "1", "--migration", mode, "--served-model-name", MODEL,
             "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
             "--kv-cache-gib", "1", "--worker-arg=--no-enable-prefix-caching"]
    cluster = UpCluster(work / mode, 2, extra, model=args.model)
    try:
        cluster.wait_ready(args.start_timeout)
        roles = {w["role"]: w for w in cluster.workers()}
        target, source = roles["prefill"], roles["decode"]
        out: dict[str, Any] = {"contexts": {}}
        before = httpx.get(cluster.url + "/metrics", timeout=10).text
        pulls_before = histogram_totals(target["url"], "vllm:fulcrum_kv_transfer_seconds")
        points: list[tuple[float, float]] = []
        requests = 0
        skipped: dict[str, int] = {}  # measured requests that did not move as `mode` does
        for context in args.contexts:
            words = make_template(source["url"], context - 8)  # room for the unique tag
            rows = []
            for r in range(args.warmup + args.rounds):
                request_id = f"mc-{mode}-{context}-{r}-{time.time_ns()}"
                cluster.admin("POST", "/migrate", request_id=request_id, to=target["name"],
                              after_tokens=args.after, planned=True)
                gw_before = httpx.get(cluster.url + "/metrics", timeout=10).text
                times = stream_times(cluster.url, f"{tag(r)} " + " ".join(words),
                                     request_id, args.max_tokens)
                gw_after = httpx.get(cluster.url + "/metrics", timeout=10).text
                requests += 1
                if len(times) != args.max_tokens:
                    raise RuntimeError(f"{len(times)} tokens, expected {args.max_tokens}")
                moved = {name: counter(gw_after, name) - counter(gw_before, name)
                         for name in ("fulcrum_stream_migrations_total",
                                      "fulcrum_stream_kv_migrations_total")}
                how = ("kv" if moved["fulcrum_stream_kv_migrations_total"] else "recompute") \
                    if moved["fulcrum_stream_migrations_total"] else "not moved"
                if r < args.warmup:
                    continue
                if how != mode:  # e.g. no clean UTF-8 boundary before the end: not counted
                    skipped[how] = skipped.get(how, 0) + 1
                    continue
                rows.append(stall_of(times, args.after))
            stalls = [row["stall_s"] for row in rows]
            points += [(context + args.after, s) for s in stalls]
            out["contexts"][str(context)] = {
                "stall_s": quantiles(stalls),
                "token_gap_s": quantiles([row["gap_s"] for row in rows]),
                "stall_at_token": sorted({row["at_token"] for row in rows}),
            }
            print(f"{mode} {context}: stall median {statistics.median(stalls) * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
        after = httpx.get(cluster.url + "/metrics", timeout=10).text
        pulled = histogram_totals(target["url"], "vllm:fulcrum_kv_transfer_seconds")
        out["moves"] = counter(after, "fulcrum_stream_migrations_total") - counter(
            before, "fulcrum_stream_migrations_total")
        out["kv_moves"] = counter(after, "fulcrum_stream_kv_migrations_total") - counter(
            before, "fulcrum_stream_kv_migrations_total")
        out["requests"] = requests
        out["skipped"] = skipped
        pulls = pulled[1] - pulls_before[1]
        out["pull_s_mean"] = (pulled[0] - pulls_before[0]) / pulls if pulls else None
        out["pulls"] = pulls
        out["fit"] = fit(points)
        return out
    finally:
        cluster.stop()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, run in result["modes"].items():
        xs = [int(c) + result["config"]["after"] for c in run["contexts"]]
        med = [v["stall_s"]["median"] * 1e3 for v in run["contexts"].values()]
        lo = [m - v["stall_s"]["p10"] * 1e3 for m, v in zip(med, run["contexts"].values(),
                                                              strict=True)]
        hi = [v["stall_s"]["p90"] * 1e3 - m for m, v in zip(med, run["contexts"].values(),
                                                              strict=True)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=mode)
    ax.set_xlabel("context at the move (tokens)")
    ax.set_ylabel("stall beyond a normal token (ms)")
    ax.set_title(f"Moving a stream: KV pull vs recompute ({result['config']['model']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[128, 512, 1024, 1536], help="prompt tokens")
    parser.add_argument("--after", type=int, default=16, help="tokens before the move")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS / "migration_cost.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    need = max(args.contexts) + args.max_tokens + 16
    args.max_model_len = 1 << (need - 1).bit_length()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
        "config": {"model": args.model, "dtype": args.dtype, "contexts": args.contexts,
                   "after": args.after, "max_tokens": args.max_tokens,
                   "rounds": args.rounds, "warmup": args.warmup,
                   "prefix_caching": False},
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="migration-cost-") as tmp:
        for mode in args.modes.split(","):
            result["modes"][mode] = run_mode(mode, args, Path(tmp))
    kv, rc = result["modes"].get("kv"), result["modes"].get("recompute")
    if kv and rc:
        result["recompute_over_kv"] = {
            c: rc["contexts"][c]["stall_s"]["median"] / kv["contexts"][c]["stall_s"]["median"]
            for c in kv["contexts"] if kv["contexts"][c]["stall_s"]["median"] > 0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({m: {"fit": r["fit"], "moves": r["moves"], "kv_moves": r["kv_moves"]}
                      for m, r in result["modes"].items()}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
