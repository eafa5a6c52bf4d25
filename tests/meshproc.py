"""`cascade up` as a test fixture: a subprocess with its own CASCADE_HOME, a free broker and
gateway port, stopped with SIGTERM (SIGKILL only if it hangs), also when the test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cascade.config import read_mesh_file

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
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _tail(home: Path) -> str:
    return (home / "up.log").read_text()[-4000:]
