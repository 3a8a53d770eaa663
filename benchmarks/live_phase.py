"""Adaptive against static and aggregated serving on real vLLM CPU workers, phase trace.

    flock /tmp/fulcrum-vllm.lock python -m benchmarks.live_phase          # ~70 min
    python -m benchmarks.live_phase --minutes 2 --systems half,arrow      # a short check
    python -m benchmarks.live_phase --rate-steps 7.5,8.6,9.9,11.4,13.1 \
        --systems half,static-3P1D,arrow --out benchmarks/results/live_phase_stairs.json
    python -m benchmarks.live_phase --model default --rate 1 --long-prompt 256x8 \
        --long-output 32x96 --slo-ttft-ms 3000 --slo-tpot-ms 250 \
        --systems half,static-3P1D,arrow --out benchmarks/results/live_phase_smollm2.json

Every system gets a fresh `fulcrum up --model tiny --workers 4` (or `--model default`,
SmolLM2-135M-Instruct in float32) and the same trace: phases of long prompts (512 in / 8 out by
default) and long outputs (32 in / 192 out) alternating at one request rate, `--minutes` long.
Systems: the half split (2P2D), the other static splits (1P3D, 3P1D; the best of them chosen
after the fact, per seed), aggregated serving (no KV connector, every worker serves whole
requests), `arrow` (Arrow routing and controller) and `dopd` (DOPD-match routing and the DOPD
controller), both starting at the half split and calibrated from one `fulcrum profile` of a
worker taken at the start (`--control-profile`).

Lengths stay hidden from the router: a random-weight model never stops on its own, so the
trace's output length goes to the engine (`max_tokens` with `ignore_eos`) while the gateway's
policies are told the client's cap (`X-Fulcrum-Client-Cap`, 4096), as `fulcrum bench
--engine-lengths` does. Per system: goodput (requests/s meeting the TTFT and TPOT SLO), SLO
attainment (also per cycle), failures, latency percentiles, and the pools sampled every
second. With `--rate-steps` each cycle runs at the next rate of a rising staircase and each
system's capacity is the last rate before its first cycle under 90% attainment; ratios of
capacity then sit beside those of goodput.
Writes benchmarks/results/live_phase.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from benchmarks.arrivals import Phase, phase_mix, synthetic_pool
from benchmarks.bench import Endpoint, run_trace
from benchmarks.live_cluster import UpCluster
from benchmarks.metrics import SLO, summarize

RESULTS = Path(__file__).parent / "results"
WORKERS = 4
# --model -> (served name, words for the setup, `fulcrum profile` prompt lengths and batch sizes);
# SmolLM2's profile stays short because a float32 512-token prefill takes seconds on one core
MODELS: dict[str, tuple[str, str, str, str]] = {
    "tiny": ("tiny-llama", "tiny random Llama (tests' model), vLLM CPU", "16,64,256,512",
             "1,4,16"),
    "default": ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct, float32, vLLM CPU",
                "16,64,256", "1,4"),
}
CLIENT_CAP = 4096

# name -> `fulcrum up` options (every cluster also gets the common ones in `up_options`)
SYSTEMS: dict[str, tuple[str, ...]] = {
    "half": ("--prefill-workers", "2"),
    "static-1P3D": ("--prefill-workers", "1"),
    "static-3P1D": ("--prefill-workers", "3"),
    "aggregated": ("--kv-connector", "none"),
    # the best split with the adaptive systems' router: what flipping adds beyond routing
    "static-3P1D-arrow-routing": ("--prefill-workers", "3", "--policy", "arrow"),
    "half-arrow-routing": ("--prefill-workers", "2", "--policy", "arrow"),
    "arrow": ("--prefill-workers", "2", "--policy", "arrow", "--control-policy", "arrow"),
    "dopd": ("--prefill-workers", "2", "--policy", "dopd-match", "--control-policy", "dopd"),
}
STATIC = ("half", "static-1P3D", "static-3P1D", "static-3P1D-arrow-routing",
          "half-arrow-routing")
ADAPTIVE = ("arrow", "dopd")


def shape(text: str) -> tuple[int, int]:
    """'512x8' -> (512, 8): prompt and output tokens of one phase's requests."""
    prompt, _, output = text.partition("x")
    return int(prompt), int(output)


def build_trace(rate: float | Sequence[float], phase_s: float, cycles: int, seed: int,
                long_prompt: tuple[int, int] = (512, 8),
                long_output: tuple[int, int] = (32, 192)) -> list:
    """`cycles` cycles of a long-prompt then a long-output phase; with a sequence of rates,
    one cycle per rate, in order (a rising staircase measures capacity)."""
    prompts = synthetic_pool(200, *long_prompt, seed=seed)
    outputs = synthetic_pool(200, *long_output, seed=seed + 1)
    rates = [float(rate)] * cycles if isinstance(rate, int | float) else list(rate)
    phases = [phase for r in rates for phase in (Phase(phase_s, r, prompts, "long-prompt"),
                                                 Phase(phase_s, r, outputs, "long-output"))]
    return phase_mix(phases, 1, seed)


def rate_steps(text: str) -> tuple[float, ...]:
    """'7,8,9.3' -> (7.0, 8.0, 9.3): one cycle per rate, rising."""
    steps = tuple(float(x) for x in text.split(",") if x)
    if not steps or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise argparse.ArgumentTypeError("rate steps must be a rising list, e.g. 7,8,9.3")
    return steps


def by_cycle(trace: list, timelines: list, slo: SLO, cycle_s: float) -> list[dict]:
    """SLO attainment and goodput per cycle of the trace (requests grouped by arrival)."""
    groups: dict[int, list] = {}
    for entry, tl in zip(trace, timelines, strict=True):
        groups.setdefault(int(entry.arrival_s // cycle_s), []).append(tl)
    out = []
    for k in sorted(groups):
        summary = summarize(groups[k], cycle_s, slo)
        out.append({"cycle": k, "requests": len(groups[k]),
                    "attainment": summary["slo_attainment"],
                    "goodput": summary["request_goodput"],
                    "median_ttft_ms": summary.get("median_ttft_ms")})
    return out


def capacity(cycles: list[dict], steps: Sequence[float], target: float = 0.9) -> float:
    """The highest step rate reached before the first cycle under `target` attainment
    (0 when the first one misses): capacity as a staircase measures it."""
    reached = 0.0
    for cycle in cycles:
        if cycle["cycle"] >= len(steps) or (cycle["attainment"] or 0.0) < target:
            break
        reached = steps[cycle["cycle"]]
    return reached


def up_options(system: str, slo: SLO, profile: Path | None) -> list[str]:
    opts = ["--max-model-len", "1024", "--kv-cache-gib", "1",
            "--slo-ttft-ms", f"{slo.ttft_ms:g}", "--slo-tpot-ms", f"{slo.tpot_ms:g}",
            "--control-interval", "1", "--control-window", "6", *SYSTEMS[system]]
    if system in ADAPTIVE and profile is not None:
        opts += ["--control-profile", str(profile)]
    return opts


class PoolSampler:
    """Samples the number of workers per role once a second."""

    def __init__(self, cluster: UpCluster, decisions: bool = False) -> None:
        self.cluster = cluster
        self.samples: list[dict] = []
        self.decisions: dict[int, dict] = {}  # tick -> decision (the log keeps only 50)
        self._with_decisions = decisions
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(1.0):
            n += 1
            try:
                roles = list(self.cluster.roles().values())
                if self._with_decisions and n % 20 == 0:
                    self.collect_decisions()
            except httpx.HTTPError:
                continue
            self.samples.append({"t": time.time(), "prefill": roles.count("prefill"),
                                 "decode": roles.count("decode"), "both": roles.count("both")})

    def collect_decisions(self) -> None:
        for d in self.cluster.admin("GET", "/explain?limit=50").get("decisions", []):
            self.decisions[d["tick"]] = d

    def __enter__(self) -> PoolSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def profile_worker(cluster: UpCluster, out: Path, model: str = "tiny") -> Path:
    """One `fulcrum profile` of a worker, for the adaptive controllers' calibration."""
    import subprocess

    url = cluster.workers()[0]["url"]
    _, _, lengths, batches = MODELS[model]
    subprocess.run([sys.executable, "-m", "benchmarks.profiler", "--base-url", url,
                    "--prompt-lengths", lengths, "--batch-sizes", batches,
                    "--repeats", "2", "--out", str(out)], check=True, timeout=1800)
    return out


def run_system(system: str, trace: list, slo: SLO, profile: Path | None,
               log_dir: Path, model: str = "tiny", split_prompt_tokens: int = 200,
               cycle_s: float = 120.0) -> dict:
    cluster = UpCluster(log_dir / system, WORKERS, up_options(system, slo, profile),
                        model=model)
    try:
        cluster.wait_ready()
        endpoint = Endpoint(cluster.url, MODELS[model][0], engine_lengths=True,
                            client_max_tokens=CLIENT_CAP, timeout_s=300)
        asyncio.run(run_trace(trace[:4], endpoint, progress=False))  # warm-up
        started = time.time()
        with PoolSampler(cluster, decisions=system in ADAPTIVE) as pools:
            timelines, duration = asyncio.run(run_trace(trace, endpoint, progress=False))
        if system in ADAPTIVE:
            pools.collect_decisions()
        decisions = [pools.decisions[k] for k in sorted(pools.decisions)]
        flips = cluster.admin("GET", "/flips").get("flips", [])
    finally:
        cluster.stop()
    summary = summarize(timelines, duration, slo)
    keep = ("completed", "failed", "request_throughput", "request_goodput", "slo_attainment",
            "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms",
            "p99_tpot_ms", "median_e2el_ms")
    errors = sorted({t.error[:120] for t in timelines if not t.success and t.error})
    return {"system": system, "started": started,
            **{k: summary.get(k) for k in keep},
            "errors": errors[:10],
            "phases": by_phase(timelines, slo, split_prompt_tokens),
            "cycles": by_cycle(trace, timelines, slo, cycle_s),
            "decisions": summarize_decisions(decisions, started),
            "pools": [{**s, "t": round(s["t"] - started, 2)} for s in pools.samples],
            "flips": [f for f in flips if f.get("outcome") == "done"],
            "flip_count": sum(1 for f in flips if f.get("outcome") == "done")}


def by_phase(timelines: list, slo: SLO, split_prompt_tokens: int = 200) -> dict[str, dict]:
    """SLO attainment per phase, and how often each half of the SLO was missed.

    A request belongs to the long-prompt phase when its prompt is longer than
    `split_prompt_tokens` (between the two phases' prompt lengths)."""
    out = {}
    for name, keep in (("long-prompt", lambda t: t.prompt_tokens > split_prompt_tokens),
                       ("long-output", lambda t: t.prompt_tokens <= split_prompt_tokens)):
        group = [t for t in timelines if keep(t)]
        done = [t for t in group if t.success]
        ttft_ok = [t.ttft_s * 1000 <= slo.ttft_ms for t in done]
        tpot_ok = [t.output_tokens <= 1 or (t.latency_s - t.ttft_s) * 1000
                   / (t.output_tokens - 1) <= slo.tpot_ms for t in done]
        both = sum(a and b for a, b in zip(ttft_ok, tpot_ok, strict=True))
        out[name] = {"requests": len(group), "attainment": both / len(group) if group else None,
                     "ttft_missed": len(done) - sum(ttft_ok),
                     "tpot_missed": len(done) - sum(tpot_ok),
                     "median_ttft_ms": statistics.median(t.ttft_s * 1000 for t in done)
                     if done else None}
    return out


def summarize_decisions(decisions: list[dict], started: float) -> dict:
    """The controller's moves (time, note, numbers) and how often each hold reason came up."""
    moves, holds = [], {}
    for d in decisions:
        note = str(d.get("note", ""))
        if d.get("actions"):
            moves.append({"t": round(float(d.get("at", started)) - started, 1),
                          "note": note[:400], "numbers": d.get("numbers", {})})
        else:
            key = note.removeprefix("hold: ").split(";")[0].split(":")[0][:80]
            holds[key] = holds.get(key, 0) + 1
    last = [{k: d.get(k) for k in ("at", "note", "numbers")} for d in decisions[-3:]]
    return {"ticks": len(decisions), "moves": moves, "holds": holds, "last": last}


def ratios(runs: dict[str, dict], key: str = "request_goodput"
           ) -> dict[str, dict[str, float | None]]:
    """Each system's goodput (or another `key`) over the half split's, the best static
    split's and aggregated serving's."""
    def value(name: str) -> float | None:
        return runs[name].get(key) if name in runs else None

    statics = [g for g in (value(s) for s in STATIC) if g is not None]
    base = {"half split": value("half"), "best static": max(statics) if statics else None,
            "aggregated": value("aggregated")}
    out: dict[str, dict[str, float | None]] = {}
    for name, run in runs.items():
        if run.get(key) is not None:
            out[name] = {k: (run[key] / v if v else None) for k, v in base.items()}
    return out


def spread(values: list[float]) -> dict[str, float | int]:
    """Mean, min and max over the seeds a system ran with, and how many there were."""
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "seeds": len(values)}


def mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


SAME_TRACE = ("model", "rate", "minutes", "phase_s", "phases", "slo")
"""Setup keys two result files must share to be joined."""


def summarise(seeds: list[dict], setup: dict, date: str) -> dict:
    """The result file: every seed's ratios, and each system's goodput spread and mean
    ratios over the seeds that ran it."""
    seeds = sorted(({**s, "ratios": ratios(s["runs"])} for s in seeds),
                   key=lambda s: s["seed"])
    names = list(dict.fromkeys(n for s in seeds for n in s["runs"]))
    goodput = {name: spread([s["runs"][name]["request_goodput"] for s in seeds
                             if name in s["runs"]]) for name in names}
    result = {
        "date": date, "cpu_count": os.cpu_count(),
        "load_average_after": list(os.getloadavg()),
        "setup": setup,
        "goodput": goodput,
        "ratios_mean": mean_ratios(seeds, names, "ratios"),
        "seeds": seeds,
    }
    if any("capacity" in run for s in seeds for run in s["runs"].values()):
        for s in seeds:
            s["capacity_ratios"] = ratios(s["runs"], "capacity")
        values = {name: [s["runs"][name]["capacity"] for s in seeds
                         if "capacity" in s["runs"].get(name, {})] for name in names}
        result["capacity"] = {name: spread(v) for name, v in values.items() if v}
        result["capacity_ratios_mean"] = mean_ratios(seeds, names, "capacity_ratios")
    return result


def mean_ratios(seeds: list[dict], names: list[str], field: str) -> dict[str, dict]:
    """Per system, the mean over seeds of its ratios in each seed's `field`."""
    return {name: {k: mean_or_none([s[field][name][k] for s in seeds if name in s[field]])
                   for k in ("half split", "best static", "aggregated")}
            for name in names}


def merge(results: list[dict]) -> dict:
    """Join result files of one trace setting: per seed, a later file's run of a system
    replaces an earlier file's."""
    first = results[0]
    for other in results[1:]:
        if any(other["setup"][k] != first["setup"][k] for k in SAME_TRACE):
            raise ValueError(f"cannot merge runs of other trace settings ({SAME_TRACE})")
    by_seed: dict[int, dict] = {}
    for result in results:
        for entry in result["seeds"]:
            old = by_seed.get(entry["seed"], {"runs": {}})
            by_seed[entry["seed"]] = {**entry, "runs": {**old["runs"], **entry["runs"]}}
    return summarise(list(by_seed.values()), first["setup"],
                     "; ".join(r["date"] for r in results))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed_runs = result["seeds"][0]["runs"]
    fig, (pools_ax, bar_ax) = plt.subplots(2, 1, figsize=(11, 7))
    phase_s = result["setup"]["phase_s"]
    total = result["setup"]["minutes"] * 60
    for i in range(int(total // phase_s)):
        pools_ax.axvspan(i * phase_s, (i + 1) * phase_s, alpha=0.08,
                         color="tab:blue" if i % 2 == 0 else "tab:orange")
    markers = "os^vDP"
    for i, name in enumerate(n for n in seed_runs if n in ADAPTIVE + ("half",)):
        samples = seed_runs[name]["pools"]
        pools_ax.step([s["t"] for s in samples], [s["prefill"] for s in samples], where="post",
                      label=name, marker=markers[i], markevery=30, markersize=4)
    pools_ax.set_ylabel("prefill workers (of 4)")
    pools_ax.set_xlabel("time (s); blue: long prompts, orange: long outputs")
    pools_ax.legend(loc="upper right")
    measure = "capacity" if "capacity" in result else "goodput"
    names = list(result[measure])
    means = [result[measure][n]["mean"] for n in names]
    spans = [(result[measure][n]["mean"] - result[measure][n]["min"],
              result[measure][n]["max"] - result[measure][n]["mean"]) for n in names]
    bar_ax.bar(names, means, yerr=list(zip(*spans, strict=True)), capsize=4,
               color=[f"C{i}" for i in range(len(names))])
    bar_ax.set_ylabel("capacity (req/s, last step at >= 90% attainment)"
                      if measure == "capacity" else "goodput (req/s meeting the SLO)")
    bar_ax.tick_params(axis="x", labelsize=8, rotation=15)
    slo = result["setup"]["slo"]
    rate = result["setup"]["rate"]
    rate_text = (f"a staircase, {rate[0]:g} to {rate[-1]:g}" if isinstance(rate, list)
                 else f"{rate}")
    fig.suptitle(f"live, 4 vLLM CPU workers ({result['setup']['model'].split(',')[0]}), "
                 f"phase trace at "
                 f"{rate_text} req/s; SLO TTFT {slo['ttft']:g} ms, "
                 f"TPOT {slo['tpot']:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--long-prompt", type=shape, default=(512, 8),
                        help="prompt x output tokens in the long-prompt phase")
    parser.add_argument("--long-output", type=shape, default=(32, 192),
                        help="prompt x output tokens in the long-output phase")
    parser.add_argument("--rate", type=float, default=6.0, help="requests/s in every phase")
    parser.add_argument("--minutes", type=float, default=10.0, help="trace length")
    parser.add_argument("--phase-s", type=float, default=60.0)
    parser.add_argument("--rate-steps", type=rate_steps, default=None,
                        help="a rising staircase instead of --rate and --minutes: one cycle "
                             "(long-prompt then long-output phase) per rate; each system's "
                             "capacity is the last rate before a cycle under 90%% attainment")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "live_phase.json")
    parser.add_argument("--profile", type=Path, default=None,
                        help="calibrate the adaptive systems from this `fulcrum profile` file "
                             "instead of profiling a worker first")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="join these result files (same trace settings; a later file's "
                             "run of a system replaces an earlier one's) into --out; runs "
                             "nothing")
    parser.add_argument("--append", action="store_true",
                        help="add these systems' runs to --out (same trace settings), "
                             "recomputing goodput and ratios over every system there")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            result = merge([json.loads(path.read_text()) for path in args.merge])
        except ValueError as exc:
            parser.error(str(exc))
        return write_result(result, args.out)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)
    cycles = max(1, round(args.minutes * 60 / (2 * args.phase_s)))
    rate: float | tuple[float, ...] = args.rate
    if args.rate_steps:
        rate, cycles = args.rate_steps, len(args.rate_steps)
        args.minutes = cycles * 2 * args.phase_s / 60
    log_dir = Path(".fulcrum/live_phase")
    profile = args.profile
    if profile is None and any(s in ADAPTIVE for s in systems):
        probe = UpCluster(log_dir / "profile", 1, ["--kv-connector", "none",
                                                   "--max-model-len", "1024"], model=args.model)
        try:
            probe.wait_ready()
            profile = profile_worker(probe, log_dir / f"profile-{args.model}.json", args.model)
        finally:
            probe.stop()
    (lp_in, lp_out), (lo_in, lo_out) = args.long_prompt, args.long_output
    split_prompt_tokens = (lp_in + lo_in) // 2
    setup = {"workers": WORKERS, "model": MODELS[args.model][1],
             "rate": list(rate) if args.rate_steps else rate, "minutes": args.minutes,
             "phase_s": args.phase_s,
             "phases": f"long-prompt {lp_in} in / {lp_out} out, long-output {lo_in} in / "
                       f"{lo_out} out (uniform +-25%)",
             "lengths": f"hidden from the router (engine-enforced, client cap {CLIENT_CAP})",
             "slo": slo.as_dict(), "profile": str(profile) if profile else None}
    earlier: dict[int, dict] = {}  # seed -> that seed's entry in --out
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.append and args.out.exists():
        old = json.loads(args.out.read_text())
        if any(old["setup"][k] != setup[k] for k in SAME_TRACE):
            parser.error(f"--append: {args.out} was run with other settings ({SAME_TRACE})")
        setup["profile"] = setup["profile"] or old["setup"].get("profile")
        earlier = {s["seed"]: s for s in old["seeds"]}
        date = f"{old['date']}; {', '.join(systems)} appended {date}"
    seeds = []
    for seed in (int(s) for s in args.seeds.split(",")):
        trace = build_trace(rate, args.phase_s, cycles, seed, args.long_prompt,
                            args.long_output)
        runs = dict(earlier[seed]["runs"]) if seed in earlier else {}
        for system in systems:
            print(f"seed {seed}: {system} ({len(trace)} requests)", file=sys.stderr, flush=True)
            runs[system] = run_system(system, trace, slo, profile, log_dir, args.model,
                                      split_prompt_tokens, 2 * args.phase_s)
            if args.rate_steps:
                runs[system]["capacity"] = capacity(runs[system]["cycles"], args.rate_steps)
            partial = args.out.with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"seed": seed, "runs": runs}, indent=1) + "\n")
            r = runs[system]
            print(f"  goodput {r['request_goodput']:.2f} req/s, attainment "
                  f"{r['slo_attainment']:.2f}, failed {r['failed']}, flips {r['flip_count']}"
                  + (f", capacity {r['capacity']:g} req/s" if "capacity" in r else ""),
                  file=sys.stderr, flush=True)
        seeds.append({"seed": seed, "requests": len(trace), "runs": runs,
                      "ratios": ratios(runs)})
    run_now = {s["seed"] for s in seeds}
    seeds += [old_seed for seed, old_seed in earlier.items() if seed not in run_now]
    result = summarise(seeds, setup, date)
    return write_result(result, args.out)


def write_result(result: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"goodput": result["goodput"], "ratios_mean": result["ratios_mean"]},
                     indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
