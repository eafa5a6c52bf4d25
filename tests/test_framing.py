from __future__ import annotations

import io
import os
import threading
import time
import zlib

import pytest

from cascade.framing import (
    Channel,
    ChecksumMismatch,
    ConnHeader,
    Forwarder,
    FramingError,
    RateLimiter,
    TcpTransport,
    TeeRelay,
    TensorMeta,
    TransferAborted,
    TruncatedStream,
    crc32,
    encode_abort,
    encode_status,
    iter_unit_frames,
    read_conn_header,
    read_crc,
    read_status,
    read_unit_header,
    recv_exact_into,
    recv_unit_body,
    verify_crc,
)


def _units() -> dict[int, list[tuple[TensorMeta, memoryview]]]:
    # Odd sizes on purpose: the receiver's aligned layout must not leak into the wire or the CRC.
    out = {}
    for u, sizes in {0: [4 * 333], 1: [4 * 7, 4 * 1000, 4 * 5], 2: [0, 4 * 64]}.items():
        out[u] = [
            (TensorMeta(f"u{u}.t{i}", "F32", (n // 4,), n), memoryview(os.urandom(n))) for i, n in enumerate(sizes)
        ]
    return out


def _stream(units: dict[int, list[tuple[TensorMeta, memoryview]]], chunk: int = 100) -> bytes:
    parts: list[bytes] = [ConnHeader("tx-1", "secret", "m", tuple(units)).encode()]
    for u, tensors in units.items():
        parts += [bytes(p) for p in iter_unit_frames(u, tensors, chunk=chunk)]
    return b"".join(parts)


def _read_all(data: bytes) -> dict[int, dict[str, bytes]]:
    r = io.BytesIO(data).readinto
    hdr = read_conn_header(r)
    got: dict[int, dict[str, bytes]] = {}
    for expect in hdr.units:
        uh, raw = read_unit_header(r, expect)
        offsets, total = uh.layout()
        buf = memoryview(bytearray(total))
        seen: list[memoryview] = []
        crc = recv_unit_body(r, uh, raw, buf, on_chunk=seen.append, chunk=64)
        verify_crc(uh, crc, read_crc(r)[0])
        assert sum(len(p) for p in seen) == uh.nbytes
        got[uh.unit] = {t.name: bytes(buf[o : o + t.nbytes]) for t, o in zip(uh.tensors, offsets, strict=True)}
    return got


def test_round_trip() -> None:
    units = _units()
    got = _read_all(_stream(units))
    assert got == {u: {m.name: bytes(v) for m, v in ts} for u, ts in units.items()}
    hdr = read_conn_header(io.BytesIO(_stream(units)).readinto)
    assert hdr == ConnHeader("tx-1", "secret", "m", (0, 1, 2))


def test_layout_aligned() -> None:
    uh, _ = read_unit_header(io.BytesIO(next(iter(iter_unit_frames(1, _units()[1])))).readinto)
    offsets, total = uh.layout()
    assert all(o % 64 == 0 for o in offsets)
    assert total >= uh.nbytes


def test_corruption_detected() -> None:
    clean = _stream(_units())
    data = bytearray(clean)
    data[-100] ^= 0x01  # inside the last unit's tensor bytes
    with pytest.raises(ChecksumMismatch, match="unit 2"):
        _read_all(bytes(data))
    # Flip each byte of the last unit's frame header in turn: the header is covered by the CRC, or
    # refused outright when it no longer makes sense; never accepted as a different unit.
    head_start = len(clean) - 4 - 256 - len(next(iter(iter_unit_frames(2, _units()[2]))))
    for i in range(head_start, len(clean) - 4 - 256):
        data = bytearray(clean)
        data[i] ^= 0x10
        with pytest.raises(FramingError):
            _read_all(bytes(data))


def test_truncated_stream_detected() -> None:
    data = _stream(_units())
    for cut in (3, 40, len(data) // 2, len(data) - 2):
        with pytest.raises(TruncatedStream):
            _read_all(data[:cut])


def test_bad_magic_and_abort() -> None:
    with pytest.raises(FramingError, match="magic"):
        read_conn_header(io.BytesIO(b"HTTP/1.1 200 OK\r\n\r\n" + b"\0" * 64).readinto)
    with pytest.raises(TransferAborted, match="source went away"):
        read_unit_header(io.BytesIO(encode_abort("source went away")).readinto)


def test_status() -> None:
    assert read_status(io.BytesIO(encode_status(True)).readinto) == (True, "")
    assert read_status(io.BytesIO(encode_status(False, "bad token")).readinto) == (False, "bad token")


def test_crc_is_zlibs_crc32() -> None:
    # The wire carries zlib's CRC-32; the faster implementation must agree with it byte for byte,
    # whole and when chained over uneven pieces (as a receiver computes it chunk by chunk).
    data = os.urandom((1 << 20) + 12345)
    assert crc32(data) == zlib.crc32(data)
    running = 0
    for start, end in ((0, 1), (1, 4097), (4097, 700_001), (700_001, len(data))):
        running = crc32(memoryview(data)[start:end], running)
    assert running == zlib.crc32(data)
    assert crc32(b"") == 0 and crc32(b"x", 0xFFFFFFFF) == zlib.crc32(b"x", 0xFFFFFFFF)


# --------------------------------------------------------------------------- the kernel relay


def _tcp_pair(transport: TcpTransport) -> tuple[Channel, Channel]:
    """Two connected channels (connecting end, accepting end) over loopback TCP."""
    lst = transport.listen("127.0.0.1", 0)
    try:
        got: list[Channel] = []
        th = threading.Thread(target=lambda: got.append(lst.accept()))
        th.start()
        client = transport.connect(lst.address, 10)
        th.join(10)
        return client, got[0]
    finally:
        lst.close()


def _drain(chan: Channel, into: bytearray) -> None:
    buf = memoryview(bytearray(1 << 16))
    while (n := chan.recv_into(buf)) > 0:
        into += buf[:n]


@pytest.mark.skipif(not TeeRelay.available(), reason="splice/tee are Linux-only")
def test_relay_receives_and_forwards_the_same_bytes() -> None:
    t = TcpTransport()
    (src, up), (down, sink) = _tcp_pair(t), _tcp_pair(t)
    for ch in (src, up, down, sink):
        ch.settimeout(10)
    data = os.urandom(3 * (1 << 20) + 4321)
    lost: list[str] = []
    relay = TeeRelay.between(up, down, lost.append)
    assert relay is not None
    got_down = bytearray()
    sender = threading.Thread(target=src.sendall, args=(data,))
    reader = threading.Thread(target=_drain, args=(sink, got_down))
    sender.start()
    reader.start()
    mine = bytearray(len(data))
    view, pos = memoryview(mine), 0
    try:
        while pos < len(data):  # odd piece sizes: the relay never reads past what it is asked for
            pos += relay.recv_into(view[pos : min(len(data), pos + 700_001)])
        down.shutdown()
        sender.join(10)
        reader.join(10)
    finally:
        relay.close()
        for ch in (src, up, down, sink):
            ch.close()
    assert bytes(mine) == data and bytes(got_down) == data
    assert relay.spliced == len(data) and relay.forwarding and not lost


@pytest.mark.skipif(not TeeRelay.available(), reason="splice/tee are Linux-only")
def test_relay_that_loses_its_downstream_keeps_receiving() -> None:
    t = TcpTransport()
    (src, up), (down, sink) = _tcp_pair(t), _tcp_pair(t)
    for ch in (src, up, down):
        ch.settimeout(10)
    sink.close()  # the next hop is gone before the first byte: forwarding fails, receiving must not
    data = os.urandom(8 * (1 << 20))
    lost: list[str] = []
    relay = TeeRelay.between(up, down, lost.append)
    assert relay is not None
    sender = threading.Thread(target=src.sendall, args=(data,))
    sender.start()
    mine = bytearray(len(data))
    view, pos = memoryview(mine), 0
    try:
        while pos < len(data):
            n = relay.recv_into(view[pos:])
            assert n > 0
            pos += n
        sender.join(10)
    finally:
        relay.close()
        for ch in (src, up, down):
            ch.close()
    assert bytes(mine) == data
    assert len(lost) == 1 and not relay.forwarding and relay.spliced < len(data)


def test_relay_only_between_kernel_sockets() -> None:
    class Memory:
        def recv_into(self, buf: memoryview, /) -> int:
            return 0

        def sendall(self, data: bytes | memoryview, /) -> None:
            pass

        def settimeout(self, seconds: float | None, /) -> None:
            pass

        def shutdown(self) -> None:
            pass

        def close(self) -> None:
            pass

    a, b = _tcp_pair(TcpTransport())
    try:
        assert TeeRelay.between(Memory(), b, print) is None and TeeRelay.between(a, Memory(), print) is None
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- forwarding from user space


class _Recording:
    """A channel that keeps what is sent to it; `fail_after` sends succeed, then it is broken."""

    def __init__(self, fail_after: int | None = None, gate: threading.Event | None = None) -> None:
        self.got: list[bytes] = []
        self._fail_after = fail_after
        self._gate = gate

    def recv_into(self, buf: memoryview, /) -> int:
        return 0

    def sendall(self, data: bytes | memoryview, /) -> None:
        if self._gate is not None:
            self._gate.wait(10)
        if self._fail_after is not None and len(self.got) >= self._fail_after:
            raise BrokenPipeError("peer gone")
        self.got.append(bytes(data))

    def settimeout(self, seconds: float | None, /) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_forwarder_sends_views_in_order_without_copying_them_first() -> None:
    buf = bytearray(os.urandom(10_000))
    view = memoryview(buf)
    gate = threading.Event()  # holds the sending thread until every piece is queued
    chan = _Recording(gate=gate)
    lost: list[str] = []
    fwd = Forwarder(chan, lost.append)
    pieces: list[bytes | memoryview] = [b"head", view[:4000], view[4000:4001], view[4001:], b"crc!"]
    for p in pieces:
        fwd.send(p)
    # Queued as views: a byte changed before the send goes out as changed (the caller's promise
    # is not to change them; this shows nothing was copied on the receiving thread).
    buf[0] ^= 0xFF
    gate.set()
    fwd.drain()
    assert b"".join(chan.got) == b"head" + bytes(buf) + b"crc!"
    fwd.close()
    assert fwd.sent == len(buf) + 8 and not lost and not fwd.lost


def test_forwarder_close_sends_what_is_queued_and_later_sends_are_ignored() -> None:
    gate = threading.Event()
    chan = _Recording(gate=gate)
    fwd = Forwarder(chan, print)
    fwd.send(b"a")
    fwd.send(b"b")
    closer = threading.Thread(target=fwd.close)
    closer.start()
    gate.set()
    closer.join(10)
    fwd.send(b"c")
    assert chan.got == [b"a", b"b"]


def test_forwarder_that_loses_its_channel_says_so_once_and_drops_the_rest() -> None:
    chan = _Recording(fail_after=1)
    lost: list[str] = []
    fwd = Forwarder(chan, lost.append)
    for p in (b"one", b"two", b"three"):
        fwd.send(p)
    fwd.drain()  # returns once lost too: nothing will ever send the rest
    fwd.send(b"four")
    fwd.close()
    assert chan.got == [b"one"] and fwd.lost
    assert len(lost) == 1 and "peer gone" in lost[0]


def test_forwarder_paces_in_chunks_through_the_egress_budget() -> None:
    class Budget(RateLimiter):
        def __init__(self) -> None:
            super().__init__(1e12)
            self.asked: list[tuple[int, float | None, float]] = []

        def acquire(self, n: int, cancel: threading.Event | None = None, ready_at: float | None = None) -> bool:
            self.asked.append((n, ready_at, time.monotonic()))
            return True

    gate = threading.Event()
    chan, budget = _Recording(gate=gate), Budget()
    fwd = Forwarder(chan, print, egress=budget, pace_chunk=1000)
    before = time.monotonic()
    fwd.send(bytes(2500))
    handed = time.monotonic()
    fwd.send(bytes(10))
    gate.set()
    fwd.close()
    assert [n for n, _, _ in budget.asked] == [1000, 1000, 500, 10]
    assert [len(g) for g in chan.got] == [1000, 1000, 500, 10]
    # Every part of a piece says when the piece was handed over (not when the thread got to it),
    # so an emulated NIC can put it on the line from then.
    first = {r for _, r, _ in budget.asked[:3]}
    assert len(first) == 1
    (t_first,) = first
    assert t_first is not None and before <= t_first <= handed
    assert all(r is not None and r <= t for _, r, t in budget.asked)
    assert budget.asked[3][1] is not None and budget.asked[3][1] >= handed


class _FakeClock:
    """Time that moves only when the limiter sleeps or the test says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _late_sender(queue: bool) -> tuple[RateLimiter, list[float]]:
    """Ten 100-byte pieces over a 1000 B/s line, all ready at t=0, whose sending thread only gets
    to them at t=0.5 (descheduled); returns the limiter and when each piece was let through."""
    clock = _FakeClock()
    lim = RateLimiter(1000.0, burst=100, queue=queue, clock=clock, sleep=clock.sleep)
    clock.t = 0.5
    granted = []
    for _ in range(10):
        assert lim.acquire(100, ready_at=0.0)
        granted.append(clock.t)
    return lim, granted


def test_an_emulated_nic_keeps_sending_what_was_queued_while_its_thread_was_late() -> None:
    lim, granted = _late_sender(queue=True)
    # A NIC with a transmit queue would have sent pieces 0-4 by t=0.5: they (and piece 5, the one
    # piece of run-ahead) go at once, the rest at the line's pace; all out by 0.9 (+ 0.1 on the line).
    assert granted == pytest.approx([0.5] * 6 + [0.6, 0.7, 0.8, 0.9])
    # Never faster than the line from when the bytes were ready, less one piece of run-ahead.
    assert all(t >= 0.1 * k - 1e-9 for k, t in enumerate(granted))
    assert lim.stalled_s == pytest.approx(0.5)


def test_a_plain_bucket_loses_the_time_its_thread_was_late() -> None:
    lim, granted = _late_sender(queue=False)
    # Paced from when the thread got there: the half second it was late is lost to the line.
    assert granted == pytest.approx([0.5 + 0.1 * k for k in range(10)])
    assert lim.stalled_s == pytest.approx(0.5)


def test_a_queue_limiter_paces_fresh_bytes_like_a_bucket() -> None:
    """Bytes that arrive at the line's pace (a forwarder's case on time) or with no ready time go
    no faster through a queue limiter than through a plain one: at most one burst ahead."""
    for ready in (True, False):
        out = []
        for queue in (True, False):
            clock = _FakeClock()
            lim = RateLimiter(1000.0, burst=100, queue=queue, clock=clock, sleep=clock.sleep)
            granted = []
            for _ in range(5):
                assert lim.acquire(100, ready_at=clock.t if ready else None)
                granted.append(clock.t)
            out.append(granted)
            assert lim.stalled_s == 0.0
        assert out[0] == pytest.approx(out[1])
        assert out[0] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_batched_reads_never_wait_for_bytes_the_frame_does_not_need() -> None:
    """With batch_reads on, a read of a small frame returns as soon as that frame is in, while
    the peer keeps the connection open (a wait for a whole chunk would time out here), and a
    stream of mixed frame sizes arrives byte for byte."""
    a, b = _tcp_pair(TcpTransport())
    try:
        a.settimeout(10)
        b.settimeout(10)
        b.batch_reads(1 << 20)  # type: ignore[attr-defined]
        header, body, trailer = os.urandom(20), os.urandom(3 * (1 << 20) + 17), os.urandom(4)
        a.sendall(header)
        got = bytearray(20)
        recv_exact_into(b.recv_into, memoryview(got))
        assert bytes(got) == header

        def send_rest() -> None:
            a.sendall(body)
            a.sendall(trailer)

        sender = threading.Thread(target=send_rest)
        sender.start()
        mine = bytearray(len(body))
        view, pos = memoryview(mine), 0
        while pos < len(body):  # reads of at most one chunk, as recv_unit_body makes them
            n = b.recv_into(view[pos : min(len(body), pos + (1 << 20))])
            assert n > 0
            pos += n
        tail = bytearray(4)
        recv_exact_into(b.recv_into, memoryview(tail))
        sender.join(10)
        assert bytes(mine) == body and bytes(tail) == trailer
        b.batch_reads(0)  # type: ignore[attr-defined]
        a.sendall(b"x")
        one = bytearray(64)
        assert b.recv_into(memoryview(one)) == 1
    finally:
        a.close()
        b.close()
