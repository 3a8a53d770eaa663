"""Fingerprints of deterministic simulator runs, to prove a speed-up changed no result.

Each case simulates a fixed trace (ShareGPT or the phase-shift mix, fixed seeds) on one
system: aggregated, static P/D, arrow, dopd, ares, with per-token SLO accounting, flip
re-warm draws, drain flips, SLAI admission and ARES migrations among them. A case's
fingerprint is its summary metrics (every number `SimResult.metrics` reports except the
simulator's own CPU and wall time and event count) plus SHA-256 digests of the per-request
arrays, the gap log and the flip, role and migration histories, all compared for exact
equality (summary floats to 1e-12 relative: numpy's reductions round differently across
versions).

    python -m benchmarks.sim.identity --write tests/data/sim_identity.json   # record
    python -m benchmarks.sim.identity --check tests/data/sim_identity.json   # compare

The file runs on its own too (`runpy`) against another checkout on PYTHONPATH, which is how
the recorded fingerprints were taken from the code before the speed work (main at 6fe11dc):

    git archive REV | tar -x -C /tmp/ref && cd /tmp/ref && PYTHONPATH=/tmp/ref python -c \
      "import runpy, sys; sys.argv = ['x', '--write', '$OLDPWD/tests/data/sim_identity.json'];
       runpy.run_path('$OLDPWD/benchmarks/sim/identity.py', run_name='__main__')"

A deliberate change of simulated behaviour (a policy's decisions, the engine model) is
re-recorded the same way from the code that made it, so the check keeps saying that later
speed work changed nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.metrics import SLO
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import roofline
from benchmarks.sim.policies import make_control, make_routing
from benchmarks.sim.simulator import SimConfig, SimResult, Simulator
from benchmarks.sim_speed import make_trace

# what differs between two runs of the same simulation: the simulator's own cost
VOLATILE = ("sim_wall_s", "sim_cpu_s", "sim_requests_per_cpu_s", "sim_events")
SLO_8B = SLO(ttft_ms=1000, tpot_ms=40, tbt_ms=50)


@dataclass(frozen=True)
class Case:
    name: str
    prefill: int
    decode: int
    routing: str
    control: str
    trace: str  # "sharegpt" or "phase-shift"
    rate: float
    flip_mode: str = "relabel"
    rewarm_s: float = 0.0
    rewarm_sigma: float = 0.0
    slai: bool = False


CASES = (
    Case("aggregated-sharegpt", 0, 8, "least-loaded", "none", "sharegpt", 60.0),
    Case("aggregated-phase", 0, 8, "least-loaded", "none", "phase-shift", 15.0),
    Case("static-sharegpt", 4, 4, "least-loaded", "none", "sharegpt", 60.0),
    Case("static-phase-slai", 4, 4, "least-loaded", "none", "phase-shift", 15.0, slai=True),
    Case("arrow-sharegpt", 4, 4, "arrow", "arrow", "sharegpt", 60.0, rewarm_s=2.0,
         rewarm_sigma=0.5),
    Case("arrow-phase", 4, 4, "arrow", "arrow", "phase-shift", 15.0, rewarm_s=2.0),
    Case("dopd-sharegpt", 4, 4, "dopd-match", "dopd", "sharegpt", 60.0, flip_mode="drain",
         rewarm_s=1.0),
    Case("dopd-phase", 4, 4, "dopd-match", "dopd", "phase-shift", 15.0, rewarm_s=2.0),
    Case("ares-sharegpt", 4, 4, "ares", "dopd", "sharegpt", 60.0, rewarm_s=2.0),
    Case("ares-phase-slai", 4, 4, "ares", "dopd", "phase-shift", 15.0, rewarm_s=2.0,
         slai=True),
)


def _digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=float)).tobytes())
    return h.hexdigest()[:24]


def _history_digest(rows: Sequence[tuple]) -> str:
    return hashlib.sha256(repr(list(rows)).encode()).hexdigest()[:24]


def fingerprint(res: SimResult, slo: SLO) -> dict:
    """Summary metrics plus digests of everything per request; equal iff results are."""
    metrics = {k: v for k, v in sorted(res.metrics(slo).items()) if k not in VOLATILE}
    log = res.gap_log if res.gap_log is not None else np.zeros((0, 3))
    log = log[np.lexsort(log.T[::-1])] if log.size else log  # row order is not a result
    return {
        "metrics": metrics,
        "requests": _digest(res.arrival, res.first_token, res.finish, res.prefill_done,
                            res.prompt_tokens, res.output_tokens, res.failed,
                            res.finish_count, res.slow_gaps),
        "gap_log": _digest(log),
        "gap_rows": int(log.shape[0]),
        "flips": _history_digest(res.flips),
        "roles": _history_digest(res.roles),
        "migrations": _history_digest(res.migrations),
        "busy_s": _history_digest(sorted(res.busy_s.items())),
        "worker_seconds": res.worker_seconds,
    }


def run_case(case: Case, n: int) -> SimResult:
    cfg = SimConfig(prefill=case.prefill, decode=case.decode, slo=SLO_8B,
                    flip_mode=case.flip_mode, flip_rewarm_s=case.rewarm_s,
                    flip_rewarm_sigma=case.rewarm_sigma, seed=1,
                    engine=EngineConfig(slai=_slai() if case.slai else None))
    sim = Simulator(cfg, roofline("llama-3.1-8b", "h100"), make_routing(case.routing),
                    make_control(case.control))
    return sim.run(make_trace(case.trace, n, case.rate))


def _slai() -> Any:
    from instance_manager.engine_plugins.slai_policy import SLAIConfig

    return SLAIConfig()


def fingerprints(n: int, only: Sequence[str] | None = None) -> dict[str, dict]:
    return {c.name: fingerprint(run_case(c, n), SLO_8B) for c in CASES
            if only is None or c.name in only}


def _same(a: Any, b: Any) -> bool:
    """Equal, both NaN, or floats a few ULPs apart: numpy's reductions (mean, std) sum in an
    order that varies with its version and SIMD path, so a summary statistic may differ in
    its last bits while every per-request array (compared by digest) is identical."""
    if isinstance(a, float) and isinstance(b, float):
        return (a != a and b != b) or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable mismatches between two fingerprint sets (empty: identical)."""
    out = []
    for name, exp in expected.items():
        got = actual.get(name)
        if got is None:
            out.append(f"{name}: not run")
            continue
        for key, value in exp.items():
            if key == "metrics":
                for m, v in value.items():
                    if not _same(got["metrics"].get(m, "missing"), v):
                        out.append(f"{name}: {m} {v!r} -> {got['metrics'].get(m, 'missing')!r}")
            elif got.get(key) != value:
                out.append(f"{name}: {key} {value!r} -> {got.get(key)!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.identity",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record fingerprints into this file")
    mode.add_argument("--check", type=Path, help="compare with fingerprints in this file")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests per case (default: the file's, or 3000 to write)")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    if args.write:
        n = args.num_requests or 3000
        data = {"num_requests": n, "cases": fingerprints(n, only)}
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return 0
    data = json.loads(args.check.read_text())
    n = args.num_requests or data["num_requests"]
    expected = {k: v for k, v in data["cases"].items() if only is None or k in only}
    diff = differences(expected, fingerprints(n, list(expected)))
    for line in diff:
        print(line, file=sys.stderr)
    print(f"{len(expected)} cases, {n} requests each: "
          f"{'identical' if not diff else f'{len(diff)} differences'}", file=sys.stderr)
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
