"""`cascade up` as a test fixture: a subprocess with its own CASCADE_HOME, a free broker and
gateway port, stopped with SIGTERM (SIGKILL only if it hangs), also when the test fails; and what
the tests of such a mesh do to it: the `cascade` commands, its status, a completion."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from bench.common import stop_processes
from cascade.cli.statusview import to_json
from cascade.config import read_mesh_file, resolve_nats_url, resolve_prefix
from cascade.natsauth import credentials_for
from cascade.natsutil import connect, gather_status
from cascade.subjects import Subjects

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def running_mesh(
    home: Path, deployment: str | None, workers: int, timeout_s: float = 180, args: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """`deployment`: the deployment file's text, or None to name models with `args` (--model)."""
    env = {**os.environ, "CASCADE_HOME": str(home), "CASCADE_HEARTBEAT_S": "0.5"}
    # With --nats-url (a broker of the test's own) no broker is embedded, so no --nats-port.
    broker = [] if "--nats-url" in args else ["--nats-port", "0"]
    cmd = ["up", "--workers", str(workers), "--port", "0", *broker, *args]
    if deployment is not None:
        cfg = home / "deploy.toml"
        cfg.write_text(deployment)
        cmd += ["--config", str(cfg)]
    with (home / "up.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cascade.cli", *cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"cascade up exited {proc.returncode}:\n{_tail(home)}")
                info = read_mesh_file(home)
                if info and info.get("gateway_url"):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"mesh did not come up:\n{_tail(home)}")
                time.sleep(0.1)  # polling the mesh file with a deadline
            yield {"home": home, "url": str(info["gateway_url"]).rstrip("/"), "proc": proc, "info": info}
        finally:
            stop_processes([proc], timeout_s=60)


def _tail(home: Path) -> str:
    return (home / "up.log").read_text()[-4000:]


def cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A `cascade` command against the mesh whose CASCADE_HOME is `home`."""
    env = {**os.environ, "CASCADE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "cascade.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def mesh_status(home: Path, window_s: float = 1.0) -> dict[str, Any]:
    """What `cascade status --json` prints for the mesh whose CASCADE_HOME is `home`, which must
    answer: the same gather and the same JSON, run here rather than in a `cascade` process (a
    process costs about a second of a core to start, and the tests poll this). Callable from
    sync code and from inside a running event loop (it blocks the caller, as the process did)."""
    url, prefix = resolve_nats_url(None, home), resolve_prefix(None, home)

    async def go() -> dict[str, Any]:
        nc = await connect(url, "test-status", connect_timeout_s=2.0, credentials=credentials_for(url, home))
        try:
            st = await gather_status(nc, Subjects(prefix), window_s)
        finally:
            await nc.drain()
        assert st.services or st.heartbeats, f"no service answered on {prefix}.status at {url}"
        return dict(orjson.loads(orjson.dumps(to_json(st, url, prefix))))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def post_json(url: str, body: dict[str, Any], timeout: float = 120) -> Any:
    req = urllib.request.Request(
        url, data=orjson.dumps(body), method="POST", headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return orjson.loads(r.read())


def complete(url: str, model: str, prompt: str, max_tokens: int) -> Any:
    """A greedy completion of exactly `max_tokens` tokens from the gateway's /v1 at `url`: the
    same prompt gets the same text from any instance of the same checkpoint."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return post_json(f"{url}/completions", body)


def generated_model(seed: int) -> str:
    """A deployment's `[models.generate]` table: a small random llama (4 layers), quick to load,
    and one checkpoint per seed."""
    return f"""
[models.generate]
layers = 4
hidden = 64
heads = 4
kv_heads = 2
vocab = 320
max_position = 512
seed = {seed}
"""
