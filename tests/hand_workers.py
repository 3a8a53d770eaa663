"""vLLM workers started by hand (from `fulcrum worker-args`) and a bare gateway, for tests of
workers that join and leave at run time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.vllm_cluster import MAX_MODEL_LEN, MODEL_NAME

REPO = Path(__file__).resolve().parents[1]


def fulcrum(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=False)


def worker_args(port: int, *extra: str) -> dict:
    """`fulcrum worker-args --format json` for a tiny-model CPU worker on `port`."""
    out = fulcrum("worker-args", "--model", "tiny", "--served-model-name", MODEL_NAME,
                  "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
                  "--kv-cache-gib", "1", "--format", "json", *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def start_process(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Run `argv` (its first element 'python' becomes this interpreter) in its own group."""
    full_env = {**os.environ, **env}
    argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    out = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600,
              path: str = "/health") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy:\n{log.read_text()[-3000:]}")


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` with `labels` on `url`/metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
