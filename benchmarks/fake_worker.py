"""A stand-in for a vLLM OpenAI server: instant or paced tokens, the P/D handshake,
and switchable faults. For unit tests and gateway load tests only; every serving
feature is also proven on real vLLM workers.

Run alone: `python -m benchmarks.fake_worker --port 9001 [--token-delay 0.01]`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from benchmarks.fake_worker_args import fake_worker_parser


@dataclass
class FakeBehaviour:
    """Knobs a test flips at run time through `app.state.behaviour`."""

    token_delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    fail_prefill_status: int | None = None
    fail_kv_load_status: int | None = None
    die_after_tokens: int | None = None
    max_model_len: int = 2048
    # token indices whose text is held back and sent with the next token (as a real
    # detokenizer does inside a multi-byte character)
    held_back_tokens: tuple[int, ...] = ()
    api_key: str | None = None  # like vLLM's --api-key: /v1/* needs "Bearer KEY"
    hang: bool = False  # every endpoint stops answering (a SIGSTOPped process)
    hang_before_done: bool = False  # a stream's worker hangs after its last event
    hang_before_usage: bool = False  # ... or after its last token, before the usage chunk
    # streams stop after this many tokens while /health still answers (a wedged engine)
    stall_after_tokens: int | None = None
    # decodes of remotely prefilled requests never start (their KV pull hangs)
    stall_remote_decodes: bool = False
    # where this fake says its KV block server listens (vllm:fulcrum_kv_endpoint_info)
    kv_endpoint: tuple[str, int] | None = None
    healthy: bool = True


@dataclass
class FakeStats:
    """What the fake saw, for assertions."""

    prefill_legs: int = 0
    remote_decodes: int = 0
    local_requests: int = 0
    aborted: int = 0
    running: int = 0
    request_ids: list[str] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"])
    else:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return max(1, len(text.split()))


def _timings(queue_s: float, prefill_s: float, itl_s: float) -> dict:
    """Per-request timings as vLLM reports them with --enable-per-request-metrics."""
    return {"queue_time_ms": queue_s * 1000, "time_to_first_token_ms": prefill_s * 1000,
            "mean_itl_ms": itl_s * 1000}


def create_fake_worker(name: str = "fake", model: str = "fake-model") -> FastAPI:
    """Build one fake worker app."""
    app = FastAPI()
    app.state.behaviour = FakeBehaviour()
    app.state.stats = FakeStats()

    async def hang_if_asked() -> None:
        while app.state.behaviour.hang:
            await asyncio.sleep(0.05)

    def chunk(kind: str, rid: str, i: int, text: str, finish: str | None) -> dict:
        if kind == "chat":
            delta = {"content": text} if i else {"role": "assistant", "content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model, "choices": [choice]}
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "text": text,
                                              "finish_reason": finish}]}

    async def generate(request: Request, kind: str) -> Response:
        b: FakeBehaviour = app.state.behaviour
        stats: FakeStats = app.state.stats
        await hang_if_asked()
        body = await request.json()
        rid = request.headers.get("x-request-id", uuid.uuid4().hex)
        stats.request_ids.append(rid)
        stats.bodies.append(body)
        stats.authorizations.append(request.headers.get("authorization"))
        if b.api_key and request.headers.get("authorization") != f"Bearer {b.api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        prompt_tokens = _prompt_tokens(body)
        asked = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        if prompt_tokens > b.max_model_len or (isinstance(asked, int) and
                                               prompt_tokens + asked > b.max_model_len):
            return JSONResponse({"error": {"message": "prompt too long", "type":
                                           "BadRequestError", "param": None, "code": 400}},
                                status_code=400)
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, int | float) or temperature < 0:
            return JSONResponse({"error": {"message": "temperature must be >= 0", "type":
                                           "BadRequestError", "param": "temperature",
                                           "code": 400}}, status_code=400)
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):
            stats.prefill_legs += 1
            if b.fail_prefill_status:
                return JSONResponse({"error": {"message": "injected"}},
                                    status_code=b.fail_prefill_status)
            await asyncio.sleep(b.prefill_delay_s)
            reply = {"id": rid, "object": "text_completion", "model": model,
                     "metrics": _timings(0.0, b.prefill_delay_s, 0.0),
                     "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                               "total_tokens": prompt_tokens + 1},
                     "kv_transfer_params": {"do_remote_prefill": True,
                                            "remote_engine_id": name,
                                            "remote_request_id": rid,
                                            "remote_block_ids": [[0, 1]]}}
            return JSONResponse(reply)
        if kv.get("do_remote_prefill"):
            stats.remote_decodes += 1
            if b.fail_kv_load_status:
                return JSONResponse({"error": {"message": "KV load failed (injected)"}},
                                    status_code=b.fail_kv_load_status)
        else:
            stats.local_requests += 1
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        prompt = body.get("prompt")
        # token ids >= 1000 in a prompt are our own earlier output: continue after them
        first = sum(1 for t in prompt if isinstance(t, int) and t >= 1000) \
            if isinstance(prompt, list) else 0
        want_ids = bool(body.get("return_token_ids"))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                 "total_tokens": prompt_tokens + n}
        if not body.get("stream"):
            await asyncio.sleep(b.token_delay_s * n)
            text = "".join(f" t{i}" for i in range(n))
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": "length"}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length"}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "model": model,
                                 "choices": [choice], "usage": usage,
                                 "kv_transfer_params": None,
                                 "metrics": _timings(0.0, 0.0, b.token_delay_s)})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            stats.running += 1
            held = ""
            try:
                for i in range(first, first + n):
                    if b.die_after_tokens is not None and i >= b.die_after_tokens:
                        raise ConnectionResetError("injected worker death")
                    await asyncio.sleep(b.token_delay_s)
                    await hang_if_asked()  # a stopped process sends nothing more
                    while (b.stall_after_tokens is not None and i >= b.stall_after_tokens) \
                            or (b.stall_remote_decodes and kv.get("do_remote_prefill")):
                        await asyncio.sleep(0.02)
                    finish = "length" if i == first + n - 1 else None
                    text, held = held + f" t{i}", ""
                    if i in b.held_back_tokens and finish is None:
                        text, held = "", text
                    event = chunk(kind, rid, i, text, finish)
                    if want_ids:
                        event["choices"][0]["token_ids"] = [1000 + i]
                        if i == first:  # vLLM: top level for chat, in the choice otherwise
                            where = event if kind == "chat" else event["choices"][0]
                            where["prompt_token_ids"] = list(range(prompt_tokens))
                    yield f"data: {json.dumps(event)}\n\n".encode()
                if b.hang_before_usage:
                    b.hang = True
                    await hang_if_asked()
                if include_usage:
                    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                    last = {"id": rid, "object": obj, "model": model, "choices": [],
                            "usage": usage, "metrics": _timings(0.0, 0.0, b.token_delay_s)}
                    yield f"data: {json.dumps(last)}\n\n".encode()
                if b.hang_before_done:  # a process stopped between its last event and [DONE]
                    b.hang = True
                await hang_if_asked()
                yield b"data: [DONE]\n\n"
            except asyncio.CancelledError:
                stats.aborted += 1
                raise
            finally:
                stats.running -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "text")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model"}]}

    @app.get("/health")
    async def health() -> Response:
        await hang_if_asked()
        return Response(status_code=200 if app.state.behaviour.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        s: FakeStats = app.state.stats
        text = (f'vllm:num_requests_running{{engine="0",model_name="{model}"}} {s.running}\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="{model}"}} 0\n'
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} '
                f'{min(1.0, s.running / 100)}\n')
        kv = app.state.behaviour.kv_endpoint
        if kv is not None:
            text += (f'vllm:fulcrum_kv_endpoint_info{{engine="0",host="{kv[0]}",'
                     f'port="{kv[1]}"}} 1.0\n')
        return Response(text, media_type="text/plain")

    return app


def main() -> None:
    import uvicorn

    parser = fake_worker_parser("Run a fake vLLM worker for load tests.")
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    app = create_fake_worker(args.name, args.model)
    app.state.behaviour.token_delay_s = args.token_delay
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
