"""The shared worker table with a fake clock, and its feed with an in-memory snapshot source."""

from __future__ import annotations

import asyncio
import dataclasses

from cascade.messages import WorkerGone, WorkerSnapshot
from cascade.workerfeed import WorkerFeed
from cascade.workers import WorkerTable
from tests.workerviews import hb, ready, snap, view

# --------------------------------------------------------------------------- table


def test_first_sight_asks_for_a_snapshot_once() -> None:
    reg = WorkerTable(heartbeat_s=1.0)
    assert reg.on_heartbeat(hb(ready_seq=0), now=0.0) is True
    assert reg.on_heartbeat(hb(ready_seq=0), now=1.0) is False  # already pending
    assert reg.on_snapshot(snap(0, [], state="idle")) is False
    assert reg.on_heartbeat(hb(state="idle", units=0), now=2.0) is False


def test_in_order_events_apply_and_a_gap_asks_for_a_snapshot() -> None:
    reg = WorkerTable(heartbeat_s=1.0)
    reg.on_heartbeat(hb(state="loading", units=0), now=0.0)
    reg.on_snapshot(snap(0, []))
    assert not reg.on_layer_ready(ready(1, 0), now=0.1)
    assert not reg.on_layer_ready(ready(2, 1), now=0.2)
    assert not reg.on_layer_ready(ready(2, 1), now=0.2)  # duplicate: ignored
    assert len(reg.get("w1").ready_units) == 2  # type: ignore[union-attr]
    # seq 3 is lost: 4 shows the gap.
    assert reg.on_layer_ready(ready(4, 3), now=0.4) is True
    assert reg.on_layer_ready(ready(5, 3), now=0.5) is False  # snapshot already on its way
    # The snapshot covers up to 4; event 5 (buffered) is newer and applies after it.
    assert reg.on_snapshot(snap(4, [0, 1, 2, 3])) is False
    e = reg.get("w1")
    assert e is not None and e.ready_seq == 5 and e.ready_units == {0, 1, 2, 3}


def test_snapshot_replaces_state_and_replays_newer_buffered_events() -> None:
    reg = WorkerTable(heartbeat_s=1.0)
    # Met through a readiness event: no state known at all.
    assert reg.on_layer_ready(ready(7, 2), now=0.0) is True
    assert reg.on_layer_ready(ready(8, 3), now=0.0) is False
    assert reg.on_snapshot(snap(6, [0, 1])) is False  # 7 and 8 follow 6 without a gap
    assert reg.get("w1").ready_units == {0, 1, 2, 3}  # type: ignore[union-attr]
    # A snapshot that leaves a gap before the buffered events asks again.
    reg2 = WorkerTable(heartbeat_s=1.0)
    reg2.on_layer_ready(ready(9, 3), now=0.0)
    assert reg2.on_snapshot(snap(6, [0, 1])) is True


def test_a_view_is_built_once_per_change_and_every_input_changes_it() -> None:
    """Views are cached between inputs (the gateway reads them at every routing decision); each
    input that changes what a view shows gives a new one, and time alone changes none."""
    reg = WorkerTable(heartbeat_s=1.0)
    reg.on_heartbeat(hb(state="loading", units=0), now=0.0)
    v0 = reg.get("w1")
    assert v0 is reg.get("w1") is reg.views(now=0.5)[0]  # the same object until something changes
    reg.on_snapshot(snap(0, []))
    v1 = reg.get("w1")
    assert v1 is not v0 and v1 is not None and v1.synced and v1.ready_seq == 0
    reg.on_layer_ready(ready(1, 0), now=0.1)
    v2 = reg.get("w1")
    assert v2 is not v1 and v2 is not None and v2.ready_units == {0} and v2.prefix_units == 1
    reg.on_layer_ready(ready(1, 0), now=0.2)  # a duplicate: nothing changed
    assert reg.get("w1") is v2
    reg.on_heartbeat(hb(state="loading", units=1, ready_seq=1, running=2), now=1.0)
    v3 = reg.get("w1")
    assert v3 is not v2 and v3 is not None and v3.running == 2 and v3.ready_units == {0}
    reg.excuse(5.0)  # time only: the same view
    assert reg.get("w1") is v3


def test_heartbeat_ready_seq_ahead_asks_for_a_snapshot() -> None:
    reg = WorkerTable(heartbeat_s=1.0)
    reg.on_heartbeat(hb(state="loading", units=0), now=0.0)
    reg.on_snapshot(snap(0, []))
    reg.on_layer_ready(ready(1, 0), now=0.1)
    assert reg.on_heartbeat(hb(state="loading", units=1, ready_seq=1), now=1.0) is False
    assert reg.on_heartbeat(hb(state="loading", units=3, ready_seq=3), now=2.0) is True


def test_reset_forgets_units() -> None:
    reg = WorkerTable(heartbeat_s=1.0)
    reg.on_heartbeat(hb(ready_seq=4), now=0.0)
    reg.on_snapshot(snap(4, [0, 1, 2, 3], state="serving"))
    assert view(reg).serves_fully("m")
    reg.on_layer_ready(ready(5, 0, reset=True), now=0.5)
    assert not view(reg).serves_fully("m")


def test_dead_after_three_missed_heartbeats() -> None:
    reg = WorkerTable(heartbeat_s=1.0)
    reg.on_heartbeat(hb("w1"), now=0.0)
    reg.on_heartbeat(hb("w2"), now=0.0)
    reg.on_heartbeat(hb("w2"), now=2.5)
    assert reg.expire(now=3.0) == []
    assert reg.expire(now=3.01) == ["w1"]
    assert [v.worker_id for v in reg.views()] == ["w2"]
    assert reg.expire(now=5.5) == []
    assert reg.expire(now=5.6) == ["w2"]
    # A snapshot arriving for a worker already declared dead does not bring it back.
    assert reg.on_snapshot(snap(0, [])) is False
    assert reg.views() == []


# --------------------------------------------------------------------------- feed


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Snapshots:
    """In-memory stand-in for the snapshot request/reply: records who was asked."""

    def __init__(self) -> None:
        self.state: dict[str, WorkerSnapshot] = {}
        self.asked: list[str] = []
        self.fail = False

    async def __call__(self, worker_id: str) -> WorkerSnapshot:
        self.asked.append(worker_id)
        if self.fail:
            from cascade.natsutil import RequestTimeout

            raise RequestTimeout("no reply")
        return self.state[worker_id]


def make_feed() -> tuple[WorkerFeed, Snapshots, FakeClock, list[str], list[int]]:
    snaps, clock = Snapshots(), FakeClock()
    dead: list[str] = []
    changes: list[int] = []
    feed = WorkerFeed(
        WorkerTable(heartbeat_s=1.0),
        fetch_snapshot=snaps,
        on_change=lambda: changes.append(1),
        on_dead=dead.append,
        clock=clock,
    )
    return feed, snaps, clock, dead, changes


async def test_feed_requests_snapshot_on_gap_and_applies_it() -> None:
    feed, snaps, _, _, changes = make_feed()
    snaps.state["w1"] = snap(0, [], state="loading")
    feed.heartbeat(hb(state="loading", units=0))
    await feed.settle()
    assert snaps.asked == ["w1"]
    feed.layer_ready(ready(1, 0))
    feed.layer_ready(ready(2, 1))
    await feed.settle()
    assert snaps.asked == ["w1"]  # in order: no snapshot needed
    snaps.state["w1"] = snap(4, [0, 1, 2, 3], state="serving")
    feed.layer_ready(ready(4, 3))  # seq 3 never arrived
    await feed.settle()
    assert snaps.asked == ["w1", "w1"]
    feed.heartbeat(hb(state="serving", ready_seq=4))
    await feed.settle()
    assert snaps.asked == ["w1", "w1"]
    assert view(feed.table).serves_fully("m")
    assert changes  # the batchers were told


async def test_feed_retries_a_failed_snapshot_on_the_next_heartbeat() -> None:
    feed, snaps, clock, _, _ = make_feed()
    snaps.fail = True
    feed.heartbeat(hb(ready_seq=4))
    await feed.settle()
    assert snaps.asked == ["w1"]
    snaps.fail = False
    snaps.state["w1"] = snap(4, [0, 1, 2, 3], state="serving")
    clock.t = 1.0
    feed.heartbeat(hb(ready_seq=4))
    await feed.settle()
    assert snaps.asked == ["w1", "w1"]
    assert feed.table.get("w1").synced  # type: ignore[union-attr]


async def test_feed_declares_dead_workers() -> None:
    feed, snaps, clock, dead, _ = make_feed()
    snaps.state["w1"] = snap(4, [0, 1, 2, 3], state="serving")
    feed.heartbeat(hb(ready_seq=4))
    await feed.settle()
    clock.t = 3.0
    assert feed.reap() == []
    clock.t = 3.5
    assert feed.reap() == ["w1"]
    assert dead == ["w1"]
    assert feed.table.views() == []


async def test_reaper_loop_runs_on_its_own() -> None:
    # Real time, tiny interval: the loop must find the silent worker by itself.
    snaps = Snapshots()
    snaps.state["w1"] = snap(0, [], state="idle")
    found = asyncio.Event()
    feed = WorkerFeed(
        WorkerTable(heartbeat_s=0.02),
        fetch_snapshot=snaps,
        on_change=lambda: None,
        on_dead=lambda w: found.set(),
    )
    feed.heartbeat(hb(state="idle", units=0))
    task = asyncio.ensure_future(feed.run_reaper())
    try:
        await asyncio.wait_for(found.wait(), 10.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await feed.close()
    assert feed.table.views() == []


async def test_feed_drops_a_worker_its_supervisor_saw_exit_but_not_a_newer_incarnation() -> None:
    feed, snaps, _, dead, _ = make_feed()
    snaps.state["w1"] = snap(4, [0, 1, 2, 3], state="serving")
    feed.heartbeat(hb(ready_seq=4, pid=10))
    await feed.settle()
    feed.gone(WorkerGone("w1", pid=9, reason="an older process"))
    assert dead == [] and "w1" in feed.table
    feed.gone(WorkerGone("w1", pid=10, reason="killed"))
    assert dead == ["w1"] and "w1" not in feed.table


async def test_feed_treats_a_heartbeat_from_a_new_pid_as_the_old_process_dead() -> None:
    feed, snaps, _, dead, _ = make_feed()
    snaps.state["w1"] = snap(4, [0, 1, 2, 3], state="serving")
    feed.heartbeat(hb(ready_seq=4, pid=10))
    await feed.settle()
    snaps.state["w1"] = snap(0, [], state="idle")
    feed.heartbeat(hb(state="idle", units=0, pid=11))
    await feed.settle()
    assert dead == ["w1"]
    v = feed.table.get("w1")
    assert v is not None and v.state == "idle" and v.pid == 11


def test_a_listener_cut_off_from_the_broker_excuses_the_silence() -> None:
    t = WorkerTable(heartbeat_s=1.0)
    t.on_heartbeat(hb(), now=0.0)
    t.excuse(now=10.0)  # the listener's own connection was down until now
    assert t.expire(12.0) == []
    assert t.expire(13.5) == ["w1"]


def test_a_worker_ordered_to_load_counts_from_its_heartbeat_before_any_unit() -> None:
    """A synced idle worker takes a load order and beats at once. No readiness event names the
    model before its first unit, but the heartbeat does: the worker counts as a loading instance
    of it from then on (`counted_model`; a scaler that lost its loader mid-decision must not
    decide the same gap again), and readiness names it from the first unit on."""
    reg = WorkerTable(heartbeat_s=1.0)
    reg.on_heartbeat(hb(state="idle", units=0), now=0.0)
    reg.on_snapshot(WorkerSnapshot("w1", "idle", None, [], 0, 0))
    reg.on_heartbeat(hb(state="idle", units=0), now=0.5)
    assert reg.instances(now=0.5) == {} and reg.loading(now=0.5) == {}
    loading = dataclasses.replace(hb(state="loading", units=0), model="m")
    assert reg.on_heartbeat(loading, now=1.0) is False  # nothing new to fetch
    v = reg.get("w1", 1.0)
    assert v is not None and v.model is None and v.counted_model == "m" and v.takes("m")
    assert reg.instances(now=1.0) == {"m": frozenset({"w1"})} and reg.loading(now=1.0) == {"m": 1}
    assert reg.on_layer_ready(ready(1, 0), now=1.1) is False  # the first unit: readiness names it now
    assert reg.instances(now=1.1) == {"m": frozenset({"w1"})}
    # It gives the load up: its heartbeat says idle, and it counts no more.
    assert reg.on_layer_ready(ready(2, 0, reset=True), now=1.2) is False
    reg.on_heartbeat(dataclasses.replace(hb(state="idle", units=0), ready_seq=2), now=1.3)
    assert reg.instances(now=1.3) == {} and not reg.get("w1", 1.3).takes("m")  # type: ignore[union-attr]
    # A snapshot saying idle after a loading heartbeat wins until the next heartbeat.
    reg.on_heartbeat(dataclasses.replace(loading, ready_seq=2), now=1.4)
    assert reg.instances(now=1.4) == {"m": frozenset({"w1"})}
    reg.on_snapshot(WorkerSnapshot("w1", "idle", None, [], 0, 2))
    assert reg.instances(now=1.5) == {}
