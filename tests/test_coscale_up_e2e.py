"""The scale-up half of 2-D co-scaling on the real broker: two `cascade worker --slots 2` processes,
model A (`coscale = true`, one instance planned, two at most) sharing process p1 with an idle
model B, the real loader, scaler and gateway. Sustained requests for A through the gateway (more
than its batch of 4 holds, so work waits behind it) make its instance short of compute: the
scaler first raises A's quota taking from B (quota first), and when the pressure lasts adds an
instance (`ScaleDecision`, policy "coscale"), which the loader puts on the idle process p2 and
which then serves A's requests. (A load that fails is decided again after a back-off, as any;
seen once in ten runs: a multicast from the serving p1 to p2 ended with "p2 gave up loading A
(now loading)", and the retry loaded it.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import (
    Heartbeat,
    InstanceMetrics,
    LoadModel,
    MessageError,
    Ok,
    QuotaSet,
    ScaleAck,
    ScaleDecision,
    decode,
)
from cascade.models.generate import generate_model
from cascade.natsutil import connect, request
from cascade.service import serve
from cascade.subjects import Subjects
from services.gateway.testing import running_gateway
from services.loader.main import Loader
from services.loader.settings import LoaderSettings
from services.scaler.main import Scaler
from tests.waiting import wait_until
from tests.workerprocs import WorkerProcs

pytestmark = pytest.mark.e2e

HB_S = 0.2


async def test_sustained_pressure_adds_an_instance_that_serves(
    nats_url: str, subjects: Subjects, tmp_path: Path
) -> None:
    paths = {}
    for name, seed in (("A", 1), ("B", 2)):
        paths[name] = tmp_path / name
        generate_model(paths[name], GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, seed=seed))
    dep = Deployment(
        (
            ModelDeployment("A", paths["A"], 1, 2, policy="manual", coscale=True),
            ModelDeployment("B", paths["B"], 1, 1, policy="manual"),
        )
    )
    log = structlog.get_logger().bind(test="coscale-up")
    procs = WorkerProcs(nats_url, subjects.prefix, tmp_path)
    nc = await connect(nats_url, "test-coscale-up")
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    beats: dict[str, Heartbeat] = {}
    events: list[Any] = []  # QuotaSets and ScaleDecisions in the order they went out
    acks: list[ScaleAck] = []
    served: dict[str, int] = {}  # worker -> tokens A generated there, from its InstanceMetrics

    async def on_heartbeat(m: Any) -> None:
        hb = decode(m.data, Heartbeat)
        beats[hb.worker_id] = hb

    async def on_event(m: Any) -> None:
        try:
            events.append(decode(m.data))
        except MessageError:
            pass

    async def on_ack(m: Any) -> None:
        acks.append(decode(m.data, ScaleAck))

    async def on_metrics(m: Any) -> None:
        try:
            msg: Any = decode(m.data)
        except MessageError:
            return
        if isinstance(msg, InstanceMetrics) and msg.model == "A":
            served[msg.worker_id] = served.get(msg.worker_id, 0) + msg.generated_tokens

    stop_load = asyncio.Event()
    statuses: list[int] = []
    clients: list[asyncio.Task[None]] = []
    try:
        await nc.subscribe(subjects.heartbeat_all(), cb=on_heartbeat)
        for w in ("p1", "p1-2"):
            await nc.subscribe(subjects.quota_set(w), cb=on_event)
        await nc.subscribe(subjects.scale_decision(), cb=on_event)
        await nc.subscribe(subjects.scale_ack(), cb=on_ack)
        await nc.subscribe(subjects.metrics_all(), cb=on_metrics)
        for p in ("p1", "p2"):
            # A batch of 4: sixteen clients keep work waiting behind it, which is the pressure the
            # policy reads (its demand counts the queue), not only the share of steps A took.
            procs.start(p, "--slots", "2", "--max-batch", "4", "--heartbeat-s", str(HB_S), "--metrics-s", "0.5")
        slots = {"p1", "p1-2", "p2", "p2-2"}
        await wait_until(lambda: slots <= set(beats), timeout=120, what="four instance slots heartbeating")
        # The planned instances, placed by hand so A shares p1 with B and p2 stays idle.
        await request(nc, subjects.load("p1"), LoadModel("A", str(paths["A"])), Ok, timeout=30)
        await request(nc, subjects.load("p1-2"), LoadModel("B", str(paths["B"])), Ok, timeout=30)
        await wait_until(
            lambda: beats["p1"].state == "serving" and beats["p1-2"].state == "serving", timeout=60, what="A and B up"
        )

        loader_settings = LoaderSettings(
            loader_id="loader-c", heartbeat_s=HB_S, idle_wait_s=2.0, load_timeout_s=60.0, unload_timeout_s=30.0,
            request_timeout_s=5.0, host_cache="off",
        )  # fmt: skip
        loader = Loader(loader_settings, dep, log.bind(service="loader"))
        tasks.append(asyncio.create_task(serve(loader, nats_url, subjects.prefix, stop)))
        scaler = Scaler(
            dep, "scaler-u", tick_s=0.2, ack_timeout_s=60.0, heartbeat_s=HB_S, stale_s=2.0,
            log=log.bind(service="scaler"),
        )  # fmt: skip
        tasks.append(asyncio.create_task(serve(scaler, nats_url, subjects.prefix, stop)))
        async with running_gateway(
            nats_url, subjects.prefix, dep, heartbeat_s=HB_S, metrics_interval_s=0.5, queue_timeout_s=60.0
        ) as gw:

            async def client(i: int) -> None:
                body = {"model": "A", "prompt": f"load {i}", "max_tokens": 64 + 16 * (i % 4), "ignore_eos": True}
                async with aiohttp.ClientSession() as http:
                    while not stop_load.is_set():
                        async with http.post(f"{gw.url}/v1/completions", json=body) as r:
                            statuses.append(r.status)
                            await r.read()

            clients = [asyncio.create_task(client(i)) for i in range(16)]

            def added() -> ScaleDecision | None:
                return next(
                    (
                        e
                        for e in events
                        if isinstance(e, ScaleDecision)
                        and e.model == "A"
                        and e.action == "up"
                        and e.policy == "coscale"
                    ),
                    None,
                )

            await wait_until(lambda: added() is not None, timeout=120, what="the scaler adding an instance of A")
            up = added()
            assert up is not None and up.reason.startswith("coscale: quota short for") and up.count == 1, up
            assert up.target_replicas == 2
            # Quota first: A's quota on p1 went up (B lending) before the instance was asked for.
            before = events[: events.index(up)]
            raised = [e for e in before if isinstance(e, QuotaSet) and e.worker_id == "p1"]
            lent = [e for e in before if isinstance(e, QuotaSet) and e.worker_id == "p1-2"]
            assert raised and lent and raised[-1].quota > lent[-1].quota, (raised, lent)

            # The instance it asked for loads. A failed load is decided again (after a back-off
            # from that worker), by the co-scaling's target, so the decision that loaded it may
            # be a retry: any ok ack of an up of A with policy coscale.
            def loaded() -> ScaleAck | None:
                ups = {e.decision_id for e in events if isinstance(e, ScaleDecision) and e.model == "A"}
                return next((a for a in acks if a.decision_id in ups and a.ok), None)

            await wait_until(lambda: loaded() is not None, timeout=120, what="an instance of A loaded")
            ack = loaded()
            assert ack is not None
            retries = [e for e in events if isinstance(e, ScaleDecision) and e.decision_id == ack.decision_id]
            assert retries and all(d.policy == "coscale" and d.target_replicas == 2 for d in retries), retries
            (new,) = ack.workers
            assert new in ("p2", "p2-2"), ack  # the idle process: p1's other slot holds B
            await wait_until(
                lambda: served.get(new, 0) > 0, timeout=60, what=f"the new instance {new} generating A's tokens"
            )
            assert beats[new].model == "A" and beats[new].state == "serving"
            # The load ends before the gateway stops: its shutdown fails what is still running
            # when its grace ends, which is not what this test is about.
            stop_load.set()
            await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 120)
    finally:
        stop_load.set()
        if clients:
            await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 120)
        stop.set()
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await nc.drain()
        procs.stop_all()
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
