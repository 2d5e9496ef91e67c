"""Streamed completions served by the stacks vLLM deployments really run, for timing the gateway:
`starlette` (vLLM's OpenAI server: Starlette's StreamingResponse on uvicorn) and `quart` (the P/D
example proxy of the runbook's setup: Quart on Hypercorn). Each waits `--delay-ms` before its first
event (prefill and KV transfer), then streams `--tokens` content events, a usage event and [DONE].
Without `"stream": true` it answers one JSON completion after the same wait; `GET /health` answers
an empty 200 at once, as vLLM's does; a request carrying `x-realarm-break: after-headers` gets the
stream's headers, then the connection is dropped before any event.

    python -m kvablocal.realarms --server starlette --port 18201 --delay-ms 300
"""

import argparse
import asyncio
import json
import time

EVENT_GAP = 0.002


BREAK_HEADER = "x-realarm-break"


class BrokenStream(Exception):
    """Raised inside a started stream: the server drops the connection without ending the body."""


def events(delay: float, tokens: int, server: str, broken: bool = False):
    """The SSE body as an async generator: nothing is yielded before the delay."""
    async def body():
        await asyncio.sleep(delay)
        if broken:
            raise BrokenStream(server)
        for i in range(tokens):
            if i:
                await asyncio.sleep(EVENT_GAP)
            chunk = {"id": f"chatcmpl-{server}", "object": "chat.completion.chunk", "created": int(time.time()),
                     "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        yield f"data: {json.dumps({'id': f'chatcmpl-{server}', 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return body()


def completion(server: str, tokens: int) -> dict:
    return {"id": f"cmpl-{server}", "object": "chat.completion", "created": int(time.time()),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * tokens},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}}


def starlette_app(delay: float, tokens: int):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        asked = json.loads(await request.body() or b"{}")
        if not asked.get("stream"):
            await asyncio.sleep(delay)
            return JSONResponse(completion("starlette", tokens))
        broken = request.headers.get(BREAK_HEADER) == "after-headers"
        return StreamingResponse(events(delay, tokens, "starlette", broken), media_type="text/event-stream")

    async def health(request):
        return Response(status_code=200)

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def quart_app(delay: float, tokens: int):
    from quart import Quart, request

    app = Quart("kvab-realarm")

    @app.post("/v1/chat/completions")
    async def completions():
        asked = json.loads(await request.get_data() or b"{}")
        if not asked.get("stream"):
            await asyncio.sleep(delay)
            return completion("quart", tokens)
        broken = request.headers.get(BREAK_HEADER) == "after-headers"
        return events(delay, tokens, "quart", broken), 200, {"content-type": "text/event-stream"}

    @app.get("/health")
    async def health():
        return "", 200

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", choices=("starlette", "quart"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=300.0)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    if args.server == "starlette":
        import uvicorn

        uvicorn.run(starlette_app(delay, args.tokens), host="127.0.0.1", port=args.port, log_level="warning")
    else:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{args.port}"]
        config.loglevel = "WARNING"
        asyncio.run(serve(quart_app(delay, args.tokens), config))


if __name__ == "__main__":
    main()
