"""A `fulcrum up` subprocess for live benchmarks: start, wait until ready, admin calls, stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from deploy.ports import free_port_block

REPO = Path(__file__).resolve().parents[1]


class UpCluster:
    """`python -m deploy.cli up --model tiny --workers N ...` and its admin API."""

    def __init__(self, log_dir: Path, workers: int, extra: Sequence[str] = (),
                 base_port: int = 18700, side_base_port: int = 26700,
                 model: str = "tiny") -> None:
        self.port = free_port_block(workers + 1, base_port)
        side = free_port_block(workers, side_base_port)
        self.cmd = [sys.executable, "-m", "deploy.cli", "up", "--model", model,
                    "--workers", str(workers), "--port", str(self.port),
                    "--side-channel-base-port", str(side), "--log-dir", str(log_dir), *extra]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, stdout=open(log_dir / "up.log", "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, cwd=REPO)
        self.url = f"http://127.0.0.1:{self.port}"

    def admin(self, method: str, path: str, **body: object) -> dict:
        r = httpx.request(method, self.url + "/admin" + path, json=body or None, timeout=300)
        r.raise_for_status()
        return r.json()

    def workers(self) -> list[dict]:
        return self.admin("GET", "/workers")["workers"]

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fulcrum up exited ({self.proc.returncode}): {self.cmd}")
            try:
                ws = self.workers()
                if ws and all(w["state"] == "ready" for w in ws):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("cluster not ready")

    def roles(self) -> dict[str, str]:
        return {w["name"]: w["role"] for w in self.workers()}

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
