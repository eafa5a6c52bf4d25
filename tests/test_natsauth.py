"""The mesh's NATS credentials: where a client finds them, the files `cascade up` writes (user
only), and a real nats-server started with them refusing a client that has none."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cascade.cli.embedded_nats import EmbeddedNats
from cascade.natsauth import (
    NatsCredentials,
    credentials_for,
    generate,
    read_mesh_credentials,
    remove_mesh_credentials,
    write_mesh_credentials,
)
from cascade.natsutil import connect

URL = "nats://127.0.0.1:4999"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for k in ("CASCADE_NATS_USER", "CASCADE_NATS_PASSWORD", "CASCADE_NATS_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    return tmp_path


def test_files_are_user_only_and_hold_what_the_server_requires(tmp_path: Path) -> None:
    creds = generate()
    assert creds.user and len(creds.password) >= 32
    assert generate().password != creds.password  # per mesh, never a constant
    auth, conf = write_mesh_credentials(creds, URL, tmp_path)
    for f in (auth, conf):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert creds.password in conf.read_text()
    assert read_mesh_credentials(tmp_path) == (URL, creds)
    assert creds.password not in repr(creds)
    remove_mesh_credentials(tmp_path)
    assert not auth.exists() and not conf.exists()


def test_where_a_client_finds_its_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mesh = NatsCredentials(user="cascade", password="from-file")
    write_mesh_credentials(mesh, URL, tmp_path)
    # The mesh's file, for its own broker only (localhost and 127.0.0.1 are the same one).
    assert credentials_for(URL) == mesh
    assert credentials_for("nats://localhost:4999") == mesh
    assert credentials_for("nats://127.0.0.1:5000") is None
    # The URL's own credentials: nothing is added.
    assert credentials_for("nats://u:p@127.0.0.1:4999") is None
    # The environment wins over the file.
    monkeypatch.setenv("CASCADE_NATS_USER", "me")
    monkeypatch.setenv("CASCADE_NATS_PASSWORD", "secret")
    assert credentials_for(URL) == NatsCredentials(user="me", password="secret")
    monkeypatch.setenv("CASCADE_NATS_TOKEN", "tok")
    assert credentials_for(URL) == NatsCredentials(token="tok")
    assert NatsCredentials(token="tok").env() == {"CASCADE_NATS_TOKEN": "tok"}


async def test_a_broker_with_credentials_refuses_a_client_without_them(tmp_path: Path) -> None:
    creds = generate()
    broker = EmbeddedNats()
    _, broker.config_file = write_mesh_credentials(creds, broker.url, tmp_path / "elsewhere")
    with broker:
        # No credentials at all: refused at once with the reason (not after the whole budget).
        with pytest.raises(ConnectionError, match="requires authentication and no credentials"):
            await connect(broker.url, "test-anon", connect_timeout_s=5.0)
        with pytest.raises(ConnectionError, match="refused the credentials"):
            await connect(broker.url, "test-wrong", 5.0, credentials=NatsCredentials("cascade", "wrong"))
        nc = await connect(broker.url, "test-ok", 5.0, credentials=creds)
        try:
            assert nc.is_connected
        finally:
            await nc.close()
