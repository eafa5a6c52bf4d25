"""The SSE response sends its status line and headers with its first chunk: one socket write, so
one wake-up of the client for the first token instead of two."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import EventStream


def _counting(transport: Any, writes: list[bytes]) -> None:
    write, writelines = transport.write, transport.writelines

    def counted_write(data: Any) -> None:
        writes.append(bytes(data))
        write(data)

    def counted_writelines(parts: Any) -> None:
        parts = [bytes(p) for p in parts]
        writes.append(b"".join(parts))
        writelines(parts)

    transport.write, transport.writelines = counted_write, counted_writelines


async def _serve_and_read(response_class: type[web.StreamResponse]) -> list[bytes]:
    writes: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        _counting(request.transport, writes)
        resp = response_class(status=200, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"first": true}\n\n')
        await resp.write_eof(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/v1/completions", json={})
        body = await r.read()
    assert b'data: {"first": true}' in body and body.endswith(b"data: [DONE]\n\n")
    return writes


@pytest.mark.skipif(
    not hasattr(web.StreamResponse, "_send_headers_immediately"),
    reason="this aiohttp sends a stream's headers on their own whatever the class says (one wake-up more, no harm)",
)
def test_headers_leave_with_the_first_chunk() -> None:
    writes = asyncio.run(_serve_and_read(EventStream))
    first = writes[0]
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"text/event-stream" in first and b'data: {"first": true}' in first
    # The end of the stream is one more write: two in all.
    assert len(writes) == 2, writes


def test_a_plain_stream_response_would_send_them_apart() -> None:
    # What EventStream changes: without it the headers are a write of their own, so the test above
    # can fail.
    writes = asyncio.run(_serve_and_read(web.StreamResponse))
    if b"data:" in writes[0]:
        pytest.skip("this aiohttp sends a stream's headers with its first chunk by itself: EventStream can go")
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(writes) == 3, writes
