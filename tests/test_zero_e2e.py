"""Execute-while-load from zero with three real worker services, a real gateway and nats-server:
the planner's ordered orders give each worker its own block of layers first, the workers
announce their readiness in that order, and while none of them holds the model whole the gateway
serves a request through a pipeline across the three, with the same greedy tokens as one whole
instance gives afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import LayerReady, Ok, decode
from cascade.models.checkpoint import Checkpoint
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from cascade.workers import WorkerView
from services.gateway.router import serves_fully
from services.gateway.testing import RunningGateway, parse_prometheus, running_gateway, sample
from services.loader.planner import MeshSnapshot, PlanRequest, plan_orders, plan_transfer
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import model_dir_fixture, paced_load_mb_s, serving
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

MODEL = "m"
SPEC = GenerateSpec(layers=6, hidden=64, heads=4, kv_heads=2, vocab=320, seed=11, max_position=2048)
NUM_UNITS = SPEC.layers + 2
HB_S = 0.2
IDS = ("w0", "w1", "w2")
# Each load is paced to an emulated disk so it takes this long: the blocks are in after about a
# third of it, which leaves the rest for a request through the three loading instances.
LOAD_S = 12.0


model_dir = model_dir_fixture(SPEC, "zero-model")


@pytest.fixture
async def workers(nats_url: str, subjects: Subjects, model_dir: Path) -> AsyncIterator[dict[str, WorkerService]]:
    mb_s = paced_load_mb_s(model_dir, LOAD_S)
    services = {
        w: WorkerService(WorkerSettings(nats_url, subjects.prefix, w, heartbeat_s=HB_S, load_mb_s=mb_s)) for w in IDS
    }
    async with serving(nats_url, subjects.prefix, *services.values(), stop_s=30):
        yield services


def views(gw: RunningGateway) -> dict[str, Any]:
    return {v.worker_id: v for v in gw.core.registry.views() if v.worker_id in IDS}


async def test_three_loading_instances_serve_from_zero_with_the_whole_models_tokens(
    nats_url: str, subjects: Subjects, model_dir: Path, workers: dict[str, WorkerService]
) -> None:
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=model_dir, min_replicas=0),))
    ck = Checkpoint(model_dir)
    sizes = tuple(ck.unit_nbytes(u) for u in range(NUM_UNITS))
    ck.close()
    # The loader's plan for three idle targets and nothing holding the model: disk reads (the
    # store), ordered.
    snap = MeshSnapshot(tuple(WorkerView(w, "idle", None, 0, 0, data_addr=f"x:{w}") for w in IDS))
    plan = plan_transfer(snap, PlanRequest(MODEL, IDS, "disk", sizes, str(model_dir), ordered=True), "zero")
    orders = plan_orders(plan)
    # Blocks of about a third of the bytes: embedding + layers 0-1, layers 2-3, layers 4-5 + LM head.
    blocks = {"w0": [0, 1, 2], "w1": [3, 4], "w2": [5, 6, 7]}
    for w, b in blocks.items():
        (order,) = orders[w]
        assert order.role == "disk" and order.units[: len(b)] == b and sorted(order.units) == list(range(NUM_UNITS))

    nc = await connect(nats_url, "test")
    announced: dict[str, list[int]] = {w: [] for w in IDS}

    async def on_ready(msg: Any) -> None:
        ev = decode(msg.data, LayerReady)
        if ev.worker_id in announced and not ev.reset:
            announced[ev.worker_id].append(ev.unit)

    await nc.subscribe(subjects.ready_all(), cb=on_ready)
    async with running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S) as gw, aiohttp.ClientSession() as http:
        try:
            await wait_until(lambda: len(views(gw)) == 3, 60, "three idle workers in the gateway's table")
            for w in IDS:
                (order,) = orders[w]
                await request(nc, subjects.transfer(w), order, Ok, timeout=10)

            def covered() -> bool:
                vs = views(gw)
                return all(
                    v.state == "loading" and v.ready_units is not None and set(blocks[w]) <= v.ready_units
                    for w, v in vs.items()
                )

            await wait_until(covered, 60, "each worker holding its own block")
            assert not any(serves_fully(v, MODEL) for v in views(gw).values())
            body = {"model": MODEL, "prompt": "from zero", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
            async with http.post(gw.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                zero = (await r.json())["choices"][0]["text"]
            # No instance held the model whole while it ran: it went through the loading ones.
            assert not any(serves_fully(v, MODEL) for v in views(gw).values()), "a load ended too soon to tell"
            async with http.get(gw.url + "/metrics") as r:
                samples = parse_prometheus(await r.text())
            assert sample(samples, "cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 1
            # Hidden states reached the later stages over the stage link.
            relayed = {w: workers[w].link.stats.frames_in for w in IDS}
            assert relayed["w0"] > 0 and relayed["w1"] > 0, relayed

            # Readiness came in each worker's plan order: its own block first.
            for w, b in blocks.items():
                assert announced[w][: len(b)] == b, (w, announced[w])

            await wait_until(lambda: all(serves_fully(v, MODEL) for v in views(gw).values()), 90, "all three loaded")
            for w in IDS:
                assert announced[w] == orders[w][0].units, (w, announced[w])
            async with http.post(gw.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                whole = (await r.json())["choices"][0]["text"]
            assert zero == whole  # a pipeline across loading instances gives the whole model's tokens
            async with http.get(gw.url + "/metrics") as r:
                samples = parse_prometheus(await r.text())
            assert sample(samples, "cascade_gateway_routed_requests_total", model=MODEL, route="full") == 1
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
