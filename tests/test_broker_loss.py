"""The broker restarts under a serving mesh: services reconnect on their own, a stream that was
running finishes with what an unbroken run gives, a request that arrives while the broker is
away gets a 503 with Retry-After once its bounded wait ends, and the mesh serves again after."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import orjson
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


async def test_a_stream_whose_last_events_were_lost_with_the_broker_resumes_elsewhere(
    broker: EmbeddedNats, tmp_path: Path
) -> None:
    """The worker's remaining events were published while the broker was away (here: a scripted
    worker that holds after two tokens, so no later event ever shows a gap). Once the broker is
    back, the gateway does not wait out request_timeout_s (120 s) for a 504: the request, not
    heard since, migrates and the client gets the whole stream."""
    from tests.test_gateway_protocol import MODEL as FAKE_MODEL
    from tests.test_gateway_protocol import FakeWorker

    path = tmp_path / FAKE_MODEL
    generate_model(path, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320))
    dep = Deployment(models=(ModelDeployment(name=FAKE_MODEL, path=path, min_replicas=1),))
    s = Subjects(f"lost{free_port()}")
    async with running_gateway(broker.url, s.prefix, dep, heartbeat_s=0.1, batch_wait_timeout_s=0.01) as gw:
        nc = await connect(broker.url, "fake-workers")
        a = await FakeWorker(nc, s, "wa").start()
        b: FakeWorker | None = None
        try:
            a.tokens_before_hold = 2
            await wait_until(lambda: any(v.worker_id == "wa" for v in gw.core.registry.views()), 10, "wa routable")
            req = {"model": FAKE_MODEL, "prompt": "hi", "max_tokens": 6, "stream": True}
            async with aiohttp.ClientSession() as http:
                resp = await http.post(gw.url + "/v1/completions", json=req)
                await asyncio.wait_for(a.produced.wait(), 10)
                b = await FakeWorker(nc, s, "wb").start()  # somewhere to move to, once wa is left
                broker.stop()
                broker.start()
                text = ""
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        for ch in orjson.loads(line[6:])["choices"]:
                            text += ch["text"]
                resp.release()
            assert resp.status == 200
            assert text == "abcdef"  # two from wa, the rest from wb resuming where wa's stream stopped
            await asyncio.wait_for(a.cancel_seen.wait(), 10)  # wa is told to stop it
        finally:
            a.release.set()
            await a.stop()
            if b is not None:
                await b.stop()
            await nc.close()
