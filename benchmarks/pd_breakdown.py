"""Where P/D time goes, per request, against one instance (real vLLM CPU workers).

For each connector (``fulcrum``, ``nixl``) a two-worker cluster is started with
``fulcrum up`` (one prefill, one decode worker, each on its own core). Each round then sends,
in rotating order, a batch of ``concurrency`` fresh prompts (no prefix-cache hits) to:

* ``single``: the decode worker directly, whole request on one instance;
* ``pd_direct``: this script as the P/D proxy: prefill leg (``max_tokens=1``,
  ``do_remote_decode``, not streamed) to the prefill worker, then the streamed decode leg
  with the returned ``kv_transfer_params`` to the decode worker;
* ``pd_gateway``: the gateway, which does the same two legs.

Per request the client records send / prefill reply / first token / end times. With the
Fulcrum connector the workers also append per-transfer events to a trace file
(``FULCRUM_KV_TRACE``, see :mod:`kv_transfer.fulcrum.trace`): when each engine admitted the
request, when the prefill finished, when the decode worker started the pull, got the first
byte, finished the copy and when the engine noticed. vLLM's per-request timings (engine
queue, scheduled to first token; the workers run with ``--enable-per-request-metrics``)
split each leg where there is no trace (NIXL), and its per-request histograms are read as
deltas of ``/metrics`` around every batch. Medians and p10/p90 over rounds go to JSON, the
stacked median breakdown (one per bar) to a PNG.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.pd_breakdown            # tiny, 500 in, 64 out
    ... -m benchmarks.pd_breakdown --model default --dtype float32 \\
        --prompt-tokens 2000 --out benchmarks/results/pd_breakdown_smollm2_2000.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.ports import free_port_block
from kv_transfer.fulcrum.trace import ENV as TRACE_ENV
from kv_transfer.fulcrum.trace import read_events

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "bench-model"
TARGETS = ("single", "pd_direct", "pd_gateway")
_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()
_HISTOGRAMS = ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
               "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds")

# Breakdown segments, in time order: (name, start mark, end mark). Marks are client times
# ("t0", "p_reply", "d_send", "first", "end") or trace events (see ``trace_marks``).
# From the decode worker's admission on, both P/D paths cross the same marks.
_FROM_DECODE_ADMISSION = (
    ("admission to pull start", "c_admit", "pull_submit"),
    ("pull: request to first byte", "pull_submit", "pull_reply"),
    ("pull: copy", "pull_reply", "pull_done"),
    ("pull done to engine", "pull_done", "pull_reported"),
    ("first decode step to client", "pull_reported", "first"),
    ("rest of the stream", "first", "end"),
)
SEGMENTS_PD_TRACED = (
    ("to prefill admission", "t0", "p_admit"),
    ("prefill compute", "p_admit", "p_done"),
    ("prefill reply to client", "p_done", "p_reply"),
    ("gap between legs", "p_reply", "d_send"),
    ("decode leg to admission", "d_send", "c_admit"),
    *_FROM_DECODE_ADMISSION,
)
SEGMENTS_GATEWAY_TRACED = (
    ("to prefill admission", "t0", "p_admit"),
    ("prefill compute", "p_admit", "p_done"),
    ("prefill done to decode admission", "p_done", "c_admit"),
    *_FROM_DECODE_ADMISSION,
)
# With the first-token handoff the client's first token comes from the prefill leg; the
# decode leg's critical path then ends at the second token.
SEGMENTS_GATEWAY_HANDOFF = (
    *SEGMENTS_GATEWAY_TRACED[:-2],
    ("second token to client", "pull_reported", "second"),
    ("rest of the stream", "second", "end"),
)
# Finer cuts of the pull, reported beside the stack (they overlap its segments).
PULL_DETAIL = (
    ("pull job queued in the decode worker", "pull_submit", "pull_start"),
    ("pull thread to producer serving it", "pull_start", "serve_start"),
    ("producer claim and reply", "serve_start", "pull_reply"),
    ("prefill done to lease held", "p_done", "hold"),
    # with the first-token handoff, the rest of TTFT after the prefill: its reply, the
    # gateway, the decode leg's headers, the relay
    ("prefill done to first token at client", "p_done", "first"),
)
SEGMENTS_SINGLE_TRACED = (
    ("to admission", "t0", "admit"),
    ("prefill + first token to client", "admit", "first"),
    ("rest of the stream", "first", "end"),
)
# Without the connector's trace (NIXL), vLLM's own per-request timings split each leg
# (workers run with --enable-per-request-metrics): engine queue (arrival in the engine core
# to first scheduled; a decode leg also waits there for its KV) and scheduled to first
# token. What is left of a leg is HTTP, tokenising and the way back to the client.
SEGMENTS_SINGLE_ENGINE = (
    ("to engine: HTTP, tokenise (+ token out)", "t0", "e_queued"),
    ("engine queue", "e_queued", "e_sched"),
    ("engine: scheduled to first token", "e_sched", "first"),
    ("rest of the stream", "first", "end"),
)
SEGMENTS_PD_ENGINE = (
    ("prefill leg: HTTP, tokenise, reply", "t0", "ep_queued"),
    ("prefill leg: engine queue", "ep_queued", "ep_sched"),
    ("prefill leg: scheduled to token", "ep_sched", "p_reply"),
    ("gap between legs", "p_reply", "d_send"),
    ("decode leg: HTTP, tokenise (+ token out)", "d_send", "e_queued"),
    ("decode leg: engine queue (KV wait)", "e_queued", "e_sched"),
    ("decode leg: scheduled to first token", "e_sched", "first"),
    ("rest of the stream", "first", "end"),
)
SEGMENTS_PD_CLIENT = (
    ("prefill leg", "t0", "p_reply"),
    ("gap between legs", "p_reply", "d_send"),
    ("decode leg to first token", "d_send", "first"),
    ("rest of the stream", "first", "end"),
)
SEGMENTS_GATEWAY_CLIENT = (("to first token", "t0", "first"),
                           ("rest of the stream", "first", "end"))
SEGMENTS_SINGLE_CLIENT = SEGMENTS_GATEWAY_CLIENT


@dataclass
class Sample:
    """One request's client-side marks (wall clock, seconds) and what it came back with."""

    key: str
    target: str
    marks: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    worker_id: str = ""  # the request id the workers saw (the gateway may assign its own)
    engine: dict[str, dict] = field(default_factory=dict)  # vLLM's per-request metrics, by leg


# --- the cluster ------------------------------------------------------------------------
class Cluster:
    """A ``fulcrum up`` process with one prefill and one decode worker."""

    def __init__(self, connector: str, args: argparse.Namespace, work: Path) -> None:
        self.port = free_port_block(3, 18900 + (os.getpid() % 300) * 4)
        side = free_port_block(2, 27600 + (os.getpid() % 300) * 4)
        self.trace = work / f"trace-{connector}.jsonl"
        self.log_dir = work / f"logs-{connector}"
        cmd = [sys.executable, "-m", "deploy.cli", "up", "--model", args.model,
               "--served-model-name", MODEL, "--workers", "2", "--prefill-workers", "1",
               "--port", str(self.port), "--worker-base-port", str(self.port + 1),
               "--side-channel-base-port", str(side), "--kv-connector", connector,
               "--max-model-len", str(args.max_model_len), "--kv-cache-gib", "1",
               "--log-dir", str(self.log_dir), "--dtype", args.dtype]
        cmd += [f"--worker-arg={extra}" for extra in args.worker_arg]  # values start with --
        env = dict(os.environ)
        env.update(kv.split("=", 1) for kv in args.env)
        env[TRACE_ENV] = str(self.trace)
        self.log = open(work / f"up-{connector}.log", "wb")  # noqa: SIM115 - process lifetime
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=Path(__file__).resolve().parents[1],
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: dict[str, str] = {}

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fulcrum up exited; see {self.log.name}")
            try:
                ws = httpx.get(self.url + "/admin/workers", timeout=5).json()["workers"]
                if len(ws) == 2 and all(w["state"] == "ready" for w in ws):
                    self.workers = {w["role"]: w["url"] for w in ws}
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1)
        raise TimeoutError("cluster not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# --- prompts ----------------------------------------------------------------------------
def make_template(url: str, n_tokens: int) -> list[str]:
    """Words whose prompt, behind a fixed-width unique tag, is ``n_tokens`` tokens long."""
    rng = random.Random(0)
    words = [tag(0)] + [rng.choice(_WORDS) for _ in range(n_tokens + 8)]

    def count(k: int) -> int:
        r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": " ".join(words[:k])},
                       timeout=60)
        return int(r.json()["count"])

    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return words[1:lo]


def tag(i: int) -> str:
    """A unique prompt start: every block of a prompt hashes differently (no cache hits)."""
    return f"[{i % 10**8:08d}-{time.time_ns() % 10**9:09d}]"


# --- requests ---------------------------------------------------------------------------
async def stream_completion(client: httpx.AsyncClient, url: str, body: dict, key: str,
                            sample: Sample, send_mark: str) -> None:
    """POST a streamed completion; marks ``send_mark``, ``first`` and ``end``."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    sample.marks[send_mark] = time.time()
    async with client.stream("POST", url + "/v1/completions", json=body,
                             headers={"X-Request-Id": key}) as resp:
        if resp.status_code != 200:
            sample.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
            return
        sample.worker_id = resp.headers.get("x-fulcrum-request-id") or key
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                sample.error = str(chunk["error"])[:200]
                return
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                mark = "first" if "first" not in sample.marks else "second"
                sample.marks.setdefault(mark, time.time())
            if chunk.get("usage"):
                sample.prompt_tokens = chunk["usage"]["prompt_tokens"]
                sample.output_tokens = chunk["usage"]["completion_tokens"]
            if isinstance(chunk.get("metrics"), dict):
                sample.engine["decode"] = chunk["metrics"]
    sample.marks["end"] = time.time()


async def one_request(client: httpx.AsyncClient, cluster: Cluster, target: str, key: str,
                      prompt: str, max_tokens: int) -> Sample:
    sample = Sample(key, target)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    try:
        if target == "single":
            await stream_completion(client, cluster.workers["decode"], body, key, sample, "t0")
        elif target == "pd_gateway":
            await stream_completion(client, cluster.url, body, key, sample, "t0")
        else:
            sample.marks["t0"] = time.time()
            resp = await client.post(
                cluster.workers["prefill"] + "/v1/completions",
                json={**body, "max_tokens": 1, "stream": False,
                      "kv_transfer_params": {"do_remote_decode": True,
                                             "do_remote_prefill": False}},
                headers={"X-Request-Id": key})
            sample.marks["p_reply"] = time.time()
            if resp.status_code != 200:
                sample.error = f"prefill HTTP {resp.status_code}"
                return sample
            reply = resp.json()
            params = reply.get("kv_transfer_params")
            if isinstance(reply.get("metrics"), dict):
                sample.engine["prefill"] = reply["metrics"]
            await stream_completion(client, cluster.workers["decode"],
                                    {**body, "kv_transfer_params": params}, key, sample,
                                    "d_send")
    except (httpx.HTTPError, ValueError) as exc:
        sample.error = repr(exc)[:200]
    engine_marks(sample)
    return sample


def engine_marks(sample: Sample) -> None:
    """Place vLLM's per-request queue and scheduled-to-first-token times back from the
    client's mark of that token (prefill leg: its reply): ``e_queued``/``e_sched`` for the
    stream's leg, ``ep_queued``/``ep_sched`` for the prefill leg."""
    for leg, end, prefix in (("decode", "first", "e_"), ("prefill", "p_reply", "ep_")):
        m = sample.engine.get(leg) or {}
        queue, ttft = m.get("queue_time_ms"), m.get("time_to_first_token_ms")
        if end in sample.marks and isinstance(queue, int | float) \
                and isinstance(ttft, int | float):
            sample.marks[prefix + "sched"] = sample.marks[end] - ttft / 1e3
            sample.marks[prefix + "queued"] = sample.marks[prefix + "sched"] - queue / 1e3


def scrape(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of vLLM's per-request histograms on one worker."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {name: [0.0, 0.0] for name in _HISTOGRAMS}
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for name in _HISTOGRAMS:
                if s.name == name + "_sum":
                    out[name][0] += s.value
                elif s.name == name + "_count":
                    out[name][1] += s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def hist_delta(before: dict, after: dict) -> dict[str, float]:
    """Mean seconds per request of each histogram between two scrapes."""
    out = {}
    for name in _HISTOGRAMS:
        n = after[name][1] - before[name][1]
        if n > 0:
            out[name.removeprefix("vllm:")] = (after[name][0] - before[name][0]) / n
    return out


async def run_rounds(cluster: Cluster, connector: str, concurrency: int, rounds: int,
                     warmup: int, template: list[str], max_tokens: int
                     ) -> tuple[list[Sample], list[dict]]:
    samples: list[Sample] = []
    hist: list[dict] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        counter = 0
        for rnd in range(warmup + rounds):
            order = list(TARGETS[rnd % 3:] + TARGETS[:rnd % 3])  # rotate who goes first
            for target in order:
                prompts = []
                for _ in range(concurrency):
                    counter += 1
                    prompts.append(" ".join([tag(counter), *template]))
                keys = [f"bd-{connector}-c{concurrency}-r{rnd}-{target}-{i}"
                        for i in range(concurrency)]
                before = {role: scrape(u) for role, u in cluster.workers.items()}
                batch = await asyncio.gather(*[
                    one_request(client, cluster, target, k, p, max_tokens)
                    for k, p in zip(keys, prompts, strict=True)])
                after = {role: scrape(u) for role, u in cluster.workers.items()}
                if rnd < warmup:
                    continue
                samples.extend(batch)
                hist.append({"target": target, "round": rnd,
                             **{role: hist_delta(before[role], after[role])
                                for role in cluster.workers}})
    return samples, hist


# --- joining client marks with the connector's trace ------------------------------------
def trace_marks(samples: list[Sample], events: list[dict]) -> None:
    """Add the connector's per-request event times to each sample's marks."""
    by_key: dict[str, list[dict]] = {}
    keys = sorted({s.worker_id or s.key for s in samples}, key=len, reverse=True)
    for ev in events:
        req = ev.get("req")
        if not req:
            continue
        for k in keys:  # vLLM's request id embeds the X-Request-Id we sent
            if k + "-" in req or req.endswith(k):
                by_key.setdefault(k, []).append(ev)
                break
    tid_events: dict[str, list[dict]] = {}
    for ev in events:
        if ev.get("tid") and not ev.get("req"):
            tid_events.setdefault(ev["tid"], []).append(ev)
    for s in samples:
        evs = by_key.get(s.worker_id or s.key, [])
        done = next((e for e in evs if e["ev"] == "prefill_done"), None)
        for e in evs:
            name = e["ev"]
            if name == "admit":
                if e.get("tid"):
                    s.marks.setdefault("c_admit", e["t"])
                    s.marks.setdefault("c_prompt", e.get("prompt_tokens", 0))
                elif done is not None and e["pid"] == done["pid"]:
                    s.marks.setdefault("p_admit", e["t"])
                    s.marks.setdefault("p_prompt", e.get("prompt_tokens", 0))
                elif done is None:
                    s.marks.setdefault("admit", e["t"])
            elif name == "prefill_done":
                s.marks.setdefault("p_done", e["t"])
            elif name in ("pull_submit", "pull_start", "pull_reply", "pull_done",
                          "pull_reported", "hold"):
                s.marks.setdefault(name, e["t"])
                if name == "pull_done":
                    s.marks["pull_bytes"] = e.get("nbytes", 0)
        if done is not None:
            for e in tid_events.get(done["tid"], []):
                s.marks.setdefault(e["ev"], e["t"])


Table = tuple[tuple[str, str, str], ...]


def tables_for(target: str, marks: dict[str, float], traced: bool) -> list[Table]:
    """The breakdowns this request's marks could fill, finest first."""
    out: list[Table] = []
    if traced:
        table = {"single": SEGMENTS_SINGLE_TRACED, "pd_direct": SEGMENTS_PD_TRACED,
                 "pd_gateway": SEGMENTS_GATEWAY_TRACED}[target]
        out.append(SEGMENTS_GATEWAY_HANDOFF if target == "pd_gateway" and handed_off(marks)
                   else table)
    engine = {"single": SEGMENTS_SINGLE_ENGINE, "pd_direct": SEGMENTS_PD_ENGINE}.get(target)
    if engine:
        out.append(engine)
    out.append({"single": SEGMENTS_SINGLE_CLIENT, "pd_direct": SEGMENTS_PD_CLIENT,
                "pd_gateway": SEGMENTS_GATEWAY_CLIENT}[target])
    return out


def fills(table: Table, marks: dict[str, float]) -> bool:
    return all(a in marks and b in marks for _, a, b in table)


def pick_table(target: str, samples: list[Sample], traced: bool) -> Table:
    """One breakdown per target (mixing tables would stack overlapping segments): the
    finest one that most of its requests fill."""
    votes: dict[Table, int] = {}
    for s in samples:
        for table in tables_for(target, s.marks, traced):
            if fills(table, s.marks):
                votes[table] = votes.get(table, 0) + 1
                break
    return max(votes, key=lambda t: votes[t]) if votes else tables_for(target, {}, False)[-1]


def handed_off(marks: dict[str, float]) -> bool:
    """The decode leg continued after the prefill leg's token (its prompt is one longer)."""
    return "c_prompt" in marks and marks["c_prompt"] == marks.get("p_prompt", -2) + 1


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    return {"median": round(statistics.median(xs), 3), "p10": round(q(0.1), 3),
            "p90": round(q(0.9), 3), "n": len(xs)}


def summarise(samples: list[Sample], hist: list[dict], traced: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target in TARGETS:
        ok = [s for s in samples if s.target == target and s.error is None
              and "first" in s.marks]
        errors = [s.error for s in samples if s.target == target and s.error is not None]
        if not ok:
            out[target] = {"errors": errors[:5], "failed": len(errors)}
            continue
        table = pick_table(target, ok, traced)
        filled = [s for s in ok if fills(table, s.marks)]
        by_name = {name: [1e3 * (s.marks[b] - s.marks[a]) for s in filled]
                   for name, a, b in table}
        engine_table = {"single": SEGMENTS_SINGLE_ENGINE,
                        "pd_direct": SEGMENTS_PD_ENGINE}.get(target)
        engine_ok = [s for s in ok if engine_table and fills(engine_table, s.marks)]
        entry: dict[str, Any] = {
            "requests": len(ok), "failed": len(errors), "errors": errors[:5],
            "ttft_ms": quantiles([1e3 * (s.marks["first"] - s.marks["t0"]) for s in ok]),
            "e2e_ms": quantiles([1e3 * (s.marks["end"] - s.marks["t0"]) for s in ok]),
            "prompt_tokens": statistics.median(s.prompt_tokens for s in ok),
            "output_tokens": statistics.median(s.output_tokens for s in ok),
            "segments_ms": {name: quantiles(xs) for name, xs in by_name.items()},
            "segments_from": f"{len(filled)} of {len(ok)} requests",
        }
        if engine_ok and engine_table is not table:  # vLLM's split too, beside the trace
            entry["engine_segments_ms"] = {
                name: quantiles([1e3 * (s.marks[b] - s.marks[a]) for s in engine_ok])
                for name, a, b in engine_table}
        if target == "pd_gateway" and traced:
            entry["first_token_handed_off"] = sum(handed_off(s.marks) for s in ok)
        if traced and target != "single":
            entry["pull_detail_ms"] = {
                name: quantiles([1e3 * (s.marks[b] - s.marks[a]) for s in ok
                                 if a in s.marks and b in s.marks])
                for name, a, b in PULL_DETAIL}
        pulled = [s.marks["pull_bytes"] for s in ok if "pull_bytes" in s.marks]
        if pulled:
            entry["pull_bytes"] = statistics.median(pulled)
        rows = [h for h in hist if h["target"] == target]
        entry["vllm_histograms_ms"] = {
            role: {name: round(1e3 * statistics.median(r[role][name] for r in rows
                                                        if name in r.get(role, {})), 3)
                   for name in {n for r in rows for n in r.get(role, {})}}
            for role in ("prefill", "decode")}
        out[target] = entry
    single = out.get("single", {})
    for target in ("pd_direct", "pd_gateway"):
        entry = out.get(target, {})
        if "e2e_ms" in entry and "e2e_ms" in single:
            entry["e2e_ratio_vs_single"] = round(
                entry["e2e_ms"]["median"] / single["e2e_ms"]["median"], 3)
            entry["ttft_overhead_ms"] = round(
                entry["ttft_ms"]["median"] - single["ttft_ms"]["median"], 3)
            entry["paired_e2e_ratio"] = paired_ratio(samples, target)
    return out


def paired_ratio(samples: list[Sample], target: str) -> dict[str, float]:
    """Ratio of a P/D batch's median e2e over the single batch of the same round: its
    spread over rounds shows how much of the gap is host noise."""
    def per_round(t: str) -> dict[str, float]:
        rounds: dict[str, list[float]] = {}
        for s in samples:
            if s.target == t and s.error is None and "end" in s.marks:
                rounds.setdefault(s.key.split("-")[3], []).append(s.marks["end"] - s.marks["t0"])
        return {r: statistics.median(v) for r, v in rounds.items()}

    a, b = per_round(target), per_round("single")
    ratios = [a[r] / b[r] for r in a if r in b]
    return quantiles(ratios) if ratios else {}


# --- output -----------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(10 * len(runs), 6.5), squeeze=False)
    for ax, (label, by_conn) in zip(axes[0], runs.items(), strict=True):
        bars: list[tuple[str, dict]] = []
        ttfts: list[float] = []
        for conn, summary in by_conn.items():
            for target in TARGETS:
                if "segments_ms" in (summary.get(target) or {}):
                    bars.append((f"{conn}\n{target}", summary[target]["segments_ms"]))
                    ttfts.append(summary[target]["ttft_ms"]["median"])
        names = [n for n in dict.fromkeys(n for _, segs in bars for n in segs)
                 if n != "rest of the stream"]
        palette = [c for j, c in enumerate(plt.get_cmap("tab20").colors)
                   if j not in (14, 15)]  # tab20's greys: grey is the rest of the stream
        palette += list(plt.get_cmap("tab20b").colors)
        color = {n: palette[j % len(palette)] for j, n in enumerate(names)}
        color["rest of the stream"] = "#cccccc"
        labelled: set[str] = set()
        for i, (_, segs) in enumerate(bars):
            bottom = 0.0
            for name, q in segs.items():  # each bar in its own time order
                val = q.get("median", 0.0)
                if val <= 0:
                    continue
                ax.bar(i, val, bottom=bottom, color=color[name],
                       label=None if name in labelled else name)
                labelled.add(name)
                bottom += val
            ax.plot([i - 0.4, i + 0.4], [ttfts[i]] * 2, color="black", linewidth=2,
                    label=None if i else "median TTFT")
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7, rotation=30)
        ax.set_ylabel("median ms per request (segments stacked)")
        ax.set_title(label)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"P/D breakdown: {result['config']['model']} "
                 f"({result['config'].get('dtype', 'auto')}), "
                 f"{result['config']['prompt_tokens']} prompt tokens, "
                 f"{result['config']['max_tokens']} out")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(label: str, summary: dict) -> None:
    print(f"\n== {label}", flush=True)
    for target in TARGETS:
        e = summary.get(target, {})
        if not isinstance(e, dict) or "ttft_ms" not in e:
            print(f"  {target}: no data {e.get('errors')}")
            continue
        extra = ""
        if "e2e_ratio_vs_single" in e:
            extra = (f"  e2e x{e['e2e_ratio_vs_single']}  TTFT +{e['ttft_overhead_ms']:.1f} ms"
                     f"  paired x{e['paired_e2e_ratio'].get('median')}")
        print(f"  {target}: TTFT {e['ttft_ms']['median']:.1f} ms  e2e "
              f"{e['e2e_ms']['median']:.1f} ms (p10 {e['e2e_ms']['p10']:.0f}, "
              f"p90 {e['e2e_ms']['p90']:.0f}){extra}")
        for name, q in e["segments_ms"].items():
            if q:
                print(f"      {name:34s} {q['median']:8.2f}  [{q['p10']:.2f} .. {q['p90']:.2f}]")


def run_connector(connector: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cluster = Cluster(connector, args, work)
    try:
        cluster.wait_ready(args.start_timeout)
        template = make_template(cluster.workers["decode"], args.prompt_tokens - 7)
        out: dict[str, Any] = {}
        for i, conc in enumerate(args.concurrency):
            rounds = args.rounds if conc == 1 else args.rounds_concurrent
            warmup = args.warmup if i == 0 or args.warmup_later is None else args.warmup_later
            samples, hist = asyncio.run(run_rounds(cluster, connector, conc, rounds,
                                                   warmup, template, args.max_tokens))
            time.sleep(0.5)  # let the last trace lines land
            traced = connector == "fulcrum"
            if traced:
                trace_marks(samples, read_events(str(cluster.trace)))
            out[f"c{conc}"] = summarise(samples, hist, traced)
            out[f"c{conc}"]["raw"] = [
                {"key": s.key, "target": s.target, "error": s.error,
                 "prompt_tokens": s.prompt_tokens, "output_tokens": s.output_tokens,
                 "engine": s.engine,
                 "marks": {k: round(v, 6) for k, v in s.marks.items()}} for s in samples]
            print_table(f"{connector}, concurrency {conc}", out[f"c{conc}"])
        return out
    finally:
        cluster.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--dtype", default="auto",
                        help="the workers' dtype (fulcrum up --dtype), e.g. float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=20, help="rounds at concurrency 1")
    parser.add_argument("--rounds-concurrent", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--warmup-later", type=int, default=None,
                        help="warm-up rounds for the later concurrency levels (default: "
                             "--warmup; the cluster is already warm then)")
    parser.add_argument("--connectors", nargs="+", default=["fulcrum", "nixl"])
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="extra vLLM argument for every worker, e.g. --dtype=float32")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment for the workers (A/B of a knob)")
    parser.add_argument("--label", default=None,
                        help="name this connector's runs (default: the connector)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pd_breakdown.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the other connectors' runs already in --out (same config)")
    args = parser.parse_args(argv)
    # A bounded run (`timeout`) must still stop its cluster: SIGTERM unwinds like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.max_model_len is None:
        need = args.prompt_tokens + args.max_tokens + 16
        args.max_model_len = 1 << (need - 1).bit_length()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {"model": args.model, "prompt_tokens": args.prompt_tokens,
                   "max_tokens": args.max_tokens, "rounds": args.rounds,
                   "rounds_concurrent": args.rounds_concurrent, "warmup": args.warmup,
                   "warmup_later": args.warmup_later,
                   "dtype": args.dtype, "worker_args": args.worker_arg,
                   "cpus": os.cpu_count()},
        "runs": {},
    }
    if args.append and args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("config") == result["config"]:
            result["runs"] = old.get("runs", {})
            result["dates"] = [*old.get("dates", [old.get("date")]), result["date"]]
    with tempfile.TemporaryDirectory(prefix="pd-breakdown-") as tmp:
        for connector in args.connectors:
            try:
                per_conc = run_connector(connector, args, Path(tmp))
            except (RuntimeError, TimeoutError) as exc:
                print(f"{connector}: {exc}", file=sys.stderr)
                logs = sorted(Path(tmp).glob("**/*.log"))
                for log in logs:
                    print(f"--- {log}\n" + "\n".join(log.read_text(errors="replace")
                                                     .splitlines()[-15:]), file=sys.stderr)
                continue
            for label, summary in per_conc.items():
                conc = label[1:]
                name = args.label or connector
                result["runs"].setdefault(f"{conc} concurrent", {})[name] = summary
            write(result, args.out)  # after each connector: a later one may not finish
    return 0


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["runs"]:
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
