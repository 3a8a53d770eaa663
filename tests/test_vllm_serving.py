"""The serving path on real vLLM CPU workers: `fulcrum up` on the tiny test model,
one prefill and one decode worker, KV moved by each connector in turn (Fulcrum's own,
then vLLM's NIXL with our CPU fixes).

One cluster per connector serves the whole module; the fault tests at the end kill
workers and wait for the manager to restart them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.greedy_match import (
    CROSS_WORKER_TOLERANCE,
    TOP_K,
    assert_follows_greedy_ids,
    assert_same_greedy_run,
    top_by_id,
)
from tests.vllm_cluster import MAX_MODEL_LEN, MODEL_NAME, LiveCluster, start_cluster

pytestmark = pytest.mark.vllm

_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def unique_prompt(n_words: int, seed: int) -> str:
    """A prompt no earlier request used, so no prefix cache can answer it."""
    rng = random.Random(seed)
    return f"[{seed}:{time.time_ns()}] " + " ".join(rng.choice(_WORDS) for _ in range(n_words))


@pytest.fixture(scope="module", params=["fulcrum", "nixl"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(tmp_path_factory.mktemp(request.param),
                         extra_args=("--kv-connector", request.param))
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture()
def client(cluster: LiveCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def _greedy(url: str, prompt: str, max_tokens: int = 12) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "logprobs": TOP_K, "ignore_eos": True}
    resp = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_cluster_has_one_prefill_and_one_decode_worker(cluster: LiveCluster) -> None:
    roles = sorted(w["role"] for w in cluster.workers().values())
    assert roles == ["decode", "prefill"]


def test_openai_client_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_NAME, prompt=unique_prompt(20, 1),
                                    max_tokens=8, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 20
    assert out.choices[0].text
    chunks = list(client.completions.create(
        model=MODEL_NAME, prompt=unique_prompt(20, 2), max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6


def test_openai_client_chat(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": unique_prompt(15, 3)}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].message.content
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage.completion_tokens == 5
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


@pytest.mark.parametrize("n_words", [8, 60, 140])
def test_pd_output_equals_single_instance_and_kv_moved(cluster: LiveCluster,
                                                       n_words: int) -> None:
    prefill, decode = cluster.by_role("prefill"), cluster.by_role("decode")
    prompt = unique_prompt(n_words, 100 + n_words)
    reference = _greedy(cluster.worker_url(prefill), prompt)  # one instance does it all
    external = cluster.metric(decode, "vllm:prompt_tokens_by_source_total",
                              source="external_kv_transfer")
    local = cluster.metric(decode, "vllm:prompt_tokens_by_source_total",
                           source="local_compute")
    via_pd = _greedy(cluster.url, prompt)
    prompt_len = via_pd["usage"]["prompt_tokens"]
    assert_same_greedy_run(via_pd, reference, CROSS_WORKER_TOLERANCE)
    # The decode worker pulled the whole prompt's KV and computed none of it.
    assert cluster.metric(decode, "vllm:prompt_tokens_by_source_total",
                          source="external_kv_transfer") - external == prompt_len
    assert cluster.metric(decode, "vllm:prompt_tokens_by_source_total",
                          source="local_compute") == local


def _stream(url: str, prompt: str, max_tokens: int) -> tuple[list[int], str, dict, set]:
    """Token ids, text, usage and chunk ids of a greedy streamed completion."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    ids: list[int] = []
    text, usage, chunk_ids = "", {}, set()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            chunk_ids.add(chunk["id"])
            for choice in chunk["choices"]:
                ids.extend(choice.get("token_ids") or [])
                text += choice["text"]
            usage = chunk.get("usage") or usage
    return ids, text, usage, chunk_ids


def test_streamed_pd_hands_off_the_first_token_and_equals_single_instance(
        cluster: LiveCluster) -> None:
    """With Fulcrum's connector the prefill leg's token is streamed first and the decode
    leg continues after it (its prompt is one token longer); with NIXL the decode leg
    recomputes it. Either way the stream equals one instance's."""
    decode = cluster.by_role("decode")
    prompt = unique_prompt(60, 31)
    reference = _stream(cluster.worker_url(decode), prompt, 10)
    prompt_sum = cluster.metric(decode, "vllm:request_prompt_tokens_sum")
    via_pd = _stream(cluster.url, prompt, 10)
    prompt_len = reference[2]["prompt_tokens"]
    assert via_pd[0] == reference[0] and len(via_pd[0]) == 10
    assert via_pd[1] == reference[1]
    assert via_pd[2]["prompt_tokens"] == prompt_len
    assert via_pd[2]["completion_tokens"] == 10
    assert len(via_pd[3]) == 1  # one stream id, as from one worker
    handed_off = cluster.metric(decode, "vllm:fulcrum_kv_pulls_total") > 0  # our connector
    assert cluster.metric(decode, "vllm:request_prompt_tokens_sum") - prompt_sum == \
        prompt_len + (1 if handed_off else 0)


def test_prompt_one_token_short_of_the_context_equals_single_instance(
        cluster: LiveCluster) -> None:
    """One instance stops after one token (no room for more); the handed-off decode leg,
    one token longer, is refused, and the gateway sends the request as written."""
    decode = cluster.by_role("decode")
    rng = random.Random(time.time_ns())
    body = {"model": MODEL_NAME, "prompt": [rng.randrange(300, 8000)
                                            for _ in range(MAX_MODEL_LEN - 1)],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}

    def run(url: str) -> tuple[list[int], list, dict]:
        ids, finish, usage = [], [], {}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200, resp.read()
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    for choice in chunk["choices"]:
                        ids.extend(choice.get("token_ids") or [])
                        finish.append(choice.get("finish_reason"))
                    usage = chunk.get("usage") or usage
        return ids, [f for f in finish if f], usage

    reference = run(cluster.worker_url(decode))
    assert len(reference[0]) == 1 and reference[1] == ["length"]
    assert run(cluster.url) == reference


def _chat_stream(url: str, messages: list[dict], max_tokens: int) -> list[dict]:
    """The chunks of a greedy streamed chat completion, token ids asked for."""
    body = {"model": MODEL_NAME, "messages": messages, "max_completion_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    assert all("error" not in c for c in chunks), chunks
    return chunks


def test_streamed_chat_pd_hands_off_the_first_token_and_equals_single_instance(
        cluster: LiveCluster) -> None:
    """A chat stream through P/D: with Fulcrum's connector the prefill leg's token comes
    first and the decode leg continues as a completion of the templated prompt's ids
    (rewritten into chat chunks); the client sees the same tokens, text, usage and chunk
    shapes as from one instance."""
    decode = cluster.by_role("decode")
    messages = [{"role": "user", "content": unique_prompt(60, 32)}]
    reference = _chat_stream(cluster.worker_url(decode), messages, 10)
    prompt_sum = cluster.metric(decode, "vllm:request_prompt_tokens_sum")
    via_pd = _chat_stream(cluster.url, messages, 10)

    assert _chat_ids(via_pd) == _chat_ids(reference) and len(_chat_ids(reference)) == 10
    assert _chat_text(via_pd) == _chat_text(reference)
    assert via_pd[-1]["usage"] == reference[-1]["usage"]
    assert via_pd[0]["prompt_token_ids"] == reference[0]["prompt_token_ids"]
    assert via_pd[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in via_pd}) == 1
    assert {c["object"] for c in via_pd} == {"chat.completion.chunk"}
    assert len({(c["created"], c["model"]) for c in via_pd}) == 1
    assert _chunk_shapes(via_pd) == _chunk_shapes([_openai_chunk(c) for c in reference])
    prompt_len = reference[-1]["usage"]["prompt_tokens"]
    handed_off = cluster.metric(decode, "vllm:fulcrum_kv_pulls_total") > 0  # our connector
    assert cluster.metric(decode, "vllm:request_prompt_tokens_sum") - prompt_sum == \
        prompt_len + (1 if handed_off else 0)


def _post(cluster: LiveCluster, route: str, payload: bytes | dict) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(cluster.url + route, content=content,
                      headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize(("route", "payload", "status"), [
    ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": -2}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "top_p": 7}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": -3}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "logprobs": "many"}, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": "hello"}, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME,
                              "messages": [{"role": "user", "content": "x"}],
                              "temperature": "hot"}, 400),
])
def test_bad_input_is_an_openai_error_not_a_500(cluster: LiveCluster, route: str,
                                                payload: bytes | dict, status: int) -> None:
    resp = _post(cluster, route, payload)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_a_400(cluster: LiveCluster, stream: bool) -> None:
    prompt = unique_prompt(MAX_MODEL_LEN + 50, 7)
    resp = _post(cluster, "/v1/completions", {"model": MODEL_NAME, "prompt": prompt,
                                              "max_tokens": 4, "stream": stream})
    assert resp.status_code == 400, resp.text
    assert "context" in resp.json()["error"]["message"].lower() or \
        "length" in resp.json()["error"]["message"].lower()


def test_client_disconnect_aborts_the_request_on_the_worker(cluster: LiveCluster) -> None:
    decode = cluster.by_role("decode")
    body = {"model": MODEL_NAME, "prompt": unique_prompt(30, 9), "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen >= 3:
                break
    deadline = time.monotonic() + 30
    while cluster.metric(decode, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the worker kept generating after the client left"
        time.sleep(0.2)
    gw = httpx.get(cluster.url + "/admin/workers").json()["workers"]
    assert all(w["in_flight_prefill"] == 0 and w["in_flight_decode"] == 0 for w in gw)


def test_kv_cache_returns_to_idle_after_many_requests(cluster: LiveCluster,
                                                      client: openai.OpenAI) -> None:
    import concurrent.futures as cf

    def one(i: int) -> int:
        out = client.completions.create(model=MODEL_NAME, prompt=unique_prompt(40, 500 + i),
                                        max_tokens=8, extra_body={"ignore_eos": True})
        return out.usage.completion_tokens

    with cf.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(16))) == [8] * 16
    deadline = time.monotonic() + 60
    usage: dict[str, float] = {}
    while time.monotonic() < deadline:
        usage = {n: cluster.metric(n, "vllm:kv_cache_usage_perc") for n in cluster.workers()}
        if all(u == 0 for u in usage.values()):
            break
        time.sleep(1)
    assert all(u == 0 for u in usage.values()), f"KV blocks still held: {usage}"


# Asked of a reference run: each step's top logprobs by token id, to tell a near tie.
_TOP_BY_ID = {"logprobs": TOP_K, "return_tokens_as_token_ids": True}


def _stream_ids(cluster: LiveCluster, prompt: str, request_id: str,
                migrate_after: int | None = None,
                **extra) -> tuple[list[int], str, dict, list[dict[int, float]]]:
    """(token ids, text, usage, top logprobs by id when asked) of a 300-token stream."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}, **extra}
    ids: list[int] = []
    top: list[dict[str, float]] = []
    text, usage = "", {}
    if migrate_after is not None:
        # Planned before the request starts: a quiet machine streams 300 tokens faster than
        # a client can ask for a move, so asking mid-stream would race the end of it.
        moved = httpx.post(cluster.url + "/admin/migrate", json={
            "request_id": request_id, "to": cluster.by_role("prefill"),
            "after_tokens": migrate_after, "planned": True})
        assert moved.status_code == 200, moved.text
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=120,
                      headers={"X-Request-Id": request_id}) as resp:
        assert resp.status_code == 200
        if migrate_after is not None:
            assert resp.headers["x-fulcrum-decode-worker"] == cluster.by_role("decode")
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                ids.extend(choice.get("token_ids") or [])
                text += choice["text"]
                top.extend((choice.get("logprobs") or {}).get("top_logprobs") or [])
            usage = chunk.get("usage") or usage
    return ids, text, usage, top_by_id(top)


def _migrations(cluster: LiveCluster, name: str = "fulcrum_stream_migrations_total") -> float:
    """A gateway counter: fulcrum_stream_migrations_total by default."""
    for line in httpx.get(cluster.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


_SOURCES = ("external_kv_transfer", "local_compute", "local_cache_hit")


def _prompt_sources(cluster: LiveCluster, worker: str) -> dict[str, float]:
    return {src: cluster.metric(worker, "vllm:prompt_tokens_by_source_total", source=src)
            for src in _SOURCES}


def test_migrated_stream_equals_an_unmigrated_run(cluster: LiveCluster) -> None:
    """At temperature 0 a moved stream follows an unmoved run's. With Fulcrum's
    connector the target pulls the source's KV and computes one token; with NIXL (no
    block server the gateway can address) it recomputes the context."""
    source, target = cluster.by_role("decode"), cluster.by_role("prefill")
    moves_kv = cluster.metric(source, "vllm:fulcrum_kv_endpoint_info") > 0
    prompt = unique_prompt(12, 21)
    before = _migrations(cluster)
    kv_before = _migrations(cluster, "fulcrum_stream_kv_migrations_total")
    reference = _stream_ids(cluster, prompt, f"ref-{time.time_ns()}", **_TOP_BY_ID)
    sources_before = _prompt_sources(cluster, target)
    pulls = cluster.metric(target, "vllm:fulcrum_kv_pulls_total")
    failed = cluster.metric(target, "vllm:fulcrum_kv_failed_transfers_total")
    migrated = _stream_ids(cluster, prompt, f"mig-{time.time_ns()}", migrate_after=20)
    assert len(reference[0]) == 300
    # the same greedy run, up to a near tie that the two workers' float noise can flip
    assert_follows_greedy_ids(migrated[0], reference[0], reference[3], CROSS_WORKER_TOLERANCE)
    if migrated[0] == reference[0]:
        assert migrated[1] == reference[1]
    assert migrated[2]["completion_tokens"] == 300
    assert migrated[2]["prompt_tokens"] == reference[2]["prompt_tokens"]
    assert _migrations(cluster) - before == 1
    assert _migrations(cluster, "fulcrum_stream_kv_migrations_total") - kv_before == \
        (1 if moves_kv else 0)
    # The target also ran this request's prefill leg (the prefill worker): its prompt
    # part may come from its prefix cache; what follows came over the wire or was computed.
    moved = {k: v - sources_before[k] for k, v in _prompt_sources(cluster, target).items()}
    if moves_kv:
        assert cluster.metric(target, "vllm:fulcrum_kv_pulls_total") == pulls + 1
        assert moved["external_kv_transfer"] >= 20  # at least the tokens made on the source
        # its own prefill leg's prompt and the continuation's last token: none of the
        # tokens generated on the source
        assert moved["local_compute"] <= migrated[2]["prompt_tokens"] + 1
        # the puller counts failed pulls (earlier tests' aborted legs may have some)
        assert cluster.metric(target, "vllm:fulcrum_kv_failed_transfers_total") == failed
    else:
        assert moved["external_kv_transfer"] == 0 and moved["local_compute"] >= 20
    # the source's held blocks went back once read (or at once, without a hold)
    deadline = time.monotonic() + 30
    while cluster.metric(source, "vllm:kv_cache_usage_perc") > 0 and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.metric(source, "vllm:kv_cache_usage_perc") == 0


def _chat_chunks(url: str, messages: list[dict], request_id: str, **extra) -> list[dict]:
    body = {"model": MODEL_NAME, "messages": messages, "max_completion_tokens": 200,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"X-Request-Id": request_id}) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    assert all("error" not in c for c in chunks), chunks
    return chunks


def _chat_text(chunks: list[dict]) -> str:
    return "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])


def _chat_ids(chunks: list[dict]) -> list[int]:
    return [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]


def _chat_top_by_id(chunks: list[dict]) -> list[dict[int, float]]:
    """Each step's top logprobs, asked with ``return_tokens_as_token_ids``."""
    return top_by_id([{e["token"]: e["logprob"] for e in step["top_logprobs"]}
                      for c in chunks for ch in c["choices"]
                      for step in (ch.get("logprobs") or {}).get("content") or []])


def _migrated_chat(cluster: LiveCluster, messages: list[dict], **extra) -> list[dict]:
    """A chat stream moved from the decode to the prefill worker after 20 tokens."""
    request_id = f"chatmig-{time.time_ns()}"
    moved = httpx.post(cluster.url + "/admin/migrate", json={
        "request_id": request_id, "to": cluster.by_role("prefill"), "after_tokens": 20,
        "planned": True})
    assert moved.status_code == 200, moved.text
    return _chat_chunks(cluster.url, messages, request_id, **extra)


def _chunk_shapes(chunks: list[dict]) -> set[tuple]:
    """Which keys each chunk, choice and delta carries, and which of them are null."""
    def shape(obj: dict) -> tuple:
        return tuple(sorted((k, v is None) for k, v in obj.items()))
    return {(shape(c), tuple(shape(ch) for ch in c["choices"]),
             tuple(shape(ch["delta"]) for ch in c["choices"]), shape(c.get("usage") or {}))
            for c in chunks}


def _openai_chunk(chunk: dict) -> dict:
    """A worker's chat chunk without the engine's timings and vLLM's null token-id keys."""
    out = {k: v for k, v in chunk.items()
           if k != "metrics" and not (k == "prompt_token_ids" and v is None)}
    out["choices"] = [{k: v for k, v in ch.items() if not (k == "token_ids" and v is None)}
                      for ch in chunk["choices"]]
    return out


def test_migrated_chat_stream_equals_an_unmigrated_run(cluster: LiveCluster) -> None:
    messages = [{"role": "user", "content": unique_prompt(12, 22)}]
    before = _migrations(cluster)
    decode_url = cluster.worker_url(cluster.by_role("decode"))
    direct = _chat_chunks(decode_url, messages, f"direct-{time.time_ns()}")
    reference = _chat_chunks(cluster.url, messages, f"chatref-{time.time_ns()}")
    migrated = _migrated_chat(cluster, messages)
    assert _migrations(cluster) - before == 1  # the reference did not move; this one did
    assert reference[-1]["usage"]["completion_tokens"] == 200
    assert migrated[-1]["usage"] == reference[-1]["usage"] == direct[-1]["usage"]
    # The tokens, asked for by id: the unmoved and the moved run through the gateway follow
    # one instance's greedy run, up to a near tie that float noise between workers can flip
    # (logprobs would keep a chat stream from moving, so only the instance is asked them).
    ties = _chat_chunks(decode_url, messages, f"ties-{time.time_ns()}",
                        return_token_ids=True, logprobs=True, top_logprobs=TOP_K,
                        return_tokens_as_token_ids=True)
    top = _chat_top_by_id(ties)
    for run in (_chat_chunks(cluster.url, messages, f"chatref-{time.time_ns()}",
                             return_token_ids=True),
                _migrated_chat(cluster, messages, return_token_ids=True)):
        assert_follows_greedy_ids(_chat_ids(run), _chat_ids(ties), top, CROSS_WORKER_TOLERANCE)
        if _chat_ids(run) == _chat_ids(ties):
            assert _chat_text(run) == _chat_text(ties)
    assert _migrations(cluster) - before == 2
    assert len({c["id"] for c in migrated}) == 1
    assert {c["object"] for c in migrated} == {"chat.completion.chunk"}
    assert len({(c["created"], c["model"]) for c in migrated}) == 1
    # The client cannot tell: same chunk shapes as vLLM's own (no token ids: not asked).
    # Two differences from a worker asked directly are on purpose: Fulcrum starts workers
    # with per-request metrics for its own use and hides them, and it drops the null token-id
    # keys vLLM adds that are not part of OpenAI's chunk.
    assert any("metrics" in c for c in direct)
    plain = [_openai_chunk(c) for c in direct]
    assert _chunk_shapes(migrated) == _chunk_shapes(reference) == _chunk_shapes(plain)


def test_bench_harness_run_against_the_gateway_writes_valid_json(cluster: LiveCluster,
                                                                 tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "benchmarks.bench", "--base-url", cluster.url,
                    "--model", MODEL_NAME, "--dataset", "random", "--input-len", "64",
                    "--output-len", "8", "--num-prompts", "8", "--request-rate", "4",
                    "--goodput", "ttft:30000", "tpot:10000", "--ignore-eos", "--length-oracle",
                    "--save-result",
                    "--result-dir", str(tmp_path), "--result-filename", "run.json",
                    "--no-progress"], check=True, timeout=300, capture_output=True)
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_output_tokens"] == 64
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "request_throughput",
                "request_goodput", "slo_attainment"):
        assert isinstance(result[key], int | float), key
    assert result["mean_ttft_ms"] > 0 and result["slo_attainment"] == 1.0


def test_metrics_on_real_workers_feed_every_dashboard_panel(cluster: LiveCluster,
                                                            request: pytest.FixtureRequest
                                                            ) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from deploy.observability import dashboard
    from tests.test_observability import metric_names, series_names

    decode = cluster.by_role("decode")
    body = {"model": MODEL_NAME, "prompt": unique_prompt(60, 31), "max_tokens": 6,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        list(r.iter_lines())
    gateway = httpx.get(cluster.url + "/metrics", timeout=10).text
    ttft = [s for f in text_string_to_metric_families(gateway) for s in f.samples
            if s.name == "fulcrum_time_to_first_token_seconds_count"
            and s.labels["mode"] == "pd" and s.labels["worker"] == decode]
    assert ttft and ttft[0].value >= 1 and ttft[0].labels["model"] == MODEL_NAME
    exported = series_names(gateway)
    for name in cluster.workers():
        exported |= series_names(httpx.get(cluster.worker_url(name) + "/metrics",
                                           timeout=10).text)
    used = {n for q in dashboard.queries(dashboard.build()) for n in metric_names(q)}
    vllm_used = {n for n in used if n.startswith("vllm:") and "fulcrum_kv" not in n}
    assert vllm_used and vllm_used <= exported  # vLLM's names, as real workers export them
    kv_used = {n for n in used if "fulcrum_kv" in n}
    if "fulcrum" in request.node.callspec.id:  # Fulcrum's connector is loaded
        assert kv_used <= exported
    # every gateway series but the controller's (this cluster runs without a controller)
    assert {n for n in used if n.startswith("fulcrum_") and "controller" not in n} <= exported


# --- faults: these kill workers; the manager must bring them back -----------------

def test_prefill_worker_killed_between_legs_decode_recomputes(cluster: LiveCluster) -> None:
    prefill, decode = cluster.by_role("prefill"), cluster.by_role("decode")
    prompt = unique_prompt(50, 11)
    reference = _greedy(cluster.worker_url(prefill), prompt)
    leg = httpx.post(cluster.worker_url(prefill) + "/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0,
        "kv_transfer_params": {"do_remote_decode": True}})
    params = leg.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] is True
    old_pid = cluster.kill_worker(prefill)
    started = time.monotonic()
    resp = httpx.post(cluster.worker_url(decode) + "/v1/completions", timeout=120, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
        "logprobs": TOP_K, "ignore_eos": True, "kv_transfer_params": params})
    took = time.monotonic() - started
    # kv_load_failure_policy=recompute: the decode worker computes the prompt itself.
    assert resp.status_code == 200, resp.text
    assert took < 60
    assert_same_greedy_run(resp.json(), reference, CROSS_WORKER_TOLERANCE)
    # And through the gateway, with the prefill pool dead, requests still complete.
    via_gateway = _greedy(cluster.url, prompt)
    assert_same_greedy_run(via_gateway, resp.json(), CROSS_WORKER_TOLERANCE)
    workers = cluster.wait_all_ready(timeout_s=400, restarted=prefill, old_pid=old_pid)
    assert workers[prefill]["pid"] != old_pid and workers[prefill]["restarts"] >= 1


def test_decode_worker_killed_mid_stream_client_gets_error_then_worker_returns(
        cluster: LiveCluster, client: openai.OpenAI) -> None:
    decode = cluster.by_role("decode")
    stream = client.completions.create(model=MODEL_NAME, prompt=unique_prompt(20, 12),
                                       max_tokens=MAX_MODEL_LEN - 100, stream=True,
                                       extra_body={"ignore_eos": True})
    received, finish, old_pid = 0, None, None
    started = time.monotonic()
    try:
        for chunk in stream:
            received += 1
            if received == 1:
                old_pid = cluster.kill_worker(decode)
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        # The worker may have finished generating before the kill landed (the gateway was
        # still relaying): then the client must have the whole, untruncated output.
        assert finish == "length"
    except openai.APIError as exc:
        assert "mid-stream" in str(exc)  # the gateway's error event, not a hang or a cut
    assert time.monotonic() - started < 60
    workers = cluster.wait_all_ready(timeout_s=400, restarted=decode, old_pid=old_pid)
    assert workers[decode]["restarts"] >= 1
    # The restarted cluster serves P/D again.
    out = client.completions.create(model=MODEL_NAME, prompt=unique_prompt(10, 13),
                                    max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4


def test_status_cli_shows_every_worker(cluster: LiveCluster) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--url", cluster.url,
                          "--json"], capture_output=True, text=True, timeout=60, check=True)
    workers = {w["name"]: w for w in json.loads(out.stdout)["workers"]}
    assert set(workers) == {"w0", "w1"}
    assert all(w["state"] == "ready" and w["pid"] for w in workers.values())
    table = subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--url", cluster.url],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "prefill" in table and "decode" in table and "KV cache %" in table


def test_sigterm_leaves_no_worker_process_behind(cluster: LiveCluster) -> None:
    import os

    groups = [w["pid"] for w in cluster.workers().values()]
    cluster.stop()
    assert cluster.proc.returncode is not None
    deadline = time.monotonic() + 30
    alive = groups
    while alive and time.monotonic() < deadline:
        alive = []
        for pgid in groups:
            try:
                os.killpg(pgid, 0)
                alive.append(pgid)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not alive, f"process groups still alive: {alive}"
