"""Live scaling through the gateway with two real worker services: while the only full
instance is busy, a new request runs its front layers on an instance that is still
loading (paced to an emulated slow disk) and the rest on the full one, and gets the
same greedy tokens as the whole model on one instance."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import LoadModel, Ok
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.gateway.router import serves_fully
from services.gateway.testing import RunningGateway, parse_prometheus, running_gateway, sample
from services.worker.main import WorkerService
from tests.inproc import full_and_loading_fixture, model_dir_fixture
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

MODEL = "m"
# A long context lets one request keep the full instance busy for as long as the test needs.
SPEC = GenerateSpec(layers=6, hidden=64, heads=4, kv_heads=2, vocab=320, seed=9, max_position=8192)
HB_S = 0.2


model_dir = model_dir_fixture(SPEC, "live-model")


workers = full_and_loading_fixture(HB_S)


def view(gw: RunningGateway, wid: str) -> Any:
    return next((v for v in gw.core.registry.views() if v.worker_id == wid), None)


async def test_busy_instance_sheds_front_layers_to_a_loading_one(
    nats_url: str, subjects: Subjects, model_dir: Path, workers: dict[str, WorkerService]
) -> None:
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=model_dir, min_replicas=1),))
    nc = await connect(nats_url, "test")
    async with running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S) as gw, aiohttp.ClientSession() as http:
        try:
            url = gw.url + "/v1/completions"
            await request(nc, subjects.load("full"), LoadModel(MODEL, str(model_dir)), Ok, timeout=10)
            await wait_until(
                lambda: (v := view(gw, "full")) is not None and serves_fully(v, MODEL), what="full serving"
            )

            body = {"model": MODEL, "prompt": "live scaling", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            async with http.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                whole = (await r.json())["choices"][0]["text"]

            # Occupy the full instance's only batch slot with a long stream.
            long = {**body, "max_tokens": 8000, "stream": True}
            busy = await http.post(url, json=long)
            try:
                assert busy.status == 200
                await busy.content.readuntil(b"\n\n")
                await wait_until(lambda: view(gw, "full").running >= 1, what="full instance reported busy")

                await request(nc, subjects.load("new"), LoadModel(MODEL, str(model_dir)), Ok, timeout=10)
                await wait_until(
                    lambda: (v := view(gw, "new")) is not None and v.state == "loading" and v.prefix_units >= 2,
                    what="new instance holding its first layer",
                )
                async with http.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    split = (await r.json())["choices"][0]["text"]
            finally:
                busy.close()
            assert split == whole  # splitting the model gives the same tokens as running it whole
            async with http.get(gw.url + "/metrics") as r:
                samples = parse_prometheus(await r.text())
            assert sample(samples, "cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 1
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
