"""A gateway that cannot see a model's folder takes its config and tokenizer from the mesh: a real
loader (real nats-server) sends the packed files in pieces, and the gateway's catalog reads them
from its own copy. Without a loader the model stays unavailable, with the reason."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from nats.aio.client import Client as NATS

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.meshfiles import CHUNK_BYTES, fetch_model_files
from cascade.models.config import read_config
from cascade.models.generate import generate_model
from cascade.models.tokenizer import load_tokenizer
from cascade.natsutil import connect
from cascade.service import ServiceHost
from cascade.subjects import Subjects
from services.gateway.catalog import ModelCatalog
from services.loader.main import Loader
from services.loader.settings import LoaderSettings
from tests.hf_fixtures import SMOLLM2, build

M = "m"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with a real tokenizer.json and a file bigger than one piece."""
    root = tmp_path_factory.mktemp("meshfiles")
    model = root / M
    generate_model(model, GenerateSpec(layers=1, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256))
    tok = build(SMOLLM2, root / "tok")
    for p in tok.iterdir():
        if p.name != "config.json":
            shutil.copy(p, model / p.name)
    (model / "notes.txt").write_bytes(os.urandom(CHUNK_BYTES * 2 + 123))
    return model


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    c = await connect(nats_url, "test-meshfiles")
    try:
        yield c
    finally:
        await c.close()


def _catalog(nc: NATS, s: Subjects, tmp_path: Path) -> ModelCatalog:
    # The gateway's deployment names a folder it cannot see (the store is on another machine).
    dep = Deployment((ModelDeployment(M, tmp_path / "not-mounted" / M, 0, 1),))
    return ModelCatalog(dep, fetch=lambda d: fetch_model_files(nc, s, d.name, tmp_path / "gw", 5.0))


async def test_the_gateway_reads_a_models_files_from_a_loader(
    nats_url: str, subjects: Subjects, nc: NATS, store: Path, tmp_path: Path
) -> None:
    catalog = _catalog(nc, subjects, tmp_path)
    errors = await catalog.refresh()
    assert "from the mesh" in errors[M], errors  # no loader yet: unavailable, and why

    settings = LoaderSettings(loader_id="lf", lease="off", heartbeat_s=0.2)
    ld = Loader(settings, Deployment((ModelDeployment(M, store, 0, 1),)), structlog.get_logger().bind(test="mf"))
    async with ServiceHost(ld, nats_url, subjects.prefix):
        assert await catalog.refresh() == {}
    info = catalog.get(M)
    cfg = read_config(store)
    assert (info.context_len, info.vocab_size) == (cfg.max_position_embeddings, cfg.vocab_size)
    text = "Hello mesh, 12345!"
    assert info.tokenizer.encode(text) == load_tokenizer(store).encode(text)
    assert _differences(store, tmp_path / "gw") == []


def _differences(store: Path, fetched_root: Path) -> list[str]:
    """Files of the store's copy that differ from the store's (the pieces put back byte for
    byte), and any weights file that travelled (they never go this way)."""
    [copy] = fetched_root.iterdir()
    out = [p.name for p in store.iterdir() if not p.name.endswith(".safetensors") and not _same(copy / p.name, p)]
    return out + [p.name for p in copy.glob("*.safetensors")]


def _same(a: Path, b: Path) -> bool:
    return a.is_file() and a.read_bytes() == b.read_bytes()
