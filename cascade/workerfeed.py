"""Feeds a `WorkerTable` from NATS, the same way in every service: subscribes to heartbeats and
readiness events, requests snapshots when the table asks (with a timeout), reaps workers that
stopped heart-beating, and tells its owner that the picture changed or a worker died.

    feed = WorkerFeed(table, fetch_snapshot=nats_snapshot_fetcher(nc, subjects, me, 2.0),
                      on_change=..., on_dead=...)
    await feed.subscribe(nc, subjects); tasks.spawn(feed.run_reaper(), "reaper")

The inputs are plain methods too (`heartbeat`, `layer_ready`, `reap`), so tests drive the feed
with messages and a fake clock, no broker needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cascade import natsutil
from cascade.messages import (
    Heartbeat,
    LayerReady,
    MessageError,
    RemoteError,
    SnapshotRequest,
    WorkerGone,
    WorkerSnapshot,
    decode,
)
from cascade.subjects import Subjects
from cascade.workers import WorkerTable


def _nothing(*_: object) -> None:
    return None


class WorkerFeed:
    def __init__(
        self,
        table: WorkerTable,
        *,
        fetch_snapshot: Callable[[str], Awaitable[WorkerSnapshot]],
        on_change: Callable[[], None] = _nothing,
        on_dead: Callable[[str], None] = _nothing,
        on_heartbeat: Callable[[Heartbeat], None] = _nothing,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        """`on_heartbeat` sees every heartbeat before the table does (the gateway notes its own
        in-flight count at that moment); `on_change` follows any input that may change a view."""
        self.table = table
        self._fetch_snapshot = fetch_snapshot
        self._on_change = on_change
        self._on_dead = on_dead
        self._on_heartbeat = on_heartbeat
        self._clock = clock
        self._log = logger or structlog.get_logger()
        self._fetches: set[asyncio.Task[None]] = set()
        self._nc: NATS | None = None  # the connection it listens on, once subscribed

    # ---- inputs (sync: callable from tests and NATS callbacks alike) -------
    def heartbeat(self, hb: Heartbeat) -> None:
        old_pid = self.table.pid(hb.worker_id)
        if old_pid and hb.pid and old_pid != hb.pid:
            # Restarted under the same id before it was reaped: the old process's work is gone.
            self._drop(hb.worker_id, f"restarted (pid {old_pid} -> {hb.pid})")
        new = hb.worker_id not in self.table
        self._on_heartbeat(hb)
        if self.table.on_heartbeat(hb, self._clock()):
            self._start_fetch(hb.worker_id)
        if new:
            self._log.info("worker_seen", worker=hb.worker_id, state=hb.state, model=hb.model)
        self._on_change()

    def layer_ready(self, ev: LayerReady) -> None:
        if self.table.on_layer_ready(ev, self._clock()):
            self._start_fetch(ev.worker_id)
        self._on_change()

    def gone(self, ev: WorkerGone) -> None:
        """Its supervisor saw the process exit; ignored when the table knows another incarnation."""
        pid = self.table.pid(ev.worker_id)
        if ev.worker_id not in self.table or (pid and ev.pid and pid != ev.pid):
            return
        self._drop(ev.worker_id, ev.reason or "process exited")

    def _drop(self, worker_id: str, why: str) -> None:
        self.table.forget(worker_id)
        self._log.warning("worker_dead", worker=worker_id, reason=why)
        self._on_dead(worker_id)
        self._on_change()

    def reap(self) -> list[str]:
        if self._nc is not None and not self._nc.is_connected:
            # Cut off from the broker: we hear nobody, which says nothing about them.
            self.table.excuse(self._clock())
            return []
        dead = self.table.expire(self._clock())
        for w in dead:
            self._log.warning("worker_dead", worker=w, silent_for_s=round(self.table.dead_after_s, 3))
            self._on_dead(w)
        if dead:
            self._on_change()
        return dead

    async def run_reaper(self) -> None:
        # Checking at half the interval bounds detection at 3.5 intervals after the last beat.
        while True:
            await asyncio.sleep(self.table.heartbeat_s / 2)  # a periodic timer, not synchronisation
            self.reap()

    async def settle(self) -> None:
        """Wait for the snapshot requests in flight (tests, shutdown)."""
        while self._fetches:
            await asyncio.gather(*list(self._fetches), return_exceptions=True)

    async def close(self) -> None:
        for t in list(self._fetches):
            t.cancel()
        await asyncio.gather(*list(self._fetches), return_exceptions=True)

    # ---- snapshots ---------------------------------------------------------
    def _start_fetch(self, worker_id: str) -> None:
        task = asyncio.ensure_future(self._fetch(worker_id))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch(self, worker_id: str) -> None:
        try:
            snap = await self._fetch_snapshot(worker_id)
        except asyncio.CancelledError:
            self.table.on_snapshot_failed(worker_id)
            raise
        except (natsutil.RequestTimeout, RemoteError, MessageError, ConnectionError) as e:
            self._log.warning("snapshot_failed", worker=worker_id, error=str(e))
            self.table.on_snapshot_failed(worker_id)
            return
        if snap.worker_id != worker_id:
            self._log.warning("snapshot_mismatch", worker=worker_id, got=snap.worker_id)
            self.table.on_snapshot_failed(worker_id)
            return
        self._log.debug("snapshot", worker=worker_id, seq=snap.seq, units=len(snap.ready_units))
        if self.table.on_snapshot(snap):
            self._start_fetch(worker_id)
        self._on_change()

    # ---- NATS --------------------------------------------------------------
    async def subscribe(self, nc: NATS, subjects: Subjects) -> list[Subscription]:
        self._nc = nc
        return [
            await nc.subscribe(subjects.heartbeat_all(), cb=self._on_heartbeat_msg),
            await nc.subscribe(subjects.ready_all(), cb=self._on_ready_msg),
            await nc.subscribe(subjects.gone_all(), cb=self._on_gone_msg),
        ]

    async def _on_gone_msg(self, msg: Msg) -> None:
        try:
            ev = decode(msg.data, WorkerGone)
        except MessageError as e:
            self._log.warning("bad_message", subject=msg.subject, error=str(e))
            return
        self.gone(ev)

    async def _on_heartbeat_msg(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except MessageError as e:
            self._log.warning("bad_message", subject=msg.subject, error=str(e))
            return
        self.heartbeat(hb)

    async def _on_ready_msg(self, msg: Msg) -> None:
        try:
            ev = decode(msg.data, LayerReady)
        except MessageError as e:
            self._log.warning("bad_message", subject=msg.subject, error=str(e))
            return
        self.layer_ready(ev)


def nats_snapshot_fetcher(
    nc: NATS, subjects: Subjects, requester: str, timeout_s: float
) -> Callable[[str], Awaitable[WorkerSnapshot]]:
    async def fetch(worker_id: str) -> WorkerSnapshot:
        return await natsutil.request(
            nc, subjects.snapshot(worker_id), SnapshotRequest(requester=requester), WorkerSnapshot, timeout_s
        )

    return fetch
