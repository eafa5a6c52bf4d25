"""Shared fixtures: one real nats-server per test session on a free port; each test
gets its own subject prefix so tests never hear each other.

Every test that talks to the broker is marked `e2e` here, whatever its module says, so
`pytest -m "not e2e"` runs the broker-free unit tests alone in seconds."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.cli.embedded_nats import EmbeddedNats, free_port
from cascade.subjects import Subjects
from tests.smollm2 import GGUF, SKIP_REASON

# Fixtures that start a broker, a process or a whole mesh: a test using one is end-to-end.
_E2E_FIXTURES = frozenset({"nats_server", "nats_url", "js_url", "broker", "three"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    srv = EmbeddedNats(jetstream=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
def js_url(tmp_path: Path) -> Iterator[str]:
    """A broker of the test's own with JetStream (the loaders' lease and journal), its store in
    the test's folder, so no state outlives the test."""
    srv = EmbeddedNats(jetstream=True, store_dir=tmp_path / "js").start()
    try:
        yield srv.url
    finally:
        srv.stop()


@pytest.fixture
def broker() -> Iterator[EmbeddedNats]:
    """A broker of the test's own on a fixed port, for a test that stops (or kills) and restarts it."""
    b = EmbeddedNats(port=free_port()).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def subjects(prefix: str) -> Subjects:
    return Subjects(prefix)


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2 GGUF converted by Cascade into a fresh home, once per session (its
    conversion takes ~10 s; every test that needs the checkpoint shares this one)."""
    from cascade.models.gguf import convert_gguf_cached

    if GGUF is None:
        pytest.skip(SKIP_REASON)
    return convert_gguf_cached(GGUF, home=tmp_path_factory.mktemp("smollm2-home"), progress=False)
