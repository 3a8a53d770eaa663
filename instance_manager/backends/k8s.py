"""Workers found through the Kubernetes API: every Ready pod matching a label selector joins
the gateway's registry; a pod that stops being Ready (deleted, evicted, failing its probe)
is drained and removed.

The `kubernetes` client lists the pods once, then watches from the list's resourceVersion;
when a watch ends or fails it lists again. A pod's role comes from its `fulcrum.io/role`
label, else from its StatefulSet ordinal (even: prefill, odd: decode); its port from the
`fulcrum.io/port` annotation, else `port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.membership import RegistryError, WorkerMembership

log = logging.getLogger("fulcrum.k8s")

ROLE_LABEL = "fulcrum.io/role"
PORT_ANNOTATION = "fulcrum.io/port"


@dataclass(frozen=True)
class PodWorker:
    name: str
    url: str
    role: str


def _get(obj: Any, *path: str) -> Any:
    """Walk attributes or dict keys (pods come as client models or plain dicts)."""
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    return obj


def pod_worker(pod: Any, default_port: int) -> PodWorker | None:
    """The worker a pod stands for, or None while it is not a Ready, addressed pod."""
    name = _get(pod, "metadata", "name")
    ip = _get(pod, "status", "pod_ip")
    if not name or not ip or _get(pod, "metadata", "deletion_timestamp"):
        return None
    conditions = _get(pod, "status", "conditions") or []
    if not any(_get(c, "type") == "Ready" and _get(c, "status") == "True" for c in conditions):
        return None
    labels = _get(pod, "metadata", "labels") or {}
    annotations = _get(pod, "metadata", "annotations") or {}
    role = labels.get(ROLE_LABEL)
    if role not in ("prefill", "decode"):
        ordinal = name.rsplit("-", 1)[-1]
        role = "prefill" if ordinal.isdigit() and int(ordinal) % 2 == 0 else "decode"
    port = int(annotations.get(PORT_ANNOTATION, default_port))
    host = f"[{ip}]" if ":" in ip else ip
    return PodWorker(name=name, url=f"http://{host}:{port}", role=role)


class PodDiscovery:
    """Keeps the registry equal to the Ready pods under a selector (a `WorkerSupervisor`)."""

    def __init__(self, registry: Callable[[], WorkerMembership], *, namespace: str,
                 selector: str, port: int = 8000, api_client: Any = None,
                 watch_timeout_s: int = 300, retry_s: float = 2.0) -> None:
        self._registry = registry
        self.namespace = namespace
        self.selector = selector
        self.port = port
        self._api_client = api_client
        self.watch_timeout_s = watch_timeout_s
        self.retry_s = retry_s
        self._pods: dict[str, Any] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leaving: dict[str, asyncio.Task] = {}
        self._lock = asyncio.Lock()
        self.generation = 0  # reconciliations done, for tests and logs

    # -- WorkerSupervisor --------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._watch_forever, name="k8s-discovery",
                                        daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._leaving.values():
            task.cancel()

    # -- the watch thread --------------------------------------------------------------
    def _api(self) -> Any:
        from kubernetes import client, config

        if self._api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api_client = client.ApiClient()
        return client.CoreV1Api(self._api_client)

    def _watch_forever(self) -> None:
        from kubernetes import watch

        api = self._api()
        while not self._stopping.is_set():
            try:
                listed = api.list_namespaced_pod(self.namespace, label_selector=self.selector)
                self._pods = {p.metadata.name: p for p in listed.items}
                self._publish()
                version = listed.metadata.resource_version
                stream = watch.Watch().stream(
                    api.list_namespaced_pod, self.namespace, label_selector=self.selector,
                    resource_version=version, timeout_seconds=self.watch_timeout_s)
                for event in stream:
                    if self._stopping.is_set():
                        return
                    pod = event["object"]
                    if event["type"] == "DELETED":
                        self._pods.pop(pod.metadata.name, None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._pods[pod.metadata.name] = pod
                    self._publish()
            except Exception as exc:  # noqa: BLE001 - the API server may come and go
                log.warning("pod list/watch failed (%r); again in %.0fs", exc, self.retry_s)
            self._stopping.wait(self.retry_s)

    def _publish(self) -> None:
        wanted = {}
        for pod in self._pods.values():
            worker = pod_worker(pod, self.port)
            if worker is not None:
                wanted[worker.name] = worker
        if self._loop is not None and not self._stopping.is_set():
            asyncio.run_coroutine_threadsafe(self.reconcile(wanted), self._loop)

    # -- on the gateway's loop ---------------------------------------------------------
    async def reconcile(self, wanted: dict[str, PodWorker]) -> None:
        """Add pods that became Ready, drain and remove workers whose pod went away."""
        async with self._lock:
            registry = self._registry()
            current = {n: e for n, e in registry.entries.items() if e.source == "k8s"}
            for name in current:
                moved = name in wanted and registry.cluster.view(name).url != wanted[name].url
                if (name not in wanted or moved) and name not in self._leaving:
                    self._leaving[name] = asyncio.create_task(self._leave(name))
            for name, worker in wanted.items():
                if name in current or name in self._leaving:
                    continue
                try:
                    registry.add(worker.url, worker.role, name=name, source="k8s")
                except RegistryError as exc:
                    log.error("pod %s cannot join: %s", name, exc)
            self.generation += 1

    async def _leave(self, name: str) -> None:
        try:
            await self._registry().remove(name, force=True)
        except RegistryError as exc:
            log.warning("pod %s: %s", name, exc)
        finally:
            self._leaving.pop(name, None)
        with contextlib.suppress(RuntimeError):
            self._publish()  # a pod that came back under the same name joins again
