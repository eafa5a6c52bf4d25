"""A worker that cannot load a model is backed off for it, through the real services.

`cascade up --workers 1` whose one worker reads no model store (`--model-source network`) and a
loader without a host cache: nothing can ever give that worker the model. Asked for one replica,
the scaler's decisions fail for that worker, and instead of re-issuing the same decision every
few seconds it backs off (doubling from `--backoff-s`, 1 s here so the window is short): few
decisions over the window, each failure counted by worker and kind, the reason in `cascade
status`, /metrics and /health's body.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.gateway.testing import parse_prometheus, sample
from tests.meshproc import cli, mesh_status, running_mesh

pytestmark = pytest.mark.e2e

MODEL = "backoff-e2e"
DEPLOYMENT = f"""
[[models]]
name = "{MODEL}"
min_replicas = 0
max_replicas = 1
policy = "manual"
[models.generate]
layers = 2
hidden = 64
heads = 4
kv_heads = 2
vocab = 320
seed = 5
"""
BACKOFF_S = 1.0
WINDOW_S = 10.0


def _scaler(home: Path) -> dict[str, Any]:
    (scaler,) = [s for s in mesh_status(home)["services"] if s["service"] == "scaler"]
    return dict(scaler["detail"])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("home")
    os.environ["CASCADE_MODEL_SOURCE"] = "network"
    os.environ["CASCADE_LOADER_HOST_CACHE"] = "off"
    os.environ["CASCADE_SCALER_BACKOFF_S"] = str(BACKOFF_S)
    try:
        with running_mesh(home, DEPLOYMENT, workers=1) as m:
            yield m
    finally:
        for k in ("CASCADE_MODEL_SOURCE", "CASCADE_LOADER_HOST_CACHE", "CASCADE_SCALER_BACKOFF_S"):
            del os.environ[k]


def test_a_worker_that_cannot_load_is_backed_off_not_retried_every_tick(mesh: dict[str, Any]) -> None:
    home, url = mesh["home"], mesh["url"]
    before = _scaler(home)["decisions"]
    r = cli(home, "scale", MODEL, "--replicas", "1")
    assert r.returncode == 0, r.stderr
    start = time.monotonic()
    while time.monotonic() - start < WINDOW_S:
        time.sleep(1.0)  # the window over which decisions are counted (not a synchronisation)
    detail = _scaler(home)
    decisions = detail["decisions"] - before
    # Back-off of 1 s doubling from the first failure: tries at about 0, 1, 3 and 7 s. A retry at
    # every 1 s tick would be about 10 here.
    assert 2 <= decisions <= 4, detail
    (row,) = detail["backoff"]
    assert row["model"] == MODEL and row["kind"] == "no_model_store" and row["failures"] == decisions
    assert "--model-source network" in row["reason"]

    text = cli(home, "status").stdout
    assert "failed scale-ups" in text and row["worker"] in text

    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as resp:
        samples = parse_prometheus(resp.read().decode())
    n = sample(samples, "cascade:scale_failures_total", model=MODEL, worker=row["worker"], reason="no_model_store")
    assert n == decisions

    # /health (200: no model needs an instance) says why the scale-ups fail, per worker.
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=10) as resp:
        body = json.loads(resp.read())
    assert row["worker"] in body["scale_failures"][MODEL]["workers"], body
