"""One thread owns the model: a worker's weights are installed, its steps computed and its batch
limit changed on its engine thread, whichever path the weights come by (a disk load, a transfer
received over the data plane), while requests are served during the load."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cascade.cli.embedded_nats import EmbeddedNats
from cascade.config import GenerateSpec
from cascade.messages import (
    BatchLimit,
    BatchReply,
    GenerateBatch,
    GenerateRequest,
    LoadModel,
    Ok,
    RouteStage,
    SamplingParams,
    SetBatchLimit,
    TokenEvents,
    TransferOrder,
    decode,
    encode,
)
from cascade.models.checkpoint import Checkpoint
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import NoResponders, connect, request
from cascade.subjects import Subjects
from services.worker.dataplane import CheckpointSource, send_units
from services.worker.directpub import DirectWriter
from services.worker.engine import Engine, StepResult
from services.worker.main import WorkerService
from services.worker.model import LlamaModel
from services.worker.runner import ENGINE_THREAD, EngineRunner
from services.worker.settings import WorkerSettings
from tests.enginehelp import load_model
from tests.inproc import InProcess, model_dir_fixture
from tests.waiting import wait_until

SPEC = GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, seed=5)


model_dir = model_dir_fixture(SPEC)


@pytest.fixture
def torch_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[tuple[str, str]]]:
    """Which thread ran each model-writing or computing call: (call, thread name) counts."""
    seen: Counter[tuple[str, str]] = Counter()

    def watch(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapped(self: Any, *args: Any, **kw: Any) -> Any:
            seen[(name, threading.current_thread().name)] += 1
            return original(self, *args, **kw)

        monkeypatch.setattr(cls, name, wrapped)

    for cls, name in (
        (LlamaModel, "load_unit"),
        (LlamaModel, "drop_unit"),
        (LlamaModel, "forward_segments"),
        (Engine, "step"),
        (Engine, "set_max_batch"),
    ):
        watch(cls, name)
    yield seen


async def test_every_torch_call_runs_on_the_engine_thread(
    nats_url: str, subjects: Subjects, model_dir: Path, torch_threads: Counter[tuple[str, str]]
) -> None:
    settings = WorkerSettings(nats_url, subjects.prefix, "wt", heartbeat_s=0.2, load_mb_s=1.0)
    other = WorkerSettings(nats_url, subjects.prefix, "wr", heartbeat_s=0.2)
    workers = [WorkerService(settings), WorkerService(other)]
    group = InProcess(nats_url, subjects.prefix)
    group.start(*workers)
    nc = await connect(nats_url, "test-thread")
    finished: list[str] = []

    async def on_tokens(msg: Any) -> None:
        finished.extend(e.request_id for e in decode(msg.data, TokenEvents).events if e.finish_reason)

    try:
        await nc.subscribe(subjects.tokens("gw"), cb=on_tokens)
        await wait_until(lambda: all(w.started for w in workers), what="workers started")
        # wr gets the model over the data plane, from the checkpoint.
        ck = Checkpoint(model_dir)
        n, L = ck.config.num_units, ck.config.num_hidden_layers
        sizes = [ck.unit_nbytes(u) for u in range(n)]
        order = TransferOrder("t1", "tok", "m", "receive", list(range(n)), n, path=str(model_dir), unit_nbytes=sizes)
        # `started` is true before the worker's subscriptions reach the broker: ask until one listens.
        deadline = time.monotonic() + 20
        while True:
            try:
                await request(nc, subjects.transfer("wr"), order, Ok, timeout=20)
                break
            except NoResponders:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        addr = workers[1].heartbeat().data_addr
        assert addr is not None
        await asyncio.to_thread(send_units, CheckpointSource(ck, "m"), addr, "t1", "tok", list(range(n)))
        ck.close()
        await wait_until(lambda: workers[1].slot.state == "serving", what="wr serving")
        # wt loads from disk, paced, and serves routes through the layers it has while the rest
        # are still being installed.
        await request(nc, subjects.load("wt"), LoadModel("m", str(model_dir)), Ok, timeout=10)
        await wait_until(lambda: workers[0].slot.holds_front(2), what="front layers loaded")
        route = [RouteStage("wt", 0, 2, workers[0].link.addr), RouteStage("wr", 2, L, workers[1].link.addr)]
        tok = ByteTokenizer()
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        reqs = [GenerateRequest(f"r{i}", "m", tok.encode(f"hello {i}"), params, route) for i in range(3)]
        reply = await request(nc, subjects.generate("wt"), GenerateBatch("gw", reqs), BatchReply, timeout=10)
        assert len(reply.accepted) == 3, reply.rejected
        await wait_until(lambda: workers[0].slot.state == "serving", timeout=30, what="wt serving")
        limit = await request(nc, subjects.batch_limit("wt"), SetBatchLimit(2), BatchLimit, timeout=10)
        assert limit.max_batch == 2
        await wait_until(lambda: len(finished) == 3, what="requests done")
    finally:
        await group.stop(30, check=True)
        await nc.drain()

    threads = {t for (_, t) in torch_threads}
    calls = {c for (c, _) in torch_threads}
    assert {"load_unit", "forward_segments", "step", "set_max_batch"} <= calls
    assert threads == {ENGINE_THREAD}, dict(torch_threads)


# ---- token events published on the engine thread's own connection --------------------------------


async def _run_lane(nats_url: str, subjects: Subjects, model_dir: Path, direct_url: str) -> dict[str, Any]:
    """Two requests on a real engine behind an `EngineRunner` whose thread connects to
    `direct_url` for its token events; what reached a subscriber, by which path and thread."""
    eng = Engine(load_model(model_dir), ByteTokenizer(), max_batch=4, worker_id="wd")
    subject = subjects.tokens("gw")
    nc = await connect(nats_url, "test-direct-sub")
    got: dict[str, list[int]] = {}
    finished: set[str] = set()
    publishers: set[str] = set()
    delivered: list[StepResult] = []
    idle = asyncio.Event()

    async def on_tokens(msg: Any) -> None:
        for ev in decode(msg.data, TokenEvents).events:
            assert ev.index == len(got.setdefault(ev.request_id, [])), "events out of order"
            got[ev.request_id].extend(ev.token_ids)
            if ev.finish_reason:
                finished.add(ev.request_id)

    def messages(result: StepResult) -> list[tuple[str, bytes]]:
        publishers.add(threading.current_thread().name)
        return [(subject, encode(TokenEvents("wd", [ev for _, ev in result.events])))]

    async def deliver(result: StepResult) -> None:
        delivered.append(result)
        await nc.publish(subject, encode(TokenEvents("wd", [ev for _, ev in result.events])))

    def on_idle(in_flight: int) -> None:
        if in_flight == 0:
            idle.set()

    lane = EngineRunner(
        lambda: eng, deliver, on_idle, direct_messages=messages,
        connect=lambda: connect(direct_url, "test-direct-pub", connect_timeout_s=0.5),
    )  # fmt: skip
    await nc.subscribe(subject, cb=on_tokens)
    await nc.flush()
    lane.start()
    task = asyncio.create_task(lane.publish())
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    try:
        for rid in ("a", "b"):
            eng.submit(rid, "gw", ByteTokenizer().encode(f"direct {rid}"), params)
        lane.wake()
        await asyncio.wait_for(idle.wait(), 60)
        await wait_until(lambda: finished == {"a", "b"}, what="both requests' final events")
        writer = lane.thread._writer
    finally:
        await lane.stop()
        task.cancel()
        await nc.drain()
    return {
        "got": got, "publishers": publishers, "delivered": delivered, "direct": lane.direct_results,
        "written": writer.written if writer else 0, "fell_back": writer.fell_back if writer else 0,
    }  # fmt: skip


async def test_token_events_go_out_on_the_engine_threads_own_connection(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    r = await _run_lane(nats_url, subjects, model_dir, nats_url)
    assert {rid: len(ids) for rid, ids in r["got"].items()} == {"a": 8, "b": 8}
    # Every step's events left from the engine thread; the loop was handed none.
    assert r["publishers"] == {ENGINE_THREAD}
    assert r["delivered"] == [] and r["direct"] > 0
    # ... written straight onto its socket, with no loop turn (directpub.py).
    assert r["written"] > 0


async def test_when_the_socket_cannot_be_written_directly_the_engine_thread_publishes_through_nats_py(
    nats_url: str, subjects: Subjects, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the writer sees when nats-py's transport is not the plain TCP one it knows (TLS, a
    # websocket, another nats-py version): no transport, every write left to nats-py.
    monkeypatch.setattr(DirectWriter, "transport", lambda self: None)
    r = await _run_lane(nats_url, subjects, model_dir, nats_url)
    assert {rid: len(ids) for rid, ids in r["got"].items()} == {"a": 8, "b": 8}
    assert r["publishers"] == {ENGINE_THREAD}
    assert r["delivered"] == [] and r["direct"] > 0
    assert r["written"] == 0 and r["fell_back"] == r["direct"]


async def test_a_busy_engine_thread_still_runs_its_connections_loop_between_steps(
    nats_url: str, subjects: Subjects, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop answers the server's PINGs and notices a reconnect only when it runs: with no
    # pause allowed, it runs between every two steps of the two requests, not only once idle.
    import services.worker.directpub as directpub
    import services.worker.runner as runner

    monkeypatch.setattr(directpub, "TURN_S", 0.0)
    turns = 0
    original = runner.turn

    async def counted() -> None:
        nonlocal turns
        turns += 1
        await original()

    monkeypatch.setattr(runner, "turn", counted)
    r = await _run_lane(nats_url, subjects, model_dir, nats_url)
    assert {rid: len(ids) for rid, ids in r["got"].items()} == {"a": 8, "b": 8}
    assert r["written"] > 0 and turns >= r["direct"] - 1


class _IdleLane:
    """An `EngineRunner` whose thread publishes on its own connection to `url`, over a real engine
    with nothing to do: its idle wait, its loop's turns, and requests that wake it."""

    def __init__(self, model_dir: Path, url: str, subjects: Subjects) -> None:
        self.eng = Engine(load_model(model_dir), ByteTokenizer(), max_batch=4, worker_id="wi")
        self.subject = subjects.tokens("gw")
        self.lane = EngineRunner(
            lambda: self.eng, self._deliver, lambda _: None, direct_messages=self._messages,
            connect=lambda: connect(url, "test-idle-pub", connect_timeout_s=2.0),
        )  # fmt: skip
        self.thread = self.lane.thread
        self.handed: list[StepResult] = []

    def _messages(self, result: StepResult) -> list[tuple[str, bytes]]:
        return [(self.subject, encode(TokenEvents("wi", [ev for _, ev in result.events])))]

    async def _deliver(self, result: StepResult) -> None:
        self.handed.append(result)

    async def serve(self, nc: Any, rid: str) -> None:
        """One request submitted and woken; returns once its last token reached `nc`."""
        done = asyncio.Event()

        async def on_tokens(msg: Any) -> None:
            if any(ev.request_id == rid and ev.finish_reason for ev in decode(msg.data, TokenEvents).events):
                done.set()

        sub = await nc.subscribe(self.subject, cb=on_tokens)
        await nc.flush()
        self.eng.submit(rid, "gw", ByteTokenizer().encode(f"idle {rid}"), SamplingParams(max_tokens=4, ignore_eos=True))
        self.lane.wake()
        await asyncio.wait_for(done.wait(), 60)
        await sub.unsubscribe()


async def test_an_idle_engine_thread_waits_on_its_event_and_still_turns_its_connections_loop(
    nats_url: str, subjects: Subjects, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Waking a thread that waits inside its loop costs the loop's self-pipe, poll, future and task;
    # on a quiet connection the idle thread waits on its event instead (a futex wake), and runs a
    # turn of the loop every IDLE_TURN_S so the server's PINGs are still answered.
    import services.worker.directpub as directpub
    import services.worker.runner as runner

    monkeypatch.setattr(directpub, "IDLE_TURN_S", 0.02)
    monkeypatch.setattr(directpub, "TURN_S", 0.02)
    turns = 0
    original = runner.turn

    async def counted() -> None:
        nonlocal turns
        turns += 1
        await original()

    monkeypatch.setattr(runner, "turn", counted)
    idle = _IdleLane(model_dir, nats_url, subjects)
    nc = await connect(nats_url, "test-idle-sub")
    idle.lane.start()
    try:
        await wait_until(lambda: idle.thread.direct is not None and turns >= 3, what="turns of the idle thread's loop")
        assert not idle.thread._loop_waiting
        for rid in ("a", "b"):  # each wakes a thread gone idle again
            await idle.serve(nc, rid)
            target = turns + 2
            await wait_until(lambda: turns >= target, what="turns once idle again")  # noqa: B023
            assert not idle.thread._loop_waiting
        assert idle.handed == [] and idle.lane.direct_results > 0
    finally:
        await idle.lane.stop()
        await nc.drain()


async def test_an_idle_engine_thread_whose_broker_went_away_waits_in_its_loop_reconnects_and_is_woken(
    broker: EmbeddedNats, subjects: Subjects, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection that is not quiet (reconnecting) needs its loop to run: the idle thread then
    # waits inside it, and a wake still reaches it there.
    import services.worker.directpub as directpub

    monkeypatch.setattr(directpub, "IDLE_TURN_S", 0.02)
    idle = _IdleLane(model_dir, broker.url, subjects)
    idle.lane.start()
    nc: Any = None
    try:
        await wait_until(lambda: idle.thread.direct is not None, what="the engine thread's connection")
        broker.stop()
        await wait_until(lambda: idle.thread._loop_waiting, what="the idle thread waiting in its loop")
        broker.start()
        await wait_until(lambda: idle.thread.direct.is_connected, timeout=30, what="the reconnect while idle")
        nc = await connect(broker.url, "test-idle-sub")
        await idle.serve(nc, "a")
        assert idle.handed == [] and idle.lane.direct_results > 0
        await wait_until(lambda: not idle.thread._loop_waiting, what="back to the event wait")
    finally:
        await idle.lane.stop()
        if nc is not None:
            await nc.drain()


async def test_without_its_own_connection_the_engine_hands_every_result_to_the_loop(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    # Nothing listens on port 1: the engine thread's connection fails and the loop publishes.
    r = await _run_lane(nats_url, subjects, model_dir, "nats://127.0.0.1:1")
    assert {rid: len(ids) for rid, ids in r["got"].items()} == {"a": 8, "b": 8}
    assert r["publishers"] == set() and r["direct"] == 0
    assert sum(len(x.events) for x in r["delivered"]) >= 2
