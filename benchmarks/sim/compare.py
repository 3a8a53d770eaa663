"""A fair side-by-side comparison in the simulator: does adaptive P/D pay, and by how much?

Every system runs the same traces (same seeds) on the same calibrated engine model:

Baselines
* `agg@B`: aggregated serving (every worker runs chunked prefill + decode) at token
  budget B in {512, 1024, 2048, 8192}; 8192 is vLLM's default for its OpenAI server on
  an H100/H200. Reported: the default, and the best budget per trace (chosen on the
  evaluation seeds: a generous baseline).
* `static-kPmD`: every fixed split. Reported: the half split (what an operator deploys
  without data), the split tuned on a separate calibration trace (another seed), and the
  hindsight-best split (best mean over the evaluation seeds).
* `oracle-schedule` (phase traces): told the phase schedule and each phase's best split
  (measured on each phase alone at the same rate), it moves every worker at once at the
  boundary: the ceiling for any controller.

Adaptive systems: routing + control policies taken by name from the live registries
(`ADAPTIVE`, plus any control policy registered later, paired with least-loaded routing),
so improved policies are picked up without editing this file. Knobs that describe the
hardware (DOPD's throughput constants) come from the performance model; reaction knobs
(intervals, cooldowns) are the policies' own defaults.

Method: a geometric rate grid around an analytic capacity estimate (no bisection:
attainment is not monotone in rate for adaptive systems), >= 3 seeds, warm-up excluded,
every flipping system starts at the half split, flips priced at 0 s, at the measured live
distribution (median 0.2 s, worst 1.9 s: log-normal, capped), at 10 s, and in drain mode.

Metrics, each paper's own, each as a ratio to every baseline (paired by seed):
* Arrow: max request rate at >= 90% SLO attainment (the crossing interpolated between
  grid points);
* DOPD: peak goodput, and P90 TTFT / P90 TPOT at a common operating point (the highest
  grid rate at which the half split still attains 90% on every seed);
* ARES: P99 TPOT at that operating point;
* SLAI: capacity at median TTFT <= 0.5 s with the pooled p99 time between tokens within
  the tbt SLO.

    python -m benchmarks.sim.compare --out benchmarks/results          # full (~30-40 min)
    python -m benchmarks.sim.compare --quick --out /tmp/cmp              # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.metrics import SLO
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.oracle import OracleSchedule
from benchmarks.sim.perf import PerfModel, roofline
from benchmarks.sim.policies import make_control, make_routing
from benchmarks.sim.simulator import SimConfig, Simulator
from benchmarks.sim.workloads import Workload, workloads
from instance_manager.engine_plugins.slai_policy import SLAIConfig

BUDGETS = (512, 1024, 2048, 8192)
DEFAULT_BUDGET = 8192
TARGET = 0.9

# name, routing, control, SLAI engine order
ADAPTIVE: tuple[tuple[str, str, str, bool], ...] = (
    ("arrow", "arrow", "arrow", False),
    ("dopd", "dopd-match", "dopd", False),
    ("dopd+ares", "ares", "dopd", False),
    ("arrow+slai", "arrow", "arrow", True),
    ("dopd+ares+slai", "ares", "dopd", True),
)


@dataclass(frozen=True)
class FlipCost:
    mode: str = "relabel"
    rewarm_s: float = 0.0
    sigma: float = 0.0
    max_s: float = math.inf


FLIP_VARIANT_SYSTEMS = ("arrow", "dopd", "dopd+ares")  # and the oracle; the rest: live only
# The gateway relabels by default (`fulcrum up --flip-mode relabel`), as this does; the
# time a flipped worker stays out of routing is priced at what flip_bench measured for
# drain flips of short streams (0.05 ms idle, 0.2 s median, 1.9 s worst under load), which
# a relabel (no wait) does not exceed.
LIVE_FLIP = FlipCost("relabel", 0.2, 0.97, 1.9)
FLIP_COSTS = {"0s": FlipCost(), "live": LIVE_FLIP, "10s": FlipCost("relabel", 10.0),
              "drain": dataclasses.replace(LIVE_FLIP, mode="drain")}


@dataclass(frozen=True)
class Setup:
    """Model x GPU x SLOs x which traces and flip costs run on it."""

    name: str
    model: str
    gpu: str
    slo: SLO
    workloads: tuple[str, ...]
    flip_variants: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    workers: int = 8
    reduced: bool = False  # fewer grid points, budgets 512/8192, no +slai variants


def setups(quick: bool) -> list[Setup]:
    if quick:
        return [Setup("8b-h100", "llama-3.1-8b", "h100",
                      SLO(ttft_ms=1000, tpot_ms=40, tbt_ms=50),
                      ("phase-1400", "sharegpt-poisson"), {"phase-1400": ("0s",)}, workers=4)]
    slo_8b = SLO(ttft_ms=1000, tpot_ms=40, tbt_ms=50)
    slo_70b = SLO(ttft_ms=2000, tpot_ms=80, tbt_ms=100)
    every = ("phase-700", "phase-1400", "sharegpt-poisson", "sharegpt-gamma", "azure-day")
    reduced = ("phase-1400",)
    flips = {"phase-1400": ("0s", "10s", "drain")}
    return [Setup("8b-h100", "llama-3.1-8b", "h100", slo_8b, every, flips),
            Setup("70b-h100", "llama-3.1-70b", "h100", slo_70b, reduced, reduced=True),
            Setup("8b-h200", "llama-3.1-8b", "h200", slo_8b, reduced, reduced=True)]


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # aggregated | static | oracle | adaptive
    prefill: int
    decode: int
    routing: str = "least-loaded"
    control: str = "none"
    slai: bool = False
    token_budget: int = DEFAULT_BUDGET


def adaptive_systems(n: int) -> list[System]:
    """The adaptive systems present in the registries (see module doc)."""
    from instance_manager.controller.registry import CONTROL_POLICIES
    from router.policy import POLICIES

    half = n // 2
    out = [System(name, "adaptive", half, n - half, routing, control, slai)
           for name, routing, control, slai in ADAPTIVE
           if routing in POLICIES and control in CONTROL_POLICIES]
    known = {a[2] for a in ADAPTIVE} | {"static"}
    for control in sorted(set(CONTROL_POLICIES) - known):
        out.append(System(control, "adaptive", half, n - half, "least-loaded", control))
    return out


def systems(n: int, with_oracle: bool, reduced: bool = False) -> list[System]:
    budgets = (BUDGETS[0], DEFAULT_BUDGET) if reduced else BUDGETS
    out = [System(f"agg@{b}", "aggregated", 0, n, token_budget=b) for b in budgets]
    out += [System(f"static-{p}P{n - p}D", "static", p, n - p) for p in range(1, n)]
    if with_oracle:
        out.append(System("oracle-schedule", "oracle", n // 2, n - n // 2))
    return out + [s for s in adaptive_systems(n) if not (reduced and s.slai)]


# ---- knobs ---------------------------------------------------------------------------------
def control_knobs(control: str, perf: PerfModel, slo: SLO, engine: EngineConfig) -> dict:
    """Hardware-describing knobs from the performance model (the same derivation `fulcrum sim`
    and `fulcrum up --control-profile` use), limited to the knobs the registered policy
    accepts; its reaction knobs stay at their defaults."""
    from instance_manager.controller.calibrate import derived_knobs
    from instance_manager.controller.registry import CONTROL_POLICIES

    if control not in CONTROL_POLICIES:
        return {}
    knobs = derived_knobs(control, perf, (slo.tpot_ms or 100.0) / 1000, engine.max_num_seqs)
    config_cls = CONTROL_POLICIES[control][1]
    accepted = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in knobs.items() if k in accepted}


# ---- rate grid -------------------------------------------------------------------------------
def capacity_estimate(perf: PerfModel, wl: Workload, workers: int, slo: SLO,
                      max_num_seqs: int = 1024) -> float:
    """Requests/s the cluster could finish if perfectly balanced (roughly): GPU-seconds
    per request from one-prompt prefill iterations and the largest decode batch whose
    step meets the TPOT target and fits in KV memory. Only centres the rate grid."""
    reqs = wl.sample()
    prompts = np.array([r.prompt_tokens for r in reqs], dtype=float)
    outputs = np.array([r.output_tokens for r in reqs], dtype=float)
    prefill = np.array([perf.iteration_time(int(p), p * p / 2, 0, 0.0) for p in prompts[:500]])
    ctx = float(np.mean(prompts + outputs / 2))
    tpot = (slo.tpot_ms or 100.0) / 1000
    batch = 1
    for b in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if b <= max_num_seqs and b * ctx <= perf.kv_capacity_tokens \
                and perf.iteration_time(0, 0.0, b, b * ctx) <= tpot:
            batch = b
    per_token = perf.iteration_time(0, 0.0, batch, batch * ctx) / batch
    cost = float(prefill.mean()) + float(outputs.mean()) * per_token
    return workers / cost


def rate_grid(capacity: float, points: int, lo: float = 0.3, hi: float = 2.0) -> list[float]:
    return [float(f"{r:.3g}") for r in np.geomspace(lo * capacity, hi * capacity, points)]


# ---- one task: one system, one seed, the whole grid ----------------------------------------------
_WORKLOADS: dict[bool, dict[str, Workload]] = {}


def _workload(name: str, quick: bool) -> Workload:
    if quick not in _WORKLOADS:
        _WORKLOADS[quick] = workloads(quick)
    return _WORKLOADS[quick][name]


KEEP = ("slo_attainment", "request_goodput", "completed", "failed", "median_ttft_ms",
        "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
        "p99_itl_ms", "ttft_slo_attainment", "tpot_slo_attainment", "tbt_slo_attainment",
        "p90_ttft_prefill_leg_ms", "p90_ttft_handoff_ms", "flips", "num_prompts")


@dataclass(frozen=True)
class Task:
    setup: Setup
    workload: str
    system: System
    seed: int
    flip: str
    rates: tuple[float, ...]
    quick: bool
    schedule: tuple[tuple[float, int], ...] = ()  # oracle only


def slai_ok(point: dict, slo: SLO) -> bool:
    ttft = point.get("median_ttft_ms")
    if ttft is None or ttft > 500:
        return False
    return slo.tbt_ms is None or (point.get("p99_itl_ms") or math.inf) <= slo.tbt_ms


def run_task(task: Task) -> dict:
    """Simulate one system on one seed over the rate grid (stops early once two rates in
    a row are far past capacity: attainment < 50% and the SLAI bound missed)."""
    cpu0 = time.process_time()
    setup, sysdef = task.setup, task.system
    perf = roofline(setup.model, setup.gpu)
    wl = _workload(task.workload, task.quick)
    flip = FLIP_COSTS[task.flip]
    engine = EngineConfig(token_budget=sysdef.token_budget,
                          slai=SLAIConfig() if sysdef.slai else None)
    points: list[dict] = []
    roles: dict[float, list] = {}
    bad = 0
    try:
        for rate in task.rates:
            cfg = SimConfig(prefill=sysdef.prefill, decode=sysdef.decode, engine=engine,
                            slo=setup.slo, flip_mode=flip.mode, flip_rewarm_s=flip.rewarm_s,
                            flip_rewarm_sigma=flip.sigma, flip_rewarm_max_s=flip.max_s,
                            seed=task.seed)
            if sysdef.kind == "oracle":
                control = OracleSchedule(task.schedule, lead_s=flip.rewarm_s)
            else:
                control = make_control(sysdef.control, control_knobs(
                    sysdef.control, perf, setup.slo, engine))
            res = Simulator(cfg, perf, make_routing(sysdef.routing), control).run(
                wl.make(rate, task.seed))
            m = res.metrics(setup.slo, (50, 90, 99), warmup_s=wl.warmup_s)
            point = {"request_rate": rate, **{k: m.get(k) for k in KEEP}}
            points.append(point)
            if len(res.roles) > 1:
                roles[rate] = res.roles
            if (point["slo_attainment"] or 0) < 0.5 and not slai_ok(point, setup.slo):
                bad += 1
                if bad >= 2:
                    break
            else:
                bad = 0
        error = None
    except Exception as exc:  # a policy under construction must not stop the whole run
        error = f"{exc!r}\n{traceback.format_exc(limit=4)}"
    best = max_rate(points)
    at = max((r for r in roles if r <= (best or 0)), default=None)
    return {"setup": setup.name, "workload": task.workload, "system": sysdef.name,
            "seed": task.seed, "flip": task.flip, "points": points, "error": error,
            "roles": roles.get(at) if at is not None else None,
            "cpu_s": round(time.process_time() - cpu0, 2)}


def max_rate(points: list[dict], target: float = TARGET) -> float:
    """Highest grid rate attaining `target`, interpolated toward the next grid rate."""
    best = 0.0
    for i, p in enumerate(points):
        a = p.get("slo_attainment") or 0.0
        if a < target:
            continue
        best = p["request_rate"]
        if i + 1 < len(points):
            nxt = points[i + 1]
            b = nxt.get("slo_attainment") or 0.0
            if b < target and a > b:
                best += (nxt["request_rate"] - best) * (a - target) / (a - b)
    return best


def slai_capacity(points: list[dict], slo: SLO) -> float:
    return max((p["request_rate"] for p in points if slai_ok(p, slo)), default=0.0)


def peak_goodput(points: list[dict]) -> float:
    return max((p.get("request_goodput") or 0.0 for p in points), default=0.0)


# ---- the oracle's schedule -----------------------------------------------------------------------
def phase_best_split(args: tuple[Setup, str, float, int, bool]) -> dict[str, int]:
    """For one grid rate and each phase pool: the split that serves that phase alone best
    (attainment; among near-ties the split closest to the half split, so the oracle does
    not pay flips for nothing; then the lower of p90 TTFT and p90 TPOT relative to SLO)."""
    from benchmarks.arrivals import Phase, phase_mix

    setup, wname, rate, seed, quick = args
    wl = _workload(wname, quick)
    perf = roofline(setup.model, setup.gpu)
    n = setup.workers
    phase_s = wl.schedule[1][0] - wl.schedule[0][0]
    out: dict[str, int] = {}
    if True:
        for pool_name, pool in wl.pools.items():
            trace = phase_mix([Phase(phase_s, rate, pool)], seed=seed)
            scored = []
            for p in range(1, n):
                res = Simulator(SimConfig(prefill=p, decode=n - p, slo=setup.slo), perf,
                                make_routing("least-loaded")).run(trace)
                m = res.metrics(setup.slo, (90,), warmup_s=min(10.0, phase_s / 3))
                slack = max((m["p90_ttft_ms"] or 0) / (setup.slo.ttft_ms or 1000),
                            (m["p90_tpot_ms"] or 0) / (setup.slo.tpot_ms or 100))
                scored.append(((m["slo_attainment"] or 0.0), -slack, p))
            # among splits within 1% of the best attainment, the one nearest the half
            # split (fewest flips), then the most slack
            top = max(a for a, _, _ in scored)
            near = [(-abs(p - n // 2), slack, p) for a, slack, p in scored if a >= top - 0.01]
            out[pool_name] = max(near)[2]
    return out


# ---- the whole run ---------------------------------------------------------------------
def plan(quick: bool, seeds: Sequence[int], calib_seed: int, grid_points: int,
         only_setups: Sequence[str] | None = None, pool=None,
         only_workloads: Sequence[str] | None = None,
         only_systems: Sequence[str] | None = None,
         only_flips: Sequence[str] | None = None) -> tuple[list[Task], dict]:
    """Every task of the comparison, and per (setup, workload) its rate grid; the
    oracle's per-phase splits are measured here (on `pool` when given). `only_systems`
    keeps those systems' tasks; the grids depend only on setup and trace, so runs of
    different systems merge point for point (`merge_raw`)."""
    tasks: list[Task] = []
    grids: dict = {}
    chosen = [s for s in setups(quick) if not only_setups or s.name in only_setups]
    if only_workloads:
        chosen = [dataclasses.replace(s, workloads=tuple(w for w in s.workloads
                                                         if w in only_workloads))
                  for s in chosen]
    for setup in chosen:
        perf = roofline(setup.model, setup.gpu)
        points = max(5, grid_points * 2 // 3) if setup.reduced else grid_points
        for wname in setup.workloads:
            wl = _workload(wname, quick)
            grids[(setup.name, wname)] = tuple(rate_grid(
                capacity_estimate(perf, wl, setup.workers, setup.slo), points))
    wanted = None if not only_systems else set(only_systems)
    if wanted is not None:
        known = {s.name for setup in chosen for s in systems(setup.workers, True, setup.reduced)}
        if wanted - known:
            raise ValueError(f"unknown systems {sorted(wanted - known)}; known: {sorted(known)}")
    jobs = [(setup, wname, r, calib_seed, quick) for setup in chosen
            for wname in setup.workloads if _workload(wname, quick).schedule
            for r in grids[(setup.name, wname)]] \
        if wanted is None or "oracle-schedule" in wanted else []
    splits = list((pool.map if pool is not None else map)(phase_best_split, jobs))
    best = {(j[0].name, j[1], j[2]): b for j, b in zip(jobs, splits, strict=True)}
    for setup in chosen:
        for wname in setup.workloads:
            wl = _workload(wname, quick)
            rates = grids[(setup.name, wname)]
            with_oracle = bool(wl.schedule)
            schedule_by_rate: dict[float, tuple] = {}
            if with_oracle and jobs:
                for r in rates:
                    schedule_by_rate[r] = tuple((t, best[(setup.name, wname, r)][p])
                                                for t, p in wl.schedule)
            for sysdef in systems(setup.workers, with_oracle, setup.reduced):
                if wanted is not None and sysdef.name not in wanted:
                    continue
                flips = ("live",)
                if sysdef.kind == "oracle" or sysdef.name in FLIP_VARIANT_SYSTEMS:
                    flips += setup.flip_variants.get(wname, ())
                if only_flips:
                    flips = tuple(f for f in flips if f in only_flips)
                run_seeds = list(seeds) + ([calib_seed] if sysdef.kind == "static" else [])
                for flip in flips:
                    for seed in run_seeds:
                        if sysdef.kind == "oracle":  # one schedule per rate: one task each
                            for r in rates:
                                tasks.append(Task(setup, wname, sysdef, seed, flip, (r,),
                                                  quick, schedule_by_rate[r]))
                        else:
                            tasks.append(Task(setup, wname, sysdef, seed, flip, rates, quick))
    return tasks, grids


def _merge_oracle(results: list[dict]) -> list[dict]:
    """Oracle tasks ran one rate each: join them back into one grid per seed."""
    out, joined = [], {}
    for r in results:
        if r["system"] != "oracle-schedule":
            out.append(r)
            continue
        key = (r["setup"], r["workload"], r["seed"], r["flip"])
        if key not in joined:
            joined[key] = {**r, "points": [], "cpu_s": 0.0, "roles": None}
            out.append(joined[key])
        j = joined[key]
        j["points"] += r["points"]
        j["cpu_s"] = round(j["cpu_s"] + r["cpu_s"], 2)
        j["error"] = j["error"] or r["error"]
        if r["roles"]:
            j["roles"] = r["roles"]
    for j in joined.values():
        j["points"].sort(key=lambda p: p["request_rate"])
    return out


def summarize(results: list[dict], setups_by_name: dict[str, Setup], seeds: Sequence[int],
              calib_seed: int) -> dict:
    """Per (setup, workload, flip): each system's metrics per seed, the baselines, ratios."""
    table: dict = {}
    for r in results:
        table.setdefault((r["setup"], r["workload"], r["flip"]), {}) \
            .setdefault(r["system"], {})[r["seed"]] = r
    out: dict = {}
    for (sname, wname, flip), per_sys in sorted(table.items()):
        if flip != "live":
            continue  # flip variants are summarised beside their live run below
        slo = setups_by_name[sname].slo
        out.setdefault(sname, {})[wname] = _summarize_one(
            per_sys, slo, seeds, calib_seed,
            {f: table[(sname, wname, f)] for (s2, w2, f) in table
             if s2 == sname and w2 == wname and f != "live"})
    return out


def _metrics_of(points: list[dict], slo: SLO, op_rate: float | None) -> dict:
    at = next((p for p in points if p["request_rate"] == op_rate), None)
    return {"max_rate": round(max_rate(points), 3), "peak_goodput": round(peak_goodput(points), 3),
            "slai_capacity": slai_capacity(points, slo),
            "p90_ttft_ms_at_op": at.get("p90_ttft_ms") if at else None,
            "p90_tpot_ms_at_op": at.get("p90_tpot_ms") if at else None,
            "p99_tpot_ms_at_op": at.get("p99_tpot_ms") if at else None}


HIGHER = ("max_rate", "peak_goodput", "slai_capacity")
LOWER = ("p90_ttft_ms_at_op", "p90_tpot_ms_at_op", "p99_tpot_ms_at_op")


def _spread(values: list[float]) -> dict:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": round(float(np.mean(v)), 3), "min": round(float(min(v)), 3),
            "max": round(float(max(v)), 3), "std": round(float(np.std(v)), 3), "n": len(v)}


def _summarize_one(per_sys: dict, slo: SLO, seeds: Sequence[int], calib_seed: int,
                   variants: dict) -> dict:
    half = next((s for s in per_sys if s.startswith("static-")
                 and _is_half(s)), None)
    # common operating point: highest grid rate the half split attains on every seed
    op_rate = None
    if half:
        rates = sorted({p["request_rate"] for seed in seeds if seed in per_sys[half]
                        for p in per_sys[half][seed]["points"]})
        ok = [r for r in rates if all(
            any(p["request_rate"] == r and (p["slo_attainment"] or 0) >= TARGET
                for p in per_sys[half][seed]["points"])
            for seed in seeds if seed in per_sys[half])]
        op_rate = max(ok) if ok else (rates[0] if rates else None)
    metrics = {name: {seed: _metrics_of(runs[seed]["points"], slo, op_rate)
                      for seed in runs} for name, runs in per_sys.items()}

    def mean_of(name: str, key: str = "max_rate") -> float:
        vals = [metrics[name][s][key] for s in seeds if s in metrics.get(name, {})]
        return float(np.mean(vals)) if vals else -1.0

    statics = [n for n in per_sys if n.startswith("static-")]
    aggs = [n for n in per_sys if n.startswith("agg@")]
    baselines = {"agg-default": f"agg@{DEFAULT_BUDGET}" if f"agg@{DEFAULT_BUDGET}" in per_sys
                 else None,
                 "agg-best": max(aggs, key=mean_of) if aggs else None,
                 "static-half": half,
                 "static-calibrated": max(statics, key=lambda n: metrics[n].get(
                     calib_seed, {}).get("max_rate", -1)) if statics else None,
                 "static-best": max(statics, key=mean_of) if statics else None,
                 "oracle": "oracle-schedule" if "oracle-schedule" in per_sys else None}
    systems_out: dict = {}
    for name in per_sys:
        entry: dict = {"per_seed": {str(s): metrics[name][s] for s in seeds
                                    if s in metrics[name]},
                       "errors": [per_sys[name][s]["error"] for s in per_sys[name]
                                  if per_sys[name][s]["error"]],
                       "cpu_s": round(sum(per_sys[name][s]["cpu_s"] for s in per_sys[name]), 1)}
        for key in HIGHER + LOWER:
            entry[key] = _spread([metrics[name][s][key] for s in seeds if s in metrics[name]])
        ratios: dict = {}
        for bname, bsys in baselines.items():
            if bsys is None or bsys == name:
                continue
            ratios[bname] = {key: _spread([_ratio(metrics[name][s][key], metrics[bsys][s][key])
                                           for s in seeds if s in metrics[name]
                                           and s in metrics[bsys]])
                             for key in HIGHER + LOWER}
        entry["ratios"] = ratios
        entry["points"] = {str(s): per_sys[name][s]["points"] for s in per_sys[name]}
        entry["roles"] = next((per_sys[name][s]["roles"] for s in seeds
                               if s in per_sys[name] and per_sys[name][s]["roles"]), None)
        systems_out[name] = entry
    flip_out: dict = {}
    for flip, runs in variants.items():
        flip_out[flip] = {}
        for name, by_seed in runs.items():
            ms = {s: _metrics_of(by_seed[s]["points"], slo, op_rate) for s in by_seed}
            flip_out[flip][name] = {"max_rate": _spread([ms[s]["max_rate"] for s in seeds
                                                         if s in ms]),
                                    "ratios": {b: _spread([_ratio(ms[s]["max_rate"],
                                                                  metrics[bs][s]["max_rate"])
                                                           for s in seeds if s in ms
                                                           and s in metrics.get(bs, {})])
                                               for b, bs in baselines.items()
                                               if bs and bs != "oracle-schedule"},
                                    "errors": [by_seed[s]["error"] for s in by_seed
                                               if by_seed[s]["error"]]}
    return {"baselines": baselines, "operating_point_rate": op_rate,
            "systems": systems_out, "flip_variants": flip_out}


def _is_half(name: str) -> bool:
    p, d = name.removeprefix("static-").rstrip("D").split("P")
    return int(p) == int(d) or int(p) == int(d) - 1


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def run(out_dir: Path, quick: bool = False, seeds: Sequence[int] = (0, 1, 2),
        calib_seed: int = 100, grid_points: int = 12, processes: int = 2,
        only_setups: Sequence[str] | None = None,
        only_workloads: Sequence[str] | None = None,
        only_systems: Sequence[str] | None = None,
        only_flips: Sequence[str] | None = None) -> dict:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / ("sim_comparison_raw_quick.json" if quick else "sim_comparison_raw.json")
    results: list[dict] = []

    def save() -> None:  # also every 20 tasks: a run cut short can still be summarised
        raw.write_text(json.dumps({"results": _merge_oracle(results),
                                   "grids": {f"{k[0]}/{k[1]}": list(v)
                                             for k, v in grids.items()},
                                   "wall_s": round(time.perf_counter() - wall0, 1)},
                                  default=str))

    if processes > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(processes, 2)) as pool:
            tasks, grids = plan(quick, seeds, calib_seed, grid_points, only_setups, pool,
                                only_workloads, only_systems, only_flips)
            print(f"{len(tasks)} tasks", file=sys.stderr, flush=True)
            for i, r in enumerate(pool.imap_unordered(run_task, tasks, chunksize=1)):
                results.append(r)
                _progress(i, len(tasks), r)
                if i % 20 == 19:
                    save()
    else:
        tasks, grids = plan(quick, seeds, calib_seed, grid_points, only_setups, None,
                            only_workloads, only_systems, only_flips)
        for i, t in enumerate(tasks):
            results.append(run_task(t))
            _progress(i, len(tasks), results[-1])
            if i % 20 == 19:
                save()
    save()
    return finish(out_dir, _merge_oracle(results), grids, quick, seeds, calib_seed, wall0,
                  cpu0)


def task_key(result: dict) -> tuple:
    """What identifies one task's result across runs."""
    return (result["setup"], result["workload"], result["system"], result["seed"],
            result["flip"])


def merge_raw(raws: Sequence[dict]) -> dict:
    """Raw result files combined: per task key the later file's result wins; grids are
    united (a trace whose grid differs between files is an error: its points would not
    pair up)."""
    results: dict[tuple, dict] = {}
    grids: dict[str, list] = {}
    wall = 0.0
    for raw in raws:
        for key, grid in raw.get("grids", {}).items():
            if key in grids and [float(r) for r in grids[key]] != [float(r) for r in grid]:
                raise ValueError(f"rate grids differ for {key}: {grids[key]} vs {grid}")
            grids[key] = grid
        for r in _merge_oracle(raw["results"]):
            results[task_key(r)] = r
        wall += raw.get("wall_s", 0.0)
    return {"results": list(results.values()), "grids": grids, "wall_s": round(wall, 1)}


def finish(out_dir: Path, results: list[dict], grids: dict, quick: bool, seeds: Sequence[int],
           calib_seed: int, wall0: float, cpu0: float) -> dict:
    """Summaries, JSON and plots from the raw per-task results."""
    by_name = {s.name: s for s in setups(quick)}
    summary = summarize(results, by_name, seeds, calib_seed)
    out = {"description": (__doc__ or "").strip().splitlines()[0],
           "command": " ".join(["python -m benchmarks.sim.compare", *sys.argv[1:]]),
           "quick": quick, "seeds": list(seeds), "calibration_seed": calib_seed,
           "target_attainment": TARGET,
           "flip_costs": {k: dataclasses.asdict(v) for k, v in FLIP_COSTS.items()},
           "setups": {s.name: {"model": s.model, "gpu": s.gpu, "slo": s.slo.as_dict(),
                               "workers": s.workers, "workloads": list(s.workloads),
                               "flip_variants": s.flip_variants,
                               "perf": roofline(s.model, s.gpu).describe()}
                      for s in by_name.values() if s.name in summary},
           "workloads": {w.name: w.description for w in workloads(quick).values()},
           "rate_grids": {(k if isinstance(k, str) else f"{k[0]}/{k[1]}"): list(v)
                          for k, v in grids.items()},
           "results": summary,
           "wall_s": round(time.perf_counter() - wall0, 1),
           "main_cpu_s": round(time.process_time() - cpu0, 1),
           "task_cpu_s": round(sum(r["cpu_s"] for r in results), 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "sim_comparison_quick.json" if quick else "sim_comparison.json"
    (out_dir / name).write_text(json.dumps(out, indent=1, default=str))
    plot(out, out_dir)
    return out


def _progress(i: int, n: int, r: dict) -> None:
    best = max_rate(r["points"])
    print(f"[{i + 1}/{n}] {r['setup']} {r['workload']:<16} {r['system']:<16} seed {r['seed']} "
          f"flip {r['flip']:<5} max {best:.1f} ({r['cpu_s']} cpu-s)"
          f"{' ERROR ' + r['error'].splitlines()[0] if r['error'] else ''}",
          file=sys.stderr, flush=True)


# ---- output ----------------------------------------------------------------------------
MARKERS = "os^vD<>pPXh*d8H"


def plot(out: dict, out_dir: Path) -> None:
    """Per (setup, workload): attainment and goodput vs rate (mean over seeds), one colour
    and one marker per series; the roles over time of the flipping systems."""
    from benchmarks.plots import _pyplot

    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    for sname, per_wl in out["results"].items():
        slo = out["setups"][sname]["slo"]
        slo_text = ", ".join(f"{k} {v:g} ms" for k, v in slo.items())
        for wname, summ in per_wl.items():
            shown = _shown_systems(summ)
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
            for i, name in enumerate(shown):
                pts = _mean_curve(summ["systems"][name]["points"])
                if not pts:
                    continue
                rates = [r for r, _, _ in pts]
                style = {"color": cmap(i % 20), "marker": MARKERS[i % len(MARKERS)],
                         "label": name, "ms": 4, "lw": 1.2}
                ax1.plot(rates, [a for _, a, _ in pts], **style)
                ax2.plot(rates, [g for _, _, g in pts], **style)
            ax1.axhline(TARGET, color="grey", ls="--", lw=1)
            ax1.set_ylabel("SLO attainment (mean over seeds)")
            ax2.set_ylabel("goodput (req/s)")
            for ax in (ax1, ax2):
                ax.set_xscale("log")
                ax.set_xlabel("request rate (req/s)")
                ax.grid(alpha=0.3)
            ax2.legend(fontsize=7, ncol=2)
            fig.suptitle(f"{sname}, trace {wname}: {out['workloads'].get(wname, '')}\n"
                         f"SLO {slo_text}; flips at the live distribution", fontsize=9)
            fig.tight_layout()
            fig.savefig(out_dir / f"sim_{sname}_{wname}_attainment.png", dpi=100)
            plt.close(fig)
            roles = {n: summ["systems"][n]["roles"] for n in shown
                     if summ["systems"][n].get("roles")}
            if roles:
                fig, ax = plt.subplots(figsize=(10, 3.6))
                for i, (name, series) in enumerate(roles.items()):
                    ax.step([p[0] for p in series], [p[1] for p in series], where="post",
                            color=cmap(i % 20), marker=MARKERS[i % len(MARKERS)],
                            markevery=max(1, len(series) // 12), ms=4, label=name)
                ax.set_xlabel("time (s)")
                ax.set_ylabel("prefill workers")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
                ax.set_title(f"{sname}, trace {wname}: prefill workers at each system's max "
                             f"rate (SLO {slo_text})", fontsize=9)
                fig.tight_layout()
                fig.savefig(out_dir / f"sim_{sname}_{wname}_roles.png", dpi=100)
                plt.close(fig)


def _shown_systems(summ: dict) -> list[str]:
    base = {v for v in summ["baselines"].values() if v}
    return [n for n in summ["systems"] if n in base or not n.startswith(("static-", "agg@"))]


def _mean_curve(points_by_seed: dict) -> list[tuple[float, float, float]]:
    by_rate: dict[float, list] = {}
    for pts in points_by_seed.values():
        for p in pts:
            by_rate.setdefault(p["request_rate"], []).append(p)
    return [(r, float(np.mean([p["slo_attainment"] or 0 for p in ps])),
             float(np.mean([p["request_goodput"] or 0 for p in ps])))
            for r, ps in sorted(by_rate.items())]


def table(out: dict, setup: str | None = None) -> str:
    """Markdown: per workload, max rate at >= 90% attainment (mean [min-max] over seeds)
    of each baseline and adaptive system, and the best adaptive system's ratios."""
    lines = []
    for sname, per_wl in out["results"].items():
        if setup and sname != setup:
            continue
        slo = out["setups"][sname]["slo"]
        lines.append(f"\n**{sname}** (SLO: " + ", ".join(f"{k} {v:g} ms" for k, v in slo.items())
                     + "; max req/s at >= 90% attainment, mean [min-max] over seeds; "
                       "flips at the live distribution)\n")
        lines.append("| trace | agg default | agg best | half split | calibrated split | "
                     "best split | oracle | best adaptive | vs agg best | vs half | "
                     "vs best split | vs oracle |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for wname, summ in per_wl.items():
            b = summ["baselines"]
            sysd = summ["systems"]

            def cell(name: str | None, sysd: dict = sysd) -> str:
                if not name or name not in sysd:
                    return "-"
                s = sysd[name]["max_rate"]
                if s["mean"] is None:
                    return "-"
                return f"{s['mean']:.1f} [{s['min']:.1f}-{s['max']:.1f}] ({name})"

            adaptive = [n for n in sysd if not n.startswith(("static-", "agg@", "oracle"))]
            best = max(adaptive, key=lambda n: sysd[n]["max_rate"]["mean"] or -1, default=None)

            def ratio(base: str, best: str | None = best, sysd: dict = sysd) -> str:
                if not best or base not in sysd[best]["ratios"]:
                    return "-"
                r = sysd[best]["ratios"][base]["max_rate"]
                return "-" if r["mean"] is None else \
                    f"{r['mean']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"

            lines.append(f"| {wname} | {cell(b['agg-default'])} | {cell(b['agg-best'])} | "
                         f"{cell(b['static-half'])} | {cell(b['static-calibrated'])} | "
                         f"{cell(b['static-best'])} | {cell(b['oracle'])} | {cell(best)} | "
                         f"{ratio('agg-best')} | {ratio('static-half')} | "
                         f"{ratio('static-best')} | {ratio('oracle')} |")
    return "\n".join(lines)


def adaptive_table(out: dict, setup: str, workload: str) -> str:
    """Every adaptive system on one trace: each paper's metric and its ratios."""
    summ = out["results"][setup][workload]
    lines = [f"| system ({setup}, {workload}) | max rate | vs agg best | vs half | "
             "vs calibrated | vs best split | vs oracle | peak goodput | SLAI capacity | "
             "P90 TTFT ms @op | P90 TPOT ms @op | P99 TPOT ms @op |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summ["systems"].items():
        if name.startswith(("static-", "agg@")) and name not in summ["baselines"].values():
            continue

        def rr(base: str, s: dict = s) -> str:
            r = s["ratios"].get(base, {}).get("max_rate", {})
            return "-" if not r or r.get("mean") is None else f"{r['mean']:.2f}"

        def mv(key: str, s: dict = s) -> str:
            v = s[key]["mean"]
            return "-" if v is None else f"{v:.1f}"

        lo, hi = s["max_rate"]["min"], s["max_rate"]["max"]
        spread = "" if lo is None else f" [{lo:.1f}-{hi:.1f}]"
        lines.append(f"| {name} | {mv('max_rate')}{spread} | {rr('agg-best')} | "
                     f"{rr('static-half')} | "
                     f"{rr('static-calibrated')} | {rr('static-best')} | {rr('oracle')} | "
                     f"{mv('peak_goodput')} | {mv('slai_capacity')} | "
                     f"{mv('p90_ttft_ms_at_op')} | {mv('p90_tpot_ms_at_op')} | "
                     f"{mv('p99_tpot_ms_at_op')} |")
    return "\n".join(lines)


def flip_table(out: dict, setup: str, workload: str) -> str:
    """Max rate at each flip cost (mean [min-max] over seeds) for the systems run at all."""
    summ = out["results"][setup][workload]
    variants = summ["flip_variants"]
    if not variants:
        return ""
    costs = ["live", *variants]
    names = sorted({n for v in variants.values() for n in v})
    lines = [f"| system ({setup}, {workload}) | " + " | ".join(f"flips {c}" for c in costs)
             + " |", "|---|" + "---|" * len(costs)]
    for name in names:
        cells = []
        for c in costs:
            m = summ["systems"][name]["max_rate"] if c == "live" else \
                variants[c].get(name, {}).get("max_rate", {})
            cells.append("-" if not m or m.get("mean") is None else
                         f"{m['mean']:.1f} [{m['min']:.1f}-{m['max']:.1f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="short traces, small grid (tests)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick 0,1)")
    parser.add_argument("--calibration-seed", type=int, default=100)
    parser.add_argument("--grid-points", type=int, default=None,
                        help="rates per grid (default 12; quick 5)")
    parser.add_argument("--processes", type=int, default=2, help="at most 2")
    parser.add_argument("--setups", default=None, help="comma-separated setup names")
    parser.add_argument("--workloads", default=None, help="comma-separated trace names")
    parser.add_argument("--systems", default=None,
                        help="comma-separated system names: run only these (e.g. arrow,dopd)")
    parser.add_argument("--flips", default=None,
                        help="comma-separated flip costs to run (default: live plus each "
                             "trace's variants; e.g. live)")
    parser.add_argument("--from-raw", type=Path, default=None,
                        help="re-summarise a sim_comparison_raw*.json instead of simulating")
    parser.add_argument("--merge-raw", type=Path, nargs="+", default=None, metavar="FILE",
                        help="combine raw files (a later file wins per task) and summarise "
                             "them as --from-raw does; the merged raw goes to --out too")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else \
        ([0, 1] if args.quick else [0, 1, 2])
    points = args.grid_points or (5 if args.quick else 12)
    if args.from_raw or args.merge_raw:
        if args.merge_raw:
            raw = merge_raw([json.loads(f.read_text()) for f in args.merge_raw])
            args.out.mkdir(parents=True, exist_ok=True)
            name = "sim_comparison_raw_quick.json" if args.quick else "sim_comparison_raw.json"
            if any(f.resolve() == (args.out / name).resolve() for f in args.merge_raw):
                name = name.replace("_raw", "_raw_merged")
            (args.out / name).write_text(json.dumps(raw, default=str))
        else:
            raw = json.loads(args.from_raw.read_text())
        if args.workloads:  # e.g. only the traces a run cut short had finished
            keep = args.workloads.split(",")
            raw["results"] = [r for r in raw["results"] if r["workload"] in keep]
            raw["grids"] = {k: v for k, v in raw["grids"].items()
                            if k.split("/")[1] in keep}
        out = finish(args.out, raw["results"], raw["grids"], args.quick, seeds,
                     args.calibration_seed, time.perf_counter() - raw.get("wall_s", 0.0),
                     time.process_time())
    else:
        out = run(args.out, args.quick, seeds, args.calibration_seed, points,
                  min(2, max(1, args.processes)),
                  args.setups.split(",") if args.setups else None,
                  args.workloads.split(",") if args.workloads else None,
                  args.systems.split(",") if args.systems else None,
                  args.flips.split(",") if args.flips else None)
    print(table(out))
    for sname, per_wl in out["results"].items():
        for wname in per_wl:
            print("\n" + adaptive_table(out, sname, wname))
            print("\n" + flip_table(out, sname, wname))
    print(f"\nwall {out['wall_s']} s, task cpu {out['task_cpu_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
