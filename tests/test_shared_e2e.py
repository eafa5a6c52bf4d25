"""Shared workers and pipelined instances together, through `cascade up`: three worker processes
with two instances each (CASCADE_WORKER_SLOTS=2). Two models of two stages each are placed with
each instance's stages on distinct processes, so a process holds stages of both models (AlpaServe's
stages on Dilu's shared devices); both answer with the tokens of a
whole instance of the same checkpoint. Scaling one model away leaves the other serving on the
same processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.meshproc import cli, complete, generated_model, mesh_status, running_mesh

pytestmark = pytest.mark.e2e

DEPLOYMENT = f"""
[[models]]
name = "a-whole"
policy = "manual"
{generated_model(1)}
[[models]]
name = "a"
policy = "manual"
stages = 2
{generated_model(1)}
[[models]]
name = "b"
min_replicas = 0
max_replicas = 1
policy = "manual"
stages = 2
{generated_model(2)}
"""


def _complete(url: str, model: str, prompt: str) -> str:
    return str(complete(url, model, prompt, 10)["choices"][0]["text"])


def _instances(home: Path) -> list[dict[str, Any]]:
    return list(mesh_status(home)["instances"])


def _wait(home: Path, pred: Any, what: str, timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _instances(home)
        if pred(rows):
            return rows
        assert time.monotonic() < deadline, f"{what}: {rows}"
        time.sleep(0.2)  # polling the mesh's status with a deadline


def _serving_stages(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("model") == model and r.get("state") == "serving" and r.get("group")]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADE_WORKER_SLOTS", "2")
        with running_mesh(tmp_path_factory.mktemp("home"), DEPLOYMENT, workers=3) as m:
            yield m


def test_two_models_stages_share_the_same_workers(mesh: dict[str, Any]) -> None:
    home, url = mesh["home"], mesh["url"]
    r = cli(home, "scale", "b", "--replicas", "1")
    assert r.returncode == 0, r.stderr
    rows = _wait(home, lambda rs: len(_serving_stages(rs, "b")) == 2, "b's two stages serving")
    for model in ("a", "b"):
        stages = _serving_stages(rows, model)
        assert len(stages) == 2 and len({s["group"] for s in stages}) == 1
        # An instance's stages are on two different processes, never two slots of one.
        assert len({s["shared_device"] for s in stages}) == 2, stages
    # Six instances on three processes, five taken: some process holds a stage of each model.
    devices = {m: {s["shared_device"] for s in _serving_stages(rows, m)} for m in ("a", "b")}
    assert devices["a"] & devices["b"], devices
    for prompt in ("shared", "two models, one group of workers"):
        assert _complete(url, "a", prompt) == _complete(url, "a-whole", prompt)
    assert _complete(url, "b", "shared") != _complete(url, "a", "shared")  # another checkpoint
    text = cli(home, "status").stdout
    assert "pipelined instances" in text and "shared workers" in text and "quota" in text


def test_one_model_scaled_away_the_other_serves_on(mesh: dict[str, Any]) -> None:
    home, url = mesh["home"], mesh["url"]
    before = _complete(url, "a", "still serving")
    shared_with_b = {x["shared_device"] for x in _instances(home) if x.get("model") == "b"}
    assert len(shared_with_b) == 2
    r = cli(home, "scale", "b", "--replicas", "0")
    assert r.returncode == 0, r.stderr
    rows = _wait(home, lambda rs: not [x for x in rs if x.get("model") == "b"], "b's stages unloaded")
    a = _serving_stages(rows, "a")
    assert len(a) == 2 and {x["shared_device"] for x in a} & shared_with_b  # on a process b left
    assert mesh["proc"].poll() is None
    assert _complete(url, "a", "still serving") == before
