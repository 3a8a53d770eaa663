"""`fulcrum bench`: measure a live OpenAI-compatible deployment like `vllm bench serve`.

Streams `/v1/completions` (or `/v1/chat/completions`) with `stream_options.include_usage`.
By default requests carry what a real client sends: a large `max_tokens` cap
(`--client-max-tokens`), so only the model knows when a request ends. With `--length-oracle`,
`max_tokens` = the trace's output length (`--ignore-eos` then makes every request produce
exactly that many, as `vllm bench serve` does) and the router sees each true length.
Prompts are counted with the served model's tokenizer when it can be found locally (chars/4
otherwise, and the result says so). Requests leave at their trace arrival times; results
are vLLM's JSON keys plus ours, and a sweep is also written in the folder layout
`vllm bench sweep plot` reads.

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

from benchmarks.arrivals import Trace, TraceEntry
from benchmarks.dataset import BenchRequest
from benchmarks.metrics import DEFAULT_PERCENTILES, SLO, RequestTimeline, summarize
from benchmarks.sweep import sweep_rates
from benchmarks.workload import WorkloadSpec, add_workload_args, build_requests, build_trace
from deploy import options
from deploy.options import EXIT_UNREACHABLE


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send requests."""

    base_url: str
    model: str
    chat: bool = False
    ignore_eos: bool = False
    length_oracle: bool = False  # max_tokens = the true output length
    client_max_tokens: int | None = None  # hidden lengths: the client's cap (None: none)
    # The trace's length goes to the engine (with ignore_eos), the client's cap to the
    # gateway's policies (`X-Fulcrum-Client-Cap`): hidden lengths on a model that never stops.
    engine_lengths: bool = False
    timeout_s: float = 600.0
    api_key: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # extra HTTP headers (`--header K=V`)

    def http_headers(self) -> dict[str, str]:
        out = dict(self.headers)
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        if self.engine_lengths and self.client_max_tokens is not None:
            out["X-Fulcrum-Client-Cap"] = str(self.client_max_tokens)
        return out

    @property
    def lengths(self) -> str:
        """What the router is told about output lengths, as the result JSON records it."""
        if self.length_oracle:
            return "oracle"
        return "hidden, engine-enforced" if self.engine_lengths else "hidden"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


def request_body(endpoint: Endpoint, req: BenchRequest) -> dict:
    """The JSON body for one streamed request."""
    body: dict = {"model": endpoint.model, "stream": True,
                  "stream_options": {"include_usage": True}, "temperature": 0.0}
    engine_knows = endpoint.length_oracle or endpoint.engine_lengths
    cap = req.output_tokens if engine_knows else endpoint.client_max_tokens
    if endpoint.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
        if cap is not None:
            body["max_completion_tokens"] = cap
    else:
        body["prompt"] = req.prompt
        if cap is not None:
            body["max_tokens"] = cap
    if endpoint.ignore_eos or endpoint.engine_lengths:
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
    headers = endpoint.http_headers()
    chunks = 0
    texts: list[str] = []
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
                text = _chunk_text(chunk, endpoint.chat)
                if text:
                    texts.append(text)
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
        tl.generated_text = "".join(texts)
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


class ServerUnreachable(Exception):
    """Nothing OpenAI-compatible answered at the base URL."""


async def served_models(base_url: str, headers: dict[str, str] | None = None) -> list[dict]:
    """`/v1/models` of the server, or `ServerUnreachable` saying why not."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with httpx.AsyncClient(timeout=30, headers=headers or {}) as client:
            resp = await client.get(url)
    except httpx.HTTPError as exc:
        raise ServerUnreachable(f"{type(exc).__name__} on GET {url}") from None
    if resp.status_code != 200:
        raise ServerUnreachable(f"GET {url} answered HTTP {resp.status_code}")
    try:
        models = resp.json()["data"]
        assert isinstance(models, list) and models and "id" in models[0]
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ServerUnreachable(f"GET {url} did not list any model") from None
    return models


async def discover_model(base_url: str, api_key: str | None = None) -> str:
    """First model id served at `base_url/v1/models`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return (await served_models(base_url, headers))[0]["id"]


def find_tokenizer(model_id: str, root: str | None = None) -> str | None:
    """Where the served model's tokenizer is on this machine, without downloading.

    Tries the server's `root` (vLLM reports the model folder there), the model id as a
    folder, Fulcrum's prepared models by their served names, then the Hugging Face cache."""
    from instance_manager.models import cache_root

    served_names = {"SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct",
                    "tiny-llama": "tiny-llama-seed0"}
    candidates = [root, model_id]
    if model_id in served_names:
        candidates.append(str(cache_root() / "models" / served_names[model_id]))
    for cand in candidates:
        if cand and (Path(cand).expanduser() / "tokenizer_config.json").is_file():
            return str(Path(cand).expanduser())
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_id, local_files_only=True)
    except Exception:  # not cached, not a HF id, or no network by design
        return None
    return model_id


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
        result["generated_texts"] = [t.generated_text for t in timelines]
        result["errors"] = [t.error for t in timelines]
    return result


def result_header(args: argparse.Namespace, endpoint: Endpoint, rate: float,
                  metadata: dict[str, str] | None = None) -> dict:
    """vLLM's header keys (with `--metadata` pairs), plus the workload of the trace."""
    metadata = metadata or {}
    header = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if endpoint.chat else "openai",
        "backend": "openai-chat" if endpoint.chat else "openai",
        "label": args.label,
        "model_id": endpoint.model,
        "tokenizer_id": str(args.tokenizer) if args.tokenizer else APPROX_TOKENIZER,
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "base_url": endpoint.base_url,
        "dataset": args.dataset,
        "arrival": args.arrival,
        "seed": args.seed,
        "lengths": endpoint.lengths,
        "client_max_tokens": None if endpoint.length_oracle else endpoint.client_max_tokens,
    }
    if args.arrival == "ramp":  # vLLM's ramp-up keys
        header.update(ramp_up_strategy=args.ramp_strategy,
                      ramp_up_start_rps=args.ramp_start_rps, ramp_up_end_rps=args.ramp_end_rps)
    header.update(metadata)
    return header


APPROX_TOKENIZER = "approx-chars/4"


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """All `fulcrum bench` options."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="OpenAI-compatible server or Fulcrum gateway")
    parser.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    parser.add_argument("--api-key", default=None,
                        help="bearer key for the endpoint (default: $OPENAI_API_KEY)")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate exactly the trace's output length, past end-of-"
                             "sequence (vLLM's flag; off by default as in vLLM)")
    parser.add_argument("--no-ignore-eos", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--header", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra HTTP headers on every request")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight at once (default: no limit)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds before one request counts as failed")
    parser.add_argument("--num-warmups", type=int, default=0,
                        help="requests sent (and not measured) before the run")
    add_workload_args(parser)
    s = parser.add_argument_group("SLOs and results")
    options.add_slo_goodput(s)
    s.add_argument("--metric-percentiles", default="90,99",
                   help="comma-separated percentiles")
    s.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help="metrics whose percentiles the summary prints (ttft, tpot, itl, "
                        "e2el); the JSON always has all")
    s.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra key=value pairs stored in the result JSON")
    s.add_argument("--sweep-rates", default=None,
                   help="comma-separated request rates: find the highest keeping "
                        "--target-attainment (needs --goodput)")
    s.add_argument("--sweep-refine", type=int, default=0, help="bisection steps after the grid")
    s.add_argument("--target-attainment", type=float, default=0.9,
                   help="SLO attainment (0-1) a sweep point must reach to pass")
    s.add_argument("--label", default="fulcrum", help="name of this run in files and plots")
    s.add_argument("--save-result", action="store_true", help="write the JSON result")
    s.add_argument("--save-detailed", action="store_true", help="also per-request arrays")
    s.add_argument("--result-dir", type=Path, default=Path("benchmarks/results"),
                   help="folder for the JSON result (and a sweep's vLLM-style folders)")
    s.add_argument("--result-filename", default=None,
                   help="file name (default: vLLM's LABEL-RATEqps-MODEL-DATE.json)")
    s.add_argument("--plot", action="store_true", help="write PNG plots next to the JSON")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _result_name(args: argparse.Namespace, model: str, rate: float | str) -> str:
    rate_s = "inf" if isinstance(rate, float) and math.isinf(rate) else str(rate)
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{args.label}-{rate_s}qps{conc}-{Path(model).name}-{stamp}.json"


def _pairs(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"fulcrum bench: {flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _resolve_tokenizer(args: argparse.Namespace, model: str, root: str | None) -> None:
    """Count prompt tokens with the served model's tokenizer unless told otherwise."""
    if args.tokenizer is not None or args.dataset != "sharegpt":
        return
    found = find_tokenizer(model, root)
    if found is None:
        print(f"fulcrum bench: no local tokenizer for {model!r}; counting tokens as chars/4 "
              "(pass --tokenizer DIR for exact lengths)", file=sys.stderr)
        return
    args.tokenizer = Path(found) if Path(found).is_dir() else found


def _warm_up(endpoint: Endpoint, pool: list[BenchRequest] | None, n: int) -> None:
    if n <= 0:
        return
    reqs = pool or [BenchRequest("Hello, how are you?", 6, 8)]
    trace: Trace = [TraceEntry(0.0, reqs[i % len(reqs)]) for i in range(n)]
    timelines, _ = asyncio.run(run_trace(trace, endpoint, progress=False))
    failed = sum(not t.success for t in timelines)
    print(f"warm-up: {n} request(s), {failed} failed", file=sys.stderr)


def run_bench(args: argparse.Namespace) -> dict:
    """Run one benchmark (or a sweep) from parsed arguments; returns the result dict."""
    api_key = getattr(args, "api_key", None) or os.environ.get("OPENAI_API_KEY") or None
    extra_headers = tuple(_pairs(args.header, "--header").items())
    metadata = _pairs(args.metadata, "--metadata")
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = asyncio.run(served_models(args.base_url, {**dict(extra_headers), **auth}))
    except ServerUnreachable as exc:
        print(f"fulcrum bench: no OpenAI-compatible server at {args.base_url} ({exc}); is it "
              "up?", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None
    model = args.model or models[0]["id"]
    root = next((m.get("root") for m in models if m["id"] == model), None)
    _resolve_tokenizer(args, model, root)
    endpoint = Endpoint(args.base_url, model, chat=args.chat, ignore_eos=args.ignore_eos,
                        length_oracle=args.length_oracle, client_max_tokens=args.client_max_tokens,
                        engine_lengths=getattr(args, "engine_lengths", False),
                        timeout_s=args.request_timeout, api_key=api_key,
                        headers=extra_headers)
    slo = SLO.parse(options.goodput_items(args))
    percentiles = ([float(p) for p in args.metric_percentiles.split(",") if p]
                   or list(DEFAULT_PERCENTILES))
    spec = WorkloadSpec.from_args(args)
    pool = build_requests(spec) if spec.dataset != "trace" else None
    _warm_up(endpoint, pool, args.num_warmups)

    def evaluate(rate: float) -> dict:
        trace = build_trace(replace(spec, request_rate=rate), pool)
        timelines, duration = asyncio.run(
            run_trace(trace, endpoint, args.max_concurrency, progress=not args.no_progress))
        return build_result(timelines=timelines, duration_s=duration, slo=slo,
                            percentiles=percentiles,
                            header=result_header(args, endpoint, rate, metadata),
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
    print_summary(result, [m.strip() for m in args.percentile_metrics.split(",") if m.strip()],
                  percentiles)
    if args.save_result or args.plot:
        args.result_dir.mkdir(parents=True, exist_ok=True)
        name = args.result_filename or _result_name(
            args, model, "sweep" if args.sweep_rates else spec.request_rate)
        path = args.result_dir / name
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"result written to {path}", file=sys.stderr)
        if args.sweep_rates:
            folder = write_sweep_layout(path.with_suffix(""), runs)
            print(f"sweep written for `vllm bench sweep plot {folder}`", file=sys.stderr)
        if args.plot:
            from benchmarks.plots import plot_goodput_vs_rate, plot_latency_cdfs

            title = f"{args.label}: {model}, {args.dataset}/{args.arrival}"
            plot_latency_cdfs({f"{r:g} req/s": res for r, res in runs},
                              path.with_suffix(".cdf.png"), title=title, slo=slo)
            if len(runs) > 1:
                plot_goodput_vs_rate({args.label: runs}, path.with_suffix(".goodput.png"),
                                     args.target_attainment, title=title, slo=slo)
    return result


def write_sweep_layout(folder: Path, runs: Sequence[tuple[float, dict]]) -> Path:
    """One folder per rate as `vllm bench sweep serve` writes them:
    `BENCH--request_rate=R/run=0.json` and `summary.json` (a list of runs), each run
    carrying `run_number` and the swept `request_rate`."""
    for rate, res in runs:
        run = {**res, "request_rate": rate, "run_number": 0}
        comb = folder / f"BENCH--request_rate={rate:g}"
        comb.mkdir(parents=True, exist_ok=True)
        (comb / "run=0.json").write_text(json.dumps(run, indent=4, default=str))
        (comb / "summary.json").write_text(json.dumps([run], indent=4, default=str))
    return folder


_SUMMARY_METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st "
                    "token)", "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def summary_text(result: dict, percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl"),
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> str:
    """The result block vLLM's `bench serve` prints, with Fulcrum's SLO lines added."""
    if "sweep" in result:
        sweep = result["sweep"]
        return (f"max rate at >= {sweep['target_attainment']:.0%} SLO attainment: "
                f"{sweep['max_rate']}")
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: object, fmt: str = "{:<10.2f}") -> None:
        if value is not None:
            shown = fmt.format(value) if isinstance(value, float) else f"{value:<10}"
            lines.append(f"{label:<40} {shown}")

    row("Successful requests:", result.get("completed"))
    row("Failed requests:", result.get("failed"))
    row("Maximum request concurrency:", result.get("max_concurrency"))
    row("Benchmark duration (s):", result.get("duration"))
    row("Total input tokens:", result.get("total_input_tokens"))
    row("Total generated tokens:", result.get("total_output_tokens"))
    row("Request throughput (req/s):", result.get("request_throughput"))
    row("Request goodput (req/s):", result.get("request_goodput"))
    row("Output token throughput (tok/s):", result.get("output_throughput"))
    row("Peak output token throughput (tok/s):", result.get("max_output_tokens_per_s"))
    row("Peak concurrent requests:", result.get("max_concurrent_requests"))
    row("Total token throughput (tok/s):", result.get("total_token_throughput"))
    row("SLO attainment:", result.get("slo_attainment"))
    for metric in percentile_metrics:
        if metric not in _SUMMARY_METRICS:
            continue
        lines.append("{s:{c}^{n}}".format(s=_SUMMARY_METRICS[metric], n=50, c="-"))
        row(f"Mean {metric.upper()} (ms):", result.get(f"mean_{metric}_ms"))
        row(f"Median {metric.upper()} (ms):", result.get(f"median_{metric}_ms"))
        for p in percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            row(f"P{word} {metric.upper()} (ms):", result.get(f"p{word}_{metric}_ms"))
    lines.append("=" * 50)
    return "\n".join(lines)


def print_summary(result: dict, percentile_metrics: Sequence[str] = ("ttft", "tpot", "itl"),
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
    """vLLM's result block on stderr (the JSON has everything)."""
    print(summary_text(result, percentile_metrics, percentiles), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fulcrum bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    run_bench(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
