"""Operator commands over the gateway's admin API: watch, flip, drain, undrain, policy,
explain, flips. `deploy.cli` adds them to `fulcrum` through `register(subparsers)`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deploy import options
from deploy.options import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE


class AdminError(Exception):
    """The gateway refused or could not be reached; the message is for the operator."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class AdminClient:
    """Thin JSON client for `/admin/*` with the bearer token attached."""

    def __init__(self, http: httpx.Client, token: str | None) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body: dict | None = None,
             params: dict | None = None) -> Any:
        try:
            resp = self.http.request(method, path, json=body, params=params,
                                     headers=self.headers)
        except httpx.HTTPError as exc:
            raise AdminError(f"no answer from the gateway at {self.http.base_url} "
                             f"({exc.__class__.__name__}); is it up?",
                             EXIT_UNREACHABLE) from None
        if resp.status_code == 404 and "error" not in resp.text:
            raise AdminError(f"{self.http.base_url} has no {path}: is it a Fulcrum gateway?",
                             EXIT_UNREACHABLE)
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            raise AdminError(f"{method} {path} answered {resp.status_code}: {message}")
        try:
            return resp.json()
        except ValueError:
            raise AdminError(f"{method} {path} did not answer JSON: is {self.http.base_url} "
                             "a Fulcrum gateway?", EXIT_UNREACHABLE) from None


def _client(args: argparse.Namespace) -> AdminClient:
    http = getattr(args, "http", None)  # tests inject a client bound to an app
    if http is None:
        drain_s = getattr(args, "timeout", None) or 150.0  # a flip answers after its drain
        timeout = httpx.Timeout(10.0, read=drain_s + 30.0)
        http = httpx.Client(base_url=args.url, timeout=timeout)
    return AdminClient(http, args.token)


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 160)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def watch_table(data: dict, url: str) -> Table:
    """The live cluster table: roles, load and windowed latencies per worker."""
    ctl = data.get("controller")
    title = f"Fulcrum at {url}: " + ", ".join(f"{n} {r}" for r, n in data["pools"].items())
    if ctl:
        title += (f" | policy {ctl['name']} ({ctl['mode']}), SLO TTFT "
                  f"{ctl['slo']['ttft_s'] * 1000:g} ms TPOT {ctl['slo']['tpot_s'] * 1000:g} ms")
    table = Table(title=title)
    for col in ("worker", "role", "state", "in-flight P", "in-flight D", "running", "waiting",
                "KV %", "TTFT p90 ms", "ITL p90 ms", "prompt tok/s", "gen tok/s"):
        table.add_column(col, justify="left" if col in ("worker", "role", "state") else "right")
    for w in data["workers"]:
        state = w["state"] + (" (flipping)" if w.get("flipping") else "")
        kv = w.get("kv_cache_usage")
        table.add_row(w["name"], w["role"], state, str(w["in_flight_prefill"]),
                      str(w["in_flight_decode"]), _num(w.get("num_running"), "{:.0f}"),
                      _num(w.get("num_waiting"), "{:.0f}"),
                      _num(None if kv is None else 100 * kv), _ms(w.get("ttft_p90_s")),
                      _ms(w.get("itl_p90_s")), _num(w.get("prompt_tokens_per_s")),
                      _num(w.get("generation_tokens_per_s")))
    last = data.get("last_decision")
    if last:
        table.caption = f"tick {last['tick']}: {last['note']}"
    errors = data.get("scrape_errors") or {}
    if errors:
        extra = "; ".join(f"{k}: {v}" for k, v in errors.items())
        table.caption = f"{table.caption or ''}\nscrape errors: {extra}".strip()
    return table


def _cmd_watch(args: argparse.Namespace) -> int:
    client = _client(args)
    console = _console()
    if args.json:
        print(json.dumps(client.call("GET", "/admin/control"), indent=2))
        return EXIT_OK
    if args.once:
        console.print(watch_table(client.call("GET", "/admin/control"), args.url))
        return 0
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                try:
                    renderable: Any = watch_table(client.call("GET", "/admin/control"), args.url)
                except AdminError as exc:
                    renderable = f"[red]{exc}[/red]"
                live.update(renderable, refresh=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def _record_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    for col in ("worker", "from", "to", "outcome", "duration s", "detail", "reason"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["worker"], r["from_role"], r["to_role"], r["outcome"],
                      f"{r['duration_s']:.2f}", r["detail"], r.get("reason", ""))
    return table


def _cmd_flip(args: argparse.Namespace) -> int:
    record = _client(args).call("POST", "/admin/flip", {
        "worker": args.worker, "to": args.to, "dry_run": args.dry_run, "force": args.force,
        "drain_timeout_s": args.timeout, "mode": args.mode})
    title = "dry run (nothing changed)" if args.dry_run else "flip"
    _console().print(_record_table(title, [record]))
    return 0 if record["outcome"] in ("done", "dry-run") else 1


def _cmd_drain(args: argparse.Namespace) -> int:
    result = _client(args).call("POST", "/admin/drain", {
        "worker": args.worker, "force": args.force, "wait": args.wait,
        "timeout_s": args.timeout})
    _console().print(f"{result['worker']}: {result['state']}, {result['in_flight']} legs in "
                     f"flight ({result['detail']})")
    return 0 if result["drained"] or not args.wait else 1


def _cmd_undrain(args: argparse.Namespace) -> int:
    result = _client(args).call("POST", "/admin/undrain", {"worker": args.worker})
    _console().print(f"{result['worker']}: {result['state']} ({result['detail']})")
    return 0


def _policy_table(state: dict) -> Table:
    table = Table(title=f"control policy {state['name']} ({state['mode']}), every "
                        f"{state['interval_s']}s over a {state['window_s']}s window")
    table.add_column("setting")
    table.add_column("value", justify="right")
    table.add_row("SLO TTFT ms", f"{state['slo']['ttft_s'] * 1000:g}")
    table.add_row("SLO TPOT ms", f"{state['slo']['tpot_s'] * 1000:g}")
    for knob, value in state["knobs"].items():
        table.add_row(knob, str(value))
    table.caption = "available: " + ", ".join(state["available"])
    return table


def parse_knobs(pairs: list[str] | None) -> dict[str, str]:
    knobs = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AdminError(f"--control-knob wants KEY=VALUE, got {pair!r}", EXIT_USAGE)
        knobs[key.strip()] = value.strip()
    return knobs


def _cmd_policy(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "show":
        state = client.call("GET", "/admin/policy")
    else:
        body: dict[str, Any] = {"knobs": parse_knobs(args.control_knob)}
        for key in ("name", "interval_s", "advisory"):
            value = getattr(args, key, None)
            if value is not None:
                body[key] = value
        for key in ("ttft", "tpot"):
            ms = getattr(args, f"slo_{key}_ms", None)
            if ms is not None:
                body[f"{key}_s"] = ms / 1000
        state = client.call("PUT", "/admin/policy", body)
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        _console().print(_policy_table(state))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    data = _client(args).call("GET", "/admin/explain", params={"limit": args.limit})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    console = _console()
    if not data["decisions"]:
        console.print("no decisions yet: the controller has not ticked")
        return 0
    table = Table(title=f"last {len(data['decisions'])} decisions of {data['policy']['name']}")
    for col in ("tick", "time", "mode", "decision", "numbers", "result"):
        table.add_column(col, overflow="fold")
    for d in data["decisions"]:
        numbers = ", ".join(f"{k}={v}" for k, v in d["numbers"].items())
        actions = "; ".join(f"{a['worker']} -> {a['to']}" for a in d["actions"])
        result = "; ".join(d["results"]) if actions else "-"
        table.add_row(str(d["tick"]), time.strftime("%H:%M:%S", time.localtime(d["at"])),
                      d["mode"], d["note"], numbers,
                      f"{actions}: {result}" if actions else result)
    console.print(table)
    return 0


def _cmd_flips(args: argparse.Namespace) -> int:
    data = _client(args).call("GET", "/admin/flips", params={"limit": args.limit})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    title = "flip history" + (f" (flipping now: {', '.join(data['active'])})"
                              if data["active"] else "")
    _console().print(_record_table(title, data["flips"]))
    return 0


def _cmd_streams(args: argparse.Namespace) -> int:
    data = _client(args).call("GET", "/admin/streams")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    table = Table(title=f"{len(data['streams'])} live stream(s)")
    for col in ("request id", "client id", "worker", "tokens", "moves", "movable"):
        table.add_column(col, overflow="fold")
    for s in data["streams"]:
        movable = "yes" if s["migratable"] else f"no: {s['why_not_migratable']}"
        table.add_row(s["request_id"], s.get("client_request_id") or "-", s["worker"],
                      str(s["generated"]), str(s["migrations"]), movable)
    _console().print(table)
    return EXIT_OK


def _cmd_migrate(args: argparse.Namespace) -> int:
    result = _client(args).call("POST", "/admin/migrate", {
        "request_id": args.request_id, "to": args.to, "after_tokens": args.after_tokens,
        "planned": args.planned})
    if args.json:
        print(json.dumps(result, indent=2))
    elif result.get("planned"):
        _console().print(f"{result['request_id']}: will move to {result['to']} after "
                         f"{result['after_tokens']} tokens once it starts")
    else:
        _console().print(f"{result['request_id']}: moving from {result['from']} to "
                         f"{result['to']} (after {result['generated']} tokens so far)")
    return EXIT_OK


def _guarded(handler):  # noqa: ANN001, ANN202 - wraps a command handler
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except AdminError as exc:
            print(f"fulcrum: {exc}", file=sys.stderr)
            return exc.exit_code
    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the operator commands to `fulcrum`."""
    common = argparse.ArgumentParser(add_help=False)
    options.add_gateway_url(common)

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:  # noqa: ANN001
        p = subparsers.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(func=_guarded(handler))
        return p

    p = add("watch", _cmd_watch, "live table of roles, load and windowed TTFT/ITL")
    p.add_argument("--interval", type=float, default=2.0, help="refresh period (s)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    options.add_json(p)

    p = add("flip", _cmd_flip, "move a worker to the other pool (relabel, or drain then "
                               "switch)")
    p.add_argument("worker")
    p.add_argument("--to", required=True, choices=("prefill", "decode"), help="target pool")
    p.add_argument("--dry-run", action="store_true", help="check and describe, change nothing")
    p.add_argument("--force", action="store_true", help="allow emptying a pool")
    p.add_argument("--timeout", type=float, default=None,
                   help="drain timeout (s) before rolling back")
    p.add_argument("--mode", choices=("relabel", "drain"), default=None,
                   help="relabel: switch now, in-flight legs finish in place; drain: wait "
                        "for them first (default: the gateway's --flip-mode)")

    p = add("drain", _cmd_drain, "stop sending new work to a worker")
    p.add_argument("worker")
    p.add_argument("--wait", action="store_true", help="wait until its in-flight work ends")
    p.add_argument("--force", action="store_true", help="allow emptying a pool")
    p.add_argument("--timeout", type=float, default=None, help="how long --wait waits (s)")

    p = add("undrain", _cmd_undrain, "put a drained worker back into routing")
    p.add_argument("worker")

    p = subparsers.add_parser("policy", help="show or set the control policy, knobs and SLOs")
    actions = p.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", parents=[common],
                              help="current policy, knobs and SLO targets")
    options.add_json(show)
    show.set_defaults(func=_guarded(_cmd_policy))
    setp = actions.add_parser("set", parents=[common],
                              help="switch policy or change knobs / SLO / mode")
    setp.set_defaults(func=_guarded(_cmd_policy))
    setp.add_argument("name", nargs="?", default=None, help="static, arrow or dopd")
    options.add_control_knob(setp)
    options.add_slo_ms(setp, ttft_ms=None, tpot_ms=None, old_seconds=("--ttft", "--tpot"))
    setp.add_argument("--interval", dest="interval_s", type=float, help="tick period (s)")
    mode = setp.add_mutually_exclusive_group()
    mode.add_argument("--advisory", dest="advisory", action="store_true", default=None,
                      help="decide and explain, but do not flip")
    mode.add_argument("--act", dest="advisory", action="store_false",
                      help="apply the policy's flips")
    options.add_json(setp)

    p = add("explain", _cmd_explain, "the controller's last decisions and their numbers")
    p.add_argument("--limit", type=int, default=10, help="how many decisions")
    options.add_json(p)

    p = add("flips", _cmd_flips, "history of role flips (manual and automatic)")
    p.add_argument("--limit", type=int, default=20, help="how many flips")
    options.add_json(p)

    p = add("streams", _cmd_streams, "live streams: worker, tokens so far, whether they can move")
    options.add_json(p)

    p = add("migrate", _cmd_migrate, "move a live stream to another worker without a break")
    p.add_argument("request_id", help="the gateway's id of the stream (`fulcrum streams`), or "
                                      "with --planned the client's X-Request-Id")
    p.add_argument("--to", required=True, metavar="WORKER", help="target worker")
    p.add_argument("--after-tokens", type=int, default=0,
                   help="move once the stream has generated this many tokens")
    p.add_argument("--planned", action="store_true",
                   help="the stream has not started yet: move it when it does")
    options.add_json(p)
