"""Credentials for the NATS broker: generated per mesh by `cascade up`, found by every client.

`cascade up` starts its embedded nats-server with a user and a random password that it
generates for that mesh. It writes them, readable by the user only (0600), to
`$CASCADE_HOME/nats-auth.json` beside `mesh.json` (with the broker's URL), and the server's
own config file (`nats-server.conf`, 0600 too: a password on the command line would show in
`ps`). A client without them is refused by the broker.

A client finds its credentials in this order (`credentials_for`):

1. the URL itself (`nats://user:password@host:port`, or `nats://token@host:port`): nats-py
   reads them there, nothing is added;
2. `CASCADE_NATS_TOKEN`, or `CASCADE_NATS_USER` with `CASCADE_NATS_PASSWORD`: for a broker of
   your own (and what `cascade up` hands its children);
3. the mesh's `nats-auth.json` in `$CASCADE_HOME`, when it was written for this URL;
4. none (a broker without authentication).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from cascade.config import cascade_home

USER_ENV = "CASCADE_NATS_USER"
PASSWORD_ENV = "CASCADE_NATS_PASSWORD"
TOKEN_ENV = "CASCADE_NATS_TOKEN"
AUTH_FILE = "nats-auth.json"
SERVER_CONF = "nats-server.conf"


@dataclass(frozen=True, slots=True)
class NatsCredentials:
    """A user and password, or a token (then `user` is empty)."""

    user: str = ""
    password: str = ""
    token: str = ""

    def __repr__(self) -> str:  # never print a secret in a log line or a traceback
        who = f"user={self.user!r}" if self.user else "token"
        return f"NatsCredentials({who}, <hidden>)"

    def env(self) -> dict[str, str]:
        """The environment variables that hand these to a child process."""
        if self.token:
            return {TOKEN_ENV: self.token}
        return {USER_ENV: self.user, PASSWORD_ENV: self.password}


def generate() -> NatsCredentials:
    # 32 random bytes: not guessable, and URL-safe characters need no quoting in the server config.
    return NatsCredentials(user="cascade", password=secrets.token_urlsafe(32))


def auth_file(home: Path | None = None) -> Path:
    return (home or cascade_home()) / AUTH_FILE


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, atomically; it is never readable by others, not
    even for a moment (created 0600 before the first byte)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.replace(path)


def write_mesh_credentials(creds: NatsCredentials, nats_url: str, home: Path | None = None) -> tuple[Path, Path]:
    """Record the mesh's credentials for clients, and write the broker's config requiring them.
    Returns (the clients' file, the server's config file)."""
    home = home or cascade_home()
    home.mkdir(parents=True, exist_ok=True)
    path = auth_file(home)
    record = {"nats_url": nats_url, "user": creds.user, "password": creds.password}
    _write_private(path, orjson.dumps(record, option=orjson.OPT_INDENT_2))
    conf = home / SERVER_CONF
    _write_private(conf, server_config(creds).encode())
    return path, conf


def server_config(creds: NatsCredentials) -> str:
    if creds.token:
        return f'authorization {{\n  token: "{creds.token}"\n}}\n'
    return f'authorization {{\n  user: "{creds.user}"\n  password: "{creds.password}"\n}}\n'


def remove_mesh_credentials(home: Path | None = None) -> None:
    home = home or cascade_home()
    auth_file(home).unlink(missing_ok=True)
    (home / SERVER_CONF).unlink(missing_ok=True)


def read_mesh_credentials(home: Path | None = None) -> tuple[str, NatsCredentials] | None:
    """(the broker URL they were made for, the credentials) from a mesh's file, if any."""
    try:
        data = orjson.loads(auth_file(home).read_bytes())
    except (FileNotFoundError, PermissionError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    url, user, password = data.get("nats_url"), data.get("user"), data.get("password")
    if not (isinstance(url, str) and isinstance(user, str) and isinstance(password, str)):
        return None
    return url, NatsCredentials(user=user, password=password)


def url_has_credentials(url: str) -> bool:
    # Any of several comma-separated servers carrying user info counts.
    return any("@" in (urlsplit(u.strip()).netloc or "") for u in url.split(","))


def credentials_for(url: str, home: Path | None = None) -> NatsCredentials | None:
    """The credentials a client of `url` presents (see the module's docstring for the order)."""
    if url_has_credentials(url):
        return None
    token = os.environ.get(TOKEN_ENV)
    if token:
        return NatsCredentials(token=token)
    user = os.environ.get(USER_ENV)
    if user:
        return NatsCredentials(user=user, password=os.environ.get(PASSWORD_ENV, ""))
    found = read_mesh_credentials(home)
    if found is not None and _same_server(found[0], url):
        return found[1]
    return None


def _same_server(a: str, b: str) -> bool:
    def key(u: str) -> tuple[str, int | None]:
        parts = urlsplit(u if "://" in u else "nats://" + u)
        host = parts.hostname or ""
        if host == "localhost":
            host = "127.0.0.1"
        return host, parts.port or 4222

    return key(a) == key(b)
