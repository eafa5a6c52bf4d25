"""`deployment.get`: a gateway or loader that (re)starts from a deployment file that does not name
the models deployed at run time learns them from the scaler, on a real nats-server; with no
scaler it keeps its file's deployment; a change that arrives while it asks wins over the answer."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.config import Deployment, GenerateSpec, ModelDeployment, entry_json
from cascade.deployfeed import DeploymentFeed
from cascade.messages import DeploymentChanged, DeploymentReply, DeployReply, DeployRequest, encode
from cascade.models.generate import generate_model
from cascade.natsutil import connect, request
from cascade.service import ServiceHost
from cascade.subjects import Subjects
from services.gateway.testing import running_gateway
from services.loader.main import Loader
from services.loader.main import add_arguments as loader_arguments
from services.loader.settings import settings_from_args
from services.scaler.main import Scaler

pytestmark = pytest.mark.e2e

SPEC = GenerateSpec(layers=1, hidden=32, heads=2, kv_heads=1, vocab=260)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    for name in ("a", "b"):
        generate_model(root / name, SPEC)
    return root / "a", root / "b"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await connect(nats_url, "test-deployment-get")
    try:
        yield conn
    finally:
        await conn.drain()


def file_deployment(a: Path) -> Deployment:
    """What the (read-only) deployment file says: model a only."""
    return Deployment(models=(ModelDeployment("a", a, 0, 2),))


def loader(nats_url: str, prefix: str, dep: Deployment) -> Loader:
    p = argparse.ArgumentParser()
    loader_arguments(p)
    args = p.parse_args(["--nats-url", nats_url, "--prefix", prefix, "--loader-id", "loader-t"])
    return Loader(settings_from_args(args), dep, structlog.get_logger().bind(test="deployment-get"))


async def listed_models(url: str) -> list[str]:
    async with aiohttp.ClientSession() as http, http.get(url + "/v1/models") as r:
        assert r.status == 200
        return sorted(m["id"] for m in (await r.json())["data"])


async def test_a_restarted_gateway_and_loader_learn_models_deployed_at_run_time(
    nats_url: str, subjects: Subjects, nc: NATS, folders: tuple[Path, Path]
) -> None:
    a, b = folders
    dep = file_deployment(a)
    scaler = Scaler(dep, "scaler-t", tick_s=0.2, heartbeat_s=0.2)
    async with ServiceHost(scaler, nats_url, subjects.prefix):
        # `cascade deploy b --model <folder> --kv-cache-mb 4` while the mesh runs.
        added = ModelDeployment("b", b, 0, 2, kv_cache_mb=4.0, max_model_len=128)
        req = DeployRequest("b", add=entry_json(added))
        reply = await request(nc, subjects.scale_deploy(), req, DeployReply, timeout=10)
        assert reply.model == "b"
        # A gateway and a loader start now from the file, which names only a.
        async with running_gateway(nats_url, subjects.prefix, dep) as gw:
            assert await listed_models(gw.url) == ["a", "b"]
        ld = loader(nats_url, subjects.prefix, dep)
        async with ServiceHost(ld, nats_url, subjects.prefix):
            assert ld.deployment.names() == ["a", "b"]
            got = ld.deployment.get("b")
            assert got is not None and (got.path, got.kv_cache_mb, got.max_model_len) == (b, 4.0, 128)


async def test_without_a_scaler_they_keep_their_deployment_file(
    nats_url: str, subjects: Subjects, folders: tuple[Path, Path]
) -> None:
    a, _ = folders
    dep = file_deployment(a)
    async with running_gateway(nats_url, subjects.prefix, dep) as gw:
        assert await listed_models(gw.url) == ["a"]
    ld = loader(nats_url, subjects.prefix, dep)
    async with ServiceHost(ld, nats_url, subjects.prefix):
        assert ld.deployment == dep


async def test_a_change_that_arrives_while_asking_wins_over_the_answer(
    subjects: Subjects, nc: NATS, folders: tuple[Path, Path]
) -> None:
    a, b = folders
    feed = DeploymentFeed()
    old = [entry_json(ModelDeployment("a", a, 0, 2))]
    new = [*old, entry_json(ModelDeployment("b", b, 0, 2))]

    changes = [encode(DeploymentChanged(new, ["b"]))]

    async def scaler_answers(msg: Msg) -> None:
        # The first time, a change is taken before the (older) answer gets back to the asker.
        if changes:
            feed.changed(changes.pop())
        await msg.respond(encode(DeploymentReply(old, "scaler-t")))

    sub = await nc.subscribe(subjects.deployment_get(), cb=scaler_answers)
    try:
        dep, why = await feed.ask(nc, subjects, "t")
        assert dep is None and "deployment.changed" in why
        # Asked again with nothing changing meanwhile, the answer is taken.
        dep, why = await feed.ask(nc, subjects, "t")
        assert dep is not None and dep.names() == ["a"] and why == "scaler scaler-t"
    finally:
        await sub.unsubscribe()
