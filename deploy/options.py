"""Options every `fulcrum` command spells the same way, and the exit codes they share.

One name per concept across `up`, `gateway`, `sim`, `bench` and `policy`:

* `--policy NAME`: the routing policy (old: `--routing`);
* `--control-policy NAME`: the role controller (old: `--control`);
* `--control-knob K=V`: a control-policy knob (old: `--knob`);
* `--slo-ttft-ms`, `--slo-tpot-ms` (and `--slo-e2el-ms` where latency is judged): SLOs in
  milliseconds, as in vLLM's `--goodput ttft:MS` (old: `--slo-ttft`/`--slo-tpot` and
  `policy set --ttft/--tpot`, in seconds).

Old spellings still work, hidden from `--help`, and print a deprecation note.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # the gateway answered, but refused or the action failed
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_UNREACHABLE = 3  # no gateway / OpenAI server answered at the URL

LOG_LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" once: not when the help already states its default, not for
    options whose default is "unset", and never a secret's value (tokens, keys)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        secret = any(w in action.dest for w in ("token", "key", "password"))
        if (secret or "default" in text or default in (None, False, [], ())
                or default is argparse.SUPPRESS or action.option_strings == []
                or isinstance(action, argparse._VersionAction | argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class DeprecatedAlias(argparse.Action):
    """An old option name: stores into the new option's dest (converted), with a note."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str,
                 convert: Callable[[str], Any] | None = None, append: bool = False,
                 **kwargs: Any) -> None:
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.convert, self.append = new, convert, append

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"fulcrum: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        value = self.convert(values) if self.convert else values
        if self.append:
            items = list(getattr(namespace, self.dest, None) or [])
            items.append(value)
            value = items
        setattr(namespace, self.dest, value)


def seconds_to_ms(text: str) -> float:
    return float(text) * 1000.0


def add_policy(parser: argparse.ArgumentParser | Any, default: str = "least-loaded") -> None:
    """`--policy`: the routing policy (old `--routing`)."""
    parser.add_argument("--policy", default=default, metavar="NAME",
                        help="routing policy: least-loaded, arrow, dopd-match, ares, or "
                             "module:Class")
    parser.add_argument("--routing", dest="policy", action=DeprecatedAlias, new="--policy")


def add_control_policy(parser: argparse.ArgumentParser | Any, default: str = "none") -> None:
    """`--control-policy` and `--control-knob` (old `--control`, `--knob`)."""
    parser.add_argument("--control-policy", default=default, metavar="NAME",
                        help="role controller that flips workers between pools: none "
                             "(manual only), static, arrow, dopd, or module:Class")
    parser.add_argument("--control", dest="control_policy", action=DeprecatedAlias,
                        new="--control-policy")
    add_control_knob(parser)


def add_control_knob(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument("--control-knob", action="append", default=[], metavar="K=V",
                        help="a control-policy knob, e.g. cooldown_s=30 (repeatable; "
                             "see `fulcrum policy show`)")
    parser.add_argument("--knob", dest="control_knob", action=DeprecatedAlias,
                        new="--control-knob", append=True)


def add_slo_ms(parser: argparse.ArgumentParser | Any, *, ttft_ms: float | None,
               tpot_ms: float | None, e2el: bool = False,
               old_seconds: tuple[str, str] | None = None) -> None:
    """`--slo-ttft-ms`, `--slo-tpot-ms` (and `--slo-e2el-ms`): SLOs in milliseconds.

    `old_seconds` names the deprecated seconds-valued spellings this command had."""
    parser.add_argument("--slo-ttft-ms", type=float, default=ttft_ms, metavar="MS",
                        help="time-to-first-token target, milliseconds")
    parser.add_argument("--slo-tpot-ms", type=float, default=tpot_ms, metavar="MS",
                        help="time-per-output-token target, milliseconds")
    if e2el:
        parser.add_argument("--slo-e2el-ms", type=float, default=None, metavar="MS",
                            help="end-to-end latency target, milliseconds")
    if old_seconds:
        for old, dest in zip(old_seconds, ("slo_ttft_ms", "slo_tpot_ms"), strict=True):
            parser.add_argument(old, dest=dest, action=DeprecatedAlias,
                                new="--" + dest.replace("_", "-"), convert=seconds_to_ms)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_log_level(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """`--log-level`, before or after the command name."""
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        default="info" if top else argparse.SUPPRESS,
                        help="how much Fulcrum logs on stderr")


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every sub-command parser below it, depth first."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:  # aliases share one parser
                    seen.add(id(sub))
                    found.extend(all_parsers(sub))
    return found


DEFAULT_URL = "http://127.0.0.1:8000"


def add_gateway_url(parser: argparse.ArgumentParser) -> None:
    """`--url` and `--token`: which gateway an operator command talks to."""
    import os

    parser.add_argument("--url", default=DEFAULT_URL, help="gateway URL")
    parser.add_argument("--token", default=os.environ.get("FULCRUM_ADMIN_TOKEN"),
                        help="admin bearer token (default: $FULCRUM_ADMIN_TOKEN)")


def add_slo_goodput(parser: argparse.ArgumentParser | Any, default: Sequence[str] = ()) -> None:
    """SLOs for judging latency (bench, sim): vLLM's `--goodput ttft:MS tpot:MS e2el:MS`,
    or the same targets one by one as `--slo-ttft-ms`... (these win)."""
    parser.add_argument("--goodput", nargs="+", default=list(default), metavar="KEY:MS",
                        help="SLOs in milliseconds, vLLM's syntax: ttft:1000 tpot:100 "
                             "e2el:20000, plus tbt:MS (each request's p99 time between "
                             "tokens)" + (f" (default: {' '.join(default)})"
                                             if default else ""))
    add_slo_ms(parser, ttft_ms=None, tpot_ms=None, e2el=True)


def goodput_items(args: argparse.Namespace) -> list[str]:
    """`--goodput` items with `--slo-*-ms` applied on top, in vLLM's KEY:MS form."""
    items = {k: v for k, _, v in (i.partition(":") for i in args.goodput)}
    for key in ("ttft", "tpot", "e2el"):
        ms = getattr(args, f"slo_{key}_ms", None)
        if ms is not None:
            items[key] = f"{ms:g}"
    return [f"{k}:{v}" for k, v in items.items()]
