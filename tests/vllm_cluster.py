"""A real local cluster (`fulcrum up` on the tiny test model) for tests.

Started once per test module that asks for it: two vLLM CPU workers, one per
core, cost ~30-60 s to start on CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.ports import free_port_block

MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 512


@dataclass
class LiveCluster:
    """Handle on a running `fulcrum up` process."""

    url: str
    proc: subprocess.Popen
    log_dir: Path

    def workers(self) -> dict[str, dict]:
        data = httpx.get(self.url + "/admin/workers", timeout=5).json()
        return {w["name"]: w for w in data["workers"]}

    def worker_url(self, name: str) -> str:
        return self.workers()[name]["url"]

    def by_role(self, role: str) -> str:
        return next(n for n, w in self.workers().items() if w["role"] == role)

    def wait_all_ready(self, timeout_s: float = 600, min_restarts: int = 0,
                       restarted: str | None = None, old_pid: int | None = None) -> dict:
        """Every worker ready; with `restarted`, that worker also runs a new process
        (not `old_pid`), so a kill that the manager has not noticed yet cannot pass."""
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fulcrum up exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                last = self.workers()
                crashed = [n for n, w in last.items() if w["restarts"] > min_restarts + 2]
                if crashed:
                    raise RuntimeError(f"workers {crashed} keep crashing:\n{self.log_tail()}")
                fresh = restarted is None or (last[restarted]["pid"] != old_pid
                                              and last[restarted]["restarts"] >= 1)
                if last and fresh and all(w["state"] == "ready"
                                          and w["restarts"] >= min_restarts
                                          for w in last.values()):
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"workers not ready after {timeout_s}s: {last}\n{self.log_tail()}")

    def log_tail(self) -> str:
        parts = []
        for log in [self.log_dir.parent / "fulcrum-up.log", *sorted(self.log_dir.glob("*.log"))]:
            if not log.exists():
                continue
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(
                errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def metric(self, worker: str, name: str, **labels: str) -> float:
        """Sum of a worker's Prometheus samples matching `name` and `labels`."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.worker_url(worker) + "/metrics", timeout=5).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def kill_worker(self, name: str) -> int:
        """SIGKILL a worker's whole process group, as a crash would; returns its pid."""
        pid = self.workers()[name]["pid"]
        os.killpg(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_cluster(tmp: Path, workers: int = 2, extra_args: tuple[str, ...] = ()) -> LiveCluster:
    """Launch `fulcrum up --model tiny` on free ports and wait until every worker serves."""
    gateway = free_port_block(1, 18000 + (os.getpid() % 500) * 8)
    worker_base = free_port_block(workers, gateway + 1)
    side = free_port_block(workers, 25600 + (os.getpid() % 500) * 8)
    log_dir = tmp / "logs"
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--model", "tiny",
           "--served-model-name", MODEL_NAME, "--port", str(gateway),
           "--workers", str(workers),
           "--worker-base-port", str(worker_base), "--side-channel-base-port", str(side),
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", "1",
           "--log-dir", str(log_dir), *extra_args]
    env = dict(os.environ)
    out = open(tmp / "fulcrum-up.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    cluster = LiveCluster(f"http://127.0.0.1:{gateway}", proc, log_dir)
    try:
        cluster.wait_all_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster
