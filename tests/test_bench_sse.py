"""The benchmarks' one SSE reader (bench.common.sse_events): events split anywhere across the
network's chunks come out whole, in order, with [DONE] as None and comments skipped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp

from bench.common import sse_events


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c


class _Resp:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)


def _read(chunks: list[bytes]) -> list[dict[str, Any] | None]:
    async def go() -> list[dict[str, Any] | None]:
        return [e async for e in sse_events(cast(aiohttp.ClientResponse, _Resp(chunks)))]

    return asyncio.run(go())


def test_events_split_across_chunks_come_out_whole_and_in_order() -> None:
    body = b': keep-alive\n\ndata: {"a": 1}\n\ndata: {"b": "x\\n"}\n\ndata: [DONE]\n\n'
    whole = _read([body])
    assert whole == [{"a": 1}, {"b": "x\n"}, None]
    for cut in range(1, len(body)):
        assert _read([body[:cut], body[cut:]]) == whole
    assert _read([bytes([b]) for b in body]) == whole


def test_an_unfinished_last_event_is_not_yielded() -> None:
    assert _read([b'data: {"a": 1}\n\ndata: {"b"']) == [{"a": 1}]
