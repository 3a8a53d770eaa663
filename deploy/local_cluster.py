"""A gateway plus N local vLLM workers in one process tree: what `fulcrum up` runs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from core.workers import Role
from deploy.gateway_app import build_gateway
from deploy.ports import busy_ports, kv_port_for
from instance_manager.manager import InstanceManager, SupervisorConfig
from instance_manager.worker_process import WorkerSpec, choose_dtype
from kv_transfer.settings import worker_kv_settings
from router.admission import AdmissionConfig
from router.app import GatewayConfig
from router.cluster import Cluster
from router.control_port import ControlConfig
from router.dispatch import DispatchConfig
from router.health import HealthConfig
from router.peers import PeerConfig
from router.security import AuthConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("fulcrum.cluster")


@dataclass(frozen=True)
class ClusterOptions:
    """What `fulcrum up` takes; defaults give a 1-prefill/1-decode CPU cluster."""

    model: str
    served_model_name: str
    workers: int = 2
    prefill_workers: int | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    worker_host: str = "127.0.0.1"
    worker_base_port: int | None = None
    side_channel_base_port: int | None = None  # None: each worker's port + 1000
    kv_connector: str = "fulcrum"
    device: str = "cpu"
    dtype: str = "auto"
    tensor_parallel_size: int = 1  # GPUs per worker
    gpus: tuple[int, ...] | None = None  # GPU ids to hand out (default 0, 1, ...)
    max_model_len: int | None = None
    kv_cache_gib: int = 2
    policy: str = "least-loaded"
    log_dir: Path = Path(".fulcrum/logs")
    admin_token: str | None = None
    extra_worker_args: tuple[str, ...] = ()
    supervisor: SupervisorConfig = SupervisorConfig()
    dispatch: DispatchConfig = DispatchConfig()
    control: ControlConfig = ControlConfig()
    max_body_mb: float = 32.0
    admission: AdmissionConfig = AdmissionConfig()
    health: HealthConfig = HealthConfig()
    auth: AuthConfig = AuthConfig()  # its worker_api_key also starts workers with --api-key
    peers: PeerConfig | None = None  # the leading one of several gateway processes


def initial_roles(names: list[str], prefill_workers: int | None,
                  kv_connector: str) -> dict[str, Role]:
    """First `prefill_workers` names prefill, the rest decode. With no KV connector, or
    a single worker, everyone decodes (aggregated serving: each computes its prompts)."""
    if kv_connector == "none" or len(names) < 2:
        return {n: Role.DECODE for n in names}
    count = len(names) // 2 if prefill_workers is None else prefill_workers
    if not 0 <= count < len(names):
        raise ValueError(f"--prefill-workers must leave at least one decode worker "
                         f"(got {count} of {len(names)})")
    return {n: (Role.PREFILL if i < count else Role.DECODE) for i, n in enumerate(names)}


def gpu_ranges(workers: int, tensor_parallel_size: int,
               gpus: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """Consecutive GPU ranges, `tensor_parallel_size` per worker, from `gpus` (0, 1, ...)."""
    if tensor_parallel_size < 1:
        raise ValueError("--tensor-parallel-size must be at least 1")
    need = workers * tensor_parallel_size
    pool = tuple(gpus) if gpus is not None else tuple(range(need))
    if len(pool) < need:
        raise ValueError(f"{workers} worker(s) x {tensor_parallel_size} GPU(s) need {need} "
                         f"GPUs, only {len(pool)} given ({','.join(map(str, pool))})")
    return [pool[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]
            for i in range(workers)]


def worker_specs(opts: ClusterOptions) -> list[WorkerSpec]:
    """One spec per worker: ports, core or GPU, KV settings and log file."""
    cores = os.cpu_count() or 1
    base = opts.worker_base_port or opts.port + 1
    dtype = choose_dtype(opts.device, opts.dtype)
    if dtype and opts.dtype == "auto":
        log.info("this CPU has no native bf16 (avx512_bf16/amx_bf16): workers run in %s "
                 "(--dtype overrides)", dtype)
    specs = []
    gpus = (gpu_ranges(opts.workers, opts.tensor_parallel_size, opts.gpus)
            if opts.device == "gpu" else [()] * opts.workers)
    for i in range(opts.workers):
        name = f"w{i}"
        specs.append(WorkerSpec(
            name=name, model=opts.model, served_model_name=opts.served_model_name,
            host=opts.worker_host, port=base + i, log_path=opts.log_dir / f"{name}.log",
            kv=worker_kv_settings(opts.kv_connector,
                                  side_channel_port=side_channel_port(opts, base + i, i),
                                  host=opts.worker_host),
            device=opts.device,
            cpu_core=(i % cores) if opts.device == "cpu" else None,
            gpu_ids=gpus[i], tensor_parallel_size=opts.tensor_parallel_size,
            max_model_len=opts.max_model_len, kv_cache_gib=opts.kv_cache_gib, dtype=dtype,
            extra_args=opts.extra_worker_args, api_key=opts.auth.worker_api_key))
    return specs


def side_channel_port(opts: ClusterOptions, http_port: int, index: int) -> int:
    """The worker's KV port: derived from its HTTP port unless a base was given."""
    if opts.side_channel_base_port is None:
        return kv_port_for(http_port)
    return opts.side_channel_base_port + index


def check_ports_free(opts: ClusterOptions, specs: list[WorkerSpec]) -> None:
    """Refuse to start when a port this cluster needs is taken (another cluster's?)."""
    wanted = {opts.port: "gateway"}
    for spec in specs:
        wanted[spec.port] = f"{spec.name} HTTP"
        kv_port = spec.kv.kv_transfer_config.get("kv_connector_extra_config", {}).get("port")
        kv_port = kv_port or int(spec.kv.env.get("VLLM_NIXL_SIDE_CHANNEL_PORT", 0)) or None
        if kv_port:
            if kv_port in wanted:
                raise PortsBusy(f"port {kv_port} is wanted twice ({wanted[kv_port]} and "
                                f"{spec.name} KV)")
            wanted[kv_port] = f"{spec.name} KV"
    busy = busy_ports(sorted(wanted), opts.worker_host)
    if busy:
        taken = ", ".join(f"{p} ({wanted[p]})" for p in busy)
        raise PortsBusy(f"ports in use: {taken}. Is another cluster running? Pick another "
                        f"--port (worker and KV ports are derived from it).")


class PortsBusy(RuntimeError):
    """A port the cluster needs is taken."""


def build_local_cluster(opts: ClusterOptions) -> tuple[FastAPI, InstanceManager]:
    """The gateway app, whose lifespan starts and stops the supervised workers.
    PortsBusy when a port it needs is taken."""
    specs = worker_specs(opts)
    check_ports_free(opts, specs)
    roles = initial_roles([s.name for s in specs], opts.prefill_workers, opts.kv_connector)
    cluster = Cluster()
    manager = InstanceManager(specs, roles, cluster, opts.supervisor)
    dispatch = opts.dispatch
    if opts.kv_connector == "none":
        dispatch = DispatchConfig(**{**dispatch.__dict__, "pd_enabled": False})
    config = GatewayConfig(served_models=(opts.served_model_name,), policy=opts.policy,
                           dispatch=dispatch, admin_token=opts.admin_token,
                           admin_open=opts.host in LOOPBACK, control=opts.control,
                           max_body_mb=opts.max_body_mb, admission=opts.admission,
                           health=opts.health, auth=opts.auth, peers=opts.peers)
    app = build_gateway(config, cluster, supervisor=manager)
    app.state.manager = manager
    for spec in specs:  # `fulcrum worker remove` drains these, then the manager stops them
        app.state.registry.adopt(spec.name, source="local", owner=manager)
    return app, manager
