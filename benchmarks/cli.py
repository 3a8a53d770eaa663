"""Subcommands `fulcrum bench`, `fulcrum sim` and `fulcrum profile` for the console script.

deploy/cli.py calls `register(subparsers)`; each subparser's `func(args) -> int` runs it.
"""

from __future__ import annotations

import argparse

from benchmarks.bench import __doc__ as BENCH_DOC
from benchmarks.bench import add_bench_args, run_bench
from benchmarks.profiler import __doc__ as PROFILE_DOC
from benchmarks.profiler import add_profile_args, run_profile
from benchmarks.sim.cli import __doc__ as SIM_DOC
from benchmarks.sim.cli import add_sim_args, run_sim


def _first_line(doc: str | None) -> str:
    """The summary line of a module doc, without its "`fulcrum x`: " prefix."""
    line = (doc or "").strip().splitlines()[0]
    return line.split(": ", 1)[1] if line.startswith("`") and ": " in line else line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the bench, sim and profile subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    bench = subparsers.add_parser("bench", help=_first_line(BENCH_DOC), description=BENCH_DOC,
                                  formatter_class=fmt)
    add_bench_args(bench)
    bench.set_defaults(func=lambda args: (run_bench(args), 0)[1])
    sim = subparsers.add_parser("sim", help=_first_line(SIM_DOC), description=SIM_DOC,
                                formatter_class=fmt)
    add_sim_args(sim)
    sim.set_defaults(func=lambda args: (run_sim(args), 0)[1])
    prof = subparsers.add_parser("profile", help=_first_line(PROFILE_DOC),
                                 description=PROFILE_DOC, formatter_class=fmt)
    add_profile_args(prof)
    prof.set_defaults(func=lambda args: (run_profile(args), 0)[1])
