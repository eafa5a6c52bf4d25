"""Execute-while-load from zero through `cascade up --workers 3`, the real scaler and loader: with
the model in the host cache and nothing serving it, `cascade scale` to three gives each worker
its own block of units first (readiness in that order, one stream each from the host cache),
a request sent with the scale-up is answered before any instance holds the model whole, through
a pipeline across the loading ones, with the tokens a whole instance gives afterwards."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from cascade.messages import LayerReady, decode
from cascade.natsauth import read_mesh_credentials
from cascade.natsutil import connect
from cascade.subjects import Subjects
from services.gateway.testing import parse_prometheus, sample
from tests.meshproc import cli, mesh_status, running_mesh

pytestmark = pytest.mark.e2e

MODEL = "zero-e2e"
LAYERS = 6
NUM_UNITS = LAYERS + 2
DEPLOYMENT = f"""
[[models]]
name = "{MODEL}"
min_replicas = 0
max_replicas = 3
loading = "multicast"
scaling = "live"
policy = "manual"
[models.generate]
layers = {LAYERS}
hidden = 64
heads = 4
kv_heads = 2
vocab = 320
max_position = 512
seed = 21
"""
# Every host-cache send is paced so a whole load takes seconds (the generated model is ~2 MB).
SEND_MB_S = "0.15"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    mp = pytest.MonkeyPatch()
    mp.setenv("CASCADE_LOADER_SEND_MB_S", SEND_MB_S)
    try:
        with running_mesh(tmp_path_factory.mktemp("home"), DEPLOYMENT, workers=3) as m:
            yield m
    finally:
        mp.undo()


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _complete(client: openai.OpenAI) -> str:
    r = client.completions.create(
        model=MODEL, prompt="zero", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, timeout=120
    )
    return r.choices[0].text or ""


async def test_scale_from_zero_orders_each_workers_block_and_serves_while_loading(mesh: dict[str, Any]) -> None:
    home = mesh["home"]
    deadline = time.monotonic() + 60
    while (r := cli(home, "cache", "load", MODEL, timeout=120)).returncode != 0:
        assert time.monotonic() < deadline, r.stderr  # the loader may still be starting
        await asyncio.sleep(0.5)  # retrying with a deadline
    info = mesh["info"]
    found = read_mesh_credentials(home)
    nc = await connect(str(info["nats_url"]), "test-zero", credentials=found[1] if found else None)
    subjects = Subjects(str(info.get("prefix") or "cascade"))
    announced: dict[str, list[int]] = {}

    async def on_ready(msg: Any) -> None:
        ev = decode(msg.data, LayerReady)
        if ev.model == MODEL and not ev.reset:
            announced.setdefault(ev.worker_id, []).append(ev.unit)

    try:
        await nc.subscribe(subjects.ready_all(), cb=on_ready)
        await nc.flush()
        r = cli(home, "scale", MODEL, "--replicas", "3", timeout=120)
        assert r.returncode == 0, r.stderr
        client = openai.OpenAI(base_url=mesh["url"], api_key="unused")
        # Sent with the scale-up: it waits in the gateway until the loading instances cover the model.
        zero = await asyncio.to_thread(_complete, client)
        whole_now = {w for w, units in announced.items() if len(set(units)) == NUM_UNITS}
        assert not whole_now, f"an instance held the model whole before the answer: {announced}"

        deadline = time.monotonic() + 120
        while not (len(announced) == 3 and all(len(set(u)) == NUM_UNITS for u in announced.values())):
            assert time.monotonic() < deadline, f"loads did not finish: {announced}"
            await asyncio.sleep(0.1)  # polling what the subscription collected, with a deadline
        # Each worker's units came as a rotation of the range: its own block first, the first
        # blocks disjoint and together every unit.
        firsts = sorted(u[0] for u in announced.values())
        assert firsts[0] == 0 and len(set(firsts)) == 3, announced
        bounds = [*firsts, NUM_UNITS]
        for units in announced.values():
            start = units[0]
            assert units == [*range(start, NUM_UNITS), *range(start)], announced
        blocks = [set(range(bounds[i], bounds[i + 1])) for i in range(3)]
        assert set().union(*blocks) == set(range(NUM_UNITS))

        st = mesh_status(home)
        new = [t for t in st["transfers"] if t["model"] == MODEL]
        assert len(new) == 3 and {t["source"] for t in new} == {"host-cache"}, new
        assert all(t["state"] == "done" and t["units_ready"] == NUM_UNITS for t in new), new

        assert await asyncio.to_thread(_complete, client) == zero  # a whole instance gives the same tokens
        samples = parse_prometheus(await asyncio.to_thread(_metrics, mesh["url"]))
        assert sample(samples, "cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 1
    finally:
        await nc.drain()
