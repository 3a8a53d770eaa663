"""Look inside one comparison run: one system, one trace, one rate, one seed.

Prints the SLO attainment per time slice (by arrival), the split over time and, for a
control policy that leaves notes (`last_note`), the note at each decision that moved
workers plus a sample of the held ones. The systems, traces and knobs are
`benchmarks.sim.compare`'s, so what this shows is what the comparison measured.

    python -m benchmarks.sim.diagnose --system dopd --workload phase-1400 --rate 47
    python -m benchmarks.sim.diagnose --system oracle-schedule --rate 47 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.sim import compare
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.oracle import OracleSchedule
from benchmarks.sim.perf import roofline
from benchmarks.sim.policies import make_control, make_routing
from benchmarks.sim.simulator import SimConfig, SimResult, Simulator


class NoteLog:
    """Wraps a control policy: records (time, actions, note summary, numbers) per tick."""

    def __init__(self, policy) -> None:
        self.policy, self.name = policy, policy.name
        self.ticks: list[dict] = []

    def decide(self, snapshot):
        actions = self.policy.decide(snapshot)
        note = getattr(self.policy, "last_note", None)
        self.ticks.append({"t": round(snapshot.time, 1), "moved": len(actions),
                           "to": actions[0].to.value if actions else None,
                           "note": note.summary if note else "",
                           "numbers": dict(note.numbers) if note else {}})
        return actions


def find_system(setup: compare.Setup, name: str, with_oracle: bool) -> compare.System:
    for s in compare.systems(setup.workers, with_oracle, setup.reduced):
        if s.name == name:
            return s
    raise SystemExit(f"no system {name!r} in setup {setup.name}")


def oracle_schedule(setup: compare.Setup, wname: str, rate: float, calib_seed: int,
                    quick: bool) -> tuple[tuple[float, int], ...]:
    wl = compare._workload(wname, quick)
    best = compare.phase_best_split((setup, wname, rate, calib_seed, quick))
    return tuple((t, best[p]) for t, p in wl.schedule)


def run_one(setup: compare.Setup, wname: str, sysdef: compare.System, rate: float, seed: int,
            flip: str = "live", quick: bool = False, calib_seed: int = 100,
            knobs: dict | None = None) -> tuple[SimResult, NoteLog | None, dict]:
    """Simulate exactly as `compare.run_task` does for one rate; returns the result, the
    note log of the control policy (None without one) and the comparison's metrics."""
    perf = roofline(setup.model, setup.gpu)
    wl = compare._workload(wname, quick)
    cost = compare.FLIP_COSTS[flip]
    engine = EngineConfig(token_budget=sysdef.token_budget,
                          slai=compare.SLAIConfig() if sysdef.slai else None)
    cfg = SimConfig(prefill=sysdef.prefill, decode=sysdef.decode, engine=engine, slo=setup.slo,
                    flip_mode=cost.mode, flip_rewarm_s=cost.rewarm_s,
                    flip_rewarm_sigma=cost.sigma, flip_rewarm_max_s=cost.max_s, seed=seed)
    if sysdef.kind == "oracle":
        control = OracleSchedule(oracle_schedule(setup, wname, rate, calib_seed, quick),
                                 lead_s=cost.rewarm_s)
    else:
        base = compare.control_knobs(sysdef.control, perf, setup.slo, engine)
        control = make_control(sysdef.control, {**base, **(knobs or {})})
    log = NoteLog(control) if control is not None else None
    res = Simulator(cfg, perf, make_routing(sysdef.routing), log).run(wl.make(rate, seed))
    return res, log, res.metrics(setup.slo, (50, 90, 99), warmup_s=wl.warmup_s)


def good_mask(res: SimResult, setup: compare.Setup) -> np.ndarray:
    """Per request: met every SLO (TTFT, mean TPOT, p99 time between tokens)."""
    slo = setup.slo
    ok = ~res.failed & ~np.isnan(res.finish)
    ttft = res.ttft
    out = res.output_tokens
    tpot = np.where(out > 1, (res.finish - res.first_token) / np.maximum(out - 1, 1), 0.0)
    good = ok & (ttft <= slo.ttft_ms / 1000) & (tpot <= slo.tpot_ms / 1000)
    if slo.tbt_ms is not None:
        good &= res.tbt_ok(slo.tbt_ms)
    return good


def slices(res: SimResult, setup: compare.Setup, width_s: float) -> list[dict]:
    """Attainment, TTFT p90 and prefill workers per `width_s` slice of arrival time."""
    good = good_mask(res, setup)
    t0 = res.arrival.min()
    roles = res.roles
    out = []
    end = res.arrival.max()
    s = t0
    while s < end:
        m = (res.arrival >= s) & (res.arrival < s + width_s)
        n = int(m.sum())
        at = [p for t, p, _ in roles if t <= s - t0 + width_s / 2]
        ttft = res.ttft[m & ~res.failed]
        ttft = ttft[~np.isnan(ttft)]
        out.append({"from_s": round(s - t0, 1), "requests": n,
                    "attainment": round(float(good[m].mean()), 3) if n else None,
                    "p90_ttft_s": round(float(np.percentile(ttft, 90)), 3) if ttft.size else None,
                    "prefill_workers": at[-1] if at else None})
        s += width_s
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.diagnose",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", default="8b-h100")
    parser.add_argument("--workload", default="phase-1400")
    parser.add_argument("--system", default="dopd")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flip", default="live", choices=sorted(compare.FLIP_COSTS))
    parser.add_argument("--slice", type=float, default=10.0, help="seconds per printed slice")
    parser.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE",
                        help="override a control knob (diagnosis only)")
    parser.add_argument("--notes", type=int, default=0,
                        help="also print the notes of this many held ticks (spread evenly)")
    parser.add_argument("--json", type=Path, default=None, help="write everything here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    setup = next(s for s in compare.setups(args.quick) if s.name == args.setup)
    wl = compare._workload(args.workload, args.quick)
    sysdef = find_system(setup, args.system, bool(wl.schedule))
    from benchmarks.sim.policies import parse_knobs

    knobs = parse_knobs(args.knob)
    res, log, m = run_one(setup, args.workload, sysdef, args.rate, args.seed, args.flip,
                          args.quick, knobs=knobs)
    table = slices(res, setup, args.slice)
    print(f"{args.system} on {args.setup}/{args.workload} at {args.rate} req/s, seed "
          f"{args.seed}: attainment {m['slo_attainment']:.3f} (ttft "
          f"{m['ttft_slo_attainment']:.3f}, tpot {m['tpot_slo_attainment']:.3f}, tbt "
          f"{m.get('tbt_slo_attainment') or 0:.3f}), {m['flips']} flips")
    for row in table:
        print(f"  t={row['from_s']:>6.1f}s  {row['prefill_workers']}P  n={row['requests']:>4}  "
              f"att {row['attainment']}  p90 ttft {row['p90_ttft_s']}")
    if log is not None:
        moved = [t for t in log.ticks if t["moved"]]
        for t in moved:
            print(f"  [{t['t']:>6.1f}] {t['moved']} to {t['to']}: {t['note'][:300]}")
        held = [t for t in log.ticks if not t["moved"]]
        if args.notes and held:
            for t in held[::max(1, len(held) // args.notes)]:
                print(f"  ({t['t']:>6.1f}) {t['note'][:300]}")
    if args.json:
        args.json.write_text(json.dumps({
            "system": args.system, "setup": args.setup, "workload": args.workload,
            "rate": args.rate, "seed": args.seed, "flip": args.flip, "knobs": knobs,
            "metrics": {k: m.get(k) for k in compare.KEEP}, "slices": table,
            "roles": res.roles, "ticks": log.ticks if log else []}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
