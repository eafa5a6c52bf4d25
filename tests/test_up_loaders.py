"""`cascade up --loaders 2`: the embedded broker runs JetStream, one loader leads and one
follows, and when the leader is SIGKILLed `up` restarts it and there is again one leader and one
follower (the survivor, or the restarted loader taking its own lease back at once: ids are unique,
so the key naming it means its old process is gone). tests/test_loader_takeover.py covers the
takeover itself."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.test_up import Up, up  # noqa: F401  (the fixture)

pytestmark = pytest.mark.e2e


def roles(u: Up) -> dict[str, str]:
    r = u.cli("status", "--json", "--timeout", "0.5")
    if r.returncode != 0:
        return {}
    return {
        s["instance"]: s["detail"].get("role", "?")
        for s in json.loads(r.stdout)["services"]
        if s["service"] == "loader"
    }


def wait_roles(u: Up, want: list[str], timeout: float = 60.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    got: dict[str, str] = {}
    while time.monotonic() < deadline:  # each look is a status gather: polling with a deadline
        got = roles(u)
        if sorted(got.values()) == want:
            return got
    raise AssertionError(f"loader roles {got}, wanted {want}\n{u.log[-3000:]}")


@pytest.mark.up_args("--loaders", "2")
def test_two_loaders_one_leads_and_the_other_takes_over(up: Up) -> None:  # noqa: F811
    assert (up.home / "nats-store").is_dir()
    got = wait_roles(up, ["follower", "leader"])
    leader = next(i for i, r in got.items() if r == "leader")
    killed = up.pids[leader]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while f"{leader} restarted" not in up.log:  # `up` says so: polling its log with a deadline
        assert time.monotonic() < deadline, up.log[-3000:]
        time.sleep(0.1)
    wait_roles(up, ["follower", "leader"])
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.log[-3000:]
