"""The overhead pairs' minimal HTTP client reads a streamed completion as aiohttp's client does:
against a real aiohttp server answering the way the gateway does (chunked SSE, the end in one
write), on one kept-alive connection, and an error status as an error."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp import web

from bench.rawhttp import RawClient, RawHttpError


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("model") != "m":
        return web.json_response({"error": {"message": "no such model"}}, status=404)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    n = body["max_tokens"]
    for i in range(n - 1):
        await resp.write(_sse({"choices": [{"text": f"t{i}"}]}))
    # The last token, its finish, the usage and [DONE] in one write, split mid-event on purpose.
    end = (
        _sse({"choices": [{"text": "last"}]})
        + _sse({"choices": [{"text": "", "finish_reason": "length"}]})
        + _sse({"choices": [], "usage": {"completion_tokens": n}})
        + b"data: [DONE]\n\n"
    )
    await resp.write(end[:7])
    await resp.write_eof(end[7:])
    return resp


@asynccontextmanager
async def _serving(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """A real aiohttp server on a free port answering POST /v1/completions with `handler`."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async with _serving(_completions) as url:
        yield url


async def test_streams_are_read_to_their_end_on_one_connection(server: str) -> None:
    c = RawClient(server)
    try:
        first = await c.stream("/completions", {"model": "m", "max_tokens": 5})
        writer = c._writer
        second = await c.stream("/completions", {"model": "m", "max_tokens": 3})
        assert c._writer is writer  # kept alive
    finally:
        await c.close()
    for got, n in ((first, 5), (second, 3)):
        assert got["ok"] and got["status"] == 200 and got["chunks"] == n and got["tokens"] == n
        assert 0 < got["ttft"] <= got["latency"]


async def test_an_error_status_is_an_error_and_the_next_request_still_works(server: str) -> None:
    c = RawClient(server)
    try:
        bad = await c.stream("/completions", {"model": "other", "max_tokens": 2})
        assert not bad["ok"] and bad["status"] == 404 and "no such model" in bad["error"]
        assert (await c.stream("/completions", {"model": "m", "max_tokens": 2}))["ok"]
    finally:
        await c.close()


async def test_an_unchunked_answer_is_refused_with_a_clear_error() -> None:
    async def plain(_: web.Request) -> web.Response:
        return web.Response(text="data: {}\n\n")

    async with _serving(plain) as url:
        c = RawClient(url)
        try:
            with pytest.raises(RawHttpError, match="not chunked"):
                await c.stream("/completions", {})
            assert c._writer is None  # dropped: its state is unknown
        finally:
            await c.close()


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        RawClient("https://example.com/v1")
