"""vLLM workers placed on a Ray cluster's nodes.

Each worker is a Ray actor pinned to one node (`NodeAffinitySchedulingStrategy`) holding the
node's share of resources (one GPU on GPU nodes, `cores_per_worker` CPUs on CPU nodes); the
actor runs the vLLM server as a child process on that node, on ports it checks there. The
back end registers every worker with the gateway's registry, watches it, and when its
process dies removes it and starts it again (same node, same role); on shutdown it stops
every actor. On CPU, KV between nodes moves over the connector's TCP transport: each
worker's connector is told its Ray node id, so workers on different nodes never try the
same-host memory path, even when two nodes share one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.membership import RegistryError, WorkerMembership
from core.workers import Role

log = logging.getLogger("fulcrum.ray")

_REPO_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class WorkerTemplate:
    """What every worker runs; ports and placement come from the back end."""

    model: str
    served_model_name: str
    kv_connector: str = "fulcrum"
    device: str = "cpu"
    max_model_len: int | None = None
    kv_cache_gib: int = 2
    extra_args: tuple[str, ...] = ()
    log_dir: str = ".fulcrum/logs"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = "auto"
    cores_per_worker: int = 4
    max_workers: int | None = None  # start at most this many (the rest is spare capacity)
    prefill_workers: int | None = None
    base_port: int = 8100
    cpu_bind: str = "slot"  # slot: cores slot*k.. on each node; global: across nodes; none
    monitor_interval_s: float = 2.0
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    start_timeout_s: float = 900.0


@dataclass(frozen=True)
class Slot:
    """One worker's place: a node and its index there."""

    node_id: str
    node_ip: str
    index: int  # on its node
    global_index: int
    gpu: bool

    @property
    def name(self) -> str:
        return f"ray-{self.node_id[:8]}-{self.index}"


def plan_slots(nodes: list[dict], cores_per_worker: int) -> list[Slot]:
    """One slot per GPU on GPU nodes, one per `cores_per_worker` CPUs on CPU nodes
    (`nodes` as `ray.nodes()` returns them); alive nodes only, in a stable order."""
    slots: list[Slot] = []
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: n["NodeID"])
    for node in alive:
        res = node.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        count = gpus if gpus else int(res.get("CPU", 0)) // max(1, cores_per_worker)
        for i in range(count):
            slots.append(Slot(node["NodeID"], node.get("NodeManagerAddress", "127.0.0.1"), i,
                              len(slots), gpus > 0))
    return slots


def initial_role(index: int, total: int, prefill_workers: int | None) -> Role:
    count = total // 2 if prefill_workers is None else prefill_workers
    return Role.PREFILL if index < count and total > 1 else Role.DECODE


class WorkerActor:
    """Runs on its node: starts the vLLM server there and reports where it listens."""

    def __init__(self, template: WorkerTemplate, slot: Slot, base_port: int,
                 cpus: str | None) -> None:
        self.template = template
        self.slot = slot
        self.base_port = base_port
        self.cpus = cpus
        self.proc: Any = None

    def start(self) -> dict:
        import subprocess

        import ray

        from deploy.ports import busy_ports, kv_port_for
        from instance_manager.worker_process import WorkerSpec, _die_with_parent
        from kv_transfer.settings import worker_kv_settings

        ip = ray.util.get_node_ip_address()
        node_id = ray.get_runtime_context().get_node_id()
        # numbered across the cluster: nodes that share a machine must not pick one port
        port = self.base_port + self.slot.global_index
        while busy_ports([port, kv_port_for(port)], ip):
            port += 1
        kv = worker_kv_settings(self.template.kv_connector, side_channel_port=kv_port_for(port),
                                host=ip)
        if kv.connector == "fulcrum":
            extra = kv.kv_transfer_config["kv_connector_extra_config"]
            extra["node_id"] = node_id
        t = self.template
        log_path = Path(t.log_dir) / f"{self.slot.name}.log"
        spec = WorkerSpec(
            name=self.slot.name, model=t.model, served_model_name=t.served_model_name,
            host=ip, port=port, log_path=log_path, kv=kv, device=t.device,
            max_model_len=t.max_model_len, kv_cache_gib=t.kv_cache_gib,
            extra_args=t.extra_args,
            extra_env={"VLLM_CPU_OMP_THREADS_BIND": self.cpus} if self.cpus else {})
        env = spec.environment()
        if t.device == "gpu":  # Ray already set CUDA_VISIBLE_DEVICES for this actor
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(spec.command(), env=env, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        return {"url": spec.url, "pid": self.proc.pid, "node_id": node_id, "ip": ip,
                "kv_port": kv_port_for(port), "log": str(log_path)}

    def poll(self) -> int | None:
        """None while the vLLM process runs, else its exit code."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except Exception:  # noqa: BLE001 - whatever happens, it must go
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def _cpu_set(slot: Slot, cores: int, mode: str) -> str | None:
    if slot.gpu or mode == "none":
        return None
    first = (slot.index if mode == "slot" else slot.global_index) * cores
    return str(first) if cores == 1 else f"{first}-{first + cores - 1}"


@dataclass
class _Running:
    slot: Slot
    role: Role
    actor: Any = None
    info: dict = field(default_factory=dict)
    task: asyncio.Task | None = None
    restarts: int = 0
    started_at: float = 0.0


class RayBackend:
    """Starts, registers, watches, restarts and stops Ray-placed workers
    (a gateway `WorkerSupervisor`, and the registry's owner of these workers)."""

    def __init__(self, registry: Callable[[], WorkerMembership], template: WorkerTemplate,
                 options: RayOptions | None = None) -> None:
        self._registry = registry  # the gateway's registry, once it exists
        self.template = template
        self.options = options or RayOptions()
        self.slots: list[Slot] = []
        self.running: dict[str, _Running] = {}
        self._stopping = False
        self._connected_here = False
        self.start_seconds: list[float] = []  # measured starts, for scaling decisions
        self._remote_cls: Any = None

    @property
    def registry(self) -> WorkerMembership:
        return self._registry()

    # -- WorkerSupervisor -------------------------------------------------------------
    async def start(self) -> None:
        import ray

        if not ray.is_initialized():
            env = {"PYTHONPATH": os.pathsep.join(
                p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}
            await asyncio.to_thread(ray.init, address=self.options.address,
                                    namespace="fulcrum", runtime_env={"env_vars": env},
                                    log_to_driver=False)
            self._connected_here = True
        self.slots = plan_slots(await asyncio.to_thread(ray.nodes),
                                self.options.cores_per_worker)
        if not self.slots:
            raise RuntimeError("the Ray cluster has no node with room for a worker "
                               f"({self.options.cores_per_worker} CPUs or one GPU)")
        wanted = self.slots[:self.options.max_workers or len(self.slots)]
        log.info("Ray cluster: %d worker slots on %d nodes; starting %d", len(self.slots),
                 len({s.node_id for s in self.slots}), len(wanted))
        for i, slot in enumerate(wanted):
            self._launch(slot, initial_role(i, len(wanted), self.options.prefill_workers))

    def _launch(self, slot: Slot, role: Role) -> _Running:
        run = _Running(slot=slot, role=role)
        self.running[slot.name] = run
        run.task = asyncio.create_task(self._keep_running(run), name=slot.name)
        return run

    async def start_worker(self, role: Role) -> str | None:
        """Start one more worker in a free slot (None when every slot is taken)."""
        free = [s for s in self.slots if s.name not in self.running]
        if not free or self._stopping:
            return None
        return self._launch(free[0], role).slot.name

    async def stop_worker(self, name: str) -> None:
        """The registry removed this worker: stop it for good."""
        run = self.running.pop(name, None)
        if run is None:
            return
        if run.task is not None and run.task is not asyncio.current_task():
            run.task.cancel()
        await self._kill(run)

    async def stop(self) -> None:
        import ray

        self._stopping = True
        runs = list(self.running.values())
        self.running.clear()
        for run in runs:
            if run.task is not None:
                run.task.cancel()
        await asyncio.gather(*(self._kill(r) for r in runs), return_exceptions=True)
        if self._connected_here:
            await asyncio.to_thread(ray.shutdown)
        log.info("Ray workers stopped")

    # -- one slot's life ---------------------------------------------------------------
    def _actor_class(self) -> Any:
        import ray

        if self._remote_cls is None:
            self._remote_cls = ray.remote(WorkerActor)
        return self._remote_cls

    async def _spawn(self, run: _Running) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        slot, opts = run.slot, self.options
        resources = {"num_gpus": 1, "num_cpus": 1} if slot.gpu else \
            {"num_cpus": opts.cores_per_worker}
        actor = self._actor_class().options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False),
            name=f"fulcrum-{slot.name}", lifetime=None, **resources,
        ).remote(self.template, slot, opts.base_port,
                 _cpu_set(slot, opts.cores_per_worker, opts.cpu_bind))
        run.actor = actor
        run.info = await actor.start.remote()
        run.started_at = time.monotonic()

    async def _keep_running(self, run: _Running) -> None:
        backoff = self.options.restart_backoff_s
        name = run.slot.name
        while not self._stopping:
            began = time.monotonic()
            try:
                await self._spawn(run)
                self.registry.add(run.info["url"], run.role, name=name, source="ray",
                                  owner=self)
                self.registry.cluster.set_process(name, run.info["pid"])
                await self.registry.wait_joined(name, self.options.start_timeout_s)
                self.start_seconds.append(time.monotonic() - began)
                log.info("%s ready on node %s at %s (KV port %s) after %.0fs", name,
                         run.info["node_id"][:8], run.info["url"], run.info["kv_port"],
                         time.monotonic() - began)
                backoff = self.options.restart_backoff_s
                while await self._alive(run):
                    await asyncio.sleep(self.options.monitor_interval_s)
                log.error("%s exited; restarting it on the same node", name)
            except (RegistryError, TimeoutError) as exc:
                log.error("%s did not start: %s", name, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Ray errors: actor or node gone
                log.error("%s failed: %r", name, exc)
            if self._stopping or name not in self.running:
                return
            run.role = self._last_role(name, run.role)
            with contextlib.suppress(RegistryError):
                await self.registry.remove(name, force=True, timeout_s=5, stop=False)
            await self._kill(run)
            run.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self.options.restart_backoff_max_s)

    def _last_role(self, name: str, fallback: Role) -> Role:
        try:
            return self.registry.cluster.view(name).role
        except KeyError:
            return fallback

    async def _alive(self, run: _Running) -> bool:
        try:
            return await run.actor.poll.remote() is None
        except Exception:  # noqa: BLE001 - the actor (or its node) is gone
            return False

    async def _kill(self, run: _Running) -> None:
        import ray

        if run.actor is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run.actor.stop.remote(), 30)
        with contextlib.suppress(Exception):
            ray.kill(run.actor)
        run.actor = None

    def describe(self) -> list[dict]:
        return [{"name": n, "node_id": r.slot.node_id, "role": r.role.value,
                 "restarts": r.restarts, **{k: r.info.get(k) for k in ("url", "pid")}}
                for n, r in self.running.items()]


def template_from(opts: Any) -> WorkerTemplate:
    """A template from `fulcrum up`-style options."""
    return replace(WorkerTemplate(model=opts.model, served_model_name=opts.served_model_name),
                   kv_connector=opts.kv_connector, device=opts.device,
                   max_model_len=opts.max_model_len, kv_cache_gib=opts.kv_cache_gib,
                   extra_args=tuple(opts.extra_worker_args), log_dir=str(opts.log_dir))
