"""Two real worker services over a real nats-server: a pipelined route through a worker that
is still loading (paced to an emulated slow disk) and a full one gives the whole model's tokens;
a route made at k keeps working after the loading worker completes; a dead downstream stage
fails the request with a clear error."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cascade.config import GenerateSpec
from cascade.messages import (
    BatchReply,
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    LayerReady,
    LoadModel,
    Ok,
    RouteStage,
    SamplingParams,
    TokenEvents,
    UnloadModel,
    decode,
)
from cascade.models.checkpoint import Checkpoint
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import InProcess, model_dir_fixture
from tests.waiting import wait_until

SPEC = GenerateSpec(layers=6, hidden=64, heads=4, kv_heads=2, vocab=320, seed=9)
tok = ByteTokenizer()
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


model_dir = model_dir_fixture(SPEC)


@pytest.fixture
async def mesh(nats_url: str, subjects: Subjects, model_dir: Path) -> AsyncIterator[dict[str, Any]]:
    unit_mb = Checkpoint(model_dir).unit_nbytes(1) / 1e6
    services = {
        "full": WorkerService(WorkerSettings(nats_url, subjects.prefix, "full", heartbeat_s=0.2)),
        # ~0.4 s per layer: slow enough to route through it half-loaded, fast enough for a test.
        "new": WorkerService(
            WorkerSettings(nats_url, subjects.prefix, "new", heartbeat_s=0.2, load_mb_s=unit_mb / 0.4)
        ),
    }
    group = InProcess(nats_url, subjects.prefix)
    group.start(*services.values())
    nc = await connect(nats_url, "test")
    beating: set[str] = set()

    async def on_heartbeat(m: Any) -> None:
        beating.add(decode(m.data, Heartbeat).worker_id)

    # A worker heartbeats only once it has subscribed to its subjects (its stage link comes up
    # before them): waiting for the link alone let a test's first request find no listener.
    try:
        await nc.subscribe(subjects.heartbeat_all(), cb=on_heartbeat)
        await wait_until(lambda: beating >= set(services), what="workers subscribed (heartbeating)")
        await wait_until(lambda: all(s.link.addr for s in services.values()), what="stage links up")
        yield {"nc": nc, "svc": services, "subjects": subjects}
    finally:
        await nc.drain()
        await group.stop(30)


async def collect(nc: Any, subjects: Subjects, gw: str) -> dict[str, list]:
    out: dict[str, list] = {}

    async def on_tokens(m: Any) -> None:
        for e in decode(m.data, TokenEvents).events:
            out.setdefault(e.request_id, []).append(e)

    await nc.subscribe(subjects.tokens(gw), cb=on_tokens)
    return out


def done(out: dict[str, list], rid: str) -> bool:
    return bool(out.get(rid)) and out[rid][-1].finish_reason is not None


def tokens(evs: list) -> list[int]:
    return [t for e in evs for t in e.token_ids]


async def test_route_through_a_loading_worker(mesh: dict[str, Any], model_dir: Path) -> None:
    nc, s, svc = mesh["nc"], mesh["subjects"], mesh["svc"]
    L = SPEC.layers
    out = await collect(nc, s, "gw")
    ready: list[LayerReady] = []

    async def on_ready(m: Any) -> None:
        ready.append(decode(m.data, LayerReady))

    await nc.subscribe(s.ready("new"), cb=functools.partial(on_ready))
    await request(nc, s.load("full"), LoadModel("m", str(model_dir)), Ok, timeout=10)
    await wait_until(lambda: svc["full"].slot.state == "serving", what="full instance serving")

    prompt = tok.encode("live scaling")
    await request(nc, s.generate("full"), GenerateBatch("gw", [GenerateRequest("whole", "m", prompt, GREEDY)]),
                  BatchReply, timeout=10)  # fmt: skip
    await wait_until(lambda: done(out, "whole"), what="whole-model request")

    await request(nc, s.load("new"), LoadModel("m", str(model_dir)), Ok, timeout=10)
    await wait_until(lambda: len(ready) >= 3, what="three units on the new instance")  # embedding + 2 layers
    assert svc["new"].slot.state == "loading"
    k = len(ready) - 1
    assert k < L
    addr = {n: svc[n].link.addr for n in svc}
    route = [RouteStage("new", 0, k, addr["new"]), RouteStage("full", k, L, addr["full"])]
    req = GenerateRequest("split", "m", prompt, GREEDY, route=route)
    reply = await request(nc, s.generate("new"), GenerateBatch("gw", [req]), BatchReply, timeout=10)
    assert reply.accepted == ["split"], reply
    await wait_until(lambda: done(out, "split"), what="pipelined request")
    assert tokens(out["split"]) == tokens(out["whole"])
    assert out["split"][-1].finish_reason == "length"
    # A route asking for layers the new instance does not hold yet is refused, not half-run.
    if k + 1 < L:
        deeper = [RouteStage("new", 0, L - 1, addr["new"]), RouteStage("full", L - 1, L, addr["full"])]
        r = await request(nc, s.generate("new"), GenerateBatch("gw", [GenerateRequest("deep", "m", prompt, GREEDY,
                          route=deeper)]), BatchReply, timeout=10)  # fmt: skip
        assert [x.code for x in r.rejected] in (["not_ready"], [])

    # A route pinned at k keeps working after the new instance completes.
    long = SamplingParams(max_tokens=60, ignore_eos=True)
    await request(nc, s.generate("new"), GenerateBatch("gw", [GenerateRequest("pinned", "m", prompt, long,
                  route=route)]), BatchReply, timeout=10)  # fmt: skip
    await wait_until(lambda: svc["new"].slot.state == "serving", what="new instance complete")
    await wait_until(lambda: done(out, "pinned"), what="pinned request")
    assert out["pinned"][-1].finish_reason == "length" and out["pinned"][-1].completion_tokens == 60
    assert tokens(out["pinned"])[:16] == tokens(out["whole"])
    link = svc["full"].link.stats
    assert link.frames_in > 0 and link.latency_ms


async def test_dead_downstream_stage_fails_the_request(mesh: dict[str, Any], model_dir: Path) -> None:
    nc, s, svc = mesh["nc"], mesh["subjects"], mesh["svc"]
    L = SPEC.layers
    out = await collect(nc, s, "gw2")
    await request(nc, s.load("new"), LoadModel("m", str(model_dir)), Ok, timeout=10)
    await wait_until(lambda: 2 in svc["new"].slot.ready, what="two units")
    # Nobody listens at this address: the stage link cannot connect.
    route = [RouteStage("new", 0, 1, svc["new"].link.addr), RouteStage("ghost", 1, L, "127.0.0.1:9")]
    req = GenerateRequest("lost", "m", tok.encode("hello"), GREEDY, route=route)
    await request(nc, s.generate("new"), GenerateBatch("gw2", [req]), BatchReply, timeout=10)
    await wait_until(lambda: done(out, "lost"), what="failed request to end")
    assert out["lost"][-1].finish_reason == "error"
    assert "ghost" in (out["lost"][-1].error or "")


async def test_tail_stage_dying_mid_request_ends_it_with_an_error(mesh: dict[str, Any], model_dir: Path) -> None:
    nc, s, svc = mesh["nc"], mesh["subjects"], mesh["svc"]
    L = SPEC.layers
    out = await collect(nc, s, "gw3")
    await request(nc, s.load("full"), LoadModel("m", str(model_dir)), Ok, timeout=10)
    await request(nc, s.load("new"), LoadModel("m", str(model_dir)), Ok, timeout=10)
    await wait_until(lambda: svc["full"].slot.state == "serving", what="full instance serving")
    await wait_until(lambda: 2 in svc["new"].slot.ready, what="two units")
    addr = {n: svc[n].link.addr for n in svc}
    route = [RouteStage("new", 0, 1, addr["new"]), RouteStage("full", 1, L, addr["full"])]
    endless = SamplingParams(max_tokens=100_000, ignore_eos=True)
    req = GenerateRequest("doomed", "m", tok.encode("hello"), endless, route=route)
    await request(nc, s.generate("new"), GenerateBatch("gw3", [req]), BatchReply, timeout=10)
    await wait_until(lambda: len(tokens(out.get("doomed", []))) >= 5, what="tokens through the pipeline")
    # The tail stage goes away (its stage link closes with it): the driver must not wait forever.
    await svc["full"].link.close()
    await wait_until(lambda: done(out, "doomed"), what="the request to end")
    last = out["doomed"][-1]
    assert last.finish_reason == "error" and "full" in (last.error or "")
    assert not svc["new"].slot.engine.driven


async def test_unload_drains_running_requests_first(mesh: dict[str, Any], model_dir: Path) -> None:
    nc, s, svc = mesh["nc"], mesh["subjects"], mesh["svc"]
    out = await collect(nc, s, "gw4")
    await request(nc, s.load("full"), LoadModel("m", str(model_dir)), Ok, timeout=10)
    await wait_until(lambda: svc["full"].slot.state == "serving", what="full instance serving")
    work = SamplingParams(max_tokens=200, ignore_eos=True)
    batch = GenerateBatch("gw4", [GenerateRequest(f"d{i}", "m", tok.encode(f"drain {i}"), work) for i in range(3)])
    await request(nc, s.generate("full"), batch, BatchReply, timeout=10)
    await wait_until(lambda: all(out.get(f"d{i}") for i in range(3)), what="requests running")
    unload = asyncio.create_task(request(nc, s.unload("full"), UnloadModel("d"), Ok, timeout=60))
    await wait_until(lambda: svc["full"].slot.state == "draining", what="draining")
    # While draining, new requests are turned away (the gateway routes them elsewhere)...
    late = GenerateBatch("gw4", [GenerateRequest("late", "m", tok.encode("late"), work)])
    reply = await request(nc, s.generate("full"), late, BatchReply, timeout=10)
    assert [r.code for r in reply.rejected] == ["draining"]
    # ...and the running ones finish in full before the model is freed.
    await unload
    assert all(out[f"d{i}"][-1].finish_reason == "length" for i in range(3))
    assert all(out[f"d{i}"][-1].completion_tokens == 200 for i in range(3))
    assert svc["full"].slot.state == "idle" and svc["full"].slot.model is None
