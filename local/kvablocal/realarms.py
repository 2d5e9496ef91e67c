"""Streamed completions served by the stacks vLLM deployments really run, for timing the gateway:
`starlette` (vLLM's OpenAI server: Starlette's StreamingResponse on uvicorn) and `quart` (the P/D
example proxy of the runbook's setup: Quart on Hypercorn). Each waits `--delay-ms` before its first
event (prefill and KV transfer), then streams `--tokens` content events, a usage event and [DONE].

    python -m kvablocal.realarms --server starlette --port 18201 --delay-ms 300
"""

import argparse
import asyncio
import json
import time

EVENT_GAP = 0.002


def events(delay: float, tokens: int, server: str):
    """The SSE body as an async generator: nothing is yielded before the delay."""
    async def body():
        await asyncio.sleep(delay)
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


def starlette_app(delay: float, tokens: int):
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        await request.body()
        return StreamingResponse(events(delay, tokens, "starlette"), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def quart_app(delay: float, tokens: int):
    from quart import Quart

    app = Quart("kvab-realarm")

    @app.post("/v1/chat/completions")
    async def completions():
        return events(delay, tokens, "quart"), 200, {"content-type": "text/event-stream"}

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
