"""The worker's end of the request links (cascade/tokenlink.py): on the worker's event loop, one
connection per gateway, on which the gateway writes batches and this worker answers each at once.

The first `GenerateBatch` a gateway sends by NATS names its token listener; `learn` (called by
`on_generate`, on the loop) then opens a request link to it: the gateway's Unix socket when this
worker is in its network namespace, else its TCP address, the same hello and key as a token link
but "CREQ". Once the gateway has acked it, its batches come on the link: `data_received` decodes
each REQUEST frame, calls the same handler as the NATS subject (`on_generate`, which must not
await or block) in that turn, and writes the REPLY. Only this loop reads or writes the connection.
A link that fails or closes is opened again at the gateway's next batch after a back-off
(`RETRY_S`, doubling to `RETRY_MAX_S`); until then batches come by NATS, which the gateway falls
back to by itself.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from cascade.advertise import split_host_port
from cascade.messages import BatchReply, GenerateBatch, decode, encode
from cascade.natsutil import failure_reply
from cascade.tokenlink import (
    ACK_OK,
    KIND_REPLY,
    KIND_REQUEST,
    FrameReader,
    TokenLinkError,
    hello,
    id_frame,
    local_socket_address,
    split_id,
)

CONNECT_TIMEOUT_S = 2.0
RETRY_S = 1.0
RETRY_MAX_S = 30.0

_Entry = tuple[str, str, str]  # (address, key, local socket name) as the gateway advertised them


class _Link(asyncio.Protocol):
    def __init__(self, owner: RequestLinks, gateway_id: str, entry: _Entry) -> None:
        self.owner = owner
        self.gateway_id = gateway_id
        self.entry = entry
        self.transport: asyncio.Transport | None = None
        self.acked = False
        self.ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Failed after its connect was given up on: nobody awaits it then.
        self.ack.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.reader = FrameReader(hello=False, kinds=frozenset({KIND_REQUEST}))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(hello(self.entry[1], self.owner.worker_id, requests=True))

    def data_received(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if not self.acked:
            if data[:1] != ACK_OK:
                if not self.ack.done():
                    why = f"the gateway refused the request link ({data[:1]!r})"
                    self.ack.set_exception(ConnectionRefusedError(why))
                t.close()
                return
            self.acked = True
            if not self.ack.done():
                self.ack.set_result(None)
            data = data[1:]
            if not data:
                return
        try:
            payloads = self.reader.feed(data)
            for p in payloads:
                ident, message = split_id(p)
                t.write(id_frame(KIND_REPLY, ident, self.owner.answer(message)))
        except TokenLinkError as e:
            self.owner.log.warning("request_link_bad_frame", gateway_id=self.gateway_id, error=str(e))
            t.abort()
            return
        if self.reader.error is not None:
            self.owner.log.warning("request_link_bad_frame", gateway_id=self.gateway_id, error=self.reader.error)
            t.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ack.done():
            self.ack.set_exception(ConnectionError(f"the request link closed before its ack: {exc!r}"))
        self.transport = None
        self.owner._lost(self)


class RequestLinks:
    """One worker instance's request links, by gateway id. Everything runs on the worker's loop."""

    def __init__(
        self,
        worker_id: str,
        handle: Callable[[GenerateBatch], BatchReply],
        logger: Any = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.worker_id = worker_id
        self._handle = handle
        self.log = logger or structlog.get_logger()
        self._connect_timeout_s = connect_timeout_s
        self._links: dict[str, _Link] = {}  # acked and open
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._retry: dict[str, tuple[float, float, _Entry]] = {}  # gateway → (next try, back-off, entry)
        self._closed = False
        self.connects = 0
        self.local_connects = 0
        self.failures = 0
        self.requests = 0  # batches answered on a link

    def linked(self, gateway_id: str) -> bool:
        return gateway_id in self._links

    def summary(self) -> dict[str, Any]:
        return {
            "linked": sorted(self._links),
            "requests": self.requests,
            "connects": self.connects,
            "local_connects": self.local_connects,
            "failures": self.failures,
        }

    def learn(self, gateway_id: str, addr: str, key: str, local: str = "") -> None:
        """A batch came from `gateway_id` advertising its listener (empty `addr`: none): open a
        request link to it unless one is open, opening, or backing off for that address."""
        if self._closed or not addr:
            return
        entry = (addr, key, local)
        held = self._links.get(gateway_id)
        if held is not None:
            if held.entry == entry:
                return
            # The gateway restarted on another address: this link is stale.
            if held.transport is not None:
                held.transport.close()
            self._links.pop(gateway_id, None)
        if gateway_id in self._connecting:
            return
        retry = self._retry.get(gateway_id)
        if retry is not None and retry[2] == entry and time.monotonic() < retry[0]:
            return
        self._connecting[gateway_id] = asyncio.get_running_loop().create_task(
            self._connect(gateway_id, entry), name=f"request-link-{gateway_id}"
        )

    def answer(self, message: bytes) -> bytes:
        """The reply to one REQUEST frame's message, as the NATS subject's handler answers."""
        self.requests += 1
        try:
            batch = decode(message, GenerateBatch)
            return encode(self._handle(batch))
        except Exception as e:
            return encode(failure_reply(e, "request link", self.log))

    async def _connect(self, gateway_id: str, entry: _Entry) -> None:
        addr, _, local = entry
        loop = asyncio.get_running_loop()
        link = _Link(self, gateway_id, entry)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                path = local_socket_address(local)
                via_local = False
                if path is not None:
                    try:
                        await loop.create_unix_connection(lambda: link, path)
                        via_local = True
                    except OSError:
                        link = _Link(self, gateway_id, entry)  # another namespace or host: TCP
                if not via_local:
                    host, port = split_host_port(addr)
                    await loop.create_connection(lambda: link, host, port)
                await link.ack
        except (OSError, ValueError, TimeoutError) as e:
            self._connecting.pop(gateway_id, None)
            if link.transport is not None:
                link.transport.abort()
            self._failed(gateway_id, entry, repr(e))
            return
        except asyncio.CancelledError:
            self._connecting.pop(gateway_id, None)
            if link.transport is not None:
                link.transport.abort()
            raise
        self._connecting.pop(gateway_id, None)
        if self._closed:
            if link.transport is not None:
                link.transport.close()
            return
        self._links[gateway_id] = link
        self._retry.pop(gateway_id, None)
        self.connects += 1
        self.local_connects += via_local
        self.log.info("request_link_up", gateway_id=gateway_id, addr=local if via_local else addr)

    def _failed(self, gateway_id: str, entry: _Entry, why: str) -> None:
        self.failures += 1
        _, backoff, _ = self._retry.get(gateway_id, (0.0, RETRY_S / 2, entry))
        backoff = min(backoff * 2, RETRY_MAX_S)
        self._retry[gateway_id] = (time.monotonic() + backoff, backoff, entry)
        self.log.warning("request_link_failed", gateway_id=gateway_id, error=why, retry_s=backoff)

    def _lost(self, link: _Link) -> None:
        if self._links.get(link.gateway_id) is link:
            del self._links[link.gateway_id]
            if not self._closed:
                # The gateway's next batch comes by NATS and opens it again, after a back-off.
                self._failed(link.gateway_id, link.entry, "the request link closed")

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._connecting.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # ending them is all we want
                pass
        for link in list(self._links.values()):
            if link.transport is not None:
                link.transport.close()
        self._links.clear()
