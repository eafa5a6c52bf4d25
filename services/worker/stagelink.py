"""The stage link: direct TCP between workers for pipelined routes.

Activations (hidden states after a stage's layers) and sampled tokens travel
here, never through the broker: a prefill's hidden states are T x hidden
floats, too large for NATS messages on real models, and per-step decode
frames want the lowest latency. One connection per peer and direction,
frames written in order under a per-peer lock.

A broken connection means the routes through that peer cannot go on: the
link reports the peer's worker id, and the engine ends those requests with
an error (driver side) or drops their stage state (relay side).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from cascade.advertise import advertised_host
from cascade.messages import RouteStage
from cascade.stagewire import (
    PREFIX_SIZE,
    StageFrame,
    StageInput,
    StageWireError,
    decode_frame,
    encode_frame,
    split_prefix,
)

FrameHandler = Callable[[StageFrame, torch.Tensor | None], None]
FailureHandler = Callable[[str, str], None]


@dataclass(slots=True)
class LinkStats:
    frames_out: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    # One-way latency of activation frames (sender's wall clock to receiver's; same host here).
    latency_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2048))

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None

        return {
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
        }


class _Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()
        self.watch: asyncio.Task[None] | None = None


class StageLink:
    def __init__(
        self,
        on_frame: FrameHandler,
        on_peer_failed: FailureHandler,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        logger: Any = None,
    ) -> None:
        self.on_frame = on_frame
        self.on_peer_failed = on_peer_failed
        self.host = host
        self.port = port
        self.advertise_host = advertised_host(host, advertise_host)
        self.log = logger or structlog.get_logger()
        self.stats = LinkStats()
        self._server: asyncio.Server | None = None
        self._peers: dict[str, _Peer] = {}  # by address
        self._incoming: set[asyncio.Task[None]] = set()
        self.addr = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        port = self._server.sockets[0].getsockname()[1]
        self.addr = f"{self.advertise_host}:{port}"
        return self.addr

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in list(self._peers.values()):
            if p.watch is not None:
                p.watch.cancel()
            p.writer.close()
        self._peers.clear()
        for t in list(self._incoming):
            t.cancel()
        if self._incoming:
            await asyncio.gather(*self._incoming, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------ sending
    async def send(self, to: RouteStage, frame: StageFrame, tensor: torch.Tensor | None) -> None:
        try:
            peer = await self._peer(to)
            parts = encode_frame(frame, tensor)
            async with peer.lock:
                peer.writer.writelines(parts)
                await peer.writer.drain()
            self.stats.frames_out += 1
            self.stats.bytes_out += sum(len(p) for p in parts)
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
            self._drop(to.stage_addr)
            self.log.warning("stage_peer_failed", peer=to.worker_id, addr=to.stage_addr, error=str(e))
            self.on_peer_failed(to.worker_id, f"stage link to {to.stage_addr}: {e}")

    async def _peer(self, to: RouteStage) -> _Peer:
        peer = self._peers.get(to.stage_addr)
        if peer is not None:
            return peer
        if not to.stage_addr:
            raise ConnectionError(f"worker {to.worker_id} has no stage address")
        host, _, port = to.stage_addr.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=5)
        peer = _Peer(reader, writer)
        self._peers[to.stage_addr] = peer
        # The peer never writes on this connection; EOF here means it went away.
        peer.watch = asyncio.ensure_future(self._watch(to, peer))
        return peer

    async def _watch(self, to: RouteStage, peer: _Peer) -> None:
        try:
            await peer.reader.read(1)
        except (OSError, ConnectionError):
            pass
        if self._peers.get(to.stage_addr) is peer:
            self._drop(to.stage_addr)
            self.on_peer_failed(to.worker_id, f"stage link to {to.stage_addr} closed")

    def _drop(self, addr: str) -> None:
        peer = self._peers.pop(addr, None)
        if peer is not None:
            if peer.watch is not None and peer.watch is not asyncio.current_task():
                peer.watch.cancel()
            peer.writer.close()

    # ------------------------------------------------------------ receiving
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._incoming.add(task)
        senders: set[str] = set()
        try:
            while True:
                prefix = await reader.readexactly(PREFIX_SIZE)
                hlen, plen = split_prefix(prefix)
                header_bytes = await reader.readexactly(hlen)
                payload = await reader.readexactly(plen) if plen else b""
                frame, tensor = decode_frame(header_bytes, payload)
                self.stats.frames_in += 1
                self.stats.bytes_in += PREFIX_SIZE + hlen + plen
                if isinstance(frame, StageInput):
                    if frame.sent_at:
                        self.stats.latency_ms.append((time.time() - frame.sent_at) * 1e3)
                    if frame.route:
                        senders.add(frame.route[0].worker_id)
                self.on_frame(frame, tensor)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except StageWireError as e:
            self.log.warning("stage_frame_rejected", error=str(e))
        finally:
            writer.close()
            self._incoming.discard(task)
            # The drivers that sent on this connection are gone (or broke the protocol).
            for wid in senders:
                self.on_peer_failed(wid, "stage link from the driver closed")
