"""KV transfer benchmark (not a test): Fulcrum vs a plain memory copy vs NIXL, one run.

Part 1, transfer throughput: the KV of a 1k / 8k / 32k-token prompt in vLLM's CPU layout for
a SmolLM2-135M-shaped model (30 layers, 3 KV heads, head size 64, bf16, 128-token blocks:
~23 KiB per token) is pulled from a producer *process* by the Fulcrum loader (same-host
single-copy path, and the TCP fallback), copied with ``Tensor.copy_`` inside one process
(memcpy baseline), and READ by a NIXL agent over UCX on loopback from a NIXL agent in
another process (as vLLM's NixlConnector does between two workers; the owner process
progresses its agent in a tight loop, as a progress thread would). Both Fulcrum and NIXL
are timed across processes; the one-time NIXL agent and metadata exchange is not timed,
Fulcrum's per-transfer connection and handshake are. Reported as GB/s and ratios.

Part 2 (``--e2e``), end-to-end P/D latency on real vLLM CPU workers (tiny model), per
connector: prefill leg + decode leg, against one instance doing the whole request.

    .venv/bin/python -m benchmarks.kv_transfer_bench --e2e
writes benchmarks/results/kv_transfer.json and kv_transfer.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("UCX_NET_DEVICES", "lo")  # NIXL/UCX on loopback, set before import

import torch  # noqa: E402

from kv_transfer.fulcrum.blocks import KVBlockStore  # noqa: E402
from kv_transfer.fulcrum.lease import LeaseTable  # noqa: E402
from kv_transfer.fulcrum.loader import BlockLoader, PullJob  # noqa: E402
from kv_transfer.fulcrum.server import BlockServer  # noqa: E402
from kv_transfer.fulcrum.stats import StatsRecorder  # noqa: E402
from kv_transfer.fulcrum.transport.cpu import CpuTransport  # noqa: E402

LAYERS, KV_HEADS, HEAD, BLOCK = 30, 3, 64, 128
SIZES = (1024, 8192, 32768)
RESULTS = Path(__file__).resolve().parent / "results"
BENCH_PORT = 5990


def make_caches(num_blocks: int, fill: bool) -> dict[str, torch.Tensor]:
    make = torch.randn if fill else torch.zeros
    return {f"model.layers.{i}.self_attn.attn": make(num_blocks, KV_HEADS, BLOCK, 2 * HEAD,
                                                     dtype=torch.bfloat16)
            for i in range(LAYERS)}


def checksum(store: KVBlockStore, block_ids: list[int]) -> float:
    return float(sum(lay.tensor[block_ids].float().sum() for lay in store.layers))


def producer_main(conn, num_blocks: int, port: int) -> None:
    """Child process: owns the source KV, serves it, registers leases on request."""
    store = KVBlockStore(make_caches(num_blocks, fill=True), num_blocks)
    leases = LeaseTable()
    server = BlockServer("127.0.0.1", port, store, leases, CpuTransport(), StatsRecorder())
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "hold":
            leases.hold(cmd[1], "req", cmd[2], ttl_s=60)
            conn.send("ok")
        elif cmd[0] == "checksum":
            conn.send(checksum(store, cmd[1]))
        else:
            break
    server.close()


class FulcrumRunner:
    """Fulcrum pulls from a producer process (same-host single copy, or the TCP stream)."""

    def __init__(self, conn, dst: KVBlockStore, mode: str) -> None:
        self.conn, self.dst, self.mode = conn, dst, mode
        self.loader = BlockLoader(dst, CpuTransport(allow_cma=mode == "cma"), StatsRecorder())
        self.count = 0

    def once(self, tokens: int) -> float:
        ids = list(range(tokens // BLOCK))
        self.count += 1
        tid = f"{self.mode}-{tokens}-{self.count}"
        self.conn.send(("hold", tid, ids))
        self.conn.recv()
        job = PullJob("r", tid, "127.0.0.1", BENCH_PORT, tuple(ids), tuple(ids))
        t = time.perf_counter()
        self.loader.pull(job)
        return time.perf_counter() - t

    def source_checksum(self, ids: list[int]) -> float:
        self.conn.send(("checksum", ids))
        return self.conn.recv()


class MemcpyRunner:
    """``Tensor.copy_`` of the same blocks inside one process (the baseline)."""

    def __init__(self, dst: KVBlockStore, num_blocks: int) -> None:
        self.src = KVBlockStore(make_caches(num_blocks, fill=True), num_blocks)
        self.dst = dst

    def once(self, tokens: int) -> float:
        n = tokens // BLOCK
        t = time.perf_counter()
        for s, d in zip(self.src.layers, self.dst.layers, strict=True):
            d.tensor[:n].copy_(s.tensor[:n])
        return time.perf_counter() - t


def nixl_owner_main(conn, num_blocks: int) -> None:
    """Child process: owns the source KV in a NIXL agent. While a read runs it progresses
    the agent in a tight loop, as a progress thread would (vLLM's producer worker progresses
    its agent from its own loop); between reads it sleeps, so it does not slow the others."""
    from nixl._api import nixl_agent, nixl_agent_config

    store = KVBlockStore(make_caches(num_blocks, fill=True), num_blocks)
    owner = nixl_agent("bench-src", nixl_agent_config(enable_prog_thread=False,
                                                      backends=["UCX"]))
    owner.register_memory(owner.get_reg_descs([lay.tensor for lay in store.layers]))
    conn.send((owner.get_agent_metadata(),
               {t: store.segments(list(range(t // BLOCK))) for t in SIZES}))
    busy = False
    while True:
        if conn.poll(0 if busy else 1.0):
            cmd = conn.recv()
            if cmd[0] == "checksum":
                conn.send(checksum(store, cmd[1]))
            elif cmd[0] in ("busy", "idle"):
                busy = cmd[0] == "busy"
                conn.send("ok")
            else:
                break
        if busy:
            owner.get_new_notifs()


class NixlRunner:
    """NIXL READs (UCX on loopback) from an agent in another process."""

    def __init__(self, dst: KVBlockStore, num_blocks: int) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=nixl_owner_main, args=(child, num_blocks))
        self.proc.start()
        meta, segments = self.conn.recv()
        self.reader = nixl_agent("bench-dst", nixl_agent_config(enable_prog_thread=False,
                                                                backends=["UCX"]))
        self.reader.register_memory(self.reader.get_reg_descs(
            [lay.tensor for lay in dst.layers]))
        self.peer = self.reader.add_remote_agent(meta)
        self.descs = {}
        for tokens in SIZES:
            ids = list(range(tokens // BLOCK))
            self.descs[tokens] = (
                self.reader.get_xfer_descs([(a, n, 0) for a, n in dst.segments(ids)], "DRAM"),
                self.reader.get_xfer_descs([(a, n, 0) for a, n in segments[tokens]], "DRAM"))

    def _owner(self, cmd: str) -> None:
        self.conn.send((cmd,))
        self.conn.recv()

    def once(self, tokens: int) -> float:
        local, remote = self.descs[tokens]
        self._owner("busy")
        try:
            t = time.perf_counter()
            handle = self.reader.initialize_xfer("READ", local, remote, self.peer)
            state = self.reader.transfer(handle)
            while state not in ("DONE", "ERR"):
                state = self.reader.check_xfer_state(handle)
            secs = time.perf_counter() - t
            self.reader.release_xfer_handle(handle)
        finally:
            self._owner("idle")
        if state == "ERR":
            raise RuntimeError("NIXL transfer failed")
        return secs

    def source_checksum(self, ids: list[int]) -> float:
        self.conn.send(("checksum", ids))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def bench_throughput(dst: KVBlockStore, num_blocks: int, repeats: int) -> dict:
    """Every method once per round, rounds interleaved (a shared host's load hits all
    alike); per size the median and the best of ``repeats`` rounds, and a data check."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    producer = ctx.Process(target=producer_main, args=(child, num_blocks, BENCH_PORT))
    producer.start()
    assert parent.recv() == "ready"
    runners: dict = {"fulcrum_cma": FulcrumRunner(parent, dst, "cma"),
                     "fulcrum_tcp": FulcrumRunner(parent, dst, "tcp"),
                     "memcpy": MemcpyRunner(dst, num_blocks)}
    errors: dict = {}
    try:
        runners["nixl"] = NixlRunner(dst, num_blocks)
    except Exception as exc:  # noqa: BLE001 - report, keep the other methods
        errors["nixl"] = repr(exc)
    samples: dict = {name: {t: [] for t in SIZES} for name in runners}
    data_ok: dict = {name: True for name in runners if name != "memcpy"}
    try:
        for tokens in SIZES:
            ids = list(range(tokens // BLOCK))
            for rnd in range(repeats + 1):  # round 0 warms up
                order = list(runners)[rnd % len(runners):] + list(runners)[:rnd % len(runners)]
                for name in order:
                    for lay in dst.layers:
                        lay.tensor[:len(ids)].zero_()
                    secs = runners[name].once(tokens)
                    if rnd:
                        samples[name][tokens].append(secs)
                    if name in data_ok and rnd == repeats:
                        data_ok[name] &= runners[name].source_checksum(ids) == \
                            checksum(dst, ids)
    finally:
        parent.send(("stop",))
        producer.join(30)
        if "nixl" in runners:
            runners["nixl"].close()
    out: dict = {"errors": errors, "data_ok": data_ok, "seconds": {}}
    for name, by_size in samples.items():
        out["seconds"][name] = {t: {"median": statistics.median(v), "best": min(v),
                                    "all": [round(x, 6) for x in v]}
                                for t, v in by_size.items()}
    return out


def e2e(connector: str, prompts: int, port_base: int = 8600) -> dict:
    """Median latencies of P/D requests (500-token prompts, 32 tokens out) on two vLLM
    workers with ``connector``, and of the same requests on one instance."""
    import random
    import signal
    import subprocess
    import sys

    import httpx

    from kv_transfer.settings import worker_kv_settings

    model = str(Path.home() / ".cache/fulcrum/models/tiny-llama-seed0")
    procs, urls = [], []
    for i in range(2):
        kv = worker_kv_settings(connector, side_channel_port=5900 + i)
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_CPU_OMP_THREADS_BIND=str(i), PYTHONPATH=str(RESULTS.parents[1]),
                   **kv.env)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", "tiny", "--port", str(port_base + i), "--enforce-eager",
               "--max-model-len", "1024", "--disable-uvicorn-access-log", *kv.cli_args()]
        log = open(RESULTS / f".e2e-{connector}-{i}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        urls.append(f"http://127.0.0.1:{port_base + i}")
    try:
        for url in urls:
            for _ in range(900):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
        p_url, d_url = urls

        def post(url: str, prompt: str, **extra) -> dict:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 32, "temperature": 0,
                    "ignore_eos": True, **extra}
            r = httpx.post(url + "/v1/completions", json=body, timeout=300)
            r.raise_for_status()
            return r.json()

        rng = random.Random(0)
        single, pd, p_leg = [], [], []
        for i in range(prompts + 2):
            prompt = f"[{i}:{time.time_ns()}] " + " ".join(
                rng.choice("ab cd ef gh ij kl mn op".split()) for _ in range(230))
            t = time.perf_counter()
            post(d_url, prompt + " x")  # single instance, a different prompt: no cache hit
            t1 = time.perf_counter()
            params = post(p_url, prompt, max_tokens=1, kv_transfer_params={
                "do_remote_decode": True, "do_remote_prefill": False})["kv_transfer_params"]
            t2 = time.perf_counter()
            post(d_url, prompt, kv_transfer_params=params)
            t3 = time.perf_counter()
            if i >= 2:  # warm-up
                single.append(t1 - t)
                pd.append(t3 - t1)
                p_leg.append(t2 - t1)
        return {"single_instance_ms": 1e3 * statistics.median(single),
                "pd_ms": 1e3 * statistics.median(pd),
                "prefill_leg_ms": 1e3 * statistics.median(p_leg),
                "decode_leg_ms": 1e3 * (statistics.median(pd) - statistics.median(p_leg)),
                "requests": prompts}
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = result["throughput_GBps"]
    series = [k for k in ("memcpy", "fulcrum_cma", "fulcrum_tcp", "nixl") if k in tp]
    fig, axes = plt.subplots(1, 2 if result.get("e2e") else 1, figsize=(12, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        xs = [i + j * width for i in range(len(SIZES))]
        ax.bar(xs, [tp[name][str(t)] for t in SIZES], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SIZES))],
                  [f"{t // 1024}k tokens" for t in SIZES])
    ax.set_yscale("log")
    ax.set_ylabel("GB/s (log)")
    ax.set_title("KV transfer throughput, one host")
    ax.legend()
    if result.get("e2e"):
        ax2 = axes[0][1]
        names = list(result["e2e"])
        for j, key in enumerate(("single_instance_ms", "prefill_leg_ms", "decode_leg_ms")):
            ax2.bar([i + j * 0.27 for i in range(len(names))],
                    [result["e2e"][n][key] for n in names], 0.27, label=key)
        ax2.set_xticks([i + 0.27 for i in range(len(names))], names)
        ax2.set_ylabel("median ms")
        ax2.set_title("End-to-end P/D latency (tiny model, ~500-token prompt, 32 out)")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--e2e", action="store_true", help="also run real vLLM workers")
    parser.add_argument("--e2e-requests", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_transfer.json")
    args = parser.parse_args()
    num_blocks = max(SIZES) // BLOCK
    dst = KVBlockStore(make_caches(num_blocks, fill=False), num_blocks)
    bench = bench_throughput(dst, num_blocks, args.repeats)
    nbytes = {t: (t // BLOCK) * dst.bytes_per_block for t in SIZES}

    def gbps(stat: str) -> dict:
        return {name: {str(t): nbytes[t] / by_size[t][stat] / 1e9 for t in SIZES}
                for name, by_size in bench["seconds"].items()}

    tp, tp_best = gbps("median"), gbps("best")

    def ratio(table: dict, a: str, b: str) -> dict:
        return {t: table[a][t] / table[b][t] for t in table[b]} if b in table else {}

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_at_start": os.getloadavg()},
        "method": "every method once per round, rounds interleaved; NIXL and Fulcrum both "
                  "read from another process",
        "kv_layout": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_size": HEAD,
                      "dtype": "bfloat16", "block_tokens": BLOCK,
                      "bytes_per_token": dst.bytes_per_block // BLOCK},
        "bytes": {str(t): nbytes[t] for t in SIZES},
        "repeats": args.repeats,
        "data_ok": bench["data_ok"],
        "errors": bench["errors"],
        "throughput_GBps": tp,
        "throughput_GBps_best": tp_best,
        "ratio_fulcrum_over_memcpy": ratio(tp, "fulcrum_cma", "memcpy"),
        "ratio_fulcrum_over_nixl": ratio(tp, "fulcrum_cma", "nixl"),
        "ratio_fulcrum_over_nixl_best": ratio(tp_best, "fulcrum_cma", "nixl"),
        "seconds": {name: {str(t): v for t, v in by.items()}
                    for name, by in bench["seconds"].items()},
    }
    print(json.dumps(result, indent=2), flush=True)
    if args.e2e:
        result["e2e"] = {name: e2e(name, args.e2e_requests) for name in ("fulcrum", "nixl")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result.get("e2e"), indent=2))


if __name__ == "__main__":
    main()
