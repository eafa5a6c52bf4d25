"""The direct token stream: a worker's engine thread writes each step's token events for a gateway
straight onto a TCP connection to that gateway, instead of publishing them through nats-server.

Through NATS, every decode step's message wakes nats-server (a process of its own, on one of the
same cores), which then writes it on to the gateway: measured on the 2-core dev VM, a 300-byte
message from a process burning a torch thread reached a third socket 0.55-0.70 ms later through
nats-server and 0.30-0.36 ms later over a direct connection (bench/results/serve-direct-probe.md).

Wire format (one connection per worker and gateway, worker → gateway):

    hello   magic "CTOK", version (u8), key (u16 length + bytes), worker id (u16 length + bytes)
    ← ack   one byte: 0 accepted, 1 refused (the connection is then closed)
    frames  kind (u8), payload length (u32, big-endian), payload

The only frame kind is EVENTS, whose payload is an encoded `TokenEvents` (cascade.messages): the
very bytes the worker would publish on the gateway's tokens subject, so the gateway handles both
through one function after the decode. The key is a random secret the gateway puts in every
`GenerateBatch` with its address: a connection that does not present it (a stray client, a
worker of another gateway incarnation on a reused port) is refused before any frame is read.

On Linux the gateway also listens on a Unix socket in the abstract namespace (`@cascade-tokens-
<gateway id>-<random>`, advertised beside the TCP address), which a worker tries first: same wire,
same key, a cheaper `send` than loopback TCP (no TCP/IP stack on the path; measured on the 2-core
dev VM, 23-40 µs against 60-63 µs a frame at the median, on every step of every request). The
name is reachable only from the gateway's own network namespace (the same host, not another
container or pod), so a worker elsewhere is refused at once and takes the TCP address.

Pure framing here, plus the gateway's listener (`TokenLinkProtocol`, asyncio). No torch: the
gateway imports it.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import struct
import sys
from collections.abc import Callable
from typing import Any

MAGIC = b"CTOK"
VERSION = 1
KIND_EVENTS = 1
ACK_OK = b"\x00"
ACK_REFUSED = b"\x01"
# Far above one step's events for one gateway (a few hundred bytes per request); a length past it
# is a corrupt or foreign stream, not a big message.
MAX_FRAME = 8 << 20
_HEADER = struct.Struct("!BI")
_MAX_FIELD = 0xFFFF


def local_socket_name(gateway_id: str) -> str | None:
    """A fresh abstract Unix socket name for a gateway's local listener, in its advertised form
    (`@name`); None where abstract names do not exist (anything but Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return f"@cascade-tokens-{gateway_id}-{secrets.token_hex(4)}"


def local_socket_address(local: str) -> str | None:
    """The address `socket.connect` and `create_unix_server` take for an advertised local name
    (`@name` → NUL + name), or None when there is none or this platform has no abstract names."""
    if not local.startswith("@") or len(local) < 2 or not sys.platform.startswith("linux"):
        return None
    return "\0" + local[1:]


class TokenLinkError(ValueError):
    """Bytes on a token link that are not this wire format (or not its version)."""


def _field(b: bytes, what: str) -> bytes:
    if len(b) > _MAX_FIELD:
        raise TokenLinkError(f"{what} is {len(b)} bytes, more than {_MAX_FIELD}")
    return struct.pack("!H", len(b)) + b


def hello(key: str, worker_id: str) -> bytes:
    """The first bytes a worker sends on a new link."""
    return MAGIC + bytes([VERSION]) + _field(key.encode(), "key") + _field(worker_id.encode(), "worker id")


def frame(payload: bytes, kind: int = KIND_EVENTS) -> bytes:
    if len(payload) > MAX_FRAME:
        raise TokenLinkError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(kind, len(payload)) + payload


class FrameReader:
    """Incremental decoder of the gateway's side: `feed` bytes as they arrive; it returns the
    hello once complete (`hello_done`, `key`, `worker_id`), then whole frames' payloads. Raises
    TokenLinkError on anything malformed; the caller then drops the connection."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.hello_done = False
        self.key = ""
        self.worker_id = ""
        # Set by `feed` when a frame header is malformed: the frames before it are still returned.
        self.error: str | None = None

    def _hello(self) -> bool:
        buf = self._buf
        if len(buf) < 5:
            if not MAGIC.startswith(bytes(buf[:4])):
                raise TokenLinkError(f"not a token link: starts with {bytes(buf[:4])!r}")
            return False
        if bytes(buf[:4]) != MAGIC:
            raise TokenLinkError(f"not a token link: starts with {bytes(buf[:4])!r}")
        if buf[4] != VERSION:
            raise TokenLinkError(f"token link version {buf[4]}, this gateway speaks {VERSION}")
        pos = 5
        fields = []
        for _ in range(2):
            if len(buf) < pos + 2:
                return False
            (n,) = struct.unpack_from("!H", buf, pos)
            if len(buf) < pos + 2 + n:
                return False
            try:
                fields.append(bytes(buf[pos + 2 : pos + 2 + n]).decode())
            except UnicodeDecodeError as e:
                raise TokenLinkError(f"hello field is not UTF-8: {e}") from None
            pos += 2 + n
        self.key, self.worker_id = fields
        del buf[:pos]
        self.hello_done = True
        return True

    def feed(self, data: bytes) -> list[bytes]:
        """Payloads of the EVENTS frames completed by `data`, frames read only after the hello.
        A malformed hello raises TokenLinkError; a malformed frame sets `error` (the frames
        before it are returned) and nothing more is read."""
        if self.error is not None:
            return []
        self._buf += data
        if not self.hello_done and not self._hello():
            return []
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            kind, n = _HEADER.unpack_from(buf, pos)
            if kind != KIND_EVENTS:
                self.error = f"unknown token link frame kind {kind}"
                break
            if n > MAX_FRAME:
                self.error = f"token link frame of {n} bytes exceeds {MAX_FRAME}"
                break
            end = pos + _HEADER.size + n
            if len(buf) < end:
                break
            out.append(bytes(buf[pos + _HEADER.size : end]))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete hello or frame held (a connection closed with some is truncated)."""
        return len(self._buf)


class TokenLinkProtocol(asyncio.Protocol):
    """The gateway's end of one link: checks the hello's key, then hands each frame's payload to
    `on_payload(worker_id, payload)` in this `data_received` turn (in arrival order, no task in
    between). A malformed stream is logged by `on_error(worker_id, error)` and the connection dropped."""

    def __init__(
        self,
        key: str,
        on_payload: Callable[[str, bytes], None],
        on_error: Callable[[str, str], None],
        stats: dict[str, int] | None = None,
        conns: set[asyncio.Transport] | None = None,
    ) -> None:
        """`conns`: the set of open links' transports, kept up to date (for the owner to close)."""
        self._key = key
        self._conns = conns if conns is not None else set()
        self._on_payload = on_payload
        self._on_error = on_error
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None
        self.stats = stats if stats is not None else {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._conns.add(transport)
        self.stats["connections"] = self.stats.get("connections", 0) + 1

    def data_received(self, data: bytes) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        r = self._reader
        try:
            was_hello = r.hello_done
            payloads = r.feed(data)
            if r.hello_done and not was_hello:
                # Constant time: the key is the link's only credential.
                if not hmac.compare_digest(r.key.encode(), self._key.encode()):
                    self.stats["refused"] = self.stats.get("refused", 0) + 1
                    self._on_error(r.worker_id, "token link refused: wrong key")
                    t.write(ACK_REFUSED)
                    t.close()
                    return
                t.write(ACK_OK)
        except TokenLinkError as e:
            self._bad(str(e))
            return
        for p in payloads:
            self.stats["frames"] = self.stats.get("frames", 0) + 1
            self._on_payload(r.worker_id, p)
        if r.error is not None:
            self._bad(r.error)

    def _bad(self, why: str) -> None:
        self.stats["bad"] = self.stats.get("bad", 0) + 1
        self._on_error(self._reader.worker_id, why)
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._conns.discard(self._transport)
        self._transport = None
        if self._reader.pending and self._reader.error is None:
            self.stats["truncated"] = self.stats.get("truncated", 0) + 1


def link_server_factory(
    key: str,
    on_payload: Callable[[str, bytes], None],
    on_error: Callable[[str, str], None],
    stats: dict[str, int],
    conns: set[asyncio.Transport],
) -> Callable[[], Any]:
    return lambda: TokenLinkProtocol(key, on_payload, on_error, stats, conns)
