"""How worker back ends (Ray, Kubernetes, the local supervisor) add workers to a running
gateway and take them out, without importing the gateway: it implements
`WorkerMembership` (`router.worker_registry.WorkerRegistry`) and hands it to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from core.worker_table import WorkerTable
from core.workers import Role


class RegistryError(Exception):
    """A join or leave that must not happen; `status` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int = 409, code: str = "registry_conflict"):
        super().__init__(message)
        self.status = status
        self.code = code


class WorkerBackend(Protocol):
    """Whoever runs worker processes the registry may stop (Ray, the local manager)."""

    async def stop_worker(self, name: str) -> None: ...


class MemberEntry(Protocol):
    """What a back end reads of one registered worker."""

    @property
    def source(self) -> str: ...


class WorkerMembership(Protocol):
    """The gateway's registry of joining and leaving workers, as back ends use it."""

    @property
    def cluster(self) -> WorkerTable: ...

    @property
    def entries(self) -> Mapping[str, MemberEntry]: ...

    def add(self, url: str, role: Role | str, *, name: str | None = None,
            source: str = "admin", owner: WorkerBackend | None = None) -> MemberEntry:
        """Register a worker and start joining it; returns at once (RegistryError)."""
        ...

    async def wait_joined(self, name: str, timeout_s: float | None = None) -> MemberEntry:
        """Until the worker is READY; RegistryError when its join failed."""
        ...

    async def remove(self, name: str, *, force: bool = False, timeout_s: float | None = None,
                     stop: bool = True) -> dict:
        """Drain, then deregister (and stop it through its owner unless `stop` is False)."""
        ...
