"""The broker restarts under a serving mesh: services reconnect on their own, a stream that was
running finishes with what an unbroken run gives, a request that arrives while the broker is
away gets a 503 with Retry-After once its bounded wait ends, and the mesh serves again after."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from cascade.cli.embedded_nats import EmbeddedNats, free_port
from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import LoadModel, Ok
from cascade.models.generate import generate_model
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.gateway.router import serves_fully
from services.gateway.testing import running_gateway
from tests.test_migration import PACED, Stream, body
from tests.waiting import wait_until
from tests.workerprocs import WorkerProcs

pytestmark = pytest.mark.e2e

MODEL = "m"


@pytest.fixture
def broker() -> Iterator[EmbeddedNats]:
    """A broker of this test's own on a fixed port, since the test kills and restarts it."""
    b = EmbeddedNats(port=free_port()).start()
    try:
        yield b
    finally:
        b.stop()


async def test_a_broker_restart_under_a_streaming_request(broker: EmbeddedNats, tmp_path: Path) -> None:
    model = tmp_path / MODEL
    generate_model(model, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=4096))
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=model, min_replicas=1),))
    subjects = Subjects("broker")
    workers = WorkerProcs(broker.url, subjects.prefix, tmp_path)
    n = 400
    try:
        async with (
            running_gateway(broker.url, subjects.prefix, dep, heartbeat_s=0.2, queue_timeout_s=1.5) as gw,
            aiohttp.ClientSession() as http,
        ):
            url = gw.url + "/v1/completions"
            workers.start("a", *PACED)
            await wait_until(lambda: any(v.worker_id == "a" for v in gw.core.registry.views()), 60, "a beating")
            nc = await connect(broker.url, "test")
            await request(nc, subjects.load("a"), LoadModel(MODEL, str(model)), Ok, timeout=10)
            await nc.close()
            await wait_until(lambda: any(serves_fully(v, MODEL) for v in gw.core.registry.views()), 60, "serving")
            async with http.post(url, json=body({"temperature": 0}, n, False)) as r:
                assert r.status == 200
                want = (await r.json())["choices"][0]["text"]

            async with http.post(url, json=body({"temperature": 0}, n, True)) as r:
                assert r.status == 200
                s = Stream(r)
                await s.read(until_chunks=10)
                assert broker.proc is not None
                broker.proc.kill()
                broker.proc.wait()

                async def broker_away() -> bool:
                    async with http.get(gw.url + "/health") as h:
                        return h.status == 503 and "broker" in (await h.json())["reason"]

                for _ in range(300):  # polling /health with a deadline
                    if await broker_away():
                        break
                    await asyncio.sleep(0.05)
                assert await broker_away()
                # A request while the broker is away waits its bounded time, then a 503 that says when to retry.
                async with http.post(url, json=body({"temperature": 0}, 4, False)) as late:
                    assert late.status == 503, await late.text()
                    assert late.headers["Retry-After"] == "1"
                    assert (await late.json())["error"]["code"] == "no_instance"
                broker.start()  # the same port: every client reconnects on its own
                out = await s.read()
            assert out.error is None, out.error
            assert out.done and out.finish == "length"
            assert out.usage is not None and out.usage["completion_tokens"] == n
            assert "".join(out.text) == want
            assert "nats_reconnected" in workers.log("a")
            # And new requests are served again.
            async with http.post(url, json=body({"temperature": 0}, 4, False)) as r:
                assert r.status == 200, await r.text()
    finally:
        workers.stop_all()
        with contextlib.suppress(Exception):
            broker.stop()
