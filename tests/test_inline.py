"""A subscription handled in nats-py's read loop (cascade/inline.py), against the real
nats-server fixture: every message reaches the handler, in order; one the handler fails on does
not stop the ones after it (nor the connection); the slow-consumer accounting stays at zero."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.inline import handled_inline, subscribe_inline

pytestmark = pytest.mark.e2e


class Log:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def exception(self, event: str, **kw: object) -> None:
        self.errors.append(event)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    c = await nats.connect(nats_url)
    try:
        yield c
    finally:
        await c.close()


async def test_messages_are_handled_in_the_read_loop_in_order(nc: NATS, prefix: str) -> None:
    got: list[bytes] = []
    tasks: list[asyncio.Task[object] | None] = []
    done = asyncio.Event()

    def handle(msg: Msg) -> None:
        got.append(msg.data)
        tasks.append(asyncio.current_task())
        if len(got) == 50:
            done.set()

    sub = await subscribe_inline(nc, f"{prefix}.tokens", handle, Log())
    assert handled_inline(sub)
    for i in range(50):
        await nc.publish(f"{prefix}.tokens", str(i).encode())
    await asyncio.wait_for(done.wait(), 10.0)
    assert got == [str(i).encode() for i in range(50)]
    # Every message in the connection's reading task: no task of the subscription's own.
    assert set(tasks) == {nc._reading_task}
    assert sub._pending_size == 0 and sub.pending_msgs == 0
    await sub.unsubscribe()


async def test_a_failing_message_does_not_stop_the_next(nc: NATS, prefix: str) -> None:
    got: list[bytes] = []
    done = asyncio.Event()
    log = Log()

    def handle(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("cannot handle this one")
        got.append(msg.data)
        if msg.data == b"last":
            done.set()

    sub = await subscribe_inline(nc, f"{prefix}.tokens", handle, log)
    for data in (b"first", b"bad", b"last"):
        await nc.publish(f"{prefix}.tokens", data)
    await asyncio.wait_for(done.wait(), 10.0)
    assert got == [b"first", b"last"]
    assert log.errors == ["handler_failed"]
    assert nc.is_connected
    # The connection still reads: a request/reply round trip after the failure.

    async def respond(m: Msg) -> None:
        await m.respond(m.data)

    echo = await nc.subscribe(f"{prefix}.echo", cb=respond)
    assert (await nc.request(f"{prefix}.echo", b"ping", timeout=10.0)).data == b"ping"
    await echo.unsubscribe()
    await sub.unsubscribe()


async def test_serve_now_answers_from_the_read_loop_and_answers_failures_as_errors(nc: NATS, prefix: str) -> None:
    # The worker's admission runs this way: a typed message in, handled in the connection's
    # reading task, the reply out; a bad message and a failing handler are answered, never raised.
    import contextlib

    import structlog

    from cascade.messages import Cancel, ErrorReply, Ok, decode, encode
    from cascade.natsutil import TaskSet
    from cascade.service import Runtime
    from cascade.subjects import Subjects

    seen: list[tuple[list[str], asyncio.Task[object] | None]] = []

    def on_cancel(msg: Cancel) -> Ok:
        seen.append((msg.request_ids, asyncio.current_task()))
        if msg.request_ids == ["boom"]:
            raise RuntimeError("cannot")
        return Ok()

    tasks = TaskSet()
    rt = Runtime(nc, Subjects(prefix), tasks, contextlib.AsyncExitStack(), structlog.get_logger())
    sub = await rt.serve_now(f"{prefix}.admit", on_cancel)
    assert handled_inline(sub)
    reply = await nc.request(f"{prefix}.admit", encode(Cancel(["a"])), timeout=10.0)
    assert isinstance(decode(reply.data), Ok)
    assert seen == [(["a"], nc._reading_task)]
    bad: object = decode((await nc.request(f"{prefix}.admit", b"{not json", timeout=10.0)).data)
    assert isinstance(bad, ErrorReply) and bad.code == "bad_message"
    failed: object = decode((await nc.request(f"{prefix}.admit", encode(Cancel(["boom"])), timeout=10.0)).data)
    assert isinstance(failed, ErrorReply) and failed.code == "internal" and "cannot" in failed.message
    assert nc.is_connected and not tasks.failed.is_set()
    await sub.unsubscribe()
