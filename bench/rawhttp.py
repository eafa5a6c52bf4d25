"""A minimal HTTP/1.1 client for streamed completions: one kept-alive connection, the request's
bytes written in one `write`, the chunked SSE answer parsed as it arrives.

Why beside aiohttp's client: `bench serve`'s overhead pairs compare a request through the mesh
with the engine called in-process, and whatever the client spends building the request and reading
the stream lands in the mesh's column. aiohttp's client spends about half a millisecond a request
of its own on this 2-core VM (its request object, connector, stream reader), which every client of
any server pays and which is not the mesh's. This one does only what a client must: write the
bytes, read the status and headers, undo the chunked framing and split the SSE events, parsing each
event's JSON as `bench.common.sse_events` does. It speaks only what the gateway answers a streamed
request with (HTTP/1.1, `Transfer-Encoding: chunked`) and raises `RawHttpError` on anything else.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import orjson


class RawHttpError(RuntimeError):
    """An answer this client does not read (not chunked, a broken chunk), or a closed connection."""


class RawClient:
    """One connection to the gateway of `url` (`http://host:port/v1`), opened on first use."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme != "http" or u.hostname is None or u.port is None:
            raise ValueError(f"RawClient takes http://host:port/..., not {url!r}")
        self.host, self.port, self.base = u.hostname, u.port, u.path.rstrip("/")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        w, self._writer, self._reader = self._writer, None, None
        if w is not None:
            w.close()
            try:
                await w.wait_closed()
            except OSError:
                pass

    async def stream(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `path` (under the URL's base) and read the SSE stream to its end:
        {"ok", "status", "ttft", "latency", "chunks", "tokens"} like `bench.serve.one_request`
        (times in seconds from just before the write; `ttft` at the first event with text)."""
        payload = orjson.dumps(body)
        head = (
            f"POST {self.base}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        t0 = time.perf_counter()
        writer.write(head + payload)
        try:
            return await self._answer(reader, t0)
        except BaseException:
            await self.close()  # the connection's state is unknown: a fresh one next time
            raise

    async def _answer(self, reader: asyncio.StreamReader, t0: float) -> dict[str, Any]:
        try:
            raw_head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise RawHttpError("the connection closed before the answer's headers") from None
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if status != 200:
            n = int(headers.get("content-length", "0"))
            text = (await reader.readexactly(n)).decode(errors="replace") if n else ""
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return {"ok": False, "status": status, "error": text[:200]}
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise RawHttpError(f"a streamed answer that is not chunked: {headers}")
        first = 0.0
        chunks = tokens = 0
        buf = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise RawHttpError(f"a bad chunk size line {size_line[:40]!r}") from None
            data = await reader.readexactly(size + 2)
            if data[-2:] != b"\r\n":
                raise RawHttpError("a chunk not ended by CRLF")
            if size == 0:
                break
            buf += data[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                obj = orjson.loads(event[6:])
                choices = obj.get("choices")
                if choices and choices[0].get("text"):
                    chunks += 1
                    if not first:
                        first = time.perf_counter()
                usage = obj.get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
        end = time.perf_counter()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return {
            "ok": True,
            "status": status,
            "ttft": (first - t0) if first else float("nan"),
            "latency": end - t0,
            "chunks": chunks,
            "tokens": tokens,
        }
