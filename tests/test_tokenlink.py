"""The direct token link's wire format (cascade/tokenlink.py) and the worker's per-request rule for
which path a request's events take (services/worker/tokenlinks.py), over real loopback sockets."""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import sys
import threading
from collections.abc import Iterator

import pytest

from cascade.messages import (
    BatchReply,
    ErrorReply,
    GenerateBatch,
    MessageError,
    RemoteError,
    TokenEvent,
    TokenEvents,
    TokenLogprob,
    decode,
    encode,
)
from cascade.tokenlink import (
    ACK_OK,
    KIND_EVENTS,
    KIND_REPLY,
    KIND_REQUEST,
    MAX_FRAME,
    FrameReader,
    RequestLinkLost,
    RequestLinks,
    TokenLinkError,
    decode_events,
    encode_rows,
    frame,
    hello,
    id_frame,
    local_socket_address,
    local_socket_name,
    split_id,
)
from services.worker.engine import StepResult
from services.worker.requestlinks import RequestLinks as WorkerRequestLinks
from services.worker.tokenlinks import TokenLinks


def test_hello_and_frames_round_trip_split_anywhere() -> None:
    payloads = [b"", b"x", b"{" + b"a" * 300 + b"}", bytes(range(256))]
    wire = hello("k3y", "w-1") + b"".join(frame(p) for p in payloads)
    for cut in range(len(wire) + 1):  # every split of the stream into two reads
        r = FrameReader()
        got = r.feed(wire[:cut]) + r.feed(wire[cut:])
        assert (r.hello_done, r.key, r.worker_id) == (True, "k3y", "w-1")
        assert got == payloads and r.pending == 0 and r.error is None
    r = FrameReader()
    got = [p for b in wire for p in r.feed(bytes([b]))]  # byte by byte
    assert got == payloads


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "not a token link"),
        (b"CTOK\x07", "version 7"),
        (b"CT\x00", "not a token link"),
    ],
)
def test_bad_hello_raises(wire: bytes, why: str) -> None:
    with pytest.raises(TokenLinkError, match=why):
        FrameReader().feed(wire)


def test_a_version_1_hello_is_still_taken() -> None:
    """A worker of the version before rows: its hello is accepted, and its frames are full messages."""
    old = b"CTOK\x01" + hello("k", "w")[5:]
    r = FrameReader()
    assert r.feed(old + frame(b"{}")) == [b"{}"] and (r.version, r.worker_id) == (1, "w")
    r = FrameReader()
    r.feed(hello("k", "w"))
    assert r.version == 2


def _events() -> list[TokenEvent]:
    return [
        TokenEvent("r1", [5, 6], "h\u00e9", None, 12, 2, index=3, choice=1, attempt=2),
        TokenEvent("r2", [], "", "stop", 0, 7, index=7),
        TokenEvent("r3", [9], '\n"x"', "length", 4, 1, index=0),
    ]


def test_rows_round_trip_and_read_as_the_full_message() -> None:
    evs = _events()
    rows = encode_rows(evs, 3)
    assert rows is not None and rows.startswith(b"[")
    got = decode_events(rows, "w-1")
    assert got == TokenEvents("w-1", evs, batch_size=3)
    # The full message reads the same through the same function.
    assert decode_events(encode(TokenEvents("w-1", evs, batch_size=3)), "w-1") == got


@pytest.mark.parametrize(
    "extra",
    [
        {"error": "boom"},
        {"logprobs": [TokenLogprob(5, -0.1)]},
        {"prompt_logprobs": [None, TokenLogprob(1, -2.0)]},
    ],
)
def test_events_rows_cannot_carry_take_the_full_message(extra: dict[str, object]) -> None:
    evs = [*_events(), TokenEvent("r4", [1], "a", **extra)]  # type: ignore[arg-type]
    assert encode_rows(evs, 4) is None
    assert decode_events(encode(TokenEvents("w", evs, batch_size=4)), "w").events == evs


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"[", "not JSON"),
        (b"[]", "no batch size"),
        (b'["1"]', "no batch size"),
        (b"[true]", "no batch size"),
        (b'[1, {"request_id": "a"}]', "not a list of 9"),
        (b'[1, ["a", [1], "x", null, 0, 0, 0, 0]]', "not a list of 9"),
        (b'[1, ["a", [1.5], "x", null, 0, 0, 0, 0, 0]]', "wrong type"),
        (b'[1, ["a", [true], "x", null, 0, 0, 0, 0, 0]]', "wrong type"),
        (b'[1, [1, [1], "x", null, 0, 0, 0, 0, 0]]', "wrong type"),
        (b'[1, ["a", [1], "x", 3, 0, 0, 0, 0, 0]]', "wrong type"),
        (b'[1, ["a", [1], "x", null, 0, 0, "0", 0, 0]]', "wrong type"),
        (b'[1, ["a", "12", "x", null, 0, 0, 0, 0, 0]]', "wrong type"),
        (b"{}", "not a Cascade message"),
    ],
)
def test_bad_rows_raise_a_message_error(payload: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why):
        decode_events(payload, "w")


def test_bad_frame_sets_error_after_the_good_ones() -> None:
    r = FrameReader()
    good = frame(b"ok")
    assert r.feed(hello("k", "w") + good + struct.pack("!BI", 9, 1) + b"z" + good) == [b"ok"]
    assert r.error == "unknown token link frame kind 9"
    assert r.feed(good) == []  # nothing more is read
    r = FrameReader()
    assert r.feed(hello("k", "w") + struct.pack("!BI", 1, MAX_FRAME + 1)) == []
    assert r.error is not None and "exceeds" in r.error
    with pytest.raises(TokenLinkError, match="exceeds"):
        frame(b"x" * (MAX_FRAME + 1))


class Gateway:
    """A loopback listener that acks hellos and collects frames' payloads (or refuses)."""

    def __init__(self, ack: bytes = ACK_OK, hold: threading.Event | None = None, local: str = "") -> None:
        """`local`: listen on that abstract Unix socket name ("@name") instead of TCP (`addr` is
        then a TCP port nobody listens on)."""
        self.local = local
        if local:
            self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = local_socket_address(local)
            assert path is not None
            self.srv.bind(path)
            self.srv.listen()
            self.addr = f"127.0.0.1:{_free_port()}"
        else:
            self.srv = socket.create_server(("127.0.0.1", 0))
            self.addr = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.ack = ack
        self.hold = hold  # the ack waits for it: a gateway slow to answer
        self.hellos = threading.Semaphore(0)
        self.payloads: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.got = threading.Condition()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._read, args=(c,), daemon=True).start()

    def _read(self, c: socket.socket) -> None:
        r = FrameReader()
        acked = False
        while True:
            try:
                data = c.recv(65536)
            except OSError:
                return
            if not data:
                return
            ps = r.feed(data)
            if r.hello_done and not acked:
                self.hellos.release()
                if self.hold is not None:
                    self.hold.wait()
                c.sendall(self.ack)
                acked = True
            with self.got:
                self.payloads += ps
                self.got.notify_all()

    def wait(self, n: int) -> list[bytes]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.payloads) >= n, 5), f"{len(self.payloads)} of {n} frames"
            return list(self.payloads)

    def close(self) -> None:
        self.srv.close()
        for c in self.conns:
            c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    g = Gateway()
    yield g
    g.close()


def enc(events: list[TokenEvent], batch_size: int) -> bytes:
    return encode(TokenEvents("w", events, batch_size=batch_size))


def step(*events: tuple[str, str, str | None]) -> StepResult:
    """(gateway, request, finish reason) per event."""
    evs = [(gw, TokenEvent(rid, [1], "a", finish_reason=fin)) for gw, rid, fin in events]
    return StepResult(evs, [], len(evs), 0, len(evs), 0)


def ids(left: list[tuple[str, TokenEvent]]) -> list[str]:
    """The requests of the events `TokenLinks.send` left for NATS."""
    return [ev.request_id for _, ev in left]


def test_links_carry_events_and_pin_requests_to_their_first_path(gateway: Gateway) -> None:
    links = TokenLinks("w", enc)
    # No address known for "g" yet: its events go by NATS, and "a" stays there to its end.
    assert ids(links.send(step(("g", "a", None)))) == ["a"]
    links.learn("g", gateway.addr, "key")
    assert links.settle()  # the connect runs on a thread of its own, started by `learn`
    left = links.send(step(("g", "a", None), ("g", "b", None), ("h", "c", None)))
    assert ids(left) == ["a", "c"]  # "a" pinned to NATS, "c" for a gateway without a link
    got = decode_events(gateway.wait(1)[0], "w")
    assert [e.request_id for e in got.events] == ["b"] and got.worker_id == "w"
    assert (links.frames, links.events_sent, links.connects) == (1, 1, 1)
    # "a" ends by NATS; a new request "d" takes the link; when everything is through, nothing stays pinned.
    assert ids(links.send(step(("g", "a", "length"), ("g", "d", None)))) == ["a"]
    assert [e.request_id for e in decode_events(gateway.wait(2)[1], "w").events] == ["d"]
    links.idle()
    assert ids(links.send(step(("g", "a", None)))) == []
    links.close()


def test_a_failed_link_moves_its_requests_to_nats_for_good(gateway: Gateway) -> None:
    links = TokenLinks("w", enc)
    links.learn("g", gateway.addr, "key")
    assert links.settle()
    assert ids(links.send(step(("g", "a", None)))) == []
    gateway.wait(1)
    for c in gateway.conns:  # the gateway side goes away (a reset, as a crashed gateway's kernel sends)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    gateway.conns.clear()
    # Writes fail within a step or two (the reset must arrive first); they then go by NATS.
    for _ in range(50):
        left = links.send(step(("g", "a", None)))
        if ids(left) == ["a"]:
            break
    assert ids(left) == ["a"] and links.failures >= 1 and not links.linked("g")
    # A new gateway address at once: new requests take the new link, "a" stays on NATS.
    other = Gateway()
    try:
        links.learn("g", other.addr, "key2")
        assert links.settle()
        assert ids(links.send(step(("g", "a", None), ("g", "b", None)))) == ["a"]
        assert [e.request_id for e in decode_events(other.wait(1)[0], "w").events] == ["b"]
    finally:
        other.close()
        links.close()


def test_refused_or_unreachable_links_fall_back_to_nats() -> None:
    refusing = Gateway(ack=b"\x01")
    links = TokenLinks("w", enc)
    try:
        links.learn("g", refusing.addr, "wrong")
        assert links.settle()
        assert ids(links.send(step(("g", "a", None)))) == ["a"]
        assert links.failures == 1 and not links.linked("g")
        # Backing off: no second connect within the back-off.
        assert ids(links.send(step(("g", "b", None)))) == ["b"]
        assert links.settle() and links.failures == 1
    finally:
        refusing.close()
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    links.learn("h", f"127.0.0.1:{port}", "k")
    assert links.settle()
    assert ids(links.send(step(("h", "c", None)))) == ["c"] and links.failures == 2
    links.learn("h", "", "")  # the gateway turned direct tokens off
    assert ids(links.send(step(("h", "d", None)))) == ["d"] and links.failures == 2


def test_each_choice_of_a_request_keeps_its_path_to_its_own_end(gateway: Gateway) -> None:
    links = TokenLinks("w", enc)

    def choices(*evs: tuple[int, str | None]) -> StepResult:
        out = [("g", TokenEvent("a", [1], "a", finish_reason=fin, choice=c)) for c, fin in evs]
        return StepResult(out, [], len(out), 0, len(out), 0)

    assert len(links.send(choices((0, None), (1, None)))) == 2  # no link yet: both by NATS
    links.learn("g", gateway.addr, "key")
    assert links.settle()
    # Choice 0 ends (by NATS); choice 1 goes on by NATS though the link is up and "a" has a finished choice.
    assert len(links.send(choices((0, "length"), (1, None)))) == 2
    assert [ev.choice for _, ev in links.send(choices((1, None)))] == [1]
    assert links.frames == 0
    links.close()


def test_a_gateway_slow_to_answer_never_holds_the_engine_thread() -> None:
    """The connect and its ack wait on a thread of their own: while the gateway withholds its ack,
    steps go on with their events by NATS, and the link serves new requests once it is up."""
    release = threading.Event()
    slow = Gateway(hold=release)
    links = TokenLinks("w", enc)
    try:
        links.learn("g", slow.addr, "key")
        assert slow.hellos.acquire(timeout=5)  # the connect is in, waiting for the ack
        # The step's events go by NATS at once: the engine thread does not wait for the ack.
        assert ids(links.send(step(("g", "a", None)))) == ["a"]
        assert not links.linked("g") and links.connects == 0
        release.set()
        assert links.settle()
        assert ids(links.send(step(("g", "a", None), ("g", "b", None)))) == ["a"]  # "a" stays on NATS
        assert links.linked("g") and links.connects == 1
        assert [e.request_id for e in decode_events(slow.wait(1)[0], "w").events] == ["b"]
    finally:
        release.set()
        links.close()
        slow.close()


def test_a_connect_that_ends_after_close_leaves_no_socket() -> None:
    release = threading.Event()
    slow = Gateway(hold=release)
    links = TokenLinks("w", enc)
    try:
        links.learn("g", slow.addr, "key")
        assert slow.hellos.acquire(timeout=5)
        links.close()
        release.set()
        assert links.settle()
        assert not links.linked("g") and not links._ready
        links.learn("g", slow.addr, "key")  # closed: no new connect
        assert links.settle() and links.connects == 0
    finally:
        release.set()
        slow.close()


def test_a_connected_link_not_yet_taken_up_is_not_connected_again(gateway: Gateway) -> None:
    """`learn` runs for every GenerateBatch: between the connect's end and the engine thread's
    next step, more batches must not open more connections (each would leak the one before)."""
    links = TokenLinks("w", enc)
    try:
        for _ in range(3):
            links.learn("g", gateway.addr, "key")
            assert links.settle()
        assert links.connects == 1 and len(gateway.conns) == 1
        assert ids(links.send(step(("g", "a", None)))) == [] and links.linked("g")
    finally:
        links.close()


def test_local_socket_names() -> None:
    assert local_socket_address("") is None and local_socket_address("/tmp/x") is None
    assert local_socket_address("@") is None
    if sys.platform.startswith("linux"):
        name = local_socket_name("gw-1")
        assert name is not None and name.startswith("@cascade-tokens-gw-1-")
        assert local_socket_name("gw-1") != name  # random: a restarted gateway never meets its old links
        assert local_socket_address("@abc") == "\0abc"
    else:
        assert local_socket_name("gw-1") is None and local_socket_address("@abc") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix socket names are Linux's")
def test_a_gateway_in_the_same_namespace_is_linked_by_its_local_socket() -> None:
    # The advertised TCP port has no listener: the frames can only have come over the Unix socket.
    gw = Gateway(local=f"@cascade-test-{secrets.token_hex(4)}")
    links = TokenLinks("w", enc)
    try:
        links.learn("g", gw.addr, "key", local=gw.local)
        assert links.settle()
        assert (links.connects, links.local_connects, links.failures) == (1, 1, 0)
        assert ids(links.send(step(("g", "a", "length")))) == []
        assert [e.request_id for e in decode_events(gw.wait(1)[0], "w").events] == ["a"]
        assert links.summary()["local_connects"] == 1
    finally:
        links.close()
        gw.close()


def test_a_local_name_nobody_listens_on_falls_back_to_tcp(gateway: Gateway) -> None:
    # Another host or another network namespace (a container, a pod): refused at once, then TCP.
    links = TokenLinks("w", enc)
    try:
        links.learn("g", gateway.addr, "key", local=f"@cascade-nobody-{secrets.token_hex(4)}")
        assert links.settle()
        assert (links.connects, links.local_connects, links.failures) == (1, 0, 0)
        assert ids(links.send(step(("g", "a", "length")))) == []
        assert [e.request_id for e in decode_events(gateway.wait(1)[0], "w").events] == ["a"]
    finally:
        links.close()


class _Transport:
    """What RequestLinks uses of an asyncio transport."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing


def test_request_frames_and_the_hello_of_a_request_link_round_trip() -> None:
    r = FrameReader()
    r.feed(hello("k", "w1", requests=True))
    assert r.hello_done and r.requests and r.worker_id == "w1"
    got = r.feed(id_frame(KIND_REPLY, 7, b"reply") + frame(b"x", KIND_EVENTS))
    # A request link carries replies only: an events frame on it is an error after the reply.
    assert [split_id(p) for p in got] == [(7, b"reply")] and r.error is not None
    w = FrameReader(hello=False, kinds=frozenset({KIND_REQUEST}))
    assert [split_id(p) for p in w.feed(id_frame(KIND_REQUEST, 0xFFFFFFFF, b"batch"))] == [(0xFFFFFFFF, b"batch")]
    with pytest.raises(TokenLinkError):
        split_id(b"abc")


def test_request_links_pair_replies_and_fail_what_a_lost_link_held() -> None:
    async def run() -> None:
        links = RequestLinks()
        t, other = _Transport(), _Transport()
        assert links.send("w1", b"m") is None  # no link: the caller goes by NATS
        links.add("w1", t)  # type: ignore[arg-type]
        links.add("w2", other)  # type: ignore[arg-type]
        a, b, c = links.send("w1", b"a"), links.send("w1", b"b"), links.send("w2", b"c")
        assert a is not None and b is not None and c is not None
        r = FrameReader(hello=False, kinds=frozenset({KIND_REQUEST}))
        ids_a, ids_b = (split_id(p)[0] for p in r.feed(b"".join(t.written)))
        links.answer(other, ids_a, b"wrong link")  # type: ignore[arg-type]
        assert not a.done()
        links.answer(t, ids_b, b"B")  # type: ignore[arg-type]
        assert b.result() == b"B" and not a.done()
        a.cancel()  # its caller stopped waiting (a timeout)
        links.answer(t, ids_a, b"late")  # type: ignore[arg-type]
        assert a.cancelled()  # given up on: the late reply is ignored
        links.lost(other)  # type: ignore[arg-type]
        with pytest.raises(RequestLinkLost):
            c.result()
        assert not links.has("w2") and links.has("w1") and links.workers() == ["w1"]
        await asyncio.sleep(0)  # the futures' done callbacks run
        assert not links._pending  # answered, given up on or lost: none is kept
        t.closing = True
        assert links.send("w1", b"d") is None and (links.sent, links.answered) == (3, 1)

    asyncio.run(run())


def test_the_workers_end_answers_a_bad_request_with_an_error_reply() -> None:
    seen: list[GenerateBatch] = []

    def handle(batch: GenerateBatch) -> BatchReply:
        seen.append(batch)
        if batch.gateway_id == "boom":
            raise RemoteError("draining", "worker w is draining")
        return BatchReply(accepted=[r.request_id for r in batch.requests], rejected=[])

    links = WorkerRequestLinks("w", handle)
    ok = decode(links.answer(encode(GenerateBatch("g", []))), BatchReply)
    assert ok == BatchReply(accepted=[], rejected=[])
    err = decode(links.answer(b"not json"), ErrorReply)
    assert err.code == "bad_message"
    err = decode(links.answer(encode(GenerateBatch("boom", []))), ErrorReply)
    assert (err.code, len(seen), links.requests) == ("draining", 2, 3)
