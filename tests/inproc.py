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

from cascade.config import GenerateSpec
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.service import Service, serve
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
async def serving(nats_url: str, prefix: str, *services: Service, stop_s: float = 60) -> AsyncIterator[InProcess]:
    """`services` running until the block ends; more may be started on the value it gives."""
    group = InProcess(nats_url, prefix)
    try:
        group.start(*services)
        yield group
    finally:
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


def paced_load_mb_s(model_dir: Path, seconds: float) -> float:
    """A worker's `load_mb_s` that makes loading the whole checkpoint take `seconds` (an emulated
    disk slow enough for a test to catch instances half-loaded)."""
    ck = Checkpoint(model_dir)
    try:
        return ck.total_nbytes() / 1e6 / seconds
    finally:
        ck.close()
