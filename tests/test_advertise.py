"""An advertised address that does not reach the worker's own listener is an error at start."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from pathlib import Path

import pytest

from cascade.advertise import AddressError, check_reachable
from tests.workerprocs import WorkerProcs


def test_check_reachable_passes_for_a_listener_and_names_the_fix_otherwise() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}", "data plane", f"127.0.0.1:{port}", timeout_s=2)
        with pytest.raises(AddressError, match="CASCADE_ADVERTISE_HOST") as e:
            # Same port, an address nothing listens on: refused at once.
            check_reachable(f"127.0.0.9:{port}", "data plane", f"127.0.0.1:{port}", timeout_s=2)
        assert f"listens on 127.0.0.1:{port} and advertises 127.0.0.9:{port}" in str(e.value)
    with pytest.raises(AddressError, match="not host:port"):
        check_reachable("nowhere", "data plane", "127.0.0.1:1")


def test_a_worker_advertising_an_address_that_is_not_its_own_fails_at_start(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    procs = WorkerProcs(nats_url, prefix, tmp_path)
    try:
        # Listens on 127.0.0.1, advertises 127.0.0.9 (loopback, but nothing of ours is there).
        proc = procs.start("w-wrong-addr", "--advertise-host", "127.0.0.9", "--address-check-s", "2")
        code = proc.wait(120)
        log = procs.log("w-wrong-addr")
        assert code != 0, log[-2000:]
        assert "advertises 127.0.0.9:" in log and "does not reach it" in log, log[-2000:]
        # The same worker advertising where it listens starts (and is stopped by the test).
        ok = procs.start("w-right-addr", "--advertise-host", "127.0.0.1", "--address-check-s", "2")
        deadline_log = ""
        for _ in range(600):
            deadline_log = procs.log("w-right-addr")
            if "worker_ready" in deadline_log or ok.poll() is not None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                ok.wait(0.2)  # polling the log with a deadline
        assert "worker_ready" in deadline_log and ok.poll() is None, deadline_log[-2000:]
    finally:
        procs.stop_all()
