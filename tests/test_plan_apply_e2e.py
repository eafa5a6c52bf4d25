"""`cascade apply` on a running mesh: `cascade up` (embedded nats-server) with two shared worker
processes of two instance slots each (CASCADE_WORKER_SLOTS=2) and two models deployed at zero
replicas. A plan that puts both models, two stages each, on one group of two workers makes the
mesh serve both with one pipelined instance each, each instance's stages on the two processes, at
the plan's quotas (0.7 / 0.3 on each process); applying it again changes nothing and the scaler
decides nothing more. A plan the pool cannot hold is refused with why, before anything moves."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.meshproc import cli, complete, generated_model, mesh_status, running_mesh

pytestmark = pytest.mark.e2e

DEPLOYMENT = f"""
[[models]]
name = "a"
min_replicas = 0
max_replicas = 1
policy = "manual"
{generated_model(1)}
[[models]]
name = "b"
min_replicas = 0
max_replicas = 1
policy = "manual"
{generated_model(2)}
"""


def _plan(workers: list[str], models: dict[str, float]) -> dict[str, Any]:
    n = len(workers)
    layers = [[i * 4 // n, (i + 1) * 4 // n] for i in range(n)]
    return {
        "type": "cascade-placement-plan",
        "version": 1,
        "pool": {"workers": n, "memory_gb": 1.0},
        "group_size": n,
        "groups": [
            {
                "group": 0,
                "workers": workers,
                "stages": n,
                "models": [
                    {
                        "model": m,
                        "quota": q,
                        "stages": [{"worker": w, "layers": r} for w, r in zip(workers, layers, strict=True)],
                    }
                    for m, q in models.items()
                ],
            }
        ],
    }


def _scaler(st: dict[str, Any]) -> dict[str, Any]:
    return dict(next(s for s in st["services"] if s["service"] == "scaler")["detail"])


def _complete(url: str, model: str, prompt: str) -> str:
    return str(complete(url, model, prompt, 8)["choices"][0]["text"])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADE_WORKER_SLOTS", "2")
        with running_mesh(tmp_path_factory.mktemp("home"), DEPLOYMENT, workers=2) as m:
            yield m


def test_a_plan_the_pool_cannot_hold_is_refused(mesh: dict[str, Any], tmp_path: Path) -> None:
    home = mesh["home"]
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(_plan(["w0", "w1", "w2"], {"a": 0.5, "b": 0.5})))
    r = cli(home, "apply", str(wide))
    assert r.returncode == 1 and "the pool cannot hold this plan" in r.stderr, (r.stdout, r.stderr)
    assert "names 3 worker(s)" in r.stderr
    # Nothing reached the scaler: the models are still at zero.
    assert _scaler(mesh_status(home))["targets"] == {"a": 0, "b": 0}


def test_apply_a_two_model_plan_then_again(mesh: dict[str, Any], tmp_path: Path) -> None:
    home, url = mesh["home"], mesh["url"]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan(["w0", "w1"], {"a": 0.7, "b": 0.3})))
    r = cli(home, "apply", str(plan), "--wait", "240", timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    assert "scaler: a: changed: 1 instance(s) of 2 stage(s)" in out, out
    assert "a: 1/1 instance(s) of 2 stage(s) serving" in out and "b: 1/1 instance(s) of 2 stage(s) serving" in out
    assert out.count("quota: ") == 4 and "plan applied" in out, out

    st = mesh_status(home)
    rows = [x for x in st["instances"] if x.get("state") == "serving"]
    devices = {}
    for m, q in (("a", 0.7), ("b", 0.3)):
        stages = [x for x in rows if x["model"] == m]
        assert len(stages) == 2 and len({x["group"] for x in stages}) == 1, stages
        assert sorted((x["stage_start"], x["stage_end"]) for x in stages) == [(0, 2), (2, 4)]
        assert all(x["quota"] == pytest.approx(q) for x in stages), stages
        devices[m] = {x["shared_device"] for x in stages}
        assert len(devices[m]) == 2  # an instance's stages on two processes
    assert devices["a"] == devices["b"]  # both models share the group's two processes
    assert "placed: group 0: w0=" in out and ": a, b" in out, out
    assert "warning" not in out
    scaler = _scaler(st)
    assert scaler["targets"] == {"a": 1, "b": 1}
    a, b = _complete(url, "a", "planned"), _complete(url, "b", "planned")
    assert a and b and a != b  # two checkpoints, both served

    # Again: nothing changes, no quota is sent, and the scaler decides nothing more.
    decided, ticks = scaler["decisions"], scaler["ticks"]
    r = cli(home, "apply", str(plan), timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "scaler: a: unchanged" in r.stdout and "scaler: b: unchanged" in r.stdout, r.stdout
    assert "quotas: as planned" in r.stdout and "quota: " not in r.stdout.replace("quotas: ", "")
    assert "nothing changed" in r.stdout
    deadline = time.monotonic() + 120  # ten ticks of 1 s, each look at the status about 1 s
    while (s := _scaler(mesh_status(home)))["ticks"] < ticks + 10:
        assert time.monotonic() < deadline, s
    assert s["decisions"] == decided, s
    assert s["targets"] == {"a": 1, "b": 1}
