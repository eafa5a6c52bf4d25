"""A model's KV budget set in the deployment file reaches the workers that load it: the real
loader carries `kv_cache_mb` / `max_model_len` in its orders (a disk read, a multicast receive,
the plain `LoadModel`), real workers build their engines from them and announce the result, on
a real nats-server. A worker's own flags stay the default for models that say nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import (
    Heartbeat,
    LoadModel,
    MessageError,
    Ok,
    ScaleAck,
    ScaleDecision,
    ServiceStatus,
    StatusRequest,
    decode,
    encode,
)
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.loader.main import Loader
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import loader_settings, model_dir_fixture, serving
from tests.waiting import wait_for_change

pytestmark = pytest.mark.e2e

SPEC = GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=5)
HB_S = 0.2
TIMEOUT_S = 60.0
# Bytes of one block of 16 tokens: layers × (K and V) × kv heads × head dim × 16 × float32.
PER_BLOCK = 2 * 2 * 2 * (64 // 4) * 16 * 4
SMALL_MB = 30.5 * PER_BLOCK / 1e6  # 30 blocks by the deployment
WORKER_MB = 300.5 * PER_BLOCK / 1e6  # 300 blocks by the workers' own flag


model_dir = model_dir_fixture(SPEC, "models", "m")


@dataclass
class Mesh:
    nc: NATS
    s: Subjects
    workers: dict[str, WorkerService]
    beats: dict[str, Heartbeat] = field(default_factory=dict)
    acks: dict[str, ScaleAck] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, pred: Callable[[], object], what: str) -> None:
        await wait_for_change(self.changed, pred, TIMEOUT_S, what)

    async def decide(self, d: ScaleDecision) -> ScaleAck:
        await self.nc.publish(self.s.scale_decision(), encode(d))
        await self.until(lambda: d.decision_id in self.acks, f"ack of {d.decision_id}")
        return self.acks[d.decision_id]

    def serving(self, w: str, model: str) -> bool:
        b = self.beats.get(w)
        return b is not None and b.state == "serving" and b.model == model

    async def kv_detail(self, w: str) -> dict[str, Any]:
        # Every service answers on the status subject; the worker's own answer is the one we want.
        inbox = self.nc.new_inbox()
        got: asyncio.Future[ServiceStatus] = asyncio.get_running_loop().create_future()

        async def on(msg: Msg) -> None:
            st = decode(msg.data, ServiceStatus)
            if st.instance == w and not got.done():
                got.set_result(st)

        sub = await self.nc.subscribe(inbox, cb=on)
        try:
            await self.nc.publish(self.s.status(), encode(StatusRequest("t")), reply=inbox)
            st = await asyncio.wait_for(got, 10)
        finally:
            await sub.unsubscribe()
        return dict(st.detail["kv_cache"])


@pytest.fixture
async def mesh(nats_url: str, subjects: Subjects, model_dir: Path) -> AsyncIterator[Mesh]:
    dep = Deployment(
        models=(
            ModelDeployment("small", model_dir, 0, 4, kv_cache_mb=SMALL_MB, max_model_len=200),
            ModelDeployment("plain", model_dir, 0, 4),
        )
    )
    nc = await connect(nats_url, "test-kv-deployment")
    try:
        flags = ("--loader-id", "loader-kv", "--heartbeat-s", str(HB_S), "--idle-wait-s", "5", "--load-timeout-s", "60",
                 "--transfer-timeout-s", "20")  # fmt: skip
        loader = Loader(loader_settings(nats_url, subjects.prefix, *flags), dep, structlog.get_logger())
        workers = {
            w: WorkerService(
                WorkerSettings(nats_url, subjects.prefix, w, heartbeat_s=HB_S, drain_timeout_s=2, kv_cache_mb=WORKER_MB)
            )
            for w in ("w0", "w1", "w2", "w3")
        }
        m = Mesh(nc, subjects, workers)

        async def on_beat(msg: Msg) -> None:
            b = decode(msg.data, Heartbeat)
            m.beats[b.worker_id] = b
            m.changed.set()

        async def on_ack(msg: Msg) -> None:
            try:
                ack = decode(msg.data, ScaleAck)
            except MessageError:
                return
            m.acks[ack.decision_id] = ack
            m.changed.set()

        await nc.subscribe(subjects.heartbeat_all(), cb=on_beat)
        await nc.subscribe(subjects.scale_ack(), cb=on_ack)
        await nc.flush()
        async with serving(nats_url, subjects.prefix, loader, *workers.values()):
            await m.until(
                lambda: all(b.data_addr for b in m.beats.values()) and len(m.beats) == 4, "four workers heart-beating"
            )
            await m.until(lambda: len(loader.table.views(loader.clock())) == 4, "the loader sees four workers")
            yield m
    finally:
        await nc.drain()


async def test_the_deployments_kv_budget_reaches_every_worker_that_loads_the_model(mesh: Mesh) -> None:
    m = mesh
    # First instance: nothing holds the model, so the loader's plan is a disk order.
    first = await m.decide(ScaleDecision("kv-1", "small", "up", 1, 1, "test"))
    assert first.ok, first.error
    # Second: a multicast from the first, so the order is a data-plane receive.
    second = await m.decide(ScaleDecision("kv-2", "small", "up", 1, 2, "test"))
    assert second.ok, second.error
    small = [*first.workers, *second.workers]
    await m.until(lambda: all(m.serving(w, "small") for w in small), "both instances of small serving")
    for w in small:
        # The deployment's 200 tokens, announced to the gateways (the workers' own default would
        # be the model's context, 2048, which their 300-block budget holds).
        assert m.beats[w].max_model_len == 200, w
        kv = await m.kv_detail(w)
        assert kv["num_blocks"] == 30 and kv["max_model_len"] == 200, (w, kv)
        assert kv["mb"] == round(30 * PER_BLOCK / 1e6, 1)

    # A model whose entry says nothing runs on the worker's own flags.
    plain = await m.decide(ScaleDecision("kv-3", "plain", "up", 1, 1, "test"))
    assert plain.ok, plain.error
    (w,) = plain.workers
    await m.until(lambda: m.serving(w, "plain"), "plain serving")
    assert m.beats[w].max_model_len == SPEC.max_position
    assert (await m.kv_detail(w))["num_blocks"] == 300


async def test_a_load_order_carries_the_budget_to_the_worker(mesh: Mesh, model_dir: Path) -> None:
    """The loader's plain path (a checkpoint it cannot plan from): `LoadModel` with the settings."""
    m = mesh
    order = LoadModel("small", str(model_dir), "direct", kv_cache_mb=SMALL_MB, max_model_len=64)
    assert isinstance(await request(m.nc, m.s.load("w3"), order, Ok, timeout=10), Ok)
    await m.until(lambda: m.serving("w3", "small"), "w3 serving small")
    assert m.beats["w3"].max_model_len == 64
    assert (await m.kv_detail("w3"))["num_blocks"] == 30
