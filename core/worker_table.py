"""What code outside the gateway may do to its table of workers.

The gateway owns the one mutable table (`router.cluster.Cluster`); the flip coordinator,
the process supervisor and the remote back ends are handed it and change it through
this interface only, so none of them imports the router.
"""

from __future__ import annotations

from typing import Protocol

from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView


class WorkerTable(Protocol):
    """The gateway's workers: read as views and snapshots, changed one field at a time."""

    def add(self, name: str, url: str, role: Role,
            state: WorkerState = WorkerState.STARTING) -> None: ...

    def names(self) -> list[str]: ...

    def view(self, name: str) -> WorkerView: ...

    def snapshot(self) -> ClusterSnapshot: ...

    def set_state(self, name: str, state: WorkerState) -> None: ...

    def set_role(self, name: str, role: Role) -> None: ...

    def set_process(self, name: str, pid: int | None) -> None: ...
