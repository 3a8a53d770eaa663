"""`fulcrum bench`: measure a live OpenAI-compatible deployment like `vllm bench serve`.

Streams `/v1/completions` (or `/v1/chat/completions`) with
`stream_options.include_usage`, `ignore_eos` and `max_tokens` = the trace's output length,
so every request produces exactly its expected length even on random-weight models.
Requests leave at their trace arrival times; results are vLLM's JSON keys plus ours.

    python -m benchmarks.bench --base-url http://127.0.0.1:8000 --request-rate 4 \
        --num-prompts 200 --goodput ttft:1000 tpot:100 --save-result
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import httpx

from benchmarks.arrivals import Trace
from benchmarks.dataset import BenchRequest
from benchmarks.metrics import DEFAULT_PERCENTILES, SLO, RequestTimeline, summarize
from benchmarks.sweep import sweep_rates
from benchmarks.workload import WorkloadSpec, add_workload_args, build_requests, build_trace


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send requests."""

    base_url: str
    model: str
    chat: bool = False
    ignore_eos: bool = True
    timeout_s: float = 600.0
    api_key: str | None = None

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


def request_body(endpoint: Endpoint, req: BenchRequest) -> dict:
    """The JSON body for one streamed request."""
    body: dict = {"model": endpoint.model, "stream": True,
                  "stream_options": {"include_usage": True}, "temperature": 0.0}
    if endpoint.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.output_tokens
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.output_tokens
    if endpoint.ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if chat:
        delta = c.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return c.get("text") or ""


async def send_request(client: httpx.AsyncClient, endpoint: Endpoint, req: BenchRequest,
                       scheduled_s: float | None = None) -> RequestTimeline:
    """Send one streamed request and record its timeline (perf_counter seconds)."""
    tl = RequestTimeline(start_s=time.perf_counter(), prompt_tokens=req.prompt_tokens,
                         scheduled_s=scheduled_s)
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    chunks = 0
    try:
        async with client.stream("POST", endpoint.base_url.rstrip("/") + endpoint.path,
                                 json=request_body(endpoint, req), headers=headers,
                                 timeout=endpoint.timeout_s) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                tl.error = f"HTTP {resp.status_code}: {body[:300]}"
                tl.end_s = time.perf_counter()
                return tl
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if _chunk_text(chunk, endpoint.chat):
                    if tl.first_token_s is None:
                        tl.first_token_s = now
                    tl.chunk_times_s.append(now)
                    chunks += 1
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    tl.output_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens"):
                        tl.prompt_tokens = int(usage["prompt_tokens"])
        tl.end_s = time.perf_counter()
        if tl.output_tokens == 0:
            tl.output_tokens = chunks
        tl.success = tl.first_token_s is not None
        if not tl.success:
            tl.error = "stream ended without any token"
    except Exception as exc:  # every failure is recorded in the timeline, not raised
        tl.end_s = time.perf_counter()
        tl.error = f"{type(exc).__name__}: {exc}"
    return tl


async def run_trace(trace: Trace, endpoint: Endpoint, max_concurrency: int | None = None,
                    progress: bool = True) -> tuple[list[RequestTimeline], float]:
    """Replay a trace against the endpoint; returns timelines (in trace order) and the
    benchmark duration in seconds."""
    from tqdm.asyncio import tqdm

    limits = httpx.Limits(max_connections=max_concurrency or 10_000,
                          max_keepalive_connections=max_concurrency or 10_000)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(trace), disable=not progress, desc="requests", file=sys.stderr)
    async with httpx.AsyncClient(limits=limits, timeout=endpoint.timeout_s) as client:
        t0 = time.perf_counter()

        async def one(arrival_s: float, req: BenchRequest) -> RequestTimeline:
            delay = t0 + arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if semaphore is None:
                tl = await send_request(client, endpoint, req, t0 + arrival_s)
            else:
                async with semaphore:
                    tl = await send_request(client, endpoint, req, t0 + arrival_s)
            bar.update(1)
            return tl

        timelines = await asyncio.gather(*(one(e.arrival_s, e.request) for e in trace))
        duration = time.perf_counter() - t0
    bar.close()
    return list(timelines), duration


async def discover_model(base_url: str, api_key: str | None = None) -> str:
    """First model id served at `base_url/v1/models`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        resp = await client.get(base_url.rstrip("/") + "/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


def build_result(*, timelines: Sequence[RequestTimeline], duration_s: float, slo: SLO,
                 percentiles: Sequence[float], header: dict, detailed: bool) -> dict:
    """vLLM's result layout: header keys, metrics, per-request arrays."""
    result = dict(header)
    result.update(summarize(timelines, duration_s, slo, percentiles))
    t0 = min((t.start_s for t in timelines), default=0.0)
    result["latencies"] = [t.latency_s for t in timelines]
    result["queue_times"] = [max(0.0, t.start_s - t.scheduled_s) if t.scheduled_s else 0.0
                             for t in timelines]
    if detailed:
        result["input_lens"] = [t.prompt_tokens for t in timelines]
        result["output_lens"] = [t.output_tokens if t.success else 0 for t in timelines]
        result["ttfts"] = [t.ttft_s for t in timelines]
        result["itls"] = [t.itls_s for t in timelines]
        result["start_times"] = [t.start_s - t0 for t in timelines]
        result["errors"] = [t.error for t in timelines]
    return result


def result_header(args: argparse.Namespace, endpoint: Endpoint, rate: float) -> dict:
    """vLLM's header keys, plus the workload that made the trace."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if endpoint.chat else "openai",
        "backend": "openai-chat" if endpoint.chat else "openai",
        "label": args.label,
        "model_id": endpoint.model,
        "tokenizer_id": str(args.tokenizer) if args.tokenizer else "approx-chars/4",
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "base_url": endpoint.base_url,
        "dataset": args.dataset,
        "arrival": args.arrival,
        "seed": args.seed,
    }


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """All `fulcrum bench` options."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="OpenAI-compatible server or Fulcrum gateway")
    parser.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    parser.add_argument("--api-key", default=None,
                        help="bearer key for the endpoint (default: $OPENAI_API_KEY)")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--no-ignore-eos", action="store_true",
                        help="let the model stop early (outputs may be shorter than the trace)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    add_workload_args(parser)
    s = parser.add_argument_group("SLOs and results")
    s.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="SLOs in ms, vLLM syntax: ttft:1000 tpot:100 e2el:20000")
    s.add_argument("--metric-percentiles", default="90,99",
                   help="comma-separated percentiles (default 90,99)")
    s.add_argument("--sweep-rates", default=None,
                   help="comma-separated request rates: find the highest keeping "
                        "--target-attainment (needs --goodput)")
    s.add_argument("--sweep-refine", type=int, default=0, help="bisection steps after the grid")
    s.add_argument("--target-attainment", type=float, default=0.9)
    s.add_argument("--label", default="fulcrum")
    s.add_argument("--save-result", action="store_true", help="write the JSON result")
    s.add_argument("--save-detailed", action="store_true", help="also per-request arrays")
    s.add_argument("--result-dir", type=Path, default=Path("benchmarks/results"))
    s.add_argument("--result-filename", default=None)
    s.add_argument("--plot", action="store_true", help="write PNG plots next to the JSON")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _result_name(args: argparse.Namespace, model: str, rate: float | str) -> str:
    rate_s = "inf" if isinstance(rate, float) and math.isinf(rate) else str(rate)
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{args.label}-{rate_s}qps{conc}-{Path(model).name}-{stamp}.json"


def run_bench(args: argparse.Namespace) -> dict:
    """Run one benchmark (or a sweep) from parsed arguments; returns the result dict."""
    api_key = getattr(args, "api_key", None) or os.environ.get("OPENAI_API_KEY") or None
    model = args.model or asyncio.run(discover_model(args.base_url, api_key))
    endpoint = Endpoint(args.base_url, model, chat=args.chat,
                        ignore_eos=not args.no_ignore_eos, timeout_s=args.request_timeout,
                        api_key=api_key)
    slo = SLO.parse(args.goodput)
    percentiles = ([float(p) for p in args.metric_percentiles.split(",") if p]
                   or list(DEFAULT_PERCENTILES))
    spec = WorkloadSpec.from_args(args)
    pool = build_requests(spec) if spec.dataset != "trace" else None

    def evaluate(rate: float) -> dict:
        trace = build_trace(replace(spec, request_rate=rate), pool)
        timelines, duration = asyncio.run(
            run_trace(trace, endpoint, args.max_concurrency, progress=not args.no_progress))
        return build_result(timelines=timelines, duration_s=duration, slo=slo,
                            percentiles=percentiles,
                            header=result_header(args, endpoint, rate),
                            detailed=args.save_detailed or args.plot)

    if args.sweep_rates:
        if slo.empty:
            raise SystemExit("--sweep-rates needs --goodput SLOs")
        rates = [float(r) for r in args.sweep_rates.split(",") if r]
        sweep = sweep_rates(evaluate, rates, args.target_attainment, args.sweep_refine)
        result = {"sweep": sweep.as_dict(), "model_id": model, "slo": slo.as_dict(),
                  "label": args.label}
        runs = sweep.points
    else:
        result = evaluate(spec.request_rate)
        runs = [(spec.request_rate, result)]
    print_summary(result)
    if args.save_result or args.plot:
        args.result_dir.mkdir(parents=True, exist_ok=True)
        name = args.result_filename or _result_name(
            args, model, "sweep" if args.sweep_rates else spec.request_rate)
        path = args.result_dir / name
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"result written to {path}", file=sys.stderr)
        if args.plot:
            from benchmarks.plots import plot_goodput_vs_rate, plot_latency_cdfs

            plot_latency_cdfs({f"{r:g} req/s": res for r, res in runs},
                              path.with_suffix(".cdf.png"))
            if len(runs) > 1:
                plot_goodput_vs_rate({args.label: runs}, path.with_suffix(".goodput.png"),
                                     args.target_attainment)
    return result


def print_summary(result: dict) -> None:
    """A short human summary on stderr (the JSON has everything)."""
    if "sweep" in result:
        print(f"max rate at >= {result['sweep']['target_attainment']:.0%} SLO attainment: "
              f"{result['sweep']['max_rate']}", file=sys.stderr)
        return
    keys = ("completed", "failed", "duration", "request_throughput", "output_throughput",
            "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms",
            "median_itl_ms", "request_goodput", "slo_attainment")
    for k in keys:
        v = result.get(k)
        if v is not None:
            print(f"{k:<24} {v:.2f}" if isinstance(v, float) else f"{k:<24} {v}",
                  file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fulcrum bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    run_bench(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
