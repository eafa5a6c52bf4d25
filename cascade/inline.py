"""A NATS subscription whose messages are handled in the connection's read loop, as they are
parsed, instead of by a task of the subscription's own.

nats-py hands every message of a callback subscription to that subscription's task through an
`asyncio.Queue`: one more event-loop turn per message (a future, a task step) between the socket
and the handler. A handler that is a plain function and never awaits gains nothing from that
hop: the gateway's token stream (decode, match, put on the request's queue; per token, at one
stream, the hop was a third of the gateway's loop turns, docs/architecture.md "Counted, per decode step"),
and the worker's admission of a `GenerateBatch` (checks, `engine.submit`, the engine thread's
wake: a loop turn earlier on every request's path to its first step; `service.Runtime.serve_now`).

This rests on how nats-py delivers to a subscription (its read loop calls `put_nowait` on the
subscription's `_pending_queue` and counts `_pending_size`), checked when subscribing: on a
nats-py without them, the subscription falls back to an ordinary callback (one more turn, the
same messages).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


class _HandleNow(asyncio.Queue[Msg]):
    """Stands in for a subscription's pending queue: each message is handled as it is put, so the
    queue itself stays empty (its `join`, for a drain, returns at once)."""

    def __init__(self, sub: Subscription, handle: Callable[[Msg], None], log: Any) -> None:
        super().__init__()
        self._sub = sub
        self._handle = handle
        self._log = log

    def put_nowait(self, item: Msg) -> None:
        # nats-py counted these bytes as pending for the slow-consumer limit; they are handled now.
        self._sub._pending_size -= len(item.data)
        try:
            self._handle(item)
        except Exception:
            # Never into nats-py's read loop: an exception there would end the connection's reading.
            self._log.exception("handler_failed", subject=item.subject)


async def subscribe_inline(nc: NATS, subject: str, handle: Callable[[Msg], None], log: Any) -> Subscription:
    """Subscribe `handle` (a plain function: it runs inside the read loop, so it must not block)
    to `subject`, handled in the read loop's turn when nats-py allows it."""
    sub = await nc.subscribe(subject)
    if not isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue) or not hasattr(sub, "_pending_size"):
        # Not the nats-py this was written against: an ordinary callback subscription instead.
        await sub.unsubscribe()

        async def cb(msg: Msg) -> None:
            handle(msg)

        return await nc.subscribe(subject, cb=cb)
    early, sub._pending_queue = sub._pending_queue, _HandleNow(sub, handle, log)
    # Whatever arrived while the subscription was being made (the SUB's flush may yield).
    while not early.empty():
        sub._pending_queue.put_nowait(early.get_nowait())
    return sub


def handled_inline(sub: Subscription) -> bool:
    """True when `sub`'s messages are handled in the read loop (for tests and logs)."""
    return isinstance(getattr(sub, "_pending_queue", None), _HandleNow)
