"""Shared fixtures: one real nats-server per test session on a free port; each test
gets its own subject prefix so tests never hear each other."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cascade.embedded_nats import EmbeddedNats
from cascade.subjects import Subjects


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
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def subjects(prefix: str) -> Subjects:
    return Subjects(prefix)
