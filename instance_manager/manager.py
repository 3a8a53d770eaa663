"""Supervises the worker processes: start, readiness, restart with backoff, stop.

The manager is the only writer of worker *states* that come from processes
(starting, ready, dead); roles belong to the router and the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass

import httpx

from core.worker_table import WorkerTable
from core.workers import Role, WorkerState
from instance_manager.worker_process import WorkerSpec, kill_group, launch, log_tail, terminate

log = logging.getLogger("fulcrum.manager")


@dataclass(frozen=True)
class SupervisorConfig:
    """Readiness and restart knobs."""

    ready_timeout_s: float = 600.0
    warmup_timeout_s: float = 300.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    stable_after_s: float = 120.0
    health_poll_s: float = 1.0


class WorkerFailedToStart(RuntimeError):
    """A worker exited or timed out before it became ready."""


class InstanceManager:
    """Runs one supervising task per worker; registers them in the gateway's worker table."""

    def __init__(self, specs: list[WorkerSpec], roles: dict[str, Role], cluster: WorkerTable,
                 config: SupervisorConfig | None = None) -> None:
        self.specs = {s.name: s for s in specs}
        self.roles = roles
        self.cluster = cluster
        self.config = config or SupervisorConfig()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Register every worker and start supervising; returns at once."""
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        for spec in self.specs.values():
            self.cluster.add(spec.name, spec.url, self.roles[spec.name], WorkerState.STARTING)
            self._tasks.append(asyncio.create_task(self._supervise(spec), name=spec.name))

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every worker is ready; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(w.state == WorkerState.READY for w in self.cluster.snapshot().workers):
                return True
            await asyncio.sleep(0.5)
        return False

    def pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.pid if proc and proc.returncode is None else None

    async def stop(self) -> None:
        """Stop supervising and terminate every worker process group."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(terminate(p) for p in self._procs.values()
                               if p.returncode is None), return_exceptions=True)
        for proc in self._procs.values():  # leftovers of groups whose leader already exited
            kill_group(proc.pid, signal.SIGKILL)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        log.info("all workers stopped")

    async def stop_worker(self, name: str) -> None:
        """Stop supervising one worker and end its process (it left the registry)."""
        self.specs.pop(name, None)
        for task in [t for t in self._tasks if t.get_name() == name]:
            task.cancel()
            self._tasks.remove(task)
            await asyncio.gather(task, return_exceptions=True)
        proc = self._procs.pop(name, None)
        if proc is not None and proc.returncode is None:
            await terminate(proc)

    async def _supervise(self, spec: WorkerSpec) -> None:
        backoff = self.config.backoff_initial_s
        while not self._stopping:
            started = time.monotonic()
            proc = await launch(spec)
            self._procs[spec.name] = proc
            self.cluster.set_process(spec.name, proc.pid)
            self.cluster.set_state(spec.name, WorkerState.STARTING)
            log.info("worker %s starting (pid %d, %s, log %s)", spec.name, proc.pid, spec.url,
                     spec.log_path)
            try:
                await self._become_ready(spec, proc)
            except WorkerFailedToStart as exc:
                log.error("worker %s failed to start: %s\n%s", spec.name, exc,
                          log_tail(spec.log_path))
                await terminate(proc)
            else:
                self.cluster.set_state(spec.name, WorkerState.READY)
                log.info("worker %s ready as %s after %.1fs", spec.name,
                         self.cluster.view(spec.name).role.value, time.monotonic() - started)
                await proc.wait()
                kill_group(proc.pid, signal.SIGKILL)  # reap engine-core children
            self.cluster.set_state(spec.name, WorkerState.DEAD)
            if self._stopping:
                return
            if time.monotonic() - started > self.config.stable_after_s:
                backoff = self.config.backoff_initial_s
            log.error("worker %s exited (code %s); restarting in %.0fs. Log tail:\n%s",
                      spec.name, proc.returncode, backoff, log_tail(spec.log_path, 15))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)

    async def _become_ready(self, spec: WorkerSpec, proc: asyncio.subprocess.Process) -> None:
        assert self._client is not None
        deadline = time.monotonic() + self.config.ready_timeout_s
        while True:
            if proc.returncode is not None:
                raise WorkerFailedToStart(f"exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise WorkerFailedToStart(f"not healthy after {self.config.ready_timeout_s}s")
            with contextlib.suppress(httpx.HTTPError):
                if (await self._client.get(spec.url + "/health")).status_code == 200:
                    break
            await asyncio.sleep(self.config.health_poll_s)
        try:  # the first request on CPU pays for one-time set-up; keep it off users
            resp = await self._client.post(
                spec.url + "/v1/completions",
                json={"model": spec.served_model_name, "prompt": "Hello", "max_tokens": 2},
                headers={"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {},
                timeout=self.config.warmup_timeout_s)
        except httpx.HTTPError as exc:
            raise WorkerFailedToStart(f"warm-up request failed: {exc!r}") from None
        if resp.status_code != 200:
            raise WorkerFailedToStart(f"warm-up answered {resp.status_code}: {resp.text[:300]}")
