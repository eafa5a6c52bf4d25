"""Services run inside the test's event loop (cascade.service.serve), each on its own NATS
connection, and stopped together, also when the test fails; and the generated checkpoint they
load."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from cascade.config import GenerateSpec
from cascade.messages import ServiceReady, decode
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.natsutil import connect
from cascade.service import Service, serve
from cascade.subjects import Subjects
from services.loader.main import add_arguments as loader_arguments
from services.loader.settings import LoaderSettings, settings_from_args


class InProcess:
    """Started services, stopped by one event: `stop` waits for every one to have shut down."""

    def __init__(self, nats_url: str, prefix: str) -> None:
        self.nats_url = nats_url
        self.prefix = prefix
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[Any]] = []

    def start(self, *services: Service) -> None:
        for s in services:
            self.tasks.append(asyncio.create_task(serve(s, self.nats_url, self.prefix, self.stopping)))

    async def stop(self, timeout_s: float, *, check: bool = False) -> None:
        """`check`: a service that ended with an error fails the test (after all have stopped)."""
        self.stopping.set()
        ended = await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), timeout_s)
        errors = [e for e in ended if isinstance(e, BaseException)]
        if check and errors:
            raise errors[0]


@asynccontextmanager
async def serving(
    nats_url: str, prefix: str, *services: Service, stop_s: float = 60, ready_s: float = 60
) -> AsyncIterator[InProcess]:
    """`services` running until the block ends, the block entered once each has said it is ready
    (`ServiceReady`: its subscriptions are in place at the server, so a request to it finds a
    responder); more may be started on the value it gives (not waited for)."""
    group = InProcess(nats_url, prefix)
    nc = await connect(nats_url, "test-serving")
    want = {(s.service, s.instance) for s in services}
    heard: set[tuple[str, str]] = set()
    all_ready = asyncio.Event()

    async def on_ready(msg: Msg) -> None:
        r = decode(msg.data, ServiceReady)
        heard.add((r.service, r.instance))
        if want <= heard:
            all_ready.set()

    try:
        await nc.subscribe(Subjects(prefix).service_ready(), cb=on_ready)
        await nc.flush()
        group.start(*services)
        if want:
            waiter = asyncio.ensure_future(all_ready.wait())
            try:
                done, _ = await asyncio.wait(
                    [waiter, *group.tasks], timeout=ready_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
            failed = [t for t in done if t is not waiter]
            if failed:
                t = failed[0]
                why = "cancelled" if t.cancelled() else repr(t.exception() or t.result())
                raise AssertionError(f"a service ended before it was ready: {why}")
            if waiter not in done:
                raise AssertionError(f"not ready within {ready_s:g} s: {sorted(want - heard)}")
        yield group
    finally:
        await nc.close()
        await group.stop(stop_s)


def loader_settings(nats_url: str, prefix: str, *flags: str) -> LoaderSettings:
    """A loader's settings as its command line makes them (defaults and variables included)."""
    p = argparse.ArgumentParser()
    loader_arguments(p)
    return settings_from_args(p.parse_args(["--nats-url", nats_url, "--prefix", prefix, *flags]))


def model_dir_fixture(spec: GenerateSpec, folder: str = "model", name: str | None = None) -> Any:
    """A module's `model_dir` fixture: a checkpoint generated from `spec` once per module, in a
    fresh `folder` (or its subfolder `name`, where the folder's name is the model's)."""

    @pytest.fixture(scope="module", name="model_dir")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
        d = tmp_path_factory.mktemp(folder)
        d = d / name if name else d
        generate_model(d, spec)
        return d

    return fixture


def full_and_loading_fixture(heartbeat_s: float) -> Any:
    """A module's `workers` fixture: "full" with one batch slot (a single long request makes it
    busy) and "new", loading at ~0.5 s a layer (slow enough to catch it half-loaded)."""

    @pytest.fixture(name="workers")
    async def fixture(nats_url: str, subjects: Any, model_dir: Path) -> AsyncIterator[dict[str, Any]]:
        from services.worker.main import WorkerService
        from services.worker.settings import WorkerSettings

        unit_mb = Checkpoint(model_dir).unit_nbytes(1) / 1e6
        hb, prefix = heartbeat_s, subjects.prefix
        services = {
            "full": WorkerService(WorkerSettings(nats_url, prefix, "full", heartbeat_s=hb, max_batch=1)),
            "new": WorkerService(WorkerSettings(nats_url, prefix, "new", heartbeat_s=hb, load_mb_s=unit_mb / 0.5)),
        }
        async with serving(nats_url, prefix, *services.values(), stop_s=30):
            yield services

    return fixture


def paced_load_mb_s(model_dir: Path, seconds: float) -> float:
    """A worker's `load_mb_s` that makes loading the whole checkpoint take `seconds` (an emulated
    disk slow enough for a test to catch instances half-loaded)."""
    ck = Checkpoint(model_dir)
    try:
        return ck.total_nbytes() / 1e6 / seconds
    finally:
        ck.close()
