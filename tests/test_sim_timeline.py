"""A small simulated mesh against a timeline computed by hand: the engine's step rule and the
profile's prices, the gateway's batching, the messages' latency, a run of decode steps cut by
an arrival; and a scale-up whose load costs what its bytes over its links say, as a chain and as
a star."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade.config import Deployment, ModelDeployment
from sim.hardware import Topology, model_shape
from sim.mesh import Arrival, Scenario, run
from sim.settings import MeshSettings

L = 0.5e-3  # one control message


def profile(tmp_path: Path) -> str:
    """Round figures: 2 layers; decode 1 ms per layer at any batch; prefill 0.01 ms per token per
    layer; no KV, overhead or head cost. A step is then 2 ms unless a prompt chunk makes it longer."""
    data = {
        "format": "cascade-device-profile",
        "version": 1,
        "name": "toy",
        "model": {
            "name": "toy",
            "layers": 2,
            "hidden": 8,
            "bytes_per_layer": 1_000_000_000,
            "bytes_embedding": 500_000_000,
            "bytes_head": 500_000_000,
        },
        "device": {"name": "toy"},
        "decode": {"batch": [1, 64], "ms_per_layer": [1.0, 1.0]},
        "prefill": {"ms_per_token_per_layer": 0.01, "ms_fixed_per_layer": 0.0},
        "disk_mb_s": 1000,
    }
    p = tmp_path / "toy.json"
    p.write_text(json.dumps(data))
    return str(p)


def deployment(policy: str, lo: int, hi: int, loading: str = "multicast") -> Deployment:
    return Deployment(
        (ModelDeployment("m", Path("/sim/m"), min_replicas=lo, max_replicas=hi, policy=policy, loading=loading),)
    )


def test_two_requests_by_hand(tmp_path: Path) -> None:
    shape = model_shape(profile(tmp_path), name="m")
    settings = MeshSettings(control_latency_s=L, max_prefill_tokens=512, host_cache="off", heartbeat_s=10.0)
    sc = Scenario(
        "hand",
        Topology(hosts=1, accelerators_per_host=1),
        settings,
        deployment("manual", 1, 1),
        {"m": shape},
        [Arrival(0.0, "m", 100, 3), Arrival(0.003, "m", 50, 2)],
        preload={"m": 1},
    )
    r = run(sc)
    a, b = r.reqs
    # A reaches the worker at L; step 1 prefills 100 tokens: 2 layers x 0.01 x 100 = 2 ms. Its
    # first token reaches the gateway one message later.
    assert a.first - a.arrived == pytest.approx(L + 0.002 + L)
    # Steps 2 and 3 decode it (2 ms each), as one run of decode steps. B arrives at 3 ms, reaches
    # the worker at 3.5 ms, inside step 2 (2.5-4.5 ms): the run is cut there and step 3 (4.5-6.5
    # ms) decodes A and prefills B: max(1 ms, 0.01 x (50 + 1)) per layer = 2 ms.
    assert a.end - a.arrived == pytest.approx(L + 0.006 + L)
    assert b.first - b.arrived == pytest.approx(L + 0.0065 - 0.003)
    # B's second token: step 4, 6.5-8.5 ms.
    assert b.end - b.arrived == pytest.approx(L + 0.0085 - 0.003)
    assert a.status == b.status == "ok"


# The 3 GB model to three workers, one per host, from the one host copy (on host 0, beside the
# first worker): as a chain, host 0 → w0 over PCIe (100 GB/s), then w0 → w1 → w2 over 1 GB/s NICs:
# 3 GB at 1 GB/s, plus one 1 MB chunk per hop at that pace (2 hops). As a star (the host-cache
# mode: a stream per target), w1 and w2 share host 0's 1 GB/s NIC: 3 GB at 0.5 GB/s each.
@pytest.mark.parametrize(("mode", "want"), [("multicast", 3.0 + 2 * 0.001), ("host-cache", 6.0)])
def test_a_scale_up_costs_its_bytes_over_its_links(tmp_path: Path, mode: str, want: float) -> None:
    shape = model_shape(profile(tmp_path), name="m")
    # 8 Gb/s NICs (1 GB/s), a fast PCIe: the NICs are the bottleneck.
    topo = Topology(
        hosts=4,
        accelerators_per_host=1,
        nic_gbps=8.0,
        nics_per_host=1,
        pcie_gb_s=100.0,
        chunk_bytes=1_000_000,
        link_latency_s=0.0,
    )
    setup = 0.02
    settings = MeshSettings(control_latency_s=L, transfer_setup_s=setup, host_cache="one", heartbeat_s=0.5)
    sc = Scenario(
        "load",
        topo,
        settings,
        deployment("manual", 0, 3, loading=mode),
        {"m": shape},
        [Arrival(10.0, "m", 10, 1)],
        fill_host_cache=("m",),
        operator=[(0.0, "m", 3)],
    )
    r = run(sc)
    (d,) = [x for x in r.decisions if x["action"] == "up"]
    (ack,) = r.acks
    assert d["count"] == 3 and ack["ok"] and ack["workers"] == 3
    # The decision's message, the orders (a round trip), the setup, the bytes, the ack (a round
    # trip: the last target's heartbeat, then the ack).
    assert ack["t"] - d["t"] == pytest.approx(5 * L + setup + want, rel=1e-6)


def test_a_drain_waits_for_the_step_that_admitted_the_last_request(tmp_path: Path) -> None:
    """Scaled to zero while a step prefills the worker's only request (admitted whole, so in no
    queue while the step runs): the worker drains after that step, and the request completes."""
    shape = model_shape(profile(tmp_path), name="m")
    # 10,000 prompt tokens in one step: 2 layers x 0.01 ms x 10,000 = 200 ms.
    settings = MeshSettings(
        control_latency_s=L, max_prefill_tokens=20_000, host_cache="off", heartbeat_s=0.01, scaler_tick_s=0.01
    )
    sc = Scenario(
        "drain",
        Topology(hosts=1, accelerators_per_host=1),
        settings,
        deployment("manual", 0, 1),
        {"m": shape},
        [Arrival(0.0, "m", 10_000, 3)],
        preload={"m": 1},
        operator=[(0.05, "m", 0)],
    )
    r = run(sc)
    (a,) = r.reqs
    assert a.status == "ok"
    # Prefill 200 ms, then two decode steps of 2 ms; the messages there and back.
    assert a.end - a.arrived == pytest.approx(L + 0.204 + L)
    assert [d["action"] for d in r.decisions] == ["down"]
