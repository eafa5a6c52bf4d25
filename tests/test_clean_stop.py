"""SIGTERM stops every service cleanly whatever the broker's state: exit 0 and no traceback,
also when the broker died under a mesh that was serving, and when it never came at all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cascade.cli.embedded_nats import EmbeddedNats, free_port
from cascade.config import GenerateSpec
from cascade.messages import LoadModel, Ok, ServiceReady, decode
from cascade.models.generate import generate_model
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from tests.waiting import wait_until
from tests.workerprocs import REPO

pytestmark = pytest.mark.e2e

MODEL = "m"


@pytest.fixture
def own_broker() -> Iterator[EmbeddedNats]:
    """A broker of this test's own, since the test kills it."""
    b = EmbeddedNats().start()
    try:
        yield b
    finally:
        b.stop()


def start(service: str, url: str, prefix: str, logs: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(PYTHONPATH=str(REPO), CASCADE_HOME=str(logs / "home"), CASCADE_HEARTBEAT_S="0.2")
    argv = [sys.executable, "-m", "cascade.cli", service, "--nats-url", url, "--prefix", prefix, *extra]
    with (logs / f"{service}.log").open("wb") as log:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_all(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, int]:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = p.wait()
    return codes


async def test_sigterm_with_the_broker_gone_exits_0_without_a_traceback(
    own_broker: EmbeddedNats, tmp_path: Path
) -> None:
    model = tmp_path / "home" / "models" / MODEL
    generate_model(model, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=4096))
    cfg = tmp_path / "deploy.toml"
    cfg.write_text(f'[[models]]\nname = "{MODEL}"\npath = "{model}"\nmin_replicas = 0\n')
    prefix = "stop" + os.urandom(3).hex()
    url = own_broker.url
    port = free_port()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    paced = ("--device-profile", "llama2-7b-a100-80gb")
    try:
        nc = await connect(url, "test")
        s = Subjects(prefix)
        ready: set[str] = set()

        async def on_ready(msg: Any) -> None:
            ready.add(decode(msg.data, ServiceReady).service)

        # Every service subscribed and announced itself (the signal handlers are in place by then).
        await nc.subscribe(s.service_ready(), cb=on_ready)
        await nc.flush()
        # The stream below outlasts both the worker's drain and the gateway's grace: short ones
        # keep the test quick, and both ends' "time is up" paths run.
        procs["worker"] = start(
            "worker", url, prefix, tmp_path, "--worker-id", "w1", *paced, "--config", str(cfg), "--drain-timeout-s", "2"
        )
        procs["gateway"] = start(
            "gateway", url, prefix, tmp_path, "--port", str(port), "--config", str(cfg), "--shutdown-grace-s", "2"
        )
        procs["scaler"] = start("scaler", url, prefix, tmp_path, "--config", str(cfg))
        procs["loader"] = start("loader", url, prefix, tmp_path, "--config", str(cfg))
        async with aiohttp.ClientSession() as http:
            health = f"http://127.0.0.1:{port}/health"

            async def healthy() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(health) as r:
                        return r.status == 200
                return False

            loaded = False
            for _ in range(600):  # polling with a deadline: first the worker, then the model
                if not loaded:
                    with contextlib.suppress(Exception):
                        await request(nc, s.load("w1"), LoadModel(MODEL, str(model)), Ok, timeout=2)
                        loaded = True
                if loaded and await healthy():
                    break
                await asyncio.sleep(0.1)
            assert await healthy(), "the mesh did not serve"
            await wait_until(lambda: ready == set(procs), 60, "every service ready")
            await nc.close()
            body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "ignore_eos": True, "stream": True}
            async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                assert r.status == 200
                await r.content.readuntil(b"\n\n")
                # The broker goes away under a serving mesh with a stream running.
                assert own_broker.proc is not None
                own_broker.proc.kill()
                own_broker.proc.wait()
                await wait_until(lambda: "nats_disconnected" in (tmp_path / "worker.log").read_text(), 30)
                codes = stop_all(procs)
    finally:
        codes = stop_all(procs)
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace") for n in procs}
    assert codes == dict.fromkeys(procs, 0), {n: logs[n][-2000:] for n in procs}
    for n, text in logs.items():
        assert "Traceback" not in text, (n, text[-4000:])


def test_sigterm_while_waiting_for_a_broker_that_never_comes_exits_0(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there
    procs = {"worker": start("worker", url, "p", tmp_path, "--worker-id", "w1")}
    try:
        # The worker is waiting for the broker (the connect budget is 30 s): stop it meanwhile.
        deadline = 600
        while "connecting" not in (tmp_path / "worker.log").read_text() and deadline:
            deadline -= 1
            with contextlib.suppress(subprocess.TimeoutExpired):
                procs["worker"].wait(0.1)  # polling the log with a deadline
    finally:
        codes = stop_all(procs)
    text = (tmp_path / "worker.log").read_text(errors="replace")
    assert codes == {"worker": 0}, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
