"""The gateway's picture of the workers, built from their events (docs/protocol.md).

`Registry` is the pure core: heartbeats, readiness events and snapshots go in
with the current time, and out come "ask this worker for a snapshot" and "these
workers are dead". It keeps, per worker, the ready units, the last applied
readiness `seq` and the load from the last heartbeat.

`RegistryFeed` is the adapter around it: it subscribes to the worker subjects,
requests snapshots (with a timeout), runs the dead-worker reaper, and tells the
gateway when the routing picture changed or a worker died.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
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
    WorkerSnapshot,
    decode,
)
from cascade.subjects import Subjects
from services.gateway.router import InstanceView

# A worker is dead after this many heartbeat intervals without one (docs/protocol.md).
MISSED_HEARTBEATS = 3


@dataclass(slots=True)
class WorkerEntry:
    worker_id: str
    last_heartbeat: float
    # From readiness events and snapshots (authoritative for which units are ready).
    ready_model: str | None = None
    num_units: int = 0
    ready_units: set[int] = field(default_factory=set)
    seq: int = 0
    synced: bool = False  # ready_units is known (a snapshot, then events in order)
    snapshot_pending: bool = False
    buffered: dict[int, LayerReady] = field(default_factory=dict)  # seq → event, while unsynced
    # From heartbeats (and snapshots, for state).
    heard: bool = False
    state: str = "idle"
    model: str | None = None
    hb_units_ready: int = 0
    hb_num_units: int = 0
    running: int = 0
    waiting: int = 0
    max_batch: int = 1
    tokens_per_s: float = 0.0
    ready_seq: int = 0
    stage_addr: str | None = None
    driven_layers: int = 0
    driven: int = 0
    prefill_budget: int = 0
    inflight_at_heartbeat: int = 0
    # Set when the worker turned a request away as draining or for another model; cleared by
    # its next heartbeat, which tells its real state.
    suspended: bool = False


class Registry:
    """Pure worker table. Methods that return True mean: request a snapshot of that worker now
    (the entry is marked pending, so the same need is reported once)."""

    def __init__(self, heartbeat_s: float, missed: int = MISSED_HEARTBEATS) -> None:
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = heartbeat_s * missed
        self._workers: dict[str, WorkerEntry] = {}

    # ---- inputs ------------------------------------------------------------
    def on_heartbeat(self, hb: Heartbeat, now: float, inflight: int = 0) -> bool:
        e = self._entry(hb.worker_id, now)
        e.last_heartbeat = now
        e.heard = True
        e.state = hb.state
        e.model = hb.model
        e.hb_units_ready = hb.units_ready
        e.hb_num_units = hb.num_units
        e.running = hb.running
        e.waiting = hb.waiting
        e.max_batch = max(hb.max_batch, 1)
        e.tokens_per_s = hb.tokens_per_s
        e.ready_seq = hb.ready_seq
        e.stage_addr = hb.stage_addr
        e.driven_layers = hb.driven_layers
        e.driven = hb.driven
        e.prefill_budget = hb.prefill_budget
        e.inflight_at_heartbeat = inflight
        e.suspended = False
        if not e.synced or hb.ready_seq > e.seq:
            return self._want_snapshot(e)
        return False

    def on_layer_ready(self, ev: LayerReady, now: float) -> bool:
        e = self._entry(ev.worker_id, now)
        if ev.seq <= e.seq and e.synced:
            return False  # already applied (a duplicate, or covered by a snapshot)
        if e.synced and not e.snapshot_pending and ev.seq == e.seq + 1:
            self._apply(e, ev)
            return False
        # A gap, a worker met for the first time, or a snapshot on its way: keep the event for
        # after the snapshot, and ask for one unless already asked.
        e.buffered[ev.seq] = ev
        return self._want_snapshot(e)

    def on_snapshot(self, snap: WorkerSnapshot) -> bool:
        e = self._workers.get(snap.worker_id)
        if e is None:
            return False  # declared dead while the snapshot was on its way
        e.snapshot_pending = False
        e.synced = True
        e.ready_model = snap.model
        e.num_units = snap.num_units
        e.ready_units = set(snap.ready_units)
        e.seq = snap.seq
        e.state = snap.state
        # Events that arrived while the snapshot was on its way and are newer than it.
        while e.seq + 1 in e.buffered:
            self._apply(e, e.buffered.pop(e.seq + 1))
        e.buffered = {s: ev for s, ev in e.buffered.items() if s > e.seq}
        if e.buffered:
            return self._want_snapshot(e)  # still a gap
        # A heartbeat's ready_seq ahead of the snapshot is left to the next heartbeat: asking again
        # at once could loop on a worker whose two counters disagree.
        return False

    def on_snapshot_failed(self, worker_id: str) -> None:
        """The snapshot request failed; the next heartbeat or event asks again."""
        e = self._workers.get(worker_id)
        if e is not None:
            e.snapshot_pending = False

    def suspend(self, worker_id: str) -> None:
        e = self._workers.get(worker_id)
        if e is not None:
            e.suspended = True

    def expire(self, now: float) -> list[str]:
        """Remove and return the workers that missed too many heartbeats."""
        dead = [w for w, e in self._workers.items() if now - e.last_heartbeat > self.dead_after_s]
        for w in dead:
            del self._workers[w]
        return dead

    # ---- outputs -----------------------------------------------------------
    def views(
        self, inflight: Mapping[str, int] | None = None, unstarted: Mapping[str, tuple[int, int]] | None = None
    ) -> list[InstanceView]:
        """The routing snapshot. Until a worker's readiness is known from a snapshot, its
        heartbeat's unit count stands in (a worker whose snapshot handler is slow is still used)."""
        out = []
        inflight = inflight or {}
        unstarted = unstarted or {}
        for e in self._workers.values():
            if not e.heard:
                continue  # no load figures yet; the first heartbeat comes within an interval
            model = e.ready_model if e.synced else e.model
            units = len(e.ready_units) if e.synced else e.hb_units_ready
            # Units load front to back, so without a snapshot the count is the prefix.
            prefix = _prefix(e.ready_units) if e.synced else e.hb_units_ready
            num_units = e.num_units if e.synced else e.hb_num_units
            state = e.state
            if e.suspended or (e.synced and e.model != e.ready_model):
                state = "unavailable"  # turned work away, or heartbeat and readiness disagree for now
            out.append(
                InstanceView(
                    worker_id=e.worker_id,
                    model=model,
                    state=state,
                    units_ready=units,
                    num_units=num_units,
                    running=e.running,
                    waiting=e.waiting,
                    max_batch=e.max_batch,
                    inflight=inflight.get(e.worker_id, 0),
                    inflight_at_heartbeat=e.inflight_at_heartbeat,
                    prefix_units=prefix,
                    stage_addr=e.stage_addr,
                    driven_layers=e.driven_layers,
                    driven=e.driven,
                    prefill_budget=e.prefill_budget,
                    unstarted_tokens=unstarted.get(e.worker_id, (0, 0))[1],
                    unstarted_prompts=unstarted.get(e.worker_id, (0, 0))[0],
                )
            )
        return out

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def workers(self) -> list[str]:
        return list(self._workers)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "worker_id": e.worker_id,
                "state": e.state,
                "model": e.ready_model if e.synced else e.model,
                "units_ready": len(e.ready_units) if e.synced else e.hb_units_ready,
                "num_units": e.num_units if e.synced else e.hb_num_units,
                "running": e.running,
                "waiting": e.waiting,
                "seq": e.seq,
                "synced": e.synced,
            }
            for e in self._workers.values()
        ]

    # ---- internals ---------------------------------------------------------
    def _entry(self, worker_id: str, now: float) -> WorkerEntry:
        e = self._workers.get(worker_id)
        if e is None:
            # First sight counts as a heartbeat: the clock to declare it dead starts now.
            e = self._workers[worker_id] = WorkerEntry(worker_id=worker_id, last_heartbeat=now)
        return e

    @staticmethod
    def _want_snapshot(e: WorkerEntry) -> bool:
        if e.snapshot_pending:
            return False
        e.snapshot_pending = True
        return True

    @staticmethod
    def _apply(e: WorkerEntry, ev: LayerReady) -> None:
        e.seq = ev.seq
        if ev.reset:
            e.ready_model = None
            e.ready_units.clear()
            e.num_units = 0
            return
        if ev.model != e.ready_model:
            e.ready_model = ev.model
            e.ready_units = set()
        e.num_units = ev.num_units
        e.ready_units.add(ev.unit)


def _prefix(units: set[int]) -> int:
    n = 0
    while n in units:
        n += 1
    return n


class RegistryFeed:
    """Feeds the registry from NATS and acts on what it says."""

    def __init__(
        self,
        registry: Registry,
        *,
        fetch_snapshot: Callable[[str], Awaitable[WorkerSnapshot]],
        inflight_of: Callable[[str], int],
        on_change: Callable[[], None],
        on_dead: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        self.registry = registry
        self._fetch_snapshot = fetch_snapshot
        self._inflight_of = inflight_of
        self._on_change = on_change
        self._on_dead = on_dead
        self._clock = clock
        self._log = logger or structlog.get_logger()
        self._fetches: set[asyncio.Task[None]] = set()

    # ---- inputs (sync: callable from tests and NATS callbacks alike) -------
    def heartbeat(self, hb: Heartbeat) -> None:
        if self.registry.on_heartbeat(hb, self._clock(), self._inflight_of(hb.worker_id)):
            self._start_fetch(hb.worker_id)
        self._on_change()

    def layer_ready(self, ev: LayerReady) -> None:
        if self.registry.on_layer_ready(ev, self._clock()):
            self._start_fetch(ev.worker_id)
        self._on_change()

    def reap(self) -> list[str]:
        dead = self.registry.expire(self._clock())
        for w in dead:
            self._log.warning("worker_dead", worker_id=w, silent_for_s=round(self.registry.dead_after_s, 3))
            self._on_dead(w)
        if dead:
            self._on_change()
        return dead

    async def run_reaper(self) -> None:
        # Checking at half the interval bounds detection at 3.5 intervals after the last beat.
        while True:
            await asyncio.sleep(self.registry.heartbeat_s / 2)
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
            self.registry.on_snapshot_failed(worker_id)
            raise
        except (natsutil.RequestTimeout, RemoteError, MessageError, ConnectionError) as e:
            self._log.warning("snapshot_failed", worker_id=worker_id, error=str(e))
            self.registry.on_snapshot_failed(worker_id)
            return
        if snap.worker_id != worker_id:
            self._log.warning("snapshot_mismatch", worker_id=worker_id, got=snap.worker_id)
            self.registry.on_snapshot_failed(worker_id)
            return
        self._log.debug("snapshot", worker_id=worker_id, seq=snap.seq, units=len(snap.ready_units))
        if self.registry.on_snapshot(snap):
            self._start_fetch(worker_id)
        self._on_change()

    # ---- NATS --------------------------------------------------------------
    async def subscribe(self, nc: NATS, subjects: Subjects) -> list[Subscription]:
        return [
            await nc.subscribe(subjects.heartbeat_all(), cb=self._on_heartbeat_msg),
            await nc.subscribe(subjects.ready_all(), cb=self._on_ready_msg),
        ]

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
