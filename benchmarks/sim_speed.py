"""Simulator speed: simulated requests per CPU second, old code against new, in one run.

Each scenario simulates one ShareGPT-like Poisson trace (or the phase-shift trace) on an
8-worker Llama-3.1-8B/H100 roofline cluster at a load where queues are busy but stable,
and reports requests and events per CPU second (`time.process_time` inside the simulating
process, so other processes on a shared machine count less than with wall time).

The baseline is another git revision (`--baseline`, default the commit before the speed
work), exported with `git archive` into a temporary folder; the new code is a copy of this
checkout taken at the start (edits during the run do not leak in). Every measurement runs in
a fresh child process on one tree or the other, alternating old and new (`--rounds` pairs,
`--repeats` runs each, best CPU time kept), and each child also reports a digest of its
results, so the JSON says whether both trees simulated exactly the same thing.

    python -m benchmarks.sim_speed --out benchmarks/results/sim_speed.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.arrivals import Phase, Trace, pair, phase_mix, poisson_times, synthetic_pool
from benchmarks.dataset import approx_token_count, load_sharegpt, sample_requests

BASELINE = "6fe11dc"  # main before the simulator speed work
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scenario:
    name: str
    prefill: int
    decode: int
    routing: str
    control: str
    trace: str  # "sharegpt" or "phase-shift"
    rate: float


SCENARIOS = (
    Scenario("aggregated-8", 0, 8, "least-loaded", "none", "sharegpt", 60.0),
    Scenario("static-4P4D-least-loaded", 4, 4, "least-loaded", "none", "sharegpt", 60.0),
    Scenario("arrow-4P4D", 4, 4, "arrow", "arrow", "sharegpt", 60.0),
    Scenario("dopd-4P4D", 4, 4, "dopd-match", "dopd", "sharegpt", 60.0),
    Scenario("ares-4P4D", 4, 4, "ares", "dopd", "sharegpt", 60.0),
    Scenario("arrow-phase-shift", 4, 4, "arrow", "arrow", "phase-shift", 15.0),
)


def make_trace(kind: str, n: int, rate: float, seed: int = 0) -> Trace:
    if kind == "sharegpt":
        pool = sample_requests(load_sharegpt(), approx_token_count, 5000, seed)
        return pair(poisson_times(n, rate, seed), pool)
    prompt_heavy = synthetic_pool(200, 3000, 60, seed=seed)
    output_heavy = synthetic_pool(200, 150, 700, seed=seed + 1)
    phase_s = n / rate / 4
    return phase_mix([Phase(phase_s, rate, prompt_heavy), Phase(phase_s, rate, output_heavy)],
                     cycles=2, seed=seed)


def _results_digest(res: object) -> str:
    """Per-request outcomes and the gap log (rows sorted: their order is no result)."""
    h = hashlib.sha256()
    for name in ("arrival", "first_token", "finish", "failed", "slow_gaps"):
        value = getattr(res, name, None)
        if value is not None:
            h.update(np.asarray(value, dtype=float).tobytes())
    log = getattr(res, "gap_log", None)
    if log is not None and log.size:
        h.update(np.ascontiguousarray(log[np.lexsort(log.T[::-1])]).tobytes())
    h.update(repr([getattr(res, "flips", None), getattr(res, "migrations", None)]).encode())
    return h.hexdigest()[:24]


def _clear_caches() -> None:
    """Empty the memo caches of the routing code (e.g. the prompt classifier's), so
    every run starts cold, as a single simulation would, whichever tree is measured."""
    for module in [m for name, m in sys.modules.items() if name.startswith("router.")]:
        for value in list(vars(module).values()):
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def measure_here(sc: Scenario, n: int, repeats: int) -> dict:
    """`repeats` runs in this process (fresh policies each), on whatever tree is imported."""
    from benchmarks.sim.perf import roofline
    from benchmarks.sim.policies import make_control, make_routing
    from benchmarks.sim.simulator import SimConfig, Simulator

    perf = roofline("llama-3.1-8b", "h100")
    trace = make_trace(sc.trace, n, sc.rate)
    runs = []
    for _ in range(repeats):
        _clear_caches()
        sim = Simulator(SimConfig(prefill=sc.prefill, decode=sc.decode), perf,
                        make_routing(sc.routing), make_control(sc.control))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        res = sim.run(trace)
        runs.append({"cpu_s": time.process_time() - cpu0,
                     "wall_s": time.perf_counter() - wall0, "events": res.events,
                     "flips": len(res.flips), "completed": int((~res.failed).sum()),
                     "digest": _results_digest(res)})
    return {"requests": len(trace), "runs": runs}


def _child(tree: Path, probe: Path, sc: Scenario, n: int, repeats: int) -> dict:
    """measure_here in a fresh interpreter that imports the simulator from `tree`; this
    file (`probe`, the new tree's copy of it) is run there, so the old tree needs only the
    simulator's public API."""
    code = ("import runpy, sys, json; m = runpy.run_path(sys.argv[1]); "
            "sc = m['Scenario'](**json.loads(sys.argv[2])); "
            "print(json.dumps(m['measure_here'](sc, int(sys.argv[3]), int(sys.argv[4]))))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code, str(probe), json.dumps(asdict(sc)),
                          str(n), str(repeats)], cwd=tree, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_tree(rev: str, into: Path) -> str:
    """`git archive rev` unpacked under `into`; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def copy_worktree(into: Path) -> None:
    """This checkout's files as they are now (tracked and untracked, not ignored) copied
    under `into`, so edits made while the benchmark runs do not leak into it."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in files:
        src = ROOT / name
        if name and src.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / name)


def _summary(requests: int, runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["cpu_s"])
    cpus = sorted(r["cpu_s"] for r in runs)
    return {"cpu_s": round(best["cpu_s"], 4), "cpu_s_all": [round(c, 4) for c in cpus],
            "requests_per_cpu_s": round(requests / best["cpu_s"]),
            "requests_per_cpu_s_median": round(requests / cpus[len(cpus) // 2]),
            "events": best["events"], "events_per_request": round(best["events"] / requests, 3),
            "us_per_event": round(best["cpu_s"] / best["events"] * 1e6, 3),
            "flips": best["flips"], "completed": best["completed"],
            "digest": best["digest"]}


def compare(sc: Scenario, trees: dict[str, Path], n: int, rounds: int, repeats: int) -> dict:
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    requests = n
    for r in range(rounds):
        order = list(trees) if r % 2 == 0 else list(trees)[::-1]
        for label in order:
            got = _child(trees[label], trees["new"] / "benchmarks" / "sim_speed.py", sc, n,
                         repeats)
            requests = got["requests"]
            runs[label].extend(got["runs"])
    row: dict = {**asdict(sc), "requests": requests}
    for label, rs in runs.items():
        row[label] = _summary(requests, rs)
    if "old" in row:
        row["speedup"] = round(row["old"]["cpu_s"] / row["new"]["cpu_s"], 2)
        row["same_results"] = len({r["digest"] for rs in runs.values() for r in rs}) == 1
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sim_speed.json"))
    parser.add_argument("--num-requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2, help="old/new child pairs")
    parser.add_argument("--repeats", type=int, default=3, help="runs per child")
    parser.add_argument("--baseline", default=BASELINE,
                        help="git revision measured as 'old' ('none': only this tree)")
    parser.add_argument("--only", default=None, help="comma-separated scenario names")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if args.only is None or s.name in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="fulcrum-sim-speed-") as tmp:
        new = Path(tmp) / "new"
        copy_worktree(new)
        trees = {"new": new}
        commit = None
        if args.baseline != "none":
            (Path(tmp) / "old").mkdir()
            commit = export_tree(args.baseline, Path(tmp) / "old")
            trees = {"old": Path(tmp) / "old", "new": new}
        rows = []
        for sc in chosen:
            row = compare(sc, trees, args.num_requests, args.rounds, args.repeats)
            old = row.get("old", {}).get("requests_per_cpu_s", "-")
            print(f"{sc.name:<26} old {old:>7}  new {row['new']['requests_per_cpu_s']:>7} "
                  f"req/cpu-s  x{row.get('speedup', '-')}  "
                  f"same results: {row.get('same_results', '-')}", file=sys.stderr)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "description": __doc__.strip().splitlines()[0],
        "command": "python -m benchmarks.sim_speed " + " ".join(argv or sys.argv[1:]),
        "baseline": commit, "python": platform.python_version(),
        "machine": platform.machine(), "num_requests": args.num_requests,
        "rounds": args.rounds, "repeats_per_round": args.repeats,
        "scenarios": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
