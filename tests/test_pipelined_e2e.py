"""A pipeline-parallel instance end to end through `cascade up`: real broker, gateway, scaler,
loader and three worker processes. `piped` (stages = 2) and `whole` are the same generated
checkpoint; scaled up from zero, the loader gives `piped` two workers that each load half the layers, the gateway
routes whole requests through both as a steady route, and greedy tokens equal the single-worker
instance's, for requests batched together. Scaling `piped` away frees both its workers."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.meshproc import cli, complete, generated_model, mesh_status, running_mesh

pytestmark = pytest.mark.e2e

GEN = generated_model(17)
DEPLOYMENT = f"""
[[models]]
name = "whole"
min_replicas = 1
max_replicas = 1
policy = "manual"
{GEN}
[[models]]
name = "piped"
min_replicas = 0
max_replicas = 1
policy = "manual"
stages = 2
{GEN}
"""
PROMPTS = ["Hello", "pipeline stages", "a", "the same tokens, layer by layer", "xyz", "0123456789"]


def _complete(url: str, model: str, prompt: str) -> tuple[str, int]:
    r = complete(url, model, prompt, 12)
    return r["choices"][0]["text"], r["usage"]["completion_tokens"]


def _workers(home: Path) -> list[dict[str, Any]]:
    return [s for s in mesh_status(home).get("services", []) if s.get("service") == "worker"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_mesh(tmp_path_factory.mktemp("home"), DEPLOYMENT, workers=3) as m:
        # Up from zero by the operator (min_replicas 0 lets the test scale it away again).
        r = cli(m["home"], "scale", "piped", "--replicas", "1")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 120
        while len([w for w in _workers(m["home"]) if w["detail"].get("model") == "piped"
                   and w["detail"].get("state") == "serving"]) < 2:  # fmt: skip
            assert time.monotonic() < deadline, f"piped not serving: {_workers(m['home'])}"
            time.sleep(0.2)  # polling the mesh's status with a deadline
        yield m


def test_two_stage_instance_gives_the_single_workers_tokens(mesh: dict[str, Any]) -> None:
    url = mesh["url"]
    stages = sorted(
        (w["detail"]["stage_start"], w["detail"]["stage_end"], w["detail"]["group"])
        for w in _workers(mesh["home"])
        if w["detail"].get("model") == "piped"
    )
    # Two workers, one instance, each half of the 4 layers.
    assert [(a, b) for a, b, _ in stages] == [(0, 2), (2, 4)] and stages[0][2] == stages[1][2] != ""
    # Sent together, so the stages batch them (continuous batching on every stage).
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        whole = list(pool.map(lambda p: _complete(url, "whole", p), PROMPTS))
        piped = list(pool.map(lambda p: _complete(url, "piped", p), PROMPTS))
    assert all(n == 12 for _, n in whole)
    assert piped == whole
    # They went the pipelined way: the gateway counted them by route.
    root = url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics", timeout=30) as r:
        metrics = r.read().decode()
    line = next(
        ln for ln in metrics.splitlines()
        if ln.startswith("cascade_gateway_routed_requests_total") and 'model="piped"' in ln and "pipelined" in ln
    )  # fmt: skip
    assert float(line.rsplit(" ", 1)[1]) >= len(PROMPTS)


def test_an_instance_that_loses_a_stage_is_replaced(mesh: dict[str, Any]) -> None:
    """The tail stage's process is killed: the survivor serves nobody, so the loader returns it
    to the pool after a grace, the scaler sees the gap and a new instance comes up on the
    survivor and the restarted worker; requests get the whole model's tokens again."""
    home, url = mesh["home"], mesh["url"]
    expect = _complete(url, "whole", "after a loss")
    tail = next(
        w for w in _workers(home) if w["detail"].get("model") == "piped" and w["detail"].get("stage_start") == 2
    )
    old_group = tail["detail"]["group"]
    os.kill(tail["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        piped = [w["detail"] for w in _workers(home) if w["detail"].get("model") == "piped"]
        if (
            len(piped) == 2
            and {d["state"] for d in piped} == {"serving"}
            and {d["group"] for d in piped} != {old_group}
        ):
            break
        assert time.monotonic() < deadline, f"no new instance of piped: {piped}"
        time.sleep(0.2)  # polling the mesh's status with a deadline
    assert len({d["group"] for d in piped}) == 1
    assert _complete(url, "piped", "after a loss") == expect


def test_scaling_a_pipelined_model_away_frees_every_stage(mesh: dict[str, Any]) -> None:
    home = mesh["home"]
    before = {w["instance"] for w in _workers(home) if w["detail"].get("model") == "piped"}
    assert len(before) == 2
    # `cascade tap` shows the placement event of the removal, as every decision is published.
    env = {**os.environ, "CASCADE_HOME": str(home)}
    prefix = mesh["info"]["prefix"]
    tap = subprocess.Popen(
        [sys.executable, "-m", "cascade.cli", "tap", "--filter", f"{prefix}.placement", "--count", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tap.stderr is not None and "tapping" in tap.stderr.readline()  # subscribed
        r = cli(home, "scale", "piped", "--replicas", "0")
        assert r.returncode == 0, r.stderr
        out, _ = tap.communicate(timeout=60)
    finally:
        if tap.poll() is None:
            tap.kill()
            tap.wait()
    assert "instance_placed" in out and "piped removed" in out, out
    deadline = time.monotonic() + 60
    while True:
        ws = {w["instance"]: w["detail"] for w in _workers(home)}
        if all(ws[w]["state"] == "idle" for w in before if w in ws):
            break
        assert time.monotonic() < deadline, f"stage workers not freed: {ws}"
        time.sleep(0.2)  # polling the mesh's status with a deadline
    assert {d["state"] for d in ws.values() if d.get("model") == "whole"} == {"serving"}
    assert _complete(mesh["url"], "whole", "still here")[1] == 12
