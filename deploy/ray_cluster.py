"""`fulcrum up --backend ray`: the gateway here, the vLLM workers on a Ray cluster's nodes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("fulcrum")


def add_backend_args(up: argparse.ArgumentParser) -> None:
    group = up.add_argument_group("where workers run")
    group.add_argument("--backend", default="local", choices=("local", "ray"),
                       help="local: worker processes on this host; ray: one worker per GPU "
                            "(or per --ray-cores-per-worker CPUs) on every Ray node")
    group.add_argument("--address", default="auto",
                       help="Ray cluster address (with --backend ray): 'auto' joins the "
                            "cluster this host belongs to (`ray start` first)")
    group.add_argument("--ray-cores-per-worker", type=int, default=4,
                       help="CPUs per worker on CPU nodes")
    group.add_argument("--ray-cpu-bind", default="slot", choices=("slot", "global", "none"),
                       help="which cores a CPU worker binds: slot i on each node takes cores "
                            "i*k.., 'global' numbers slots across nodes (nodes sharing a "
                            "machine), 'none' leaves it to vLLM")
    group.add_argument("--ray-worker-port", type=int, default=None,
                       help="first worker port on each node (default: --port + 100)")


def run_ray(args: argparse.Namespace) -> int:
    """Build the gateway with a Ray back end and serve until Ctrl-C."""
    import uvicorn

    from deploy.cli import _control_config, _served_name
    from deploy.gateway_app import build_gateway
    from deploy.local_cluster import LOOPBACK
    from instance_manager.backends.ray_backend import RayBackend, RayOptions, WorkerTemplate
    from instance_manager.models import resolve_model
    from router.app import GatewayConfig
    from router.cluster import Cluster
    from router.dispatch import DispatchConfig

    model = resolve_model(args.model)
    served = args.served_model_name or _served_name(args.model, model)
    template = WorkerTemplate(model=model, served_model_name=served,
                              kv_connector=args.kv_connector, device=args.device,
                              max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                              extra_args=tuple(args.worker_arg or ()),
                              log_dir=str(Path(args.log_dir).resolve()))
    options = RayOptions(address=None if args.address == "local" else args.address,
                         cores_per_worker=args.ray_cores_per_worker,
                         max_workers=args.workers, prefill_workers=args.prefill_workers,
                         base_port=args.ray_worker_port or args.port + 100,
                         cpu_bind=args.ray_cpu_bind)
    dispatch = DispatchConfig(pd_enabled=args.kv_connector != "none")
    config = GatewayConfig(served_models=(served,), policy=args.policy, dispatch=dispatch,
                           admin_token=args.admin_token, admin_open=args.host in LOOPBACK,
                           control=_control_config(args))
    cluster = Cluster()
    app = None
    backend = RayBackend(lambda: app.state.registry, template, options)
    app = build_gateway(config, cluster, supervisor=backend)
    app.state.backend = backend
    from instance_manager.controller.scaling import attach

    attach(app.state.controller, backend, app.state.registry)  # flip-or-scale can add workers
    print(f"fulcrum: gateway on http://{args.host}:{args.port}; placing up to {args.workers} "
          f"worker(s) of {served} on the Ray cluster at {args.address} ...", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Give `fulcrum up` a `--backend` choice."""
    up = subparsers.choices.get("up")
    if up is None:
        return
    add_backend_args(up)
    local = up.get_default("func")

    def dispatch(args: argparse.Namespace) -> int:
        return run_ray(args) if args.backend == "ray" else local(args)

    up.set_defaults(func=dispatch)
