"""Control-plane deaths with real processes and a real nats-server: the loader, then the scaler,
SIGKILLed the moment a scale decision goes out and started again. The replica target is reached
exactly once: never more instances than the target, never a scale-down, and the restarted
services settle with the target they inherited."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from bench.common import stop_processes
from cascade.config import GenerateSpec
from cascade.messages import Heartbeat, Ok, ScaleAck, ScaleDecision, ScaleRequest, decode
from cascade.models.generate import generate_model
from cascade.natsutil import connect, gather_status, request
from cascade.subjects import Subjects
from cascade.workers import COUNTED_STATES
from tests.waiting import wait_until
from tests.workerprocs import REPO

pytestmark = pytest.mark.e2e

MODEL = "m"
HEARTBEAT_S = "0.5"  # heartbeats a busy 2-core machine still keeps (3 missed = dead)


@dataclass
class Procs:
    url: str
    prefix: str
    logs: Path
    config: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, service: str, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        env.update(PYTHONPATH=str(REPO), CASCADE_HOME=str(self.logs / "home"), CASCADE_HEARTBEAT_S=HEARTBEAT_S)
        env["CASCADE_LOAD_MB_S"] = "0.15"
        argv = [sys.executable, "-m", "cascade.cli", service, "--nats-url", self.url, "--prefix", self.prefix]
        argv += ["--config", str(self.config), "--log-level", "debug", *extra]
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(30)

    def logs_tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def stop_all(self) -> None:
        stop_processes(self.procs.values())

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()


@pytest.fixture
def mesh(nats_url: str, prefix: str, tmp_path: Path) -> Iterator[Procs]:
    model = tmp_path / "models" / MODEL
    generate_model(model, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256))
    cfg = tmp_path / "deploy.toml"
    cfg.write_text(
        f'[[models]]\nname = "{MODEL}"\npath = "{model}"\nmin_replicas = 1\nmax_replicas = 3\npolicy = "manual"\n'
        # Each worker reads the checkpoint itself, paced (CASCADE_LOAD_MB_S): a load lasts about five
        # seconds, so the kills land while the decision is being carried out.
        'loading = "disk"\n'
    )
    with Procs(nats_url, prefix, tmp_path, cfg) as p:
        yield p


@dataclass
class Watch:
    """Every heartbeat, decision and ack on the mesh; the most workers seen holding the model."""

    latest: dict[str, Heartbeat] = field(default_factory=dict)
    decisions: list[ScaleDecision] = field(default_factory=list)
    acks: list[ScaleAck] = field(default_factory=list)
    most: int = 0

    def holders(self) -> int:
        return sum(1 for hb in self.latest.values() if hb.model == MODEL and hb.state in COUNTED_STATES)

    def serving(self) -> int:
        return sum(
            1
            for hb in self.latest.values()
            if hb.model == MODEL and hb.state == "serving" and hb.units_ready == hb.num_units
        )

    async def attach(self, nc: NATS, s: Subjects) -> None:
        async def on_beat(msg: Any) -> None:
            hb = decode(msg.data, Heartbeat)
            self.latest[hb.worker_id] = hb
            self.most = max(self.most, self.holders())

        async def on_decision(msg: Any) -> None:
            self.decisions.append(decode(msg.data, ScaleDecision))

        async def on_ack(msg: Any) -> None:
            self.acks.append(decode(msg.data, ScaleAck))

        await nc.subscribe(s.heartbeat_all(), cb=on_beat)
        await nc.subscribe(s.scale_decision(), cb=on_decision)
        await nc.subscribe(s.scale_ack(), cb=on_ack)
        await nc.flush()


async def _scaler_settled(nc: NATS, s: Subjects, target: int) -> bool:
    """The scaler's own word: the model's target, nothing in flight, a loader known."""
    st = await gather_status(nc, s, window_s=0.3)
    for svc in st.services:
        if svc.service == "scaler":
            d = svc.detail
            return bool(d.get("targets", {}).get(MODEL) == target and not d.get("in_flight") and d.get("loader_known"))
    return False


async def _scale_killing(
    mesh: Procs, nc: NATS, s: Subjects, watch: Watch, target: int, victim: str, timeout: float = 120.0
) -> None:
    """Ask for `target` replicas and SIGKILL `victim` as soon as the decision is out; start it again."""
    before = len(watch.decisions)
    await request(nc, s.scale_request(), ScaleRequest(MODEL, target), Ok, timeout=10)
    await wait_until(lambda: len(watch.decisions) > before, 30, "the scale decision")
    mesh.kill(victim)
    mesh.start(victim, victim)
    try:
        await wait_until(lambda: watch.serving() == target, timeout, f"{target} serving instances")
        deadline = asyncio.get_running_loop().time() + 60.0
        # Each look is a 0.3 s status gather: polling the scaler's word with a deadline.
        while not await _scaler_settled(nc, s, target):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("the scaler did not settle on the target")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{mesh.logs_tail()}") from None


async def test_loader_and_scaler_killed_mid_decision_reach_the_target_exactly_once(
    mesh: Procs, nats_url: str, prefix: str
) -> None:
    s = Subjects(prefix)
    nc = await connect(nats_url, "test-watch")
    watch = Watch()
    try:
        await watch.attach(nc, s)
        mesh.start("loader", "loader")
        mesh.start("scaler", "scaler")
        for w in ("w1", "w2", "w3"):
            mesh.start(w, "worker", "--worker-id", w, "--kv-cache-mb", "16")
        try:
            await wait_until(lambda: watch.serving() == 1, 120, "the first instance")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{mesh.logs_tail()}") from None

        # The loader dies the moment the decision for a second instance is out: the scaler drops
        # it, and decides again only if the gap is still there (at most one more decision).
        before = len(watch.decisions)
        await _scale_killing(mesh, nc, s, watch, 2, "loader")
        assert watch.most == 2, [(d.decision_id, d.action, d.count) for d in watch.decisions]
        assert len(watch.decisions) - before <= 2

        # Then the scaler dies the moment the decision for a third is out: its successor takes
        # that decision over (or finds it done) and decides nothing itself.
        before = len(watch.decisions)
        await _scale_killing(mesh, nc, s, watch, 3, "scaler")
        assert watch.most == 3
        assert len(watch.decisions) - before == 1, watch.decisions[before:]
        assert watch.serving() == 3
        # Never a scale-down, and the instances added by ok acks are exactly the two asked for.
        assert [d for d in watch.decisions if d.action == "down"] == []
        added = [w for a in watch.acks if a.ok for w in a.workers]
        assert len(added) == len(set(added)) and len(set(added)) <= 3
        ids = [d.decision_id for d in watch.decisions]
        assert len(ids) == len(set(ids)), ids
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
