"""Through `cascade up --workers 3` and `cascade scale`: the first instance reads the disk (nothing
holds the model yet), the scale-up to three is a chain multicast from it, and every instance
answers the same tokens."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from services.gateway.testing import parse_prometheus, sample
from tests.meshproc import cli, mesh_status, running_mesh

pytestmark = pytest.mark.e2e

MODEL = "mc-e2e"
DEPLOYMENT = f"""
[[models]]
name = "{MODEL}"
min_replicas = 1
max_replicas = 3
loading = "multicast"
[models.generate]
layers = 4
hidden = 128
heads = 4
kv_heads = 2
vocab = 320
seed = 13
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_mesh(tmp_path_factory.mktemp("home"), DEPLOYMENT, workers=3) as m:
        yield m


def test_scale_to_three_is_a_chain_multicast_that_serves(mesh: dict[str, Any]) -> None:
    home = mesh["home"]
    deadline = time.monotonic() + 60
    while True:  # the first instance serving and its load recorded (two services' status)
        st = mesh_status(home)
        held = [i["worker_id"] for i in st["instances"] if i["state"] == "serving"]
        if len(held) == 1 and any(t["worker"] == held[0] and t["state"] == "done" for t in st["transfers"]):
            break
        assert time.monotonic() < deadline, f"no first instance: {st['instances']}\n{st['transfers']}"
        time.sleep(0.2)  # polling status with a deadline
    (holder,) = held
    first = [t for t in st["transfers"] if t["worker"] == holder]
    assert first and first[-1]["source"] == "disk", "nothing held the model: the first instance read the disk"

    r = cli(home, "scale", MODEL, "--replicas", "3")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 120
    while True:
        # Serving and the loader's record of the transfer come from different services' status
        # (the loader records a transfer done after its worker serves): wait for both.
        st = mesh_status(home)
        serving = [i for i in st["instances"] if i["state"] == "serving" and i["units_ready"] == i["num_units"]]
        recorded = [t for t in st["transfers"] if t["worker"] != holder and t["state"] == "done"]
        if len(serving) == 3 and len(recorded) == 2:
            break
        assert time.monotonic() < deadline, f"not 3 serving instances: {st['instances']}\n{st['transfers']}"
        time.sleep(0.2)  # polling status with a deadline

    new = [t for t in st["transfers"] if t["worker"] != holder]
    assert len(new) == 2 and all(t["state"] == "done" for t in new), new
    assert {t["source"] for t in new} == {holder} and {t["mode"] for t in new} == {"multicast"}
    assert all(t["units_ready"] == t["num_units"] == 6 for t in new)
    (loader,) = [s for s in st["services"] if s["service"] == "loader"]
    assert loader["detail"]["plans"] >= 2 and loader["detail"]["replans"] == 0
    assert st["host_cache"] and st["host_cache"][0]["model"] == MODEL  # the disk load left the one host copy
    text = cli(home, "status").stdout
    assert "transfers" in text and "host cache: 1 model(s)" in text

    client = openai.OpenAI(base_url=mesh["url"], api_key="unused")
    outs = {
        client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for _ in range(6)
    }
    assert len(outs) == 1, f"instances answer differently: {outs}"

    # The gateway's /metrics carries what the mesh did, from the bus alone: the decision by policy
    # and trigger, the bytes each new instance took in by source, every worker's own figures.
    with urllib.request.urlopen(mesh["url"].removesuffix("/v1") + "/metrics", timeout=10) as r:
        samples = parse_prometheus(r.read().decode())
    ups = sample(samples, "cascade:scale_decisions_total", model=MODEL, action="up", reason="target")
    assert ups is not None and ups >= 1
    nbytes = {lab["worker"]: v for lab, v in samples["cascade:transfer_bytes_total"] if lab["source"] == "chain"}
    assert set(nbytes) >= {t["worker"] for t in new} and all(v > 0 for v in nbytes.values()), nbytes
    for w in [holder, *(t["worker"] for t in new)]:
        assert sample(samples, "cascade:layers_ready", model=MODEL, worker=w) == 6
        assert sample(samples, "cascade:kv_cache_usage_perc", model=MODEL, worker=w) is not None
        assert sample(samples, "cascade:num_preemptions_total", model=MODEL, worker=w) == 0
    successes = samples["cascade:request_success_total"]
    served = {lab["worker"] for lab, _ in successes if lab["finished_reason"] == "length"}
    assert served and served <= {holder, *(t["worker"] for t in new)}
    assert sum(v for _, v in samples["cascade:generation_tokens_total"]) == 6 * 8
