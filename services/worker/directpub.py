"""Token events written straight onto the engine thread's NATS socket, without an event-loop turn.

The engine thread publishes each step's token events on a nats-py connection of its own
(runner.py). Through nats-py, a publish is a loop turn: `run_until_complete` of the publish, the
client's flusher task woken, `asyncio.sleep(0)` so that it writes: measured right after a step,
0.37 ms wall and 250 µs of CPU, most of it asyncio's machinery run cold, where a bare socket
send of the same bytes takes 13 µs. `DirectWriter.write` sends the `PUB` commands itself, with
the loop not running, on the asyncio transport nats-py reads and writes through: a selector
transport whose buffer is empty sends at once, in the caller's thread.

It does so only when that cannot reorder or lose anything nats-py would have kept, and says so
(returns False) otherwise, for the caller to publish through nats-py as before:

- the connection is connected (not connecting, reconnecting, draining or closed): nats-py keeps
  publishes made while the broker is away and sends them after the reconnect;
- nats-py has nothing of its own pending (a publish made through it, a PONG): those go first;
- the transport is nats-py's plain TCP one (not TLS, not a websocket), not closing, and has
  nothing buffered: bytes it could not send yet go out when the loop runs, and anything written
  after them through nats-py queues behind them anyway, but the caller then runs the loop;
- the subject is a plain NATS subject, and the payload within the server's limit.

It relies on two private attributes of nats-py 2.x (`Client._transport`, a `TcpTransport`, and
its `_io_writer`); without them, `transport()` finds nothing and every write falls back. The loop
still has to run now and then (the server's PINGs, a reconnect, bytes the kernel did not take at
once): `wants_turn()` says when, and the engine thread runs it (runner.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.transport import TcpTransport

# How long the engine thread may go without running its connection's loop while it steps: the
# server's PINGs wait that long for their PONG (it allows minutes), a broken connection is
# noticed that late (its events buffer in nats-py meanwhile, as with any reconnect).
TURN_S = 0.5

# The same while the engine thread waits for work on a quiet connection (runner.py `_sleep`).
IDLE_TURN_S = 0.5

_BAD_SUBJECT = frozenset(b" \t\r\n")


def pub_command(subject: bytes, payload: bytes) -> bytes:
    """One NATS `PUB` (no reply subject, no headers): what nats-py's `publish` would queue."""
    return b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload)


class DirectWriter:
    """Publishes on `nc` from the thread that owns its event loop while that loop is not running."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.last_turn = time.monotonic()
        self.written = 0  # writes that went straight onto the transport
        self.fell_back = 0  # writes refused, for the caller to publish through nats-py
        self._subjects: dict[str, bytes | None] = {}

    def transport(self) -> asyncio.WriteTransport | None:
        """The asyncio transport under nats-py's connection, when it is plain TCP; else None."""
        tp = getattr(self.nc, "_transport", None)
        if not isinstance(tp, TcpTransport):
            return None
        writer = getattr(tp, "_io_writer", None)
        t = getattr(writer, "transport", None)
        if not isinstance(t, asyncio.WriteTransport) or t.get_extra_info("sslcontext") is not None:
            return None
        return t

    def _subject(self, subject: str) -> bytes | None:
        b = self._subjects.get(subject, b"")
        if b == b"":
            raw = subject.encode()
            b = raw if raw and not (_BAD_SUBJECT & set(raw)) else None
            if len(self._subjects) < 1024:  # one per gateway: a handful
                self._subjects[subject] = b
        return b

    def write(self, messages: list[tuple[str, bytes]]) -> bool:
        """Send `messages` (subject, payload) as one write; False, having sent nothing, when the
        caller must publish them through nats-py instead (see the module's docstring)."""
        nc = self.nc
        t = self.transport()
        if (
            t is None
            or not nc.is_connected
            or nc.is_draining
            or nc.pending_data_size
            or t.is_closing()
            or t.get_write_buffer_size()
        ):
            self.fell_back += 1
            return False
        cmds = []
        size = 0
        limit = nc.max_payload
        for subject, payload in messages:
            subj = self._subject(subject)
            if subj is None or len(payload) > limit:
                self.fell_back += 1
                return False
            cmds.append(pub_command(subj, payload))
            size += len(payload)
        t.write(b"".join(cmds))
        stats = getattr(nc, "stats", None)
        if isinstance(stats, dict):
            stats["out_msgs"] = stats.get("out_msgs", 0) + len(cmds)
            stats["out_bytes"] = stats.get("out_bytes", 0) + size
        self.written += 1
        return True

    def quiet(self) -> bool:
        """Whether the loop has nothing to do but wait for the server's next PING: connected,
        nothing pending in nats-py or buffered in the transport (a reconnect under way, a drain or
        bytes to send need the loop to run, so an idle engine thread runs it until woken)."""
        nc = self.nc
        if not nc.is_connected or nc.is_draining or nc.pending_data_size:
            return False
        t = self.transport()
        return t is not None and not t.is_closing() and not t.get_write_buffer_size()

    def wants_turn(self, now: float) -> bool:
        """Whether the loop should run now: bytes wait in the transport or in nats-py, or it has
        not run for `TURN_S`."""
        if now - self.last_turn >= TURN_S:
            return True
        if self.nc.pending_data_size:
            return True
        t = self.transport()
        return t is not None and t.get_write_buffer_size() > 0


async def publish_all(nc: Any, messages: list[tuple[str, bytes]]) -> None:
    """The same messages through nats-py (the fallback), written before this returns: the publish
    wakes the client's flusher task, and one turn of the loop lets it write (else the events would
    wait for the loop's next run)."""
    for subject, payload in messages:
        await nc.publish(subject, payload)
    await asyncio.sleep(0)


async def turn(n: int = 3) -> None:
    """A few turns of the loop: enough for a read to reach nats-py's read loop, its answer (a
    PONG) to be queued and the flusher to write it."""
    for _ in range(n):
        await asyncio.sleep(0)
