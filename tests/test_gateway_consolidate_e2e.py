"""Consolidation end to end, with real worker services, a real gateway and nats-server: while the
only full instance is busy, a streamed request starts on a live route (its front layers on an
instance still loading, the rest on the busy one); once that instance holds every layer, the
gateway moves the request onto it alone, resuming from the tokens streamed so far. The client's
one stream holds the same greedy tokens as the whole model on one instance (compared as token
ids: the random model's text is mostly U+FFFD)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import LoadModel, Ok
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.gateway.router import serves_fully
from services.gateway.streams import Phase, RequestState
from services.gateway.testing import RunningGateway, parse_prometheus, running_gateway, sample
from services.worker.main import WorkerService
from tests.inproc import full_and_loading_fixture, model_dir_fixture
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

MODEL = "m"
# A long context: one request keeps the full instance busy, another outlasts the new one's load.
SPEC = GenerateSpec(layers=6, hidden=64, heads=4, kv_heads=2, vocab=320, seed=21, max_position=8192)
HB_S = 0.2
# Tokens of the request that moves: enough to be still decoding when the new instance's ~4 s load
# ends (a token of its live route takes a hop and a step on each instance: 180 tokens in 2.5 s
# measured on a loaded machine).
TOKENS = 1500


model_dir = model_dir_fixture(SPEC, "consolidate-model")


workers = full_and_loading_fixture(HB_S)


def view(gw: RunningGateway, wid: str) -> Any:
    return next((v for v in gw.core.registry.views() if v.worker_id == wid), None)


async def read_to_done(resp: aiohttp.ClientResponse) -> None:
    """Read a completion's event stream to its [DONE]; an error chunk fails the test."""
    async for line in resp.content:
        data = line.decode().strip().removeprefix("data: ")
        if data == "[DONE]":
            return
        assert not data or "error" not in json.loads(data), data
    raise AssertionError("the stream ended without [DONE]")


def only_open(gw: RunningGateway, but: tuple[RequestState, ...] = ()) -> RequestState:
    (req,) = [r for r in gw.core.hub.open_requests() if r not in but]
    return req


async def test_a_request_on_a_live_route_moves_onto_the_instance_that_finished_loading(
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
            body = {"model": MODEL, "prompt": "one place", "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
            async with http.post(url, json={**body, "stream": True}) as r:
                assert r.status == 200, await r.text()
                await r.content.readuntil(b"\n\n")
                whole = only_open(gw)  # its token ids are kept in its state
                await read_to_done(r)
            assert len(whole.streamed) == TOKENS

            # Occupy the full instance's only batch slot with a long stream.
            busy = await http.post(url, json={**body, "max_tokens": 8000, "stream": True})
            try:
                assert busy.status == 200
                await busy.content.readuntil(b"\n\n")
                await wait_until(lambda: view(gw, "full").running >= 1, what="full instance reported busy")
                busy_req = only_open(gw)

                await request(nc, subjects.load("new"), LoadModel(MODEL, str(model_dir)), Ok, timeout=10)
                await wait_until(
                    lambda: (v := view(gw, "new")) is not None and v.state == "loading" and v.prefix_units >= 2,
                    what="new instance holding its first layer",
                )
                async with http.post(url, json={**body, "stream": True}) as moving:
                    assert moving.status == 200, await moving.text()
                    await moving.content.readuntil(b"\n\n")
                    req = only_open(gw, but=(busy_req,))
                    # It decodes on a live route: its front layers on the loading instance.
                    assert req.worker_id == "new" and req.relays == ("full",), (req.worker_id, req.relays)
                    assert not serves_fully(view(gw, "new"), MODEL), "the load ended too soon to tell"

                    await wait_until(lambda: req.consolidations == 1 or req.ended, 60, what="the request moving")
                    assert req.consolidations == 1, f"it ended ({req.phase}) on its live route"
                    # On the new instance alone now, and no migration spent on the move.
                    assert req.worker_id == "new" and req.relays == () and req.migrations == 0
                    assert req.phase in (Phase.PREFILL, Phase.DECODE)
                    # Its old route was cancelled: the busy instance let go of its back layers' KV.
                    engine = workers["full"].slot.engine
                    assert engine is not None
                    await wait_until(lambda: not engine.relayed, 30, what="the busy instance dropping the route")
                    await read_to_done(moving)
            finally:
                busy.close()
            # One unbroken stream with the whole model's greedy tokens.
            assert req.phase is Phase.DONE and req.streamed == whole.streamed
            async with http.get(gw.url + "/metrics") as r:
                samples = parse_prometheus(await r.text())
            assert sample(samples, "cascade:migrations_total", model=MODEL, reason="consolidate") == 1
            assert sample(samples, "cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 1
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()
