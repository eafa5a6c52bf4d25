"""Worker services as real processes (so a test can SIGKILL one), stopped with SIGTERM (SIGKILL
only if one hangs) when the test ends, also when it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.common import stop_processes

REPO = Path(__file__).resolve().parent.parent


class WorkerProcs:
    def __init__(self, nats_url: str, prefix: str, logs: Path) -> None:
        self.nats_url = nats_url
        self.prefix = prefix
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, worker_id: str, *flags: str, wrap: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`wrap`: a command that execs the worker's argv given after it (e.g. `unshare ...`);
        `env`: variables on top of this process's (its CASCADE_* ones are not passed on)."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}, **(env or {})}
        env["PYTHONPATH"] = str(REPO)
        argv = [*wrap, sys.executable, "-m", "cascade.cli", "worker", "--nats-url", self.nats_url]
        argv += ["--prefix", self.prefix]
        argv += ["--worker-id", worker_id, "--log-level", "debug", *flags]
        with (self.logs / f"{worker_id}.log").open("ab") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[worker_id] = proc
        return proc

    def kill(self, worker_id: str) -> None:
        self.procs[worker_id].kill()
        self.procs[worker_id].wait(30)

    def log(self, worker_id: str) -> str:
        return (self.logs / f"{worker_id}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        stop_processes(self.procs.values())
