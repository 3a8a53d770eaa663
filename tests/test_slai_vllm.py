"""The SLAI scheduler class inside a real vLLM CPU server (one server for the module).

The server runs with `--max-num-seqs 1`, so requests queue behind a long-running one and
the waiting-queue order decides who is admitted next. The scheduler logs each admission
(`log_admissions`), which is what these tests read, together with client-side timings.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from instance_manager.models import resolve_model

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
SCHEDULER = "instance_manager.engine_plugins.slai_scheduler.SLAIAsyncScheduler"
ADMIT = re.compile(r"SLAI admit prompt_tokens=(\d+) tbt_s=([0-9.]+)")
BURST_LENGTHS = (1600, 1200, 800, 400, 200, 50)  # sent longest first


def _free_port(lo: int = 8330, hi: int = 8399) -> int:
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


class Server:
    def __init__(self, base: str, log: Path, model: str) -> None:
        self.base, self.log, self.model = base, log, model

    def admissions(self) -> list[tuple[int, float]]:
        return [(int(n), float(t)) for n, t in ADMIT.findall(self.log.read_text())]

    def num_waiting(self) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        found = re.search(r"^vllm:num_requests_waiting\{[^}]*\} ([0-9.]+)$", text, re.M)
        return float(found.group(1)) if found else -1.0

    def complete(self, prompt_tokens: int, max_tokens: int, xargs: dict | None = None) -> dict:
        body = {"model": self.model, "prompt": [100 + i % 500 for i in range(prompt_tokens)],
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        if xargs:
            body["vllm_xargs"] = xargs
        response = httpx.post(f"{self.base}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = resolve_model("tiny")
    port = _free_port()
    log = tmp_path_factory.mktemp("slai") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
           "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "1",
           "--scheduler-cls", SCHEDULER,
           "--additional-config", '{"slai": {"log_admissions": true}}']
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield Server(base, log, "tiny")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_scheduler_class_loads_and_serves(server):
    text = server.log.read_text()
    assert "SLAI scheduler active" in text
    result = server.complete(prompt_tokens=16, max_tokens=8)
    assert result["usage"]["completion_tokens"] == 8
    assert server.admissions()[-1] == (16, 0.2)  # default TBT target
