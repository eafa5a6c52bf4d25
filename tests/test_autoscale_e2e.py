"""Autoscaling end to end on the real broker: real workers (torch, in-process), the real gateway,
scaler and loader services, requests over HTTP.

- a burst makes the policy decide an up, the loader acks it, and the new instance serves;
- keep-alive scales an idle model to zero (its worker back in the pool, its model freed), and the
  next request scales it from zero and is answered;
- a model at its minimum is never taken from: a request for a model with no worker to get waits
  out the gateway's queue timeout and gets a clear 503; a model above its need lends a worker;
- the admin API (and `cascade deploy`) changes a model's policy at run time, and the two-stage
  policy holds its instances at its batch limit.

Intervals are short (heartbeats and metrics 0.2 s, scaler tick 0.1 s); every wait is on an event
or a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from nats.aio.msg import Msg

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import (
    DeployReply,
    DeployRequest,
    ModelMetrics,
    Ok,
    ScaleAck,
    ScaleDecision,
    ScaleRequest,
    ServiceReady,
    decode,
    encode,
)
from cascade.models.generate import generate_model
from cascade.natsutil import connect, request
from cascade.service import serve
from cascade.subjects import Subjects
from services.gateway.testing import RunningGateway, running_gateway
from services.loader.main import Loader
from services.loader.settings import LoaderSettings
from services.scaler.main import Scaler
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

SPEC = GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=5)
HB_S = 0.2
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    generate_model(d, SPEC)
    return d


def model(name: str, path: Path, lo: int, hi: int, *, policy: str = "concurrency", **knobs: float) -> ModelDeployment:
    return ModelDeployment(name, path, lo, hi, policy=policy, knobs=dict(knobs))


@dataclass
class Mesh:
    nats_url: str
    subjects: Subjects
    deployment: Deployment
    nc: Any = None
    gateway: RunningGateway | None = None
    scaler: Scaler | None = None
    workers: dict[str, WorkerService] = field(default_factory=dict)
    decisions: list[ScaleDecision] = field(default_factory=list)
    acks: list[ScaleAck] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def start(self, name: str, coro: Any) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def add_worker(self, wid: str, **cfg: Any) -> WorkerService:
        svc = WorkerService(
            WorkerSettings(self.nats_url, self.subjects.prefix, wid, heartbeat_s=HB_S, metrics_s=HB_S, **cfg)
        )
        self.workers[wid] = svc
        self.start(wid, serve(svc, svc.settings.nats_url, svc.settings.prefix, self.stop))
        await wait_until(lambda: svc.started, what=f"{wid} started")
        return svc

    def serving(self, name: str) -> list[str]:
        return sorted(w for w, s in self.workers.items() if s.slot.model_name == name and s.slot.state == "serving")

    def decided(self, name: str, action: str) -> list[ScaleDecision]:
        return [d for d in self.decisions if d.model == name and d.action == action]

    async def until_decided(self, name: str, action: str, n: int, what: str) -> None:
        await wait_until(lambda: len(self.decided(name, action)) == n, what=what)

    def acked(self, d: ScaleDecision) -> ScaleAck | None:
        return next((a for a in self.acks if a.decision_id == d.decision_id), None)

    async def done(self, d: ScaleDecision, timeout: float = 30.0) -> ScaleAck:
        await wait_until(lambda: self.acked(d) is not None, timeout, what=f"ack of {d.decision_id} ({d.reason})")
        ack = self.acked(d)
        assert ack is not None and ack.ok, ack
        return ack

    async def complete(self, name: str, prompt: str = "hi", max_tokens: int = 8) -> tuple[int, dict[str, Any]]:
        assert self.gateway is not None
        body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.gateway.url}/v1/completions", json=body) as r,
        ):
            return r.status, await r.json()


@contextlib.asynccontextmanager
async def running_mesh(
    nats_url: str, subjects: Subjects, deployment: Deployment, workers: list[str], queue_timeout_s: float = 20.0
) -> AsyncIterator[Mesh]:
    """Workers, loader, scaler and gateway under `subjects`; everything stopped on the way out,
    also on failure."""
    mesh = Mesh(nats_url, subjects, deployment)
    log = structlog.get_logger().bind(test="autoscale")
    mesh.nc = await connect(nats_url, "test-autoscale")

    async def on_decision(msg: Msg) -> None:
        mesh.decisions.append(decode(msg.data, ScaleDecision))

    async def on_ack(msg: Msg) -> None:
        mesh.acks.append(decode(msg.data, ScaleAck))

    try:
        await mesh.nc.subscribe(subjects.scale_decision(), cb=on_decision)
        await mesh.nc.subscribe(subjects.scale_ack(), cb=on_ack)
        for w in workers:
            await mesh.add_worker(w)
        loader_settings = LoaderSettings(
            loader_id="loader-t", heartbeat_s=HB_S, idle_wait_s=2.0, load_timeout_s=60.0, unload_timeout_s=30.0,
            request_timeout_s=5.0, host_cache="off",
        )  # fmt: skip

        loader = Loader(loader_settings, deployment, log.bind(service="loader"))
        mesh.start("loader", serve(loader, nats_url, subjects.prefix, mesh.stop))
        mesh.scaler = Scaler(
            deployment, "scaler-t", tick_s=0.1, ack_timeout_s=60.0, heartbeat_s=HB_S, window_s=10.0, rate_window_s=2.0,
            stale_s=1.0, log=log.bind(service="scaler"),
        )  # fmt: skip
        mesh.start("scaler", serve(mesh.scaler, nats_url, subjects.prefix, mesh.stop))
        async with running_gateway(
            nats_url, subjects.prefix, deployment, heartbeat_s=HB_S, metrics_interval_s=HB_S,
            queue_timeout_s=queue_timeout_s,
        ) as gw:  # fmt: skip
            mesh.gateway = gw
            yield mesh
    finally:
        mesh.stop.set()
        if mesh.tasks:
            await asyncio.wait_for(asyncio.gather(*mesh.tasks, return_exceptions=True), 60)
        await mesh.nc.drain()


async def test_a_gateway_report_of_waiting_requests_wakes_the_scaler_before_its_tick(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    tick_s = 8.0
    dep = Deployment((model("m", model_dir, 0, 1, upscale_delay_s=0.0),))
    scaler = Scaler(
        dep, "scaler-w", tick_s=tick_s, ack_timeout_s=60.0, heartbeat_s=HB_S, window_s=10.0, rate_window_s=2.0,
        stale_s=30.0, log=structlog.get_logger().bind(service="scaler"),
    )  # fmt: skip
    looks: list[tuple[float, int]] = []  # (scaler clock, requests waiting as its policy saw them)
    tick = scaler.tick

    async def counted() -> None:
        at = scaler.clock()
        await tick()
        looks.append((at, scaler.state.controls.get("m").window.snapshot(time.time()).waiting))

    scaler.tick = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    nc = await connect(nats_url, "test-wake")
    announced: list[ServiceReady] = []

    async def on_ready(m: Any) -> None:
        announced.append(decode(m.data, ServiceReady))

    await nc.subscribe(subjects.service_ready(), cb=on_ready)
    await nc.flush()
    task = asyncio.create_task(serve(scaler, nats_url, subjects.prefix, stop))
    try:
        # Its first look can come before its subscriptions reach the server; its announcement
        # comes after (cascade/service.py flushes first), so a report sent then is heard.
        await wait_until(lambda: len(looks) == 1 and announced, what="the scaler's first look and its announcement")
        report = ModelMetrics("gw-t", "m", seq=1, ts=time.time(), interval_s=0.1, arrivals=3, waiting=3)
        await nc.publish(subjects.metrics("gateway", "gw-t"), encode(report))
        await wait_until(lambda: len(looks) == 2, timeout=2 * tick_s, what="a look after the report")
        (t0, _), (t1, waiting) = looks
        assert waiting == 3
        assert t1 - t0 < 0.75 * tick_s, "the report did not wake the scaler: it waited for its tick"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await nc.drain()


async def test_a_burst_scales_up_and_the_new_instance_serves(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    m = model("m", model_dir, 1, 2, target_ongoing_requests=1.0, upscale_delay_s=0.0, downscale_delay_s=600.0)
    dep = Deployment((m,))
    async with running_mesh(nats_url, subjects, dep, ["w1", "w2"]) as mesh:
        await wait_until(lambda: len(mesh.serving("m")) == 1, what="m at min_replicas")
        (first,) = mesh.serving("m")
        assert [d.action for d in mesh.decided("m", "up")] == ["up"]

        stop_load = asyncio.Event()
        statuses: list[int] = []

        async def client(i: int) -> None:
            # Lengths differ so the clients fall out of step: six requests arriving together would
            # go to one instance as one batch every time.
            while not stop_load.is_set():
                status, _ = await mesh.complete("m", f"burst {i}", max_tokens=16 + 10 * i)
                statuses.append(status)

        clients = [asyncio.create_task(client(i)) for i in range(6)]
        try:
            await wait_until(lambda: len(mesh.decided("m", "up")) == 2, what="an up decision from the burst")
            burst = mesh.decided("m", "up")[1]
            assert "ongoing" in burst.reason and burst.figures["ongoing"] >= 2 and burst.count == 1
            ack = await mesh.done(burst)
            (new,) = ack.workers
            assert new != first
            await wait_until(
                lambda: (e := mesh.workers[new].slot.engine) is not None and sum(e.stats.finished.values()) > 0,
                what="the new instance answering requests",
            )
        finally:
            stop_load.set()
            await asyncio.gather(*clients)
        assert statuses and set(statuses) == {200}
        assert mesh.serving("m") == sorted([first, new])
        assert mesh.decided("m", "down") == []


async def test_keep_alive_scales_to_zero_and_the_next_request_from_zero(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    dep = Deployment((model("z", model_dir, 0, 1, keep_alive_s=1.0, upscale_delay_s=0.0),))
    async with running_mesh(nats_url, subjects, dep, ["w1"]) as mesh:
        w1 = mesh.workers["w1"]
        for round_ in (1, 2):
            assert mesh.serving("z") == []
            status, body = await mesh.complete("z", f"wake up {round_}")
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 8
            up = mesh.decided("z", "up")[-1]
            assert len(mesh.decided("z", "up")) == round_ and "scale from zero" in up.reason
            await mesh.done(up)
            model_ref = weakref.ref(w1.slot.model) if w1.slot.model is not None else None
            await mesh.until_decided("z", "down", round_, what="keep-alive scale-down")
            down = mesh.decided("z", "down")[-1]
            assert "keep-alive" in down.reason and down.target_replicas == 0
            await mesh.done(down)
            assert w1.slot.state == "idle" and w1.slot.model is None and w1.slot.engine is None
            gc.collect()
            assert model_ref is not None and model_ref() is None, "the unloaded model's memory is still held"


async def test_a_model_at_its_minimum_is_not_taken_from_and_one_above_its_need_lends(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    dep = Deployment(
        (
            model("a", model_dir, 1, 2, target_ongoing_requests=1.0, downscale_delay_s=600.0, keep_alive_s=600.0),
            model("b", model_dir, 0, 1, upscale_delay_s=0.0, keep_alive_s=600.0),
        )
    )
    async with running_mesh(nats_url, subjects, dep, ["w1"], queue_timeout_s=1.5) as mesh:
        await wait_until(lambda: mesh.serving("a") == ["w1"], what="a on the only worker")
        status, body = await mesh.complete("b")
        assert status == 503 and "no instance of b" in body["error"]["message"], body
        assert mesh.decided("a", "down") == [] and mesh.decided("b", "up") == []
        assert mesh.serving("a") == ["w1"]
        # The gateway's next report shows nobody waits for b any more; b's target follows.
        scaler = mesh.scaler
        assert scaler is not None
        await wait_until(lambda: scaler.state.book.targets["b"] == 0, what="b's target back to zero")

        # A second worker; the operator asks a for two. a now holds one above its need.
        await mesh.add_worker("w2")
        await request(mesh.nc, subjects.scale_request(), ScaleRequest("a", 2), Ok, timeout=5)
        await wait_until(lambda: len(mesh.serving("a")) == 2, what="a on both workers")
        held = {w: weakref.ref(s.slot.model) for w, s in mesh.workers.items() if s.slot.model is not None}
        status, body = await mesh.complete("b", max_tokens=4)
        assert status == 200, body
        (loan,) = mesh.decided("a", "down")
        assert loan.count == 1 and "lend 1 to b" in loan.reason and loan.figures["need"] == 1
        (lent,) = (await mesh.done(loan)).workers
        assert mesh.serving("b") == [lent] and len(mesh.serving("a")) == 1
        gc.collect()
        assert held[lent]() is None, "the lent worker still holds a's model"


async def test_admin_api_changes_the_policy_and_two_stage_sets_batch_limits(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    dep = Deployment((model("t", model_dir, 1, 1, policy="two-stage", base_batch=3, max_batch=16),))
    async with running_mesh(nats_url, subjects, dep, []) as mesh:
        w1 = await mesh.add_worker("w1", max_batch=6, kv_slots=12)
        await wait_until(lambda: mesh.serving("t") == ["w1"], what="t serving")
        # The two-stage policy holds its instances at its base batch.
        await wait_until(
            lambda: w1.slot.engine is not None and w1.slot.engine.figures.max_batch == 3, what="batch limit 3"
        )

        reply = await request(mesh.nc, subjects.scale_deploy(), DeployRequest("t"), DeployReply, timeout=5)
        assert (reply.policy, reply.changed, reply.batch_limit, reply.target_replicas) == ("two-stage", False, 3, 1)
        assert reply.effective["base_batch"] == 3 and reply.knobs == {"base_batch": 3.0, "max_batch": 16.0}

        env = {**os.environ, "CASCADE_HOME": str(model_dir.parent / "home")}
        cmd = [sys.executable, "-m", "cascade.cli", "deploy", "t", "--policy", "rate", "--knob", "capacity_tps=50"]
        cmd += ["--nats-url", nats_url, "--prefix", subjects.prefix]
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "t: policy rate" in out.decode() and "capacity_tps=50" in out.decode()
        # Off the vertical policy, the worker goes back to its own limit.
        await wait_until(
            lambda: w1.slot.engine is not None and w1.slot.engine.figures.max_batch == 6, what="own batch limit again"
        )

        bad = DeployRequest("t", knobs={"speed": 2})
        with pytest.raises(Exception, match="bad_policy: policy rate: unknown knobs"):
            await request(mesh.nc, subjects.scale_deploy(), bad, DeployReply, timeout=5)
        with pytest.raises(Exception, match="unknown_model"):
            await request(mesh.nc, subjects.scale_deploy(), DeployRequest("nope"), DeployReply, timeout=5)


def batch_limit(w: WorkerService) -> int | None:
    eng = w.slot.engine
    return eng.figures.max_batch if eng is not None else None
