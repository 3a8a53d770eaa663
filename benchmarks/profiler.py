"""`fulcrum profile`: measure one live worker and write points for the fitted sim model.

Prefill: after one warm-up request, sequential requests with max_tokens=1 at several prompt
lengths; the median TTFT per length is the prefill time. Decode: n concurrent streams of
fixed length; the median per-stream TPOT, (latency - TTFT) / (tokens - 1), is the step time
at batch n with about n*(prompt + output/2) resident tokens. (Inter-chunk gaps are not used:
servers coalesce SSE events under load, which makes most gaps ~0.) The KV capacity is read
from vLLM's `vllm:cache_config_info` metric (num_gpu_blocks x block_size) unless given.

    python -m benchmarks.profiler --base-url http://127.0.0.1:8100 --out profile.json
    python -m benchmarks.sim --perf fitted --fitted-model profile.json ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from benchmarks.bench import Endpoint, discover_model, send_request
from benchmarks.dataset import BenchRequest, synthetic_prompt
from benchmarks.sim.perf import FittedModel


async def measure_prefill(endpoint: Endpoint, lengths: Sequence[int],
                          repeats: int) -> list[tuple[float, float]]:
    """(prompt_tokens, seconds) points: TTFT of single max_tokens=1 requests."""
    points = []
    async with httpx.AsyncClient(timeout=endpoint.timeout_s) as client:
        await send_request(client, endpoint, BenchRequest(synthetic_prompt(32, 7), 32, 4))
        for length in lengths:
            seen = []
            for r in range(repeats):
                req = BenchRequest(synthetic_prompt(length, seed=length * 100 + r), length, 1)
                tl = await send_request(client, endpoint, req)
                if tl.success:
                    seen.append((float(tl.prompt_tokens), tl.ttft_s))
            if seen:
                points.append((statistics.median(p for p, _ in seen),
                               statistics.median(t for _, t in seen)))
    return points


ITL_METRIC = "vllm:inter_token_latency_seconds"


async def server_itl_totals(client: httpx.AsyncClient, base_url: str) -> tuple[float, float]:
    """(sum, count) of the worker's inter-token-latency histogram; (0, 0) if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = await client.get(base_url.rstrip("/") + "/metrics")
    except httpx.HTTPError:
        return 0.0, 0.0
    total = count = 0.0
    if resp.status_code != 200:
        return total, count
    try:
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                if sample.name == ITL_METRIC + "_sum":
                    total += sample.value
                elif sample.name == ITL_METRIC + "_count":
                    count += sample.value
    except ValueError:  # not Prometheus text
        return 0.0, 0.0
    return total, count


async def measure_decode(endpoint: Endpoint, batch_sizes: Sequence[int], prompt_tokens: int,
                         output_tokens: int) -> list[tuple[float, float, float]]:
    """(num_seqs, resident_tokens, step seconds) points from concurrent streams.

    The step time is the worker's own mean inter-token latency over the batch (histogram
    deltas from its /metrics): a client on the same busy host reads coalesced SSE events,
    which makes client-side TPOT of concurrent streams meaningless (near 0). Without that
    metric it falls back to the client-side median TPOT."""
    points = []
    async with httpx.AsyncClient(timeout=endpoint.timeout_s) as client:
        for n in batch_sizes:
            reqs = [BenchRequest(synthetic_prompt(prompt_tokens, seed=i), prompt_tokens,
                                 output_tokens) for i in range(n)]
            before = await server_itl_totals(client, endpoint.base_url)
            tls = await asyncio.gather(*(send_request(client, endpoint, r) for r in reqs))
            after = await server_itl_totals(client, endpoint.base_url)
            tpots = [(t.latency_s - t.ttft_s) / (t.output_tokens - 1) for t in tls
                     if t.success and t.output_tokens > 1]
            if not tpots:
                continue
            prompt = statistics.mean(t.prompt_tokens for t in tls if t.success)
            count = after[1] - before[1]
            step = (after[0] - before[0]) / count if count > 0 else statistics.median(tpots)
            points.append((float(n), n * (prompt + output_tokens / 2), step))
    return points


async def kv_capacity_from_metrics(base_url: str) -> int | None:
    """num_gpu_blocks * block_size from vLLM's /metrics, if exposed."""
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(base_url.rstrip("/") + "/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info"):
            blocks = re.search(r'num_gpu_blocks="(\d+)"', line)
            size = re.search(r'block_size="(\d+)"', line)
            if blocks and size:
                return int(blocks.group(1)) * int(size.group(1))
    return None


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="one worker (not the gateway)")
    parser.add_argument("--model", default=None,
                        help="model name (default: first of /v1/models)")
    parser.add_argument("--prompt-lengths", default="16,64,128,256,512,1024",
                        help="prompt lengths (tokens) timed for the prefill curve")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per point")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16",
                        help="concurrent streams timed for the decode curve")
    parser.add_argument("--decode-prompt-tokens", type=int, default=128,
                        help="prompt length of the decode measurements")
    parser.add_argument("--decode-output-tokens", type=int, default=64,
                        help="tokens generated per decode measurement")
    parser.add_argument("--kv-capacity-tokens", type=int, default=None,
                        help="default: from /metrics, else 100000")
    parser.add_argument("--kv-bytes-per-token", type=float, default=0.0,
                        help="for KV transfer time (2*layers*kv_heads*head_dim*dtype bytes)")
    parser.add_argument("--link-bytes-per-s", type=float, default=1e9,
                        help="KV transfer bandwidth between workers")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile.json"),
                        help="where the profile JSON goes")


def run_profile(args: argparse.Namespace) -> dict:
    async def go() -> dict:
        model = args.model or await discover_model(args.base_url)
        # exact lengths to time
        endpoint = Endpoint(args.base_url, model, ignore_eos=True, length_oracle=True)
        prefill = await measure_prefill(endpoint, [int(x) for x in args.prompt_lengths.split(",")],
                                        args.repeats)
        decode = await measure_decode(endpoint, [int(x) for x in args.batch_sizes.split(",")],
                                      args.decode_prompt_tokens, args.decode_output_tokens)
        kv = args.kv_capacity_tokens or await kv_capacity_from_metrics(args.base_url) or 100_000
        return {"name": f"fitted-{Path(model).name}", "model": model, "prefill": prefill,
                "decode": decode, "kv_capacity_tokens": kv,
                "kv_bytes_per_token": args.kv_bytes_per_token,
                "link_bytes_per_s": args.link_bytes_per_s}

    data = asyncio.run(go())
    fitted = FittedModel.fit(data["prefill"], data["decode"], data["kv_capacity_tokens"],
                             data["kv_bytes_per_token"], data["link_bytes_per_s"], data["name"])
    data["fit"] = {"prefill_coef": fitted.prefill_coef, "decode_coef": fitted.decode_coef}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2))
    print(f"profile written to {args.out}: prefill(L)=%.3g L^2 + %.3g L + %.3g; "
          "step(n, ctx)=%.3g + %.3g n + %.3g ctx" % (*fitted.prefill_coef, *fitted.decode_coef),
          file=sys.stderr)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fulcrum profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_profile_args(parser)
    run_profile(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
