"""The engine thread's direct writer (services/worker/directpub.py): `PUB` commands written onto a
nats-py connection's socket while its loop is not running, and every case where it must leave the
publish to nats-py instead (nothing sent, order kept)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.protocol.command import pub_cmd

from cascade.cli.embedded_nats import EmbeddedNats
from cascade.natsutil import connect
from services.worker.directpub import DirectWriter, pub_command, publish_all, turn
from tests.waiting import wait_until

T = TypeVar("T")


def test_a_pub_command_is_what_nats_py_would_send() -> None:
    assert pub_command(b"cascade.tokens.gw", b'{"a":1}') == b'PUB cascade.tokens.gw 7\r\n{"a":1}\r\n'
    assert pub_command(b"s", b"") == b"PUB s 0\r\n\r\n"
    # nats-py puts an empty reply between subject and size: the same command to the server.
    assert pub_cmd("s", "", b"xy").split() == pub_command(b"s", b"xy").split()


def test_without_nats_py_s_tcp_transport_every_write_falls_back() -> None:
    # A client that never connected has no transport: what the writer finds too when nats-py's
    # private attributes change shape.
    w = DirectWriter(NATS())
    assert w.transport() is None
    assert w.write([("s", b"x")]) is False
    assert (w.written, w.fell_back) == (0, 1)


class Publisher:
    """A nats-py connection owned by a thread of its own whose loop runs only when asked (the
    engine thread's arrangement): `do(fn)` runs `fn` on that thread, loop stopped."""

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.jobs: list[tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]] = []
        self.ready = threading.Event()
        self.stopping = False
        self.nc: NATS | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping:
            self.ready.wait()
            self.ready.clear()
            while self.jobs:
                fn, fut, caller = self.jobs.pop(0)
                try:
                    value = fn()
                except BaseException as e:
                    caller.call_soon_threadsafe(_settle, fut, None, e)
                else:
                    caller.call_soon_threadsafe(_settle, fut, value, None)
        self.loop.close()

    async def do(self, fn: Callable[[], T]) -> T:
        caller = asyncio.get_running_loop()
        fut: asyncio.Future[T] = caller.create_future()
        self.jobs.append((fn, fut, caller))
        self.ready.set()
        return await asyncio.wait_for(fut, 30)

    def run(self, aw: Any) -> Any:
        return self.loop.run_until_complete(aw)

    async def start(self) -> DirectWriter:
        self.thread.start()
        self.nc = await self.do(lambda: self.run(nats.connect(self.url, **self.options)))
        return DirectWriter(self.nc)

    async def stop(self) -> None:
        nc = self.nc
        if nc is not None:
            try:
                await self.do(lambda: self.run(nc.close()))
            except Exception:
                pass
        self.stopping = True
        self.ready.set()
        await asyncio.to_thread(self.thread.join, 10)


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if not fut.done():
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)


async def test_writes_reach_a_subscriber_without_the_publishers_loop_running(nats_url: str) -> None:
    sub = await connect(nats_url, "test-directpub-sub")
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    pub = Publisher(nats_url)
    try:
        # One subscription for both subjects: nats-py orders messages within a subscription only.
        await sub.subscribe("dp.*", cb=on_msg)
        await sub.flush()
        w = await pub.start()
        loop_runs = 0

        def write(k: int) -> bool:
            nonlocal loop_runs
            loop_runs += pub.loop.is_running()
            return w.write([("dp.a", b"a%d" % k), ("dp.b", b"b%d" % k)])

        for k in range(5):
            assert await pub.do(functools.partial(write, k))
        # The publisher's loop has not run since the writes: the socket send carried them.
        await wait_until(lambda: len(got) == 10, what="ten messages")
        assert loop_runs == 0
        assert got == [x for k in range(5) for x in (b"a%d" % k, b"b%d" % k)]
        assert (w.written, w.fell_back) == (5, 0)
        assert pub.nc is not None and pub.nc.stats["out_msgs"] == 10
        # A subject the protocol cannot carry is left to nats-py (which refuses it).
        assert await pub.do(lambda: w.write([("dp.a", b"x"), ("bad subject", b"y")])) is False
        assert w.fell_back == 1
    finally:
        await pub.stop()
        await sub.close()


async def test_while_the_broker_is_away_writes_fall_back_and_nats_py_keeps_them(broker: EmbeddedNats) -> None:
    pub = Publisher(broker.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    sub: NATS | None = None
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    def turns_until(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {what}")
            pub.run(asyncio.sleep(0.02))

    try:
        w = await pub.start()
        nc = pub.nc
        assert nc is not None
        broker.stop()
        await pub.do(lambda: turns_until(lambda: not nc.is_connected, "the publisher notices"))
        assert await pub.do(lambda: w.write([("dp.r", b"1")])) is False
        # The caller's fallback: nats-py buffers it for the reconnect.
        await pub.do(lambda: pub.run(publish_all(nc, [("dp.r", b"1")])))
        assert nc.pending_data_size > 0
        assert w.wants_turn(time.monotonic())
        broker.start()
        sub = await connect(broker.url, "test-directpub-sub")
        await sub.subscribe("dp.r", cb=on_msg)
        await sub.flush()
        await pub.do(lambda: turns_until(lambda: nc.is_connected and not nc.pending_data_size, "reconnected"))
        assert await pub.do(lambda: w.write([("dp.r", b"2")]))
        await wait_until(lambda: b"2" in got, what="the direct write after the reconnect")
        # What nats-py kept went out first (if the subscriber was there in time to see it).
        assert got in ([b"1", b"2"], [b"2"])
    finally:
        await pub.stop()
        if sub is not None:
            await sub.close()


async def test_a_socket_that_takes_no_more_makes_writes_fall_back_in_order() -> None:
    """A server that stops reading: the writer sends until the kernel's buffers are full, then the
    transport buffers, and from then on every write is left to nats-py (queued behind the
    transport's bytes); once the server reads again, every command arrives, whole and in order."""
    reading = asyncio.Event()
    received = bytearray()
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"x","version":"2.10.0","proto":1,"max_payload":1048576}\r\n')
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line or line.startswith(b"PING"):
                break
        writer.write(b"PONG\r\n")
        await writer.drain()
        await reading.wait()
        while chunk := await reader.read(1 << 20):
            received.extend(chunk)
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pub = Publisher(f"nats://127.0.0.1:{port}", allow_reconnect=False, ping_interval=3600)
    big = b"x" * 1_000_000
    try:
        w = await pub.start()
        t = w.transport()
        assert t is not None

        def fill() -> int:
            for k in range(200):
                if not w.write([("dp.f", b"%d:" % k + big)]):
                    return k
            raise AssertionError("the socket took 200 MB without buffering")

        sent = await pub.do(fill)
        assert sent > 0 and t.get_write_buffer_size() > 0
        assert w.wants_turn(time.monotonic())
        nc = pub.nc
        assert nc is not None
        # The fallback, through nats-py: queued behind what the transport holds.
        await pub.do(lambda: pub.run(publish_all(nc, [("dp.f", b"last")])))
        reading.set()
        await pub.do(lambda: pub.run(turn()))

        async def drain_and_close() -> None:
            deadline = time.monotonic() + 30
            while t.get_write_buffer_size() or nc.pending_data_size:
                if time.monotonic() > deadline:
                    raise AssertionError("bytes still buffered")
                await asyncio.sleep(0.01)
            await nc.close()

        await pub.do(lambda: pub.run(drain_and_close()))
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await pub.stop()
        server.close()
        await server.wait_closed()

    data = bytes(received)
    start = data.index(b"PUB ")
    want = b"".join(pub_command(b"dp.f", b"%d:" % k + big) for k in range(sent)) + pub_cmd("dp.f", "", b"last")
    assert data[start : start + len(want)] == want
