"""The SLAI scheduler class inside a real vLLM CPU server, against vLLM's FCFS as a control.

Both servers run with `--max-num-seqs 1` (one seat). A burst is queued deterministically,
whatever the machine's speed: the engine is paused (`POST /pause?mode=keep`, a dev-mode
endpoint: nothing is scheduled, new requests still enter the waiting queue), the burst is
sent longest-first, each request only after the API server logged handing the previous one
to the engine ("Added request"), and then the engine is resumed. The resume call travels
on the same socket as the adds, behind them, so the whole burst is in the waiting queue
when scheduling restarts. The burst then runs one request at a time, in the order the
scheduler takes them from its waiting queue: shortest-first under SLAI (the exact reverse
of arrival), arrival order under FCFS.

At most one server is up at a time (`Servers` stops one before starting another); the SLAI
tests come first in this file, so a plain run starts two servers, one after the other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from instance_manager.models import resolve_model

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
SCHEDULER = "instance_manager.engine_plugins.slai_scheduler.SLAIAsyncScheduler"
ADMIT = re.compile(r"SLAI admit prompt_tokens=(\d+) tbt_s=([0-9.]+) waiting=(\d+)")
ADDED = "Added request "  # AsyncLLM's line once a request was sent to the engine
# The API server's access log, one line per response sent, in the order sent.
RESPONDED = re.compile(r'"POST /v1/completions\?burst=(\d+) HTTP/1\.1" 200')
PORTS = (20000, 20099)
# Aging credit, tokens per second waited. The burst's lengths differ by >= 400 tokens, so
# aging could swap two of them only if their arrivals were >= 400 s apart: never here (the
# module times out first). At the default, 100 tokens/s, it would take 4 s.
AGING_TOKENS_PER_S = 1.0
BURST_LENGTHS = (1600, 1200, 800, 400)  # sent in this order: longest first
BURST_OUTPUT_TOKENS = 32  # each burst request holds the seat for 32 decode steps


def _free_port(lo: int, hi: int) -> int:
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def _prompt(tokens: int, first: int) -> list[int]:
    """Token ids; distinct `first` values keep prompts from sharing a cached prefix."""
    return [first + i % 500 for i in range(tokens)]


class Server:
    """A running vLLM server: its address, its log, and a few client calls."""

    def __init__(self, base: str, log: Path, model: str) -> None:
        self.base, self.log, self.model = base, log, model

    def admissions(self) -> list[tuple[int, float, int]]:
        """(prompt_tokens, tbt_s, still waiting) of each prefill SLAI admitted, in order."""
        return [(int(n), float(t), int(w)) for n, t, w in ADMIT.findall(self.log.read_text())]

    def num_added(self) -> int:
        """Requests the API server has handed to the engine so far."""
        return self.log.read_text().count(ADDED)

    def post(self, path: str) -> None:
        httpx.post(f"{self.base}{path}", timeout=30).raise_for_status()

    def body(self, prompt_tokens: int, max_tokens: int, first: int = 100) -> dict:
        return {"model": self.model, "prompt": _prompt(prompt_tokens, first),
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}

    def complete(self, prompt_tokens: int, max_tokens: int, first: int = 100,
                 query: str = "") -> dict:
        response = httpx.post(f"{self.base}/v1/completions{query}",
                              json=self.body(prompt_tokens, max_tokens, first), timeout=120)
        response.raise_for_status()
        return response.json()


def _start(scheduler_args: list[str], log: Path) -> tuple[subprocess.Popen, Server]:
    model = resolve_model("tiny")
    port = _free_port(*PORTS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1",  # for /pause, /resume
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
           "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "1",
           "--enable-log-requests", "--max-log-len", "8", *scheduler_args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}:\n"
                                   f"{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return proc, Server(base, log, "tiny")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # the API server is gone; its engine child may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


SCHEDULERS = {
    "slai": ["--scheduler-cls", SCHEDULER, "--additional-config",
             json.dumps({"slai": {"log_admissions": True,
                                  "aging_tokens_per_s": AGING_TOKENS_PER_S}})],
    "fcfs": [],  # vLLM's own scheduler, first come first served
}


class Servers:
    """Keeps at most one server up: asking for another kind stops the current one first."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.kind: str | None = None
        self.proc: subprocess.Popen | None = None
        self.server: Server | None = None

    def get(self, kind: str) -> Server:
        if self.kind != kind:
            self.close()
            self.proc, self.server = _start(SCHEDULERS[kind], self.folder / f"{kind}.log")
            self.kind = kind
        assert self.server is not None
        return self.server

    def close(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        self.kind, self.proc, self.server = None, None, None


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[Servers]:
    pool = Servers(tmp_path_factory.mktemp("slai"))
    try:
        yield pool
    finally:
        pool.close()


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def run_queued_burst(server: Server, lengths: tuple[int, ...]) -> list[int]:
    """Queue `lengths` (arriving in that order) on a paused engine, resume, and return
    the lengths in the order the server sent their responses (from its access log: the
    server's order, free of client-side thread scheduling)."""
    completed: list[int] = []
    errors: list[BaseException] = []

    def send(n: int, first: int) -> None:
        try:
            server.complete(n, BURST_OUTPUT_TOKENS, first, query=f"?burst={n}")
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
            return
        completed.append(n)

    threads = []
    log_offset = len(server.log.read_text())
    server.post("/pause?mode=keep")
    try:
        added = server.num_added()
        for k, n in enumerate(lengths):
            thread = threading.Thread(target=send, args=(n, 1000 + 500 * k))
            thread.start()
            threads.append(thread)
            _wait_until(lambda k=k: server.num_added() == added + k + 1 or bool(errors),
                        f"burst request {k} reached the engine")
            assert not errors, errors
        assert not completed  # nothing runs while paused
    finally:
        server.post("/resume")
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(completed) == sorted(lengths)
    return [int(n) for n in RESPONDED.findall(server.log.read_text()[log_offset:])]


def test_scheduler_class_loads_and_serves(servers):
    server = servers.get("slai")
    assert "SLAI scheduler active" in server.log.read_text()
    result = server.complete(prompt_tokens=16, max_tokens=8)
    assert result["usage"]["completion_tokens"] == 8
    assert server.admissions()[-1] == (16, 0.2, 0)  # default TBT target


def test_slai_serves_a_queued_burst_shortest_first(servers):
    server = servers.get("slai")
    before = len(server.admissions())
    response_order = run_queued_burst(server, BURST_LENGTHS)
    # The engine's own record: the burst admitted in reverse arrival order, one at a time
    # (max_num_seqs=1 holds: each admission leaves the rest waiting).
    admitted = server.admissions()[before:]
    expected = [(n, len(BURST_LENGTHS) - 1 - i) for i, n in enumerate(sorted(BURST_LENGTHS))]
    assert [(n, w) for n, _, w in admitted] == expected  # (400, 3), ..., (1600, 0)
    assert response_order == sorted(BURST_LENGTHS)


def test_fcfs_control_serves_the_same_burst_in_arrival_order(servers):
    server = servers.get("fcfs")
    assert "SLAI scheduler active" not in server.log.read_text()
    assert run_queued_burst(server, BURST_LENGTHS) == list(BURST_LENGTHS)
