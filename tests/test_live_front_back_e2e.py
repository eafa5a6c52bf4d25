"""Live scaling to two new instances beside a busy full one, with real worker services, a real
gateway and nats-server: the planner's live order loads one new instance front to back and the
other back to front (planner.front_back_units). While the full instance is busy, a request runs
its front layers on the first, the middle on the full one and the back layers and LM head on the
second; once the two loading instances hold every layer between them, a request runs on those two
alone. Each gets the same greedy tokens as the whole model on one instance."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import LoadModel, Ok
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
# A long context lets one request keep the full instance busy for as long as the test needs.
SPEC = GenerateSpec(layers=6, hidden=64, heads=4, kv_heads=2, vocab=320, seed=13, max_position=8192)
NUM_UNITS = SPEC.layers + 2
HB_S = 0.2
NEW = ("n1", "n2")
# Each new instance's load is paced to an emulated disk so it takes this long: slow enough to
# catch both half-loaded, first apart and then meeting.
LOAD_S = 16.0


model_dir = model_dir_fixture(SPEC, "front-back-model")


@pytest.fixture
async def workers(nats_url: str, subjects: Subjects, model_dir: Path) -> AsyncIterator[dict[str, WorkerService]]:
    mb_s = paced_load_mb_s(model_dir, LOAD_S)
    services = {
        # One batch slot: a single long request makes it busy.
        "full": WorkerService(WorkerSettings(nats_url, subjects.prefix, "full", heartbeat_s=HB_S, max_batch=1)),
        **{
            w: WorkerService(WorkerSettings(nats_url, subjects.prefix, w, heartbeat_s=HB_S, load_mb_s=mb_s))
            for w in NEW
        },
    }
    async with serving(nats_url, subjects.prefix, *services.values(), stop_s=30):
        yield services


def views(gw: RunningGateway) -> dict[str, Any]:
    return {v.worker_id: v for v in gw.core.registry.views()}


def front(v: Any) -> int:
    """Decoder layers held from the front, embedding included (0 without the embedding)."""
    units = v.ready_units or frozenset()
    return next(n for n in range(NUM_UNITS + 1) if n not in units) - 1 if 0 in units else 0


def back(v: Any) -> int:
    """Decoder layers held from the back, LM head included (0 without the head)."""
    units = v.ready_units or frozenset()
    if NUM_UNITS - 1 not in units:
        return 0
    return next(b for b in range(SPEC.layers + 1) if SPEC.layers - b not in units)


async def test_two_new_instances_loading_from_both_ends_carry_routes_beside_a_busy_one(
    nats_url: str, subjects: Subjects, model_dir: Path, workers: dict[str, WorkerService]
) -> None:
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=model_dir, min_replicas=1),))
    nc = await connect(nats_url, "test")
    async with running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S) as gw, aiohttp.ClientSession() as http:
        try:
            url = gw.url + "/v1/completions"
            await request(nc, subjects.load("full"), LoadModel(MODEL, str(model_dir)), Ok, timeout=10)
            await wait_until(
                lambda: (v := views(gw).get("full")) is not None and serves_fully(v, MODEL), 60, what="full serving"
            )
            body = {"model": MODEL, "prompt": "front and back", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
            async with http.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                whole = (await r.json())["choices"][0]["text"]

            # The loader's live plan beside a full instance: disk reads, ordered.
            ck = Checkpoint(model_dir)
            sizes = tuple(ck.unit_nbytes(u) for u in range(NUM_UNITS))
            ck.close()
            snap = MeshSnapshot(
                (
                    WorkerView("full", "serving", MODEL, NUM_UNITS, NUM_UNITS, running=1, data_addr="x:full"),
                    *(WorkerView(w, "idle", None, 0, 0, data_addr=f"x:{w}") for w in NEW),
                )
            )
            plan = plan_transfer(snap, PlanRequest(MODEL, NEW, "disk", sizes, str(model_dir), ordered=True), "fb")
            orders = plan_orders(plan)
            assert orders["n1"][0].units == list(range(NUM_UNITS))
            assert orders["n2"][0].units == list(reversed(range(NUM_UNITS)))

            # Occupy the full instance's only batch slot with a long stream.
            busy = await http.post(url, json={**body, "max_tokens": 8000, "stream": True})
            try:
                assert busy.status == 200
                await busy.content.readuntil(b"\n\n")
                await wait_until(lambda: views(gw)["full"].running >= 1, 60, what="full instance reported busy")
                for w in NEW:
                    (order,) = orders[w]
                    await request(nc, subjects.transfer(w), order, Ok, timeout=10)

                def apart() -> bool:
                    vs = views(gw)
                    return all(vs[w].state == "loading" for w in NEW) and front(vs["n1"]) >= 1 and back(vs["n2"]) >= 1

                await wait_until(apart, 60, what="n1 holding a front layer and n2 a back one")
                vs = views(gw)
                assert front(vs["n1"]) + back(vs["n2"]) < SPEC.layers, "the loads met too soon to tell"
                frames = {w: workers[w].link.stats.frames_in for w in ("full", *NEW)}
                async with http.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    three = (await r.json())["choices"][0]["text"]
                # Hidden states went into the full instance (the middle) and into n2 (the back).
                assert workers["full"].link.stats.frames_in > frames["full"]
                assert workers["n2"].link.stats.frames_in > frames["n2"]

                def met() -> bool:
                    vs = views(gw)
                    return front(vs["n1"]) + back(vs["n2"]) >= SPEC.layers

                await wait_until(met, 60, what="the two loads meeting")
                assert not any(serves_fully(views(gw)[w], MODEL) for w in NEW), "a load ended too soon to tell"
                frames = {w: workers[w].link.stats.frames_in for w in ("full", *NEW)}
                async with http.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    two = (await r.json())["choices"][0]["text"]
                # Only the two loading instances ran it: nothing went into the full one.
                assert workers["full"].link.stats.frames_in == frames["full"]
                assert workers["n2"].link.stats.frames_in > frames["n2"]
                assert not any(serves_fully(views(gw)[w], MODEL) for w in NEW), "a load ended too soon to tell"
            finally:
                busy.close()
            assert three == whole and two == whole  # the same greedy tokens as the whole model
            async with http.get(gw.url + "/metrics") as r:
                samples = parse_prometheus(await r.text())
            assert sample(samples, "cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 2
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
