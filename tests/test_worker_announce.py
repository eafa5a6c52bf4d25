"""A worker ordered to load says so at once: its heartbeat with the model and state `loading`
goes out with the order's acceptance, not at the next tick of its periodic beat. A scaler whose
loader dies right after ordering a load decides the same gap again unless it sees that load
(tests/test_control_restart.py), and a restarted loader can be up before the next beat."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cascade.config import GenerateSpec
from cascade.messages import Heartbeat, LoadModel, Ok, TransferOrder, decode
from cascade.models.checkpoint import Checkpoint
from cascade.natsutil import NoResponders, connect, request
from cascade.subjects import Subjects
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import InProcess, model_dir_fixture
from tests.waiting import wait_until

model_dir = model_dir_fixture(GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, seed=5))

# Far longer than the test waits: a beat within it is the announcement, not the periodic one.
QUIET_S = 120.0


def _order(kind: str, model_dir: Path) -> Any:
    if kind == "load":
        return LoadModel("m", str(model_dir))
    ck = Checkpoint(model_dir)
    n = ck.config.num_units
    sizes = [ck.unit_nbytes(u) for u in range(n)]
    ck.close()
    return TransferOrder("t1", "tok", "m", "disk", list(range(n)), n, path=str(model_dir), unit_nbytes=sizes)


@pytest.mark.parametrize("kind", ["load", "disk transfer"])
async def test_an_order_to_load_is_announced_at_once(
    kind: str, nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    # Paced slow, so the worker is still loading when its announcement is read.
    worker = WorkerService(WorkerSettings(nats_url, subjects.prefix, "wa", heartbeat_s=QUIET_S, load_mb_s=0.05))
    group = InProcess(nats_url, subjects.prefix)
    group.start(worker)
    nc = await connect(nats_url, "test-announce")
    beats: list[Heartbeat] = []

    async def on_beat(msg: Any) -> None:
        beats.append(decode(msg.data, Heartbeat))

    try:
        await nc.subscribe(subjects.heartbeat("wa"), cb=on_beat)
        await nc.flush()
        await wait_until(lambda: worker.started, what="worker started")
        subject = subjects.load("wa") if kind == "load" else subjects.transfer("wa")
        order = _order(kind, model_dir)
        sent = time.monotonic()
        deadline = sent + 20
        while True:  # `started` comes before the subscriptions reach the broker
            try:
                await request(nc, subject, order, Ok, timeout=20)
                break
            except NoResponders:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await wait_until(
            lambda: any(b.model == "m" and b.state == "loading" for b in beats), timeout=10, what="a loading beat"
        )
        assert time.monotonic() - sent < QUIET_S / 2
        assert worker.slot.state == "loading"  # the beat told the truth: still loading
    finally:
        await group.stop(30, check=True)
        await nc.drain()
