"""`cascade up` as a user runs it: a subprocess that generates a tiny model, starts a broker and
every service, reports itself in the mesh file and `cascade status`, and leaves no process
behind when stopped, or when a child dies under it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cascade.config import read_mesh_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
MODEL = "up-tiny"
DEPLOYMENT = f"""
[[models]]
name = "{MODEL}"
min_replicas = 1
max_replicas = 2
[models.generate]
layers = 2
hidden = 64
heads = 4
kv_heads = 2
vocab = 320
max_position = 256
seed = 7
"""
START_TIMEOUT_S = 180.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll until every pid is gone (they are not our children: nothing to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)  # polling with a deadline
    return [p for p in pids if alive(p)]


@dataclass
class Up:
    home: Path
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    env: dict[str, str]

    @property
    def log(self) -> str:
        return (self.home / "up.out").read_text(errors="replace")

    @property
    def pids(self) -> dict[str, int]:
        return {k: v for k, v in self.info["pids"].items() if isinstance(v, int)}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cascade.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def up(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Up]:
    """`cascade up --workers 1` on free ports in its own CASCADE_HOME; torn down whatever happens.
    Extra flags come from the test's `up_args` marker."""
    marker = request.node.get_closest_marker("up_args")
    extra = list(marker.args) if marker else []
    home = tmp_path / "home"
    home.mkdir()
    cfg = home / "deploy.toml"
    cfg.write_text(DEPLOYMENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_HOME=str(home), CASCADE_HEARTBEAT_S="0.5", PYTHONPATH=str(ROOT))
    out = open(home / "up.out", "wb")
    argv = ["up", "--workers", "1", "--port", "0", "--nats-port", "0", "--config", str(cfg), "--stop-timeout", "20"]
    argv += extra
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade.cli", *argv],
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    seen: dict[str, int] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        info: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"cascade up exited {proc.returncode}:\n{(home / 'up.out').read_text()[-4000:]}")
            info = read_mesh_file(home)
            if info and info.get("pids", {}).get("up") == proc.pid:
                break
            time.sleep(0.1)  # polling the mesh file with a deadline
        else:
            raise AssertionError(f"cascade up did not come up:\n{(home / 'up.out').read_text()[-4000:]}")
        seen = {k: v for k, v in info["pids"].items() if isinstance(v, int)}
        up = Up(home, proc, info, env)
        yield up
        seen.update(up.pids)
    finally:
        # Normal tests stop the mesh themselves; this is the safety net when one failed midway.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name, pid in seen.items():
            if name != "up" and alive(pid):
                os.kill(pid, signal.SIGKILL)
        out.close()


def test_up_serves_reports_status_and_stops_without_leftovers(up: Up) -> None:
    info = up.info
    assert info["gateway_url"].startswith("http://127.0.0.1:") and info["gateway_url"].endswith("/v1")
    assert info["nats_url"].startswith("nats://127.0.0.1:")
    assert set(up.pids) == {"up", "nats", "gateway", "scaler", "loader", "worker-0"}
    assert f"Cascade is up: {info['gateway_url']}" in up.log
    for name in ("gateway", "scaler", "loader", "worker-0"):
        assert (up.home / "logs" / f"{name}.log").is_file()
    assert (up.home / "models" / MODEL / "config.json").is_file()

    # The status command finds the mesh through the mesh file alone.
    r = up.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["nats_url"] == info["nats_url"]
    services = {s["service"] for s in st["services"]}
    assert services == {"gateway", "scaler", "loader", "worker"}
    (inst,) = st["instances"]
    assert inst["worker_id"] == "worker-0" and inst["model"] == MODEL and inst["state"] == "serving"
    assert inst["units_ready"] == inst["num_units"] == 4

    # The same home cannot run a second mesh at once.
    again = up.cli("up", "--workers", "1", "--port", "0", "--nats-port", "0")
    assert again.returncode == 1 and "already running" in again.stderr

    # An operator target beyond the deployment's bound is refused by the scaler with the reason.
    r = up.cli("scale", MODEL, "--replicas", "3")
    assert r.returncode == 1 and "above max_replicas 2" in r.stderr

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.log[-3000:]
    assert wait_gone(list(up.pids.values()), 10) == [], "processes left behind"
    assert read_mesh_file(up.home) is None


@pytest.mark.up_args("--max-restarts", "0")
def test_without_restarts_a_child_dying_stops_the_mesh_with_an_error(up: Up) -> None:
    os.kill(up.pids["loader"], signal.SIGKILL)
    assert up.proc.wait(60) == 1
    assert "loader was killed by signal 9" in up.log
    assert wait_gone(list(up.pids.values()), 10) == [], "processes left behind"
    assert read_mesh_file(up.home) is None


def _restarted(up: Up, name: str, old_pid: int, timeout: float = 60.0) -> int:
    """Poll the mesh file until `name` runs under a new pid (the supervisor rewrites it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert up.proc.poll() is None, up.log[-3000:]
        info = read_mesh_file(up.home) or {}
        pid = info.get("pids", {}).get(name)
        if isinstance(pid, int) and pid != old_pid and alive(pid):
            up.info = info
            return pid
        time.sleep(0.05)  # polling the mesh file with a deadline
    raise AssertionError(f"{name} was not restarted:\n{up.log[-3000:]}")


def _completes(up: Up, timeout: float = 120.0) -> dict[str, Any]:
    """Poll until a completion succeeds (the mesh may be reloading its model)."""
    url = up.info["gateway_url"] + "/completions"
    body = json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}).encode()
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, body, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return dict(json.loads(resp.read()))
        except (urllib.error.URLError, OSError) as e:
            last = repr(e)
        time.sleep(0.2)  # polling with a deadline until the mesh serves again
    raise AssertionError(f"no completion within {timeout}s (last: {last}):\n{up.log[-3000:]}")


def test_a_killed_worker_and_a_killed_broker_are_restarted_and_the_mesh_serves_again(up: Up) -> None:
    before = _completes(up)["choices"][0]["text"]
    old = up.pids["worker-0"]
    os.kill(old, signal.SIGKILL)
    _restarted(up, "worker-0", old)
    assert "worker-0 was killed by signal 9; restarting it" in up.log
    # The restarted worker is idle; the scaler puts the model back on it.
    assert _completes(up)["choices"][0]["text"] == before

    old = up.pids["nats"]
    os.kill(old, signal.SIGKILL)
    _restarted(up, "nats", old)
    assert "the NATS server was killed by signal 9; restarting it" in up.log
    # Every service reconnects to the restarted broker on its own.
    assert _completes(up)["choices"][0]["text"] == before
    assert up.proc.poll() is None

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.log[-3000:]
    assert wait_gone(list(up.pids.values()), 10) == [], "processes left behind"


@pytest.mark.up_args("--max-restarts", "1")
def test_a_crash_looping_child_stops_the_mesh_saying_why(up: Up) -> None:
    old = up.pids["loader"]
    os.kill(old, signal.SIGKILL)
    new = _restarted(up, "loader", old)
    os.kill(new, signal.SIGKILL)
    assert up.proc.wait(60) == 1
    assert "loader was killed by signal 9: 2 deaths within 60s, it is crash-looping" in up.log
    assert wait_gone([p for n, p in up.pids.items() if n != "up"], 10) == [], "processes left behind"
    assert read_mesh_file(up.home) is None


def _http(url: str, body: dict[str, Any] | None = None, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(json.loads(resp.read()))
    except urllib.error.HTTPError as e:
        return e.code, dict(json.loads(e.read()))


API_KEY = "test-key-0123"


@pytest.mark.up_args("--api-key", API_KEY)
def test_up_with_an_api_key_and_broker_credentials_refuses_strangers(up: Up) -> None:
    import asyncio

    import nats

    from cascade.natsauth import read_mesh_credentials
    from cascade.natsutil import connect

    base = up.info["gateway_url"]
    completion = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
    # HTTP: no key, a wrong key → 401 with an OpenAI error body; the key → served.
    for key in (None, "wrong"):
        status, body = _http(base + "/completions", completion, key)
        assert status == 401, body
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["type"] == "invalid_request_error"
    status, body = _http(base + "/completions", completion, API_KEY)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4
    # A limit is a 400 like vLLM's: max_tokens beyond the model's context (max_position 256).
    status, body = _http(base + "/completions", {**completion, "max_tokens": 1000}, API_KEY)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "context_length_exceeded"

    # NATS: the embedded broker has per-mesh credentials, in a file only the user can read.
    auth = up.home / "nats-auth.json"
    assert auth.stat().st_mode & 0o077 == 0
    found = read_mesh_credentials(up.home)
    assert found is not None and found[0] == up.info["nats_url"]

    async def clients() -> None:
        errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            errors.append(e)

        # A plain nats-py client with no credentials: the broker refuses it.
        with pytest.raises(Exception):  # noqa: B017 - nats-py's type varies; the reason is checked below
            await nats.connect(up.info["nats_url"], allow_reconnect=False, connect_timeout=5, error_cb=on_error)
        assert any("authorization violation" in str(e).lower() for e in errors), errors
        nc = await connect(up.info["nats_url"], "insider", 5.0, credentials=found[1])
        await nc.close()

    asyncio.run(clients())
    # The CLI tools find the credentials beside mesh.json.
    r = up.cli("status", "--json")
    assert r.returncode == 0, r.stderr

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.log[-3000:]
    assert not auth.exists()
