"""The `fulcrum` command line: run a local cluster, inspect it, stop it.

Sub-commands from other parts (benchmarks, the operator CLI) register themselves
through `register(subparsers)` functions listed in `_EXTENSIONS`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from deploy import options
from deploy.options import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, HelpFormatter
from instance_manager.models import cache_root
from router.build_info import version_line

log = logging.getLogger("fulcrum")

_EXTENSIONS = ("deploy.operator_cli", "deploy.worker_cli", "deploy.ray_cluster", "benchmarks.cli")
_DEFAULT_NAMES = {"default": "SmolLM2-135M-Instruct", "smollm2": "SmolLM2-135M-Instruct",
                  "tiny": "tiny-llama"}


def _add_control_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("role controller (automatic P/D flips)")
    options.add_control_policy(group)
    options.add_slo_ms(group, ttft_ms=1000.0, tpot_ms=100.0,
                       old_seconds=("--slo-ttft", "--slo-tpot"))
    group.add_argument("--control-profile", type=Path, default=None, metavar="FILE",
                       help="a `fulcrum profile` JSON: DOPD's and Arrow's throughput "
                            "constants are derived from it (explicit --control-knob values win)")
    group.add_argument("--control-interval", type=float, default=5.0,
                       help="seconds between controller ticks")
    group.add_argument("--control-window", type=float, default=20.0,
                       help="seconds of metrics each decision looks at")
    group.add_argument("--advisory", action="store_true",
                       help="decide and explain, but never flip")
    group.add_argument("--flip-mode", choices=("relabel", "drain"), default="relabel",
                       help="relabel: a flipped worker takes its new role at once and "
                            "finishes its old role's legs in place; drain: it first finishes "
                            "them, out of both pools (manual flips may name either)")


def _add_gateway_workers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway-workers", type=int, default=1, metavar="N",
                        help="gateway processes sharing the port (SO_REUSEPORT); process 0 "
                             "runs the controller, the others follow its worker table")


def _control_config(args: argparse.Namespace):  # noqa: ANN202 - avoids importing at start-up
    from core.flips import FlipMode
    from core.slo import SLOTargets
    from router.control_port import ControlConfig

    knobs = []
    for item in args.control_knob:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"fulcrum: --control-knob takes K=V, got {item!r}")
        knobs.append((key, value))
    if args.control_profile is not None:
        from instance_manager.controller.calibrate import knobs_from_profile

        given = {k for k, _ in knobs}
        derived = knobs_from_profile(args.control_policy, args.control_profile,
                                     args.slo_tpot_ms / 1000)
        knobs = [(k, v) for k, v in derived.items() if k not in given] + knobs
    return ControlConfig(
        policy=None if args.control_policy == "none" else args.control_policy,
        knobs=tuple(knobs), slo=SLOTargets(ttft_s=args.slo_ttft_ms / 1000,
                                           tpot_s=args.slo_tpot_ms / 1000),
        interval_s=args.control_interval, window_s=args.control_window,
        advisory=args.advisory, flip_mode=FlipMode(args.flip_mode))


def _add_hardening_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits, health checks and authentication")
    group.add_argument("--max-body-mb", type=float, default=32.0,
                       help="largest request body accepted (413 beyond)")
    group.add_argument("--max-inflight", type=int, default=1024,
                       help="client requests in flight through the gateway; 429 beyond "
                            "(0: no limit)")
    group.add_argument("--max-worker-queue", type=int, default=256,
                       help="legs in flight on one worker; a full worker takes no new ones, "
                            "and with every worker full the gateway answers 429 (0: no limit)")
    group.add_argument("--connect-timeout", type=float, default=5.0,
                       help="seconds to connect to a worker")
    group.add_argument("--prefill-timeout", type=float, default=60.0,
                       help="seconds for a prefill leg (then the decode worker computes "
                            "the prompt)")
    group.add_argument("--request-timeout", type=float, default=300.0,
                       help="seconds for a non-streamed answer, headers and body together")
    group.add_argument("--stream-idle-timeout", type=float, default=120.0,
                       help="longest silence inside a stream before it is cut with an error")
    group.add_argument("--stream-stall-factor", type=float, default=30.0,
                       help="a stream silent for this many times its worker's recent gap "
                            "between chunks (and at least --stream-stall-min) moves to "
                            "another worker (0: off)")
    group.add_argument("--stream-stall-min", type=float, default=5.0,
                       help="seconds of silence below which a stream never counts as stalled")
    group.add_argument("--migration", choices=("kv", "recompute"), default="kv",
                       help="how a moved stream continues on its new decode worker: 'kv' "
                            "pulls the KV the old worker computed (workers running the "
                            "fulcrum connector; others recompute), 'recompute' prefills "
                            "prompt + generated tokens again")
    group.add_argument("--health-interval", type=float, default=0.25,
                       help="seconds between active /health probes of each worker (0: off)")
    group.add_argument("--health-timeout", type=float, default=1.0,
                       help="a probe slower than this counts as a failure")
    group.add_argument("--breaker-failures", type=int, default=2,
                       help="consecutive failures (probes or legs) that take a worker out")
    group.add_argument("--api-key", action="append", default=[],
                       help="a key clients must send as 'Authorization: Bearer KEY' on "
                            "/v1/* (repeatable; default $FULCRUM_API_KEY)")
    group.add_argument("--api-key-file", action="append", default=[],
                       help="a file with one API key per line (repeatable)")
    group.add_argument("--forward-authorization", action="store_true",
                       help="pass the client's Authorization header on to the workers")
    group.add_argument("--worker-api-key", default=os.environ.get("FULCRUM_WORKER_API_KEY"),
                       help="send this key to every worker (workers run vLLM with "
                            "--api-key; `fulcrum up` starts them so)")


def _hardening_config(args: argparse.Namespace) -> dict:
    """GatewayConfig fields from `_add_hardening_args` options."""
    from router.admission import AdmissionConfig
    from router.dispatch import DispatchConfig
    from router.health import HealthConfig
    from router.security import AuthConfig, load_api_keys

    keys = list(args.api_key) or [k for k in [os.environ.get("FULCRUM_API_KEY")] if k]
    return {
        "max_body_mb": args.max_body_mb,
        "admission": AdmissionConfig(max_inflight=args.max_inflight,
                                     max_worker_queue=args.max_worker_queue),
        "health": HealthConfig(interval_s=args.health_interval, timeout_s=args.health_timeout,
                               failures=args.breaker_failures),
        "auth": AuthConfig(api_keys=load_api_keys(keys, args.api_key_file),
                           forward_authorization=args.forward_authorization,
                           worker_api_key=args.worker_api_key),
        "dispatch": DispatchConfig(connect_timeout_s=args.connect_timeout,
                                   prefill_timeout_s=args.prefill_timeout,
                                   request_timeout_s=args.request_timeout,
                                   stream_idle_timeout_s=args.stream_idle_timeout,
                                   stall_factor=args.stream_stall_factor,
                                   stall_min_s=args.stream_stall_min,
                                   kv_migration=args.migration == "kv"),
    }


_SECRET_OPTIONS = ("--api-key", "--worker-api-key")  # never on a command line (ps shows it)


def _hardening_argv(args: argparse.Namespace) -> list[str]:
    """`_add_hardening_args` options as given, for follower gateway processes (the keys
    travel separately, see `_follower_secrets`)."""
    probe = argparse.ArgumentParser(add_help=False)
    _add_hardening_args(probe)
    out: list[str] = []
    for action in probe._actions:
        if not action.option_strings or action.option_strings[0] in _SECRET_OPTIONS:
            continue
        flag, value = action.option_strings[0], getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            out += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            for item in value or ():
                out += [flag, str(item)]
        elif value is not None:
            out += [flag, str(value)]
    return out


def _state_file(port: int) -> Path:
    return cache_root() / "run" / f"gateway-{port}.json"


def _served_name(model_spec: str, resolved: str) -> str:
    from instance_manager.models import is_hf_id

    if model_spec in _DEFAULT_NAMES:
        return _DEFAULT_NAMES[model_spec]
    if is_hf_id(model_spec):  # as vLLM names it: the id, not the cache folder
        return model_spec
    return Path(resolved.rstrip("/")).name


def _gateway_sockets(args: argparse.Namespace):  # noqa: ANN202 - lazy imports
    """The listening sockets, the peer settings and (leader of several) the run folder."""
    from deploy import gateway_processes as gp
    from router.peers import PeerConfig

    follow = getattr(args, "follow", None)
    if follow:
        return [], PeerConfig(Path(follow), args.process_index), None
    if args.gateway_workers <= 1:
        return [], None, None
    run_dir = gp.fresh_run_dir(args.port)
    admin = gp.listen_socket("127.0.0.1", 0, reuse_port=False)
    admin_url = f"http://127.0.0.1:{admin.getsockname()[1]}"
    return [admin], PeerConfig(run_dir, 0, admin_url=admin_url), run_dir


def _follower_secrets(args: argparse.Namespace, run_dir: Path) -> tuple[list[str], dict]:
    """API keys for followers: a private file in the run folder, and the environment."""
    env = {}
    if args.admin_token:
        env["FULCRUM_ADMIN_TOKEN"] = args.admin_token
    if args.worker_api_key:
        env["FULCRUM_WORKER_API_KEY"] = args.worker_api_key
    keys = list(args.api_key)
    if not keys:
        return [], env
    path = run_dir / "api-keys"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(keys) + "\n")
    return ["--api-key-file", str(path)], env


def _serve(app: object, args: argparse.Namespace, sockets: list, run_dir: Path | None,
           follower_args: list[str]) -> None:
    """Serve `app`; as the leader of several processes, with the followers running."""
    from deploy import gateway_processes as gp

    several = args.gateway_workers > 1 or bool(getattr(args, "follow", None))
    sockets = [gp.listen_socket(args.host, args.port, reuse_port=several), *sockets]
    if run_dir is None:
        gp.serve(app, sockets, _uvicorn_level(args))
        return
    secret_args, env = _follower_secrets(args, run_dir)
    extra = [*follower_args, *secret_args, "--host", args.host, "--port", str(args.port)]
    with gp.followers(args.gateway_workers - 1, run_dir, extra, env):
        gp.serve(app, sockets, _uvicorn_level(args))


def _cmd_up(args: argparse.Namespace) -> int:
    from deploy.local_cluster import ClusterOptions, PortsBusy, build_local_cluster
    from instance_manager.models import ModelNotAvailable, fetch_model, resolve_model

    print(f"fulcrum: preparing model {args.model!r} ...", flush=True)
    try:
        model = fetch_model(resolve_model(args.model), download=args.download)
        gpus = (tuple(int(g) for g in args.gpus.split(",") if g.strip())
                if args.gpus else None)
    except (ModelNotAvailable, ValueError) as exc:
        print(f"fulcrum: {exc}", file=sys.stderr)
        return EXIT_FAILED
    sockets, peers, run_dir = _gateway_sockets(args)
    opts = ClusterOptions(
        model=model, served_model_name=args.served_model_name or _served_name(args.model, model),
        workers=args.workers, prefill_workers=args.prefill_workers, host=args.host,
        port=args.port, worker_base_port=args.worker_base_port,
        side_channel_base_port=args.side_channel_base_port, kv_connector=args.kv_connector,
        device=args.device, tensor_parallel_size=args.tensor_parallel_size, gpus=gpus,
        dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
        policy=args.policy, log_dir=Path(args.log_dir), admin_token=args.admin_token,
        extra_worker_args=tuple(args.worker_arg or ()), control=_control_config(args),
        peers=peers, **_hardening_config(args))
    try:
        app, manager = build_local_cluster(opts)
    except PortsBusy as exc:
        raise SystemExit(f"fulcrum: {exc}") from None
    state = _state_file(args.port)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"

    async def announce_when_ready() -> None:
        started = time.monotonic()
        if await manager.wait_ready(opts.supervisor.ready_timeout_s):
            name = opts.served_model_name
            print(f"\nfulcrum: {opts.workers} worker(s) ready in "
                  f"{time.monotonic() - started:.0f}s. OpenAI endpoint: {url}/v1 "
                  f"(model {name!r}). Ctrl-C stops everything.\n"
                  f"  try: curl {url}/v1/chat/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", "
                  f"\"content\": \"What is the capital of France?\"}}]}}'\n", flush=True)
        else:
            print("fulcrum: workers are not ready yet; see `fulcrum status` and the logs in "
                  f"{opts.log_dir}/", flush=True)

    app.state.on_workers_started = announce_when_ready
    print(f"fulcrum: gateway on {url} ({args.gateway_workers} process(es)), starting "
          f"{opts.workers} worker(s) on {opts.served_model_name} (logs in {opts.log_dir}/) ...",
          flush=True)
    follower_args = ["--model", opts.served_model_name, "--policy", args.policy,
                     *_hardening_argv(args)]
    if args.kv_connector == "none":
        follower_args.append("--no-pd")
    with _recorded(state, url, opts.log_dir):
        _serve(app, args, sockets, run_dir, follower_args)
    return EXIT_OK


@contextlib.contextmanager
def _recorded(state: Path, url: str, log_dir: Path | None) -> Iterator[None]:
    """Record this gateway for `fulcrum down` and `fulcrum logs` while it runs."""
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"pid": os.getpid(), "url": url,
                                 "log_dir": str(log_dir) if log_dir else None}))
    try:
        yield
    finally:
        state.unlink(missing_ok=True)


def _uvicorn_level(args: argparse.Namespace) -> str:
    """uvicorn's own access/error logs stay one notch quieter than Fulcrum's."""
    return "debug" if getattr(args, "log_level", "info") == "debug" else "warning"


def _cmd_gateway(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from core.workers import Role, WorkerState
    from deploy.gateway_app import build_gateway
    from router.app import GatewayConfig
    from router.cluster import Cluster
    from router.control_port import ControlConfig

    cluster = Cluster()
    for i, item in enumerate(args.worker):
        role, sep, url = item.partition("=")
        if not sep or role not in ("prefill", "decode"):
            raise SystemExit(f"fulcrum: --worker takes ROLE=URL with ROLE prefill|decode, "
                             f"got {item!r}")
        cluster.add(f"w{i}", url.rstrip("/"), Role(role), WorkerState.READY)
    sockets, peers, run_dir = _gateway_sockets(args)
    hardening = _hardening_config(args)
    if args.no_pd:
        hardening["dispatch"] = replace(hardening["dispatch"], pd_enabled=False)
    config = GatewayConfig(served_models=tuple(args.model), policy=args.policy,
                           admin_token=args.admin_token,
                           control=ControlConfig() if args.follow else _control_config(args),
                           admin_open=args.host in ("127.0.0.1", "localhost", "::1"),
                           peers=peers, **hardening)
    from deploy.worker_cli import discovery_supervisor

    app = None
    supervisor = None if args.follow else discovery_supervisor(args, lambda: app.state.registry)
    app = build_gateway(config, cluster, supervisor=supervisor)
    follower_args = [a for m in args.model for a in ("--model", m)]
    follower_args += ["--policy", args.policy] + (["--no-pd"] if args.no_pd else [])
    follower_args += _hardening_argv(args)
    if args.follow:  # a follower: the leader records the gateway and says where it is
        _serve(app, args, sockets, None, follower_args)
        return EXIT_OK
    url = f"http://{args.host}:{args.port}"
    print(f"fulcrum: gateway on {url} over {len(args.worker)} external worker(s), "
          f"{args.gateway_workers} process(es)"
          + (f", discovering {args.k8s_selector!r} pods" if supervisor else ""), flush=True)
    with _recorded(_state_file(args.port), url, None):
        _serve(app, args, sockets, run_dir, follower_args)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        resp = httpx.get(args.url.rstrip("/") + "/admin/workers", headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        print(f"fulcrum: no gateway at {args.url} ({exc.__class__.__name__}); is it up?",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if resp.status_code != 200:
        print(f"fulcrum: /admin/workers answered {resp.status_code}: {resp.text[:300]}",
              file=sys.stderr)
        return EXIT_FAILED
    data = resp.json()
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    table = Table(title=f"Fulcrum at {args.url} (policy {data.get('policy')})")
    for col in ("worker", "role", "state", "breaker", "in-flight P", "in-flight D", "running",
                "waiting", "KV cache %", "pid", "restarts", "url"):
        table.add_column(col)
    for w in data["workers"]:
        table.add_row(w["name"], w["role"], w["state"], w.get("breaker", "-"),
                      str(w["in_flight_prefill"]),
                      str(w["in_flight_decode"]), str(w["num_running"]),
                      str(w["num_waiting"]), f"{100 * w['kv_cache_usage']:.1f}",
                      str(w["pid"]), str(w["restarts"]), w["url"])
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return EXIT_OK


def _alive(pid: int) -> bool:
    """True while `pid` runs; an exited process its parent has not reaped yet is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _cmd_down(args: argparse.Namespace) -> int:
    state = _state_file(args.port)
    if not state.exists():
        print(f"fulcrum: no running gateway recorded for port {args.port}", file=sys.stderr)
        return EXIT_FAILED
    pid = json.loads(state.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state.unlink(missing_ok=True)
        print(f"fulcrum: gateway pid {pid} was already gone; cleaned up")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            state.unlink(missing_ok=True)  # gone before its own clean-up could run
            print(f"fulcrum: stopped gateway pid {pid} (and any workers it ran)")
            return EXIT_OK
        time.sleep(0.2)
    print(f"fulcrum: gateway pid {pid} still running after {args.timeout}s", file=sys.stderr)
    return EXIT_FAILED


def _tail(path: Path, lines: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256 * lines))  # enough bytes for `lines` lines of vLLM logs
        text = f.read().decode(errors="replace")
    return text.splitlines()[-lines:] if lines > 0 else []


def _cmd_logs(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir is None:
        state = _state_file(args.port)
        recorded = json.loads(state.read_text()).get("log_dir") if state.exists() else None
        log_dir = Path(recorded) if recorded else Path(".fulcrum/logs")
    files = sorted(log_dir.glob("*.log"))
    if args.worker:
        files = [f for f in files if f.stem == args.worker]
    if not files:
        what = f"worker {args.worker!r}" if args.worker else "any worker"
        print(f"fulcrum: no log of {what} in {log_dir}/", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"log_dir": str(log_dir), "logs": {
            f.stem: _tail(f, args.lines) for f in files}}, indent=2))
        return EXIT_OK
    for f in files:
        for line in _tail(f, args.lines):
            print(f"{f.stem} | {line}" if len(files) > 1 else line)
    if not args.follow:
        return EXIT_OK
    offsets = {f: f.stat().st_size for f in files}
    try:
        while True:
            for f, offset in offsets.items():
                size = f.stat().st_size
                if size < offset:  # truncated or replaced
                    offset = 0
                if size > offset:
                    with open(f, "rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read().decode(errors="replace")
                    for line in chunk.splitlines():
                        print(f"{f.stem} | {line}" if len(files) > 1 else line, flush=True)
                offsets[f] = size
            time.sleep(0.5)
    except KeyboardInterrupt:
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fulcrum", description="Adaptive prefill/decode router for vLLM.",
        epilog=f"Exit codes: {EXIT_OK} ok, {EXIT_FAILED} refused or failed, "
               f"{options.EXIT_USAGE} bad command line, {EXIT_UNREACHABLE} gateway (or "
               "OpenAI server) unreachable.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    options.add_log_level(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run a gateway and local vLLM workers until Ctrl-C",
                        formatter_class=HelpFormatter)
    up.add_argument("--model", default="default",
                    help="'default' (embedded SmolLM2-135M-Instruct), 'tiny' (random test "
                         "Llama), a model folder, or a Hugging Face id")
    up.add_argument("--served-model-name", default=None,
                    help="name clients use in 'model' (derived from --model if unset)")
    up.add_argument("--workers", type=int, default=2, help="number of vLLM workers")
    up.add_argument("--prefill-workers", type=int, default=None,
                    help="how many start in the prefill pool (default: half)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, default=8000, help="gateway port")
    up.add_argument("--worker-base-port", type=int, default=None,
                    help="first worker port (default: gateway port + 1)")
    up.add_argument("--side-channel-base-port", type=int, default=None,
                    help="first KV side-channel port (default: each worker's port + 1000)")
    up.add_argument("--kv-connector", default="fulcrum", choices=("fulcrum", "nixl", "none"),
                    help="KV transport between workers: 'fulcrum' (ours), 'nixl' (vLLM's, "
                         "with CPU fixes), 'none' (aggregated serving)")
    up.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                    help="where workers run: one CPU core each, or GPUs")
    up.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="GPUs per worker (--device gpu): worker i gets the i-th range of "
                         "that many GPUs in CUDA_VISIBLE_DEVICES")
    up.add_argument("--gpus", default=None, metavar="IDS",
                    help="comma-separated GPU ids to hand out (default: 0, 1, ...)")
    up.add_argument("--dtype", default="auto",
                    help="vLLM --dtype for the workers; 'auto': float32 on a CPU without "
                         "native bf16 (avx512_bf16/amx_bf16), else the model's own")
    up.add_argument("--download", action="store_true",
                    help="fetch a Hugging Face model that is not in the local cache (needs "
                         "network; off by default: workers never go online)")
    up.add_argument("--max-model-len", type=int, default=None,
                    help="context length per worker (default: the model's)")
    up.add_argument("--kv-cache-gib", type=int, default=2,
                    help="KV cache GiB per CPU worker (VLLM_CPU_KVCACHE_SPACE)")
    options.add_policy(up)
    up.add_argument("--log-dir", default=".fulcrum/logs", help="one log file per worker")
    up.add_argument("--admin-token", default=os.environ.get("FULCRUM_ADMIN_TOKEN"),
                    help="bearer token for /admin (required to use it off loopback)")
    up.add_argument("--worker-arg", action="append",
                    help="extra argument passed to every vLLM worker (repeatable)")
    _add_gateway_workers_arg(up)
    _add_control_args(up)
    _add_hardening_args(up)
    up.set_defaults(func=_cmd_up)

    gw = sub.add_parser("gateway", help="run only the gateway, over workers you started",
                        formatter_class=HelpFormatter)
    gw.add_argument("--worker", action="append", default=[], metavar="ROLE=URL",
                    help="a vLLM server and its starting role, e.g. "
                         "prefill=http://10.0.0.5:8000 (repeatable; more can join later "
                         "with `fulcrum worker add`)")
    gw.add_argument("--model", action="append", required=True,
                    help="served model name clients may ask for (repeatable)")
    gw.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    gw.add_argument("--port", type=int, default=8000, help="gateway port")
    options.add_policy(gw)
    gw.add_argument("--admin-token", default=os.environ.get("FULCRUM_ADMIN_TOKEN"),
                    help="bearer token for /admin (required to use it off loopback)")
    _add_gateway_workers_arg(gw)
    gw.add_argument("--no-pd", action="store_true", help="never split a request into P/D legs")
    gw.add_argument("--follow", default=None, help=argparse.SUPPRESS)  # a follower's run dir
    gw.add_argument("--process-index", type=int, default=0, help=argparse.SUPPRESS)
    _add_control_args(gw)
    _add_hardening_args(gw)
    gw.set_defaults(func=_cmd_gateway)

    status = sub.add_parser("status", help="table of workers: role, state, load, KV cache",
                            formatter_class=HelpFormatter)
    options.add_gateway_url(status)
    options.add_json(status)
    status.set_defaults(func=_cmd_status)

    down = sub.add_parser("down", help="stop a gateway started by `fulcrum up` or "
                                       "`fulcrum gateway`", formatter_class=HelpFormatter)
    down.add_argument("--port", type=int, default=8000, help="port of the gateway to stop")
    down.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for it (and its workers) to exit")
    down.set_defaults(func=_cmd_down)

    logs = sub.add_parser("logs", help="the workers' log files (tail, or follow)",
                          formatter_class=HelpFormatter)
    logs.add_argument("worker", nargs="?", default=None, help="one worker, e.g. w0 (default: all)")
    logs.add_argument("--port", type=int, default=8000,
                      help="gateway whose log folder to read (as recorded by `fulcrum up`)")
    logs.add_argument("--log-dir", default=None, help="read this folder instead")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines per worker")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    options.add_json(logs)
    logs.set_defaults(func=_cmd_logs)

    for module_name in _EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    for p in options.all_parsers(parser)[1:]:
        p.formatter_class = HelpFormatter
        if not any("--log-level" in a.option_strings for a in p._actions):
            options.add_log_level(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return args.func(args) or EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
