"""The Fulcrum KV connector between real vLLM CPU workers (`fulcrum up --kv-connector
fulcrum`, tiny model, two workers).

Checks: temperature-0 agreement with one instance (greedy tokens, logprobs up to float
noise) for several prompt lengths up to the context limit, the decode worker computing none
of the prompt; both directions between the two workers and concurrent requests; KV blocks
returned after many requests; a dead prefill worker making the decode leg recompute. The
kill test runs last.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.greedy_match import (
    BATCHED_TOLERANCE,
    CROSS_WORKER_TOLERANCE,
    TOP_K,
    assert_same_greedy_run,
)
from tests.vllm_cluster import MAX_MODEL_LEN, MODEL_NAME, LiveCluster, start_cluster

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(tmp_path_factory.mktemp("fulcrum-kv"),
                         extra_args=("--kv-connector", "fulcrum"))
    try:
        yield live
    finally:
        live.stop()


def prompt_of(url: str, n_tokens: int, seed: int) -> str:
    """A never-seen prompt of exactly ``n_tokens`` tokens (checked with /tokenize)."""
    rng = random.Random(seed)
    words = [f"[{seed}:{time.time_ns()}]"] + [rng.choice(_WORDS) for _ in range(n_tokens)]
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix that fits
        mid = (lo + hi + 1) // 2
        if count_tokens(url, " ".join(words[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def count_tokens(url: str, prompt: str) -> int:
    resp = httpx.post(url + "/tokenize", json={"model": MODEL_NAME, "prompt": prompt},
                      timeout=30)
    return resp.json()["count"]


def complete(url: str, prompt: str, **extra) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0, "logprobs": 1, "ignore_eos": True, **extra}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


def prefill_leg(url: str, prompt: str) -> dict:
    out = complete(url, prompt, max_tokens=1,
                   kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False})
    params = out["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["connector"] == "fulcrum"
    return params


def by_source(cluster: LiveCluster, worker: str) -> dict[str, float]:
    return {src: cluster.metric(worker, "vllm:prompt_tokens_by_source_total", source=src)
            for src in ("external_kv_transfer", "local_compute", "local_cache_hit")}


def pd_and_reference(cluster: LiveCluster, producer: str, consumer: str, prompt: str,
                     **extra) -> tuple[dict, dict]:
    """(producer -> consumer output, the producer's own output) for ``prompt``."""
    p_url = cluster.worker_url(producer)
    reference = complete(p_url, prompt, **extra)
    params = prefill_leg(p_url, prompt)
    via_pd = complete(cluster.worker_url(consumer), prompt, kv_transfer_params=params, **extra)
    return via_pd, reference


def pd_once(cluster: LiveCluster, producer: str, consumer: str, prompt: str) -> dict:
    """Reference on the producer alone, then producer -> consumer; returns the P/D output.

    With each forward pass alone, only the two processes' float32 summing order tells the
    runs apart (see ``tests.greedy_match``).
    """
    via_pd, reference = pd_and_reference(cluster, producer, consumer, prompt,
                                         logprobs=TOP_K)
    assert_same_greedy_run(via_pd, reference, CROSS_WORKER_TOLERANCE)
    return via_pd


@pytest.mark.parametrize("n_tokens", [30, 100, 256, MAX_MODEL_LEN - MAX_TOKENS - 1])
def test_pd_equals_single_instance_and_decoder_computes_no_prompt(
        cluster: LiveCluster, n_tokens: int) -> None:
    prefill, decode = cluster.by_role("prefill"), cluster.by_role("decode")
    prompt = prompt_of(cluster.worker_url(prefill), n_tokens, seed=n_tokens)
    before = by_source(cluster, decode)
    pulled = cluster.metric(decode, "vllm:fulcrum_kv_pulls_total")
    length = count_tokens(cluster.worker_url(prefill), prompt)
    assert n_tokens - 4 <= length <= n_tokens  # word granularity
    via_pd = pd_once(cluster, prefill, decode, prompt)
    after = by_source(cluster, decode)
    assert via_pd["usage"]["prompt_tokens"] == length
    assert after["external_kv_transfer"] - before["external_kv_transfer"] == length
    assert after["local_compute"] == before["local_compute"]
    assert cluster.metric(decode, "vllm:fulcrum_kv_pulls_total") == pulled + 1


def test_roles_swap_per_request_and_concurrent_requests(cluster: LiveCluster) -> None:
    a, b = sorted(cluster.workers())
    failed = {w: cluster.metric(w, "vllm:fulcrum_kv_failed_transfers_total") for w in (a, b)}
    jobs = [((a, b) if i % 2 == 0 else (b, a), 40 + 30 * i, 1000 + i) for i in range(8)]
    prompts = [(pair, prompt_of(cluster.worker_url(a), n, seed)) for pair, n, seed in jobs]

    def one(job: tuple[tuple[str, str], str]) -> tuple[dict, dict]:
        (producer, consumer), prompt = job
        via_pd, reference = pd_and_reference(cluster, producer, consumer, prompt,
                                             logprobs=TOP_K)
        assert_same_greedy_run(via_pd, reference, BATCHED_TOLERANCE)
        return via_pd, reference

    with cf.ThreadPoolExecutor(4) as pool:  # concurrent requests share batches
        pairs = list(pool.map(one, prompts))
    outs = [via_pd for via_pd, _ in pairs]
    for i, (via_pd, _) in enumerate(pairs):  # the check tells another prompt's run apart
        with pytest.raises(AssertionError):
            assert_same_greedy_run(via_pd, pairs[(i + 1) % len(pairs)][1], BATCHED_TOLERANCE)
    assert all(o["usage"]["completion_tokens"] == MAX_TOKENS for o in outs)
    for w in (a, b):  # each worker served and pulled: both directions ran
        assert cluster.metric(w, "vllm:fulcrum_kv_serves_total") > 0
        assert cluster.metric(w, "vllm:fulcrum_kv_pulls_total") > 0
        assert cluster.metric(w, "vllm:fulcrum_kv_failed_transfers_total") == failed[w]


def test_gateway_pd_requests_return_kv_blocks_to_idle(cluster: LiveCluster) -> None:
    def one(i: int) -> int:
        out = httpx.post(cluster.url + "/v1/completions", timeout=300, json={
            "model": MODEL_NAME, "prompt": f"[{i}:{time.time_ns()}] " + " ".join(
                random.Random(i).choice(_WORDS) for _ in range(60)),
            "max_tokens": MAX_TOKENS, "ignore_eos": True})
        assert out.status_code == 200, out.text
        return out.json()["usage"]["completion_tokens"]

    decode = cluster.by_role("decode")
    pulls = cluster.metric(decode, "vllm:fulcrum_kv_pulls_total")
    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(16))) == [MAX_TOKENS] * 16
    assert cluster.metric(decode, "vllm:fulcrum_kv_pulls_total") - pulls == 16
    deadline = time.monotonic() + 60
    usage: dict[str, float] = {}
    while time.monotonic() < deadline:
        usage = {n: cluster.metric(n, "vllm:kv_cache_usage_perc") for n in cluster.workers()}
        if all(u == 0 for u in usage.values()):
            break
        time.sleep(1)
    assert all(u == 0 for u in usage.values()), f"KV blocks still held: {usage}"


def test_prefill_worker_killed_after_prefill_leg_decode_recomputes(
        cluster: LiveCluster) -> None:
    prefill, decode = cluster.by_role("prefill"), cluster.by_role("decode")
    p_url, d_url = cluster.worker_url(prefill), cluster.worker_url(decode)
    prompt = prompt_of(p_url, 120, seed=77)
    length = count_tokens(p_url, prompt)
    reference = complete(p_url, prompt, logprobs=TOP_K)
    params = prefill_leg(p_url, prompt)
    before = by_source(cluster, decode)
    failed = cluster.metric(decode, "vllm:fulcrum_kv_failed_transfers_total")
    cluster.kill_worker(prefill)
    out = complete(d_url, prompt, kv_transfer_params=params, logprobs=TOP_K)
    assert_same_greedy_run(out, reference, CROSS_WORKER_TOLERANCE)
    after = by_source(cluster, decode)
    assert after["local_compute"] - before["local_compute"] == length  # recomputed
    assert after["external_kv_transfer"] == before["external_kv_transfer"]
    assert cluster.metric(decode, "vllm:fulcrum_kv_failed_transfers_total") == failed + 1
