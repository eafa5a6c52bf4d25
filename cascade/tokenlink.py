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
through one function after the decode; or, from version 2 on, the same events as rows
(`encode_rows`: a JSON array, `[batch size, [request id, token ids, text, finish reason, prompt
tokens, completion tokens, index, choice, attempt], ...]`, the worker id being the hello's), which
the engine thread writes for every step whose events carry no logprobs and no error. Why a second
form: the engine thread encodes right after a step, with the CPU's caches full of the model's
weights, where everything it runs is slow: measured on the 2-core dev VM, an `orjson` encode of the
`TokenEvents` dataclass took 35-70 µs there against 3 µs warm, and the rows 13-18 µs, on every
step of every request. A gateway reads both forms (and takes version 1 hellos, whose frames are all
full messages); a version 1 gateway refuses a version 2 hello, and the worker then sends by NATS.

The key is a random secret the gateway puts in every `GenerateBatch` with its address: a
connection that does not present it (a stray client, a worker of another gateway incarnation on a
reused port) is refused before any frame is read.

On Linux the gateway also listens on a Unix socket in the abstract namespace (`@cascade-tokens-
<gateway id>-<random>`, advertised beside the TCP address), which a worker tries first: same wire,
same key, a cheaper `send` than loopback TCP (no TCP/IP stack on the path; measured on the 2-core
dev VM, 23-40 µs against 60-63 µs a frame at the median, on every step of every request). The
name is reachable only from the gateway's own network namespace (the same host, not another
container or pod), so a worker elsewhere is refused at once and takes the TCP address.

The request link, the other way: a worker's event loop also opens a second connection to the
same listener, whose hello starts with "CREQ" instead of "CTOK" (same version, key and worker id,
the same ack). On it the gateway writes REQUEST frames and the worker answers each with a REPLY
frame, both with the payload a request/reply through NATS would carry (an encoded
`GenerateBatch`, an encoded `BatchReply` or `ErrorReply`) behind a u32 id that pairs them
(`RequestLinks`, the gateway's end). A batch then reaches the worker's loop straight from the
gateway, without nats-server's two hops and nats-py's flusher turn on each side; only the loop
thread of the worker reads and writes that connection (the engine thread writes the token link),
so no socket is shared between threads. A gateway without a request link to a worker (its first
batch to it, which starts the connect; a link lost; a worker or gateway of an older version)
sends by NATS as before, and a link lost with batches in flight fails them as a lost NATS reply
does: cancelled where they went, retried.

Pure framing here, plus the gateway's listener (`TokenLinkProtocol`, asyncio) and its request
links (`RequestLinks`). No torch: the gateway imports it.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import struct
import sys
from collections.abc import Callable
from typing import Any

import orjson

from cascade.messages import MessageError, TokenEvent, TokenEvents, decode

MAGIC = b"CTOK"
MAGIC_REQUESTS = b"CREQ"
VERSION = 2  # what this build sends; 2: EVENTS frames may carry rows (`encode_rows`)
VERSIONS = frozenset({1, 2})  # the hellos a gateway takes
KIND_EVENTS = 1  # worker → gateway, token link: an encoded TokenEvents
KIND_REQUEST = 2  # gateway → worker, request link: u32 id + an encoded GenerateBatch
KIND_REPLY = 3  # worker → gateway, request link: u32 id + an encoded BatchReply or ErrorReply
ACK_OK = b"\x00"
ACK_REFUSED = b"\x01"
# Far above one step's events for one gateway (a few hundred bytes per request); a length past it
# is a corrupt or foreign stream, not a big message.
MAX_FRAME = 8 << 20
FRAME_HEADER = struct.Struct("!BI")
_ID = struct.Struct("!I")
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


def hello(key: str, worker_id: str, requests: bool = False) -> bytes:
    """The first bytes a worker sends on a new link (`requests`: on a request link)."""
    magic = MAGIC_REQUESTS if requests else MAGIC
    return magic + bytes([VERSION]) + _field(key.encode(), "key") + _field(worker_id.encode(), "worker id")


_ROW_FIELDS = 9


def encode_rows(events: list[TokenEvent], batch_size: int) -> bytes | None:
    """One gateway's events of a step as rows (the module's docstring), or None when one of them
    carries what only the full message does (logprobs, prompt logprobs, an error)."""
    rows: list[Any] = [batch_size]
    for ev in events:
        if ev.error is not None or ev.logprobs or ev.prompt_logprobs is not None:
            return None
        rows.append(
            (
                ev.request_id,
                ev.token_ids,
                ev.text,
                ev.finish_reason,
                ev.prompt_tokens,
                ev.completion_tokens,
                ev.index,
                ev.choice,
                ev.attempt,
            )
        )
    return orjson.dumps(rows)


def decode_events(payload: bytes, worker_id: str) -> TokenEvents:
    """An EVENTS frame's payload, either form, from the link of `worker_id`. MessageError on
    anything else (the caller logs it and drops the frame)."""
    if payload[:1] != b"[":
        return decode(payload, TokenEvents)
    try:
        rows = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise MessageError(f"token event rows: not JSON: {e}") from None
    if not rows or type(rows[0]) is not int:
        raise MessageError("token event rows: no batch size first")
    events = []
    for row in rows[1:]:
        if type(row) is not list or len(row) != _ROW_FIELDS:
            raise MessageError(f"token event rows: a row is not a list of {_ROW_FIELDS}: {row!r:.80}")
        rid, ids, text, finish, prompt, completion, index, choice, attempt = row
        if (
            type(rid) is not str
            or type(ids) is not list
            or any(type(t) is not int for t in ids)
            or type(text) is not str
            or not (finish is None or type(finish) is str)
            or any(type(n) is not int for n in (prompt, completion, index, choice, attempt))
        ):
            raise MessageError(f"token event rows: a field of the wrong type in {row!r:.120}")
        events.append(
            TokenEvent(
                request_id=rid,
                token_ids=ids,
                text=text,
                finish_reason=finish,
                prompt_tokens=prompt,
                completion_tokens=completion,
                index=index,
                choice=choice,
                attempt=attempt,
            )
        )
    return TokenEvents(worker_id, events, batch_size=rows[0])


def frame(payload: bytes, kind: int = KIND_EVENTS) -> bytes:
    if len(payload) > MAX_FRAME:
        raise TokenLinkError(f"frame payload of {len(payload)} bytes exceeds {MAX_FRAME}")
    return FRAME_HEADER.pack(kind, len(payload)) + payload


def id_frame(kind: int, ident: int, message: bytes) -> bytes:
    """A REQUEST or REPLY frame: the id that pairs them, then the message."""
    return frame(_ID.pack(ident) + message, kind)


def split_id(payload: bytes) -> tuple[int, bytes]:
    """(id, message) of a REQUEST or REPLY frame's payload."""
    if len(payload) < _ID.size:
        raise TokenLinkError(f"a request or reply frame of {len(payload)} bytes has no id")
    return _ID.unpack_from(payload)[0], payload[_ID.size :]


class FrameReader:
    """Incremental decoder: `feed` bytes as they arrive; it returns the hello once complete
    (`hello_done`, `key`, `worker_id`, `requests`), then whole frames' payloads, of the kinds
    `kinds` allows (after the hello: EVENTS on a token link, REPLY on a request link). Raises
    TokenLinkError on anything malformed; the caller then drops the connection. The worker's end
    of a request link reads with `hello=False` and `kinds={KIND_REQUEST}`."""

    def __init__(self, hello: bool = True, kinds: frozenset[int] | None = None) -> None:
        self._buf = bytearray()
        self.hello_done = not hello
        self.key = ""
        self.worker_id = ""
        self.requests = False  # the hello opened a request link
        self.version = 0  # the hello's
        self.kinds = kinds
        # Set by `feed` when a frame header is malformed: the frames before it are still returned.
        self.error: str | None = None

    def _hello(self) -> bool:
        buf = self._buf
        head = bytes(buf[:4])
        if len(buf) < 5:
            if not (MAGIC.startswith(head) or MAGIC_REQUESTS.startswith(head)):
                raise TokenLinkError(f"not a token link: starts with {head!r}")
            return False
        if head not in (MAGIC, MAGIC_REQUESTS):
            raise TokenLinkError(f"not a token link: starts with {head!r}")
        if buf[4] not in VERSIONS:
            raise TokenLinkError(f"token link version {buf[4]}, this gateway speaks {sorted(VERSIONS)}")
        self.version = buf[4]
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
        self.requests = head == MAGIC_REQUESTS
        if self.kinds is None:
            self.kinds = frozenset({KIND_REPLY if self.requests else KIND_EVENTS})
        del buf[:pos]
        self.hello_done = True
        return True

    def feed(self, data: bytes) -> list[bytes]:
        """Payloads of the frames completed by `data`, frames read only after the hello.
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
        while len(buf) - pos >= FRAME_HEADER.size:
            kind, n = FRAME_HEADER.unpack_from(buf, pos)
            if kind not in (self.kinds or (KIND_EVENTS,)):
                self.error = f"unknown token link frame kind {kind}"
                break
            if n > MAX_FRAME:
                self.error = f"token link frame of {n} bytes exceeds {MAX_FRAME}"
                break
            end = pos + FRAME_HEADER.size + n
            if len(buf) < end:
                break
            out.append(bytes(buf[pos + FRAME_HEADER.size : end]))
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
        requests: RequestLinks | None = None,
    ) -> None:
        """`conns`: the set of open links' transports, kept up to date (for the owner to close).
        `requests`: where request links register (None: a request link's hello is refused)."""
        self._key = key
        self._requests = requests
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
                if r.requests:
                    if self._requests is None:
                        self._on_error(r.worker_id, "request link refused: this gateway takes none")
                        t.write(ACK_REFUSED)
                        t.close()
                        return
                    self._requests.add(r.worker_id, t)
                t.write(ACK_OK)
        except TokenLinkError as e:
            self._bad(str(e))
            return
        if r.requests and self._requests is not None:
            for p in payloads:
                try:
                    self._requests.answer(t, *split_id(p))
                except TokenLinkError as e:
                    self._bad(str(e))
                    return
        else:
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
            if self._requests is not None:
                self._requests.lost(self._transport)
        self._transport = None
        if self._reader.pending and self._reader.error is None:
            self.stats["truncated"] = self.stats.get("truncated", 0) + 1


def link_server_factory(
    key: str,
    on_payload: Callable[[str, bytes], None],
    on_error: Callable[[str, str], None],
    stats: dict[str, int],
    conns: set[asyncio.Transport],
    requests: RequestLinks | None = None,
) -> Callable[[], Any]:
    return lambda: TokenLinkProtocol(key, on_payload, on_error, stats, conns, requests)


class RequestLinkLost(ConnectionError):
    """The request link closed with the request in flight (the worker may or may not have it)."""


class RequestLinks:
    """The gateway's request links, one per worker id (the newest when a worker reconnects), and
    the requests in flight on them. `send` writes a REQUEST frame at once, in the caller's turn
    (no task, no flusher between the dispatch and the socket); the future it returns gets the
    REPLY's message, or RequestLinkLost when the link closes first."""

    def __init__(self) -> None:
        self._by_worker: dict[str, asyncio.Transport] = {}
        self._pending: dict[int, tuple[asyncio.Transport, asyncio.Future[bytes]]] = {}
        self._next = 0
        self.sent = 0
        self.answered = 0

    def has(self, worker_id: str) -> bool:
        t = self._by_worker.get(worker_id)
        return t is not None and not t.is_closing()

    def workers(self) -> list[str]:
        return sorted(w for w in self._by_worker if self.has(w))

    def add(self, worker_id: str, transport: asyncio.Transport) -> None:
        self._by_worker[worker_id] = transport

    def send(self, worker_id: str, message: bytes) -> asyncio.Future[bytes] | None:
        """The reply's future, or None when there is no open link to `worker_id` (go by NATS)."""
        t = self._by_worker.get(worker_id)
        if t is None or t.is_closing():
            return None
        self._next = ident = (self._next + 1) & 0xFFFFFFFF
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # However it ends (answered, the link lost, cancelled by a caller that stopped waiting), it
        # leaves the table: a late reply to it is ignored. A failure nobody awaits any more (the
        # dispatch task cancelled at shutdown) is marked retrieved.
        fut.add_done_callback(lambda f: self._settled(ident, f))
        self._pending[ident] = (t, fut)
        t.write(id_frame(KIND_REQUEST, ident, message))
        self.sent += 1
        return fut

    def _settled(self, ident: int, fut: asyncio.Future[bytes]) -> None:
        held = self._pending.get(ident)
        if held is not None and held[1] is fut:
            del self._pending[ident]
        if not fut.cancelled():
            fut.exception()

    def answer(self, transport: asyncio.Transport, ident: int, message: bytes) -> None:
        held = self._pending.get(ident)
        if held is None or held[0] is not transport or held[1].done():
            return  # given up on, or not this link's
        self.answered += 1
        held[1].set_result(message)

    def lost(self, transport: asyncio.Transport) -> None:
        for w, t in list(self._by_worker.items()):
            if t is transport:
                del self._by_worker[w]
        for t, f in list(self._pending.values()):
            if t is transport and not f.done():
                f.set_exception(RequestLinkLost("the request link closed before the reply"))
