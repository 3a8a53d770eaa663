"""The live harness against a tiny in-test streaming server (not vLLM)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.arrivals import TraceEntry
from benchmarks.bench import Endpoint, main, run_trace
from benchmarks.dataset import BenchRequest
from benchmarks.sweep import sweep_rates

TOKEN_GAP_S = 0.002


def _fake_app(bodies: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "fake-model"}]}

    async def stream(body: dict, chat: bool):
        n = body.get("max_tokens") or body.get("max_completion_tokens")
        for i in range(n):
            await asyncio.sleep(TOKEN_GAP_S)
            choice = {"delta": {"content": f"t{i}"}} if chat else {"text": f"t{i}"}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {"prompt_tokens": 7, "completion_tokens": n}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        body = await request.json()
        bodies.append({**body, "_headers": dict(request.headers)})
        text = body.get("prompt") or body["messages"][0]["content"]
        if "FAIL" in text:
            return JSONResponse({"error": "nope"}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server():
    bodies: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_fake_app(bodies), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", bodies
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


def test_run_trace_records_streams_and_failures(fake_server):
    url, bodies = fake_server
    trace = [TraceEntry(0.0, BenchRequest("hello there", 2, 5)),
             TraceEntry(0.05, BenchRequest("please FAIL", 2, 3)),
             TraceEntry(0.1, BenchRequest("again", 1, 4))]
    timelines, duration = asyncio.run(
        run_trace(trace, Endpoint(url, "fake-model", length_oracle=True), progress=False))
    ok = [t for t in timelines if t.success]
    assert [t.output_tokens for t in ok] == [5, 4]
    assert [len(t.chunk_times_s) for t in ok] == [5, 4]
    assert timelines[1].success is False and "HTTP 500" in timelines[1].error
    assert all(t.prompt_tokens == 7 for t in ok)  # usage overrides the estimate
    # scheduled at their arrival offsets, and none sent before its time (a loaded host may
    # send late, never early)
    assert timelines[2].scheduled_s - timelines[0].scheduled_s == pytest.approx(0.1)
    assert all(t.start_s >= t.scheduled_s for t in timelines)
    assert duration >= 0.1
    sent = bodies[-1]
    assert "ignore_eos" not in sent and sent["stream"] is True  # vLLM's default: off
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 4


def test_chat_endpoint(fake_server):
    url, bodies = fake_server
    trace = [TraceEntry(0.0, BenchRequest("hi", 1, 3))]
    timelines, _ = asyncio.run(
        run_trace(trace, Endpoint(url, "fake-model", chat=True, length_oracle=True),
                  progress=False))
    assert timelines[0].success and timelines[0].output_tokens == 3
    assert bodies[-1]["max_completion_tokens"] == 3 and "messages" in bodies[-1]


def test_cli_writes_vllm_compatible_json_and_plots(fake_server, tmp_path):
    url, _ = fake_server
    rc = main(["--base-url", url, "--dataset", "random", "--num-prompts", "6",
               "--input-len", "16", "--output-len", "5", "--request-rate", "50",
               "--goodput", "ttft:5000", "tpot:1000", "--save-result", "--save-detailed",
               "--plot", "--result-dir", str(tmp_path), "--result-filename", "run.json",
               "--no-progress", "--length-oracle"])
    assert rc == 0
    result = json.loads((tmp_path / "run.json").read_text())
    for key in ("date", "backend", "model_id", "num_prompts", "request_rate", "burstiness",
                "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
                "p99_ttft_ms", "p90_tpot_ms", "mean_itl_ms", "p99_e2el_ms", "latencies",
                "ttfts", "itls", "input_lens", "output_lens", "slo_attainment"):
        assert key in result, key
    assert result["model_id"] == "fake-model"
    assert result["completed"] == 6 and result["total_output_tokens"] == 30
    assert result["slo_attainment"] == 1.0
    assert [len(itl) for itl in result["itls"]] == [4] * 6  # 5 chunks -> 4 gaps each
    assert (tmp_path / "run.cdf.png").stat().st_size > 1000


def test_sweep_finds_the_last_passing_rate():
    calls: list[float] = []

    def evaluate(rate: float) -> dict:
        calls.append(rate)
        return {"slo_attainment": 1.0 if rate <= 5.5 else 0.5}

    res = sweep_rates(evaluate, [1, 2, 4, 8, 16], target=0.9, refine_steps=3)
    assert 16 not in calls  # stops after the first failure
    assert 5.0 <= res.max_rate <= 5.5
    assert sweep_rates(lambda r: {"slo_attainment": 0.0}, [1, 2]).max_rate is None


def test_profile_writes_points_that_fit(fake_server, tmp_path):
    from benchmarks.profiler import main as profile_main
    from benchmarks.sim.perf import FittedModel

    url, _ = fake_server
    out = tmp_path / "profile.json"
    assert profile_main(["--base-url", url, "--prompt-lengths", "8,16,32", "--repeats", "1",
                         "--batch-sizes", "1,2", "--decode-output-tokens", "6",
                         "--kv-capacity-tokens", "5000", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["prefill"]) == 3 and len(data["decode"]) == 2
    assert [n for n, _, _ in data["decode"]] == [1, 2]
    assert all(step >= 0 for _, _, step in data["decode"])
    model = FittedModel.load(out)
    assert model.kv_capacity_tokens == 5000
    assert model.iteration_time(0, 0.0, 1, 100) > 0
