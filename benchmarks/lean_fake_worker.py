"""A lean, fast stand-in for a vLLM OpenAI server, for gateway throughput benchmarks.

aiohttp on uvloop, events pre-encoded: one process relays thousands of requests a
second, so a gateway in front of it is what limits a benchmark, not the worker. It
speaks the P/D protocol the gateways use: a prefill leg (`kv_transfer_params.
do_remote_decode`) answers one token plus `kv_transfer_params`; a decode leg streams
`max_tokens` (default 16) chunks, with a usage event when asked, then `[DONE]`.
For fault injection and assertions use `benchmarks.fake_worker` instead.

    python -m benchmarks.lean_fake_worker --port 9001 --name P
"""

from __future__ import annotations

import asyncio
import time

import orjson
import uvloop
from aiohttp import web

from benchmarks.fake_worker_args import fake_worker_parser

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _prompt_tokens(body: dict) -> int:
    if "messages" in body:
        text = " ".join(str(m.get("content", "")) for m in body["messages"])
    else:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return max(1, len(text.split()))


class LeanWorker:
    """Request handlers and counters of one fake worker."""

    def __init__(self, name: str, model: str) -> None:
        self.name = name
        self.model = model
        self.requests = 0
        self.prefill_legs = 0
        self.remote_decodes = 0
        self.running = 0

    def _event(self, chat: bool, rid: str, i: int, finish: str | None) -> bytes:
        if chat:
            delta = {"content": f" t{i}"} if i else {"role": "assistant", "content": " t0"}
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": 0,
                     "model": self.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        else:
            chunk = {"id": rid, "object": "text_completion", "created": 0, "model": self.model,
                     "choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        chat = request.path.endswith("/chat/completions")
        body = orjson.loads(await request.read())
        rid = request.headers.get("x-request-id") or f"cmpl-{self.requests}"
        prompt_tokens = _prompt_tokens(body)
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):
            self.prefill_legs += 1
            reply = {"id": rid, "object": "text_completion", "created": int(time.time()),
                     "model": self.model,
                     "choices": [{"index": 0, "text": " t0", "finish_reason": "length"}],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                               "total_tokens": prompt_tokens + 1},
                     "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                            "remote_engine_id": self.name,
                                            "remote_request_id": rid,
                                            "remote_block_ids": [[0, 1]],
                                            "remote_host": "127.0.0.1", "remote_port": 1}}
            return web.Response(body=orjson.dumps(reply), content_type="application/json")
        if kv.get("do_remote_prefill"):
            self.remote_decodes += 1
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                 "total_tokens": prompt_tokens + n}
        if not body.get("stream"):
            text = "".join(f" t{i}" for i in range(n))
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": "length"}
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length"}
            reply = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                     "created": 0, "model": self.model, "choices": [choice], "usage": usage,
                     "kv_transfer_params": None}
            return web.Response(body=orjson.dumps(reply), content_type="application/json")
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        self.running += 1
        try:
            for i in range(n):
                await response.write(self._event(chat, rid, i, "length" if i == n - 1 else None))
            if (body.get("stream_options") or {}).get("include_usage"):
                last = {"id": rid, "object": "chat.completion.chunk" if chat
                        else "text_completion", "created": 0, "model": self.model,
                        "choices": [], "usage": usage}
                await response.write(b"data: " + orjson.dumps(last) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        finally:
            self.running -= 1
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        labels = f'engine="0",model_name="{self.model}"'
        text = (f"vllm:num_requests_running{{{labels}}} {self.running}\n"
                f"vllm:num_requests_waiting{{{labels}}} 0\n"
                f"vllm:kv_cache_usage_perc{{{labels}}} {min(1.0, self.running / 100)}\n")
        return web.Response(text=text, content_type="text/plain")

    async def other(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "path": request.path})


def make_app(name: str = "fake", model: str = "fake-model") -> web.Application:
    worker = LeanWorker(name, model)
    app = web.Application()
    app.router.add_post("/v1/completions", worker.generate)
    app.router.add_post("/v1/chat/completions", worker.generate)
    app.router.add_get("/health", worker.health)
    app.router.add_get("/v1/models", worker.models)
    app.router.add_get("/metrics", worker.metrics)
    app.router.add_route("*", "/{tail:.*}", worker.other)
    return app


def main() -> None:
    parser = fake_worker_parser("Run a lean fake vLLM worker.")
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(args.name, args.model), host="127.0.0.1", port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
