"""`cascade up` as a benchmark fixture: its own CASCADE_HOME, a free broker and gateway port,
stopped with SIGTERM (SIGKILL only if it does not stop); and what benchmarks ask a running mesh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from cascade.cli.supervisor import die_with_parent_preexec
from cascade.config import read_mesh_file
from cascade.natsauth import read_mesh_credentials
from cascade.natsutil import connect, gather_status
from cascade.subjects import Subjects


class Mesh:
    def __init__(self, up_args: list[str], env: dict[str, str] | None = None, deploy_toml: str | None = None) -> None:
        """`deploy_toml`: the deployment file's text; it is written into the mesh's own home, which
        exists only from here on, and passed to `cascade up --config`."""
        self.tmp = tempfile.TemporaryDirectory(prefix="cascade-bench-")
        self.home = Path(self.tmp.name)
        self.args = [sys.executable, "-m", "cascade.cli", "up", "--port", "0", "--nats-port", "0", *up_args]
        if deploy_toml is not None:
            deploy = self.home / "deploy.toml"
            deploy.write_text(deploy_toml)
            self.args += ["--config", str(deploy)]
        self.env = {**os.environ, "CASCADE_HOME": str(self.home), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.url = ""

    def start(self, timeout_s: float = 240.0) -> str:
        log = open(self.home / "up.log", "wb")
        # A benchmark killed mid-run (Ctrl-C twice, SIGTERM, the OOM killer) must not leave its mesh behind.
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent_preexec(),
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = (self.home / "up.log").read_text()
                raise RuntimeError(f"cascade up exited with {self.proc.returncode}:\n{out[-3000:]}")
            info = read_mesh_file(self.home)
            if info and info.get("gateway_url"):
                self.info = info
                self.url = str(info["gateway_url"]).rstrip("/")
                return self.url
            time.sleep(0.1)  # polling the mesh file with a deadline
        self.stop()
        raise RuntimeError("cascade up did not come up in time")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        keep = os.environ.get("CASCADE_BENCH_KEEP_LOGS")
        if keep:
            # For debugging a run: the services' logs outlive the temporary home.
            import shutil

            dest = Path(keep) / self.home.name
            shutil.copytree(self.home / "logs", dest, dirs_exist_ok=True)
        self.tmp.cleanup()

    async def connect(self, name: str) -> NATS:
        """A NATS connection to the mesh's broker, with the credentials `cascade up` made for it
        (they live in the mesh's home, not in this process's CASCADE_HOME)."""
        found = read_mesh_credentials(self.home)
        return await connect(str(self.info["nats_url"]), name, credentials=found[1] if found else None)

    def __enter__(self) -> Mesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def worker_details(nc: NATS, subjects: Subjects, key: str | tuple[str, ...], window_s: float) -> dict[str, Any]:
    """Per worker, one entry of its status detail (`cascade status --json` shows the same), or a
    dict of several (`key` a tuple), from a scatter-gather status request answered within
    `window_s`."""
    status = await gather_status(nc, subjects, window_s, requester="bench")
    workers = [s for s in status.services if s.service == "worker"]
    if isinstance(key, tuple):
        return {s.instance: {k: s.detail.get(k) for k in key} for s in workers}
    return {s.instance: s.detail.get(key) for s in workers}
