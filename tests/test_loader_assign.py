"""The loader: which workers a decision goes to (pure core), then the service itself carrying
decisions out against scripted workers on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.config import Deployment, ModelDeployment
from cascade.messages import (
    Heartbeat,
    LoadModel,
    MessageError,
    Ok,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    UnloadModel,
    decode,
    encode,
)
from cascade.natsutil import connect, handler
from cascade.service import serve
from cascade.subjects import Subjects
from cascade.workers import WorkerTable, WorkerView
from services.loader.assign import choose_for_down, choose_for_up, describe
from services.loader.main import Loader
from services.loader.planner import MeshSnapshot
from services.loader.settings import LoaderSettings


def w(wid: str, state: str = "idle", model: str | None = None, running: int = 0, waiting: int = 0) -> WorkerView:
    n = 4 if model else 0
    return WorkerView(
        worker_id=wid,
        state=state,  # type: ignore[arg-type]
        model=model,
        units_ready=n if state == "serving" else (1 if model else 0),
        num_units=n,
        running=running,
        waiting=waiting,
    )


def snap(*workers: WorkerView) -> MeshSnapshot:
    return MeshSnapshot(workers=tuple(workers))


# --------------------------------------------------------------------------- up


def test_up_takes_idle_workers_least_loaded_first_then_by_id() -> None:
    s = snap(w("c"), w("a", running=2), w("b"), w("s", "serving", "m"), w("l", "loading", "m"))
    assert choose_for_up(s, 2).workers == ("b", "c")
    assert choose_for_up(s, 3).workers == ("b", "c", "a")


def test_up_skips_reserved_workers_and_reports_the_shortfall() -> None:
    s = snap(w("a"), w("b"), w("d", "draining", "m"))
    a = choose_for_up(s, 3, reserved={"a"})
    assert a.workers == ("b",)
    assert (a.wanted, a.shortfall) == (3, 2)
    assert choose_for_up(snap(), 1).workers == ()


def test_up_waits_for_a_worker_whose_heartbeat_and_readiness_disagree() -> None:
    """Just unloaded: the heartbeat says idle, readiness still shows the model's every unit. Taken
    now, the planner refuses it ("already holds"); once its readiness reset is in, it is taken."""
    unloading = replace(w("a"), model="m", units_ready=4, num_units=4, consistent=False)
    assert unloading.holds("m")
    a = choose_for_up(snap(unloading, w("b")), 2)
    assert a.workers == ("b",) and a.shortfall == 1
    assert choose_for_up(snap(w("a"), w("b")), 2).workers == ("a", "b")


def test_down_unloads_loading_instances_first_then_least_loaded() -> None:
    s = snap(
        w("busy", "serving", "m", running=5),
        w("quiet", "serving", "m", running=1),
        w("half", "loading", "m"),
        w("other", "serving", "x"),
        w("idle"),
    )
    assert choose_for_down(s, "m", 1).workers == ("half",)
    assert choose_for_down(s, "m", 2).workers == ("half", "quiet")
    a = choose_for_down(s, "m", 5, reserved={"half"})
    assert a.workers == ("quiet", "busy") and a.shortfall == 3


def test_counts_below_one_are_refused() -> None:
    with pytest.raises(ValueError):
        choose_for_up(snap(w("a")), 0)
    with pytest.raises(ValueError):
        choose_for_down(snap(w("a")), "m", 0)


def test_fully_serving_needs_every_unit_and_the_serving_state() -> None:
    assert w("a", "serving", "m").serves_fully("m")
    assert not w("a", "serving", "m").serves_fully("x")
    assert not w("a", "loading", "m").serves_fully("m")
    partial = WorkerView("a", "serving", "m", units_ready=3, num_units=4)
    assert not partial.serves_fully("m")


def test_describe_says_what_the_mesh_holds() -> None:
    assert describe(snap()) == "no workers alive"
    text = describe(snap(w("a"), w("b", "serving", "m"), w("c", "serving", "m")))
    assert text == "3 worker(s): 1 idle, 2 serving m"


def heartbeat(wid: str, state: str = "idle", model: str | None = None, units: int = 0, running: int = 0) -> Heartbeat:
    return Heartbeat(
        worker_id=wid,
        state=state,  # type: ignore[arg-type]
        model=model,
        units_ready=units,
        num_units=4 if model else 0,
        running=running,
        waiting=0,
        max_batch=8,
        tokens_per_s=0.0,
        ready_seq=0,
        pid=1,
        host="h",
        data_addr="127.0.0.1:9",
    )


def test_worker_table_snapshot_has_only_live_workers() -> None:
    t = WorkerTable(heartbeat_s=0.5)
    assert "b" not in t
    t.on_heartbeat(heartbeat("b"), 0.0)
    t.on_heartbeat(heartbeat("a", "serving", "m", 4), 1.0)
    assert [v.worker_id for v in t.views(1.0)] == ["a", "b"]
    # b was last heard 1.6 s ago: more than three 0.5 s heartbeats.
    assert [v.worker_id for v in t.views(1.6)] == ["a"]
    assert t.get("b", 1.6) is None
    view = t.get("a", 1.6)
    assert view is not None and view.data_addr == "127.0.0.1:9" and view.serves_fully("m")
    assert t.expire(1.6) == ["b"]


# --------------------------------------------------------------------------- the service

HB_S = 0.1


class ScriptedWorker:
    """Speaks the worker side of the protocol without torch: heart-beats, takes LoadModel and
    UnloadModel, and walks through its units one per heartbeat (or refuses, when told to)."""

    def __init__(self, nc: NATS, subjects: Subjects, wid: str, refuse: str = "", running: int = 0) -> None:
        self.nc, self.s, self.wid = nc, subjects, wid
        self.refuse = refuse
        self.running = running
        self.state = "idle"
        self.model: str | None = None
        self.units = 0
        self.loads: list[LoadModel] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.nc.subscribe(self.s.load(self.wid), cb=handler(self.on_load))
        await self.nc.subscribe(self.s.unload(self.wid), cb=handler(self.on_unload))
        self.task = asyncio.ensure_future(self.beat())

    async def on_load(self, req: LoadModel) -> Ok:
        self.loads.append(req)
        if self.refuse:
            raise RemoteError("load_failed", self.refuse)
        self.state, self.model, self.units = "loading", req.model, 0
        return Ok("loading")

    async def on_unload(self, _: UnloadModel) -> Ok:
        self.state, self.model, self.units = "idle", None, 0
        return Ok("unloaded")

    async def beat(self) -> None:
        while True:
            if self.state == "loading":
                self.units += 1
                if self.units == 4:
                    self.state = "serving"
            hb = heartbeat(self.wid, self.state, self.model, self.units, self.running)
            await self.nc.publish(self.s.heartbeat(self.wid), encode(hb))
            await asyncio.sleep(HB_S)  # a periodic heartbeat timer, as a real worker has

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@pytest.fixture
async def mesh(nats_url: str, subjects: Subjects) -> AsyncIterator[tuple[NATS, Subjects, list[ScriptedWorker]]]:
    """A loader service on its own prefix; tests add scripted workers to the list it yields."""
    nc = await connect(nats_url, "test-loader-driver")
    settings = LoaderSettings(
        loader_id="loader-t", heartbeat_s=HB_S, idle_wait_s=1.0, load_timeout_s=10.0, unload_timeout_s=5.0,
        request_timeout_s=2.0,
    )  # fmt: skip
    dep = Deployment(models=(ModelDeployment("m", Path("/nowhere/m"), 1, 4),))
    loader = Loader(settings, dep, structlog.get_logger().bind(test="loader"))
    stop = asyncio.Event()
    ready = asyncio.get_running_loop().create_future()

    async def on_ready(msg: Msg) -> None:
        if not ready.done():
            ready.set_result(True)

    sub = await nc.subscribe(subjects.service_ready(), cb=on_ready)
    task = asyncio.ensure_future(serve(loader, nats_url, subjects.prefix, stop))
    workers: list[ScriptedWorker] = []
    try:
        await asyncio.wait_for(ready, 10)
        await sub.unsubscribe()
        yield nc, subjects, workers
    finally:
        for wk in workers:
            await wk.stop()
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.drain()


async def decide(nc: NATS, s: Subjects, d: ScaleDecision, timeout: float = 15.0) -> ScaleAck:
    """Publish a decision and wait for its ack (the scaler's side of the exchange)."""
    fut: asyncio.Future[ScaleAck] = asyncio.get_running_loop().create_future()

    async def on_ack(msg: Msg) -> None:
        try:
            ack = decode(msg.data, ScaleAck)
        except MessageError:
            return
        if ack.decision_id == d.decision_id and not fut.done():
            fut.set_result(ack)

    sub = await nc.subscribe(s.scale_ack(), cb=on_ack)
    try:
        await nc.flush()
        await nc.publish(s.scale_decision(), encode(d))
        return await asyncio.wait_for(fut, timeout)
    finally:
        await sub.unsubscribe()


async def add_workers(mesh: tuple[NATS, Subjects, list[ScriptedWorker]], *specs: tuple[str, str]) -> None:
    nc, s, workers = mesh
    for wid, refuse in specs:
        wk = ScriptedWorker(nc, s, wid, refuse=refuse)
        await wk.start()
        workers.append(wk)
    await nc.flush()


@pytest.mark.e2e
async def test_loader_loads_idle_workers_and_acks_once_they_serve(
    mesh: tuple[NATS, Subjects, list[ScriptedWorker]],
) -> None:
    nc, s, workers = mesh
    await add_workers(mesh, ("w0", ""), ("w1", ""), ("w2", ""))
    ack = await decide(nc, s, ScaleDecision("d1", "m", "up", 2, 2, "test"))
    assert ack.ok, ack.error
    assert sorted(ack.workers) == ["w0", "w1"]
    by_id = {wk.wid: wk for wk in workers}
    assert [(x.model, x.path, x.decision_id) for x in by_id["w0"].loads] == [("m", "/nowhere/m", "d1")]
    assert by_id["w0"].state == "serving" and by_id["w2"].loads == []


@pytest.mark.e2e
async def test_loader_reports_a_refused_load_and_keeps_the_workers_that_loaded(
    mesh: tuple[NATS, Subjects, list[ScriptedWorker]],
) -> None:
    nc, s, _ = mesh
    await add_workers(mesh, ("w0", ""), ("w1", "no config.json in /nowhere/m"))
    ack = await decide(nc, s, ScaleDecision("d2", "m", "up", 2, 2, "test"))
    assert not ack.ok
    assert ack.workers == ["w0"]
    assert "w1 refused the load (load_failed: no config.json in /nowhere/m)" in ack.error


@pytest.mark.e2e
async def test_loader_says_when_no_worker_is_idle(mesh: tuple[NATS, Subjects, list[ScriptedWorker]]) -> None:
    nc, s, _ = mesh
    await add_workers(mesh, ("w0", ""))
    first = await decide(nc, s, ScaleDecision("d3", "m", "up", 1, 1, "test"))
    assert first.ok, first.error
    ack = await decide(nc, s, ScaleDecision("d4", "m", "up", 1, 2, "test"))
    assert not ack.ok and ack.workers == []
    assert "no idle worker for m" in ack.error and "1 serving m" in ack.error


@pytest.mark.e2e
async def test_loader_unloads_the_least_loaded_instance(mesh: tuple[NATS, Subjects, list[ScriptedWorker]]) -> None:
    nc, s, workers = mesh
    await add_workers(mesh, ("w0", ""), ("w1", ""))
    up = await decide(nc, s, ScaleDecision("d5", "m", "up", 2, 2, "test"))
    assert up.ok, up.error
    workers[0].running = 3  # w0 is busy; w1 should go
    # Ask for the down only once a heartbeat with w0's new load has gone out (the loader hears
    # the same heartbeat).
    seen = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        hb = decode(msg.data, Heartbeat)
        if hb.running == 3:
            seen.set()

    sub = await nc.subscribe(s.heartbeat("w0"), cb=on_beat)
    await asyncio.wait_for(seen.wait(), 5)
    await sub.unsubscribe()
    down = await decide(nc, s, ScaleDecision("d6", "m", "down", 1, 1, "test"))
    assert down.ok, down.error
    assert down.workers == ["w1"]
    assert workers[1].state == "idle" and workers[0].state == "serving"


@pytest.mark.e2e
async def test_loader_refuses_a_model_outside_its_deployment(
    mesh: tuple[NATS, Subjects, list[ScriptedWorker]],
) -> None:
    nc, s, _ = mesh
    ack = await decide(nc, s, ScaleDecision("d7", "ghost", "up", 1, 1, "test"))
    assert not ack.ok and "not in the loader's deployment" in ack.error


def test_up_never_takes_a_worker_the_scaler_backs_off_from() -> None:
    s = snap(w("a"), w("b"), w("c"))
    assert choose_for_up(s, 2, avoid=["a"]).workers == ("b", "c")
    a = choose_for_up(s, 2, reserved={"b"}, avoid={"a"})
    assert a.workers == ("c",) and a.shortfall == 1
