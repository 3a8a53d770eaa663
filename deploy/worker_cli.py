"""`fulcrum worker add|remove|list` (the gateway's worker registry) and `fulcrum worker-args`
(the command line of a vLLM worker you start yourself, on this host or another)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from deploy.operator_cli import AdminError, _client, _console, _guarded
from deploy.ports import busy_ports, kv_port_for

# Variables a hand-started worker needs beyond its command line (the rest of the
# environment is the user's own).
_WORKER_ENV_KEYS = ("PYTHONPATH", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE",
                    "VLLM_CPU_OMP_THREADS_BIND", "CUDA_VISIBLE_DEVICES",
                    "VLLM_NIXL_SIDE_CHANNEL_PORT", "VLLM_NIXL_SIDE_CHANNEL_HOST",
                    "UCX_NET_DEVICES")


def worker_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment variables of one worker started by hand."""
    from deploy.cli import _served_name
    from instance_manager.models import resolve_model
    from instance_manager.worker_process import WorkerSpec
    from kv_transfer.settings import worker_kv_settings

    model = resolve_model(args.model)
    served = args.served_model_name or _served_name(args.model, model)
    kv_port = args.kv_port or kv_port_for(args.port)
    spec = WorkerSpec(
        name="hand-started", model=model, served_model_name=served, host=args.host,
        port=args.port, log_path=Path(os.devnull),
        kv=worker_kv_settings(args.kv_connector, side_channel_port=kv_port,
                              host=args.advertise_host or args.host),
        device=args.device, cpu_core=args.cpu_core, gpu_index=args.gpu_index,
        max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
        extra_args=tuple(args.worker_arg or ()))
    env = spec.environment(base={})
    argv = spec.command()
    argv[0] = "python"  # whichever Python has vLLM where the worker runs
    return argv, {k: env[k] for k in _WORKER_ENV_KEYS if k in env}


def _cmd_worker_args(args: argparse.Namespace) -> int:
    argv, env = worker_command(args)
    kv_port = args.kv_port or kv_port_for(args.port)
    busy = busy_ports([args.port, kv_port], args.host) if args.check_ports else []
    if args.format == "json":
        print(json.dumps({"argv": argv, "env": env, "port": args.port, "kv_port": kv_port,
                          "busy_ports": busy}))
    else:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print(f"{exports} {shlex.join(argv)}")
    if busy:
        print(f"fulcrum: ports {busy} are in use on {args.host}; pick another --port",
              file=sys.stderr)
        return 1
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    body = {"url": args.worker_url, "role": args.role, "name": args.name, "wait": args.wait}
    if args.timeout:
        body["timeout_s"] = args.timeout
    out = _client(args).call("POST", "/admin/workers", body)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['name']}: {out['url']} as {out['role']}, {out['state']}"
              + (f", KV at {out['kv_endpoint']}" if out.get("kv_endpoint") else ""))
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    params: dict = {"force": "true"} if args.force else {}
    if args.timeout:
        params["timeout_s"] = args.timeout
    out = _client(args).call("DELETE", f"/admin/workers/{args.worker}", params=params)
    print(json.dumps(out) if args.json else
          f"{out['name']} removed after {out['seconds']:.1f}s "
          f"({out['in_flight_at_start']} legs were in flight; all finished)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    data = _client(args).call("GET", "/admin/registry")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title="workers")
    for col in ("worker", "role", "state", "source", "url", "KV endpoint", "in-flight",
                "error"):
        table.add_column(col)
    for w in data["workers"]:
        table.add_row(w["name"], w["role"], w["state"], w["source"], w["url"],
                      w["kv_endpoint"] or "-", str(w["in_flight"]), w["error"] or "")
    _console().print(table)
    return 0


def add_worker_args_options(p: argparse.ArgumentParser) -> None:
    """The options that shape one worker's command line (shared with other back ends)."""
    p.add_argument("--model", default="default",
                   help="'default', 'tiny', a model folder or a Hugging Face id")
    p.add_argument("--served-model-name", default=None,
                   help="must equal the gateway's --model / served name")
    p.add_argument("--kv-connector", default="fulcrum", choices=("fulcrum", "nixl", "none"),
                   help="KV transport between workers")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="where it runs")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's)")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="KV cache GiB on a CPU worker")
    p.add_argument("--worker-arg", action="append", help="extra vLLM argument (repeatable)")


def add_discovery_args(gateway: argparse.ArgumentParser) -> None:
    """`fulcrum gateway` options to find workers through the Kubernetes API."""
    group = gateway.add_argument_group("worker discovery")
    group.add_argument("--discover", default="none", choices=("none", "k8s"),
                       help="k8s: every Ready pod under --k8s-selector joins, leaving pods "
                            "are drained and removed")
    group.add_argument("--k8s-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                       help="namespace to watch (default: $POD_NAMESPACE, else 'default')")
    group.add_argument("--k8s-selector", default="app.kubernetes.io/component=worker",
                       help="label selector of worker pods")
    group.add_argument("--k8s-worker-port", type=int, default=8000,
                       help="workers' HTTP port (a pod's fulcrum.io/port annotation wins)")


def discovery_supervisor(args: argparse.Namespace, registry):  # noqa: ANN001, ANN201
    """The pod discovery `fulcrum gateway` runs, or None."""
    if getattr(args, "discover", "none") != "k8s":
        return None
    from instance_manager.backends.k8s import PodDiscovery

    return PodDiscovery(registry, namespace=args.k8s_namespace, selector=args.k8s_selector,
                        port=args.k8s_worker_port)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `worker` and `worker-args` to `fulcrum`, and discovery to `fulcrum gateway`."""
    if "gateway" in subparsers.choices:
        add_discovery_args(subparsers.choices["gateway"])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://127.0.0.1:8000", help="gateway URL")
    common.add_argument("--token", default=os.environ.get("FULCRUM_ADMIN_TOKEN"),
                        help="admin bearer token (default: $FULCRUM_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", help="print raw JSON")

    worker = subparsers.add_parser("worker", help="add, remove or list the gateway's workers")
    actions = worker.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", parents=[common],
                             help="register a running vLLM server (it joins once healthy)")
    add.add_argument("worker_url", metavar="URL", help="e.g. http://10.0.0.5:8100")
    add.add_argument("--role", default="decode", choices=("prefill", "decode"),
                     help="pool it joins")
    add.add_argument("--name", default=None, help="default: the first free wN")
    add.add_argument("--wait", action="store_true", help="return once it serves")
    add.add_argument("--timeout", type=float, default=None, help="how long --wait waits (s)")
    add.set_defaults(func=_guarded(_cmd_add))
    rm = actions.add_parser("remove", parents=[common],
                            help="drain a worker (in-flight requests finish), then drop it")
    rm.add_argument("worker")
    rm.add_argument("--force", action="store_true",
                    help="remove even if it empties a pool or does not drain in time")
    rm.add_argument("--timeout", type=float, default=None, help="drain timeout (s)")
    rm.set_defaults(func=_guarded(_cmd_remove))
    ls = actions.add_parser("list", parents=[common],
                            help="workers with their KV endpoints and where they came from")
    ls.set_defaults(func=_guarded(_cmd_list))

    args_p = subparsers.add_parser(
        "worker-args", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="print the command (and environment) of a vLLM worker to start by hand")
    args_p.add_argument("--host", default="127.0.0.1",
                        help="address the worker binds and gateways/peers reach it on")
    args_p.add_argument("--advertise-host", default=None,
                        help="address peers pull KV from, if not --host (e.g. bind 0.0.0.0)")
    args_p.add_argument("--port", type=int, default=8100, help="worker HTTP port")
    args_p.add_argument("--kv-port", type=int, default=None,
                        help="KV block-server port (default: --port + 1000)")
    args_p.add_argument("--cpu-core", type=int, default=None, help="pin to this core (CPU)")
    args_p.add_argument("--gpu-index", type=int, default=None, help="CUDA_VISIBLE_DEVICES")
    add_worker_args_options(args_p)
    args_p.add_argument("--format", default="shell", choices=("shell", "json"),
                        help="a shell command line, or JSON")
    args_p.add_argument("--no-check-ports", dest="check_ports", action="store_false",
                        help="do not check that the ports are free here")
    args_p.set_defaults(func=_cmd_worker_args)


__all__ = ["AdminError", "register", "worker_command"]
