"""bench/sim_burst.py's variants: how a variant's text becomes a deployment's knobs."""

from __future__ import annotations

from pathlib import Path

from bench.sim_burst import parse_variant, with_knobs
from cascade.config import Deployment, ModelDeployment
from sim.hardware import Topology
from sim.mesh import Scenario
from sim.settings import MeshSettings


def test_a_variant_names_knobs_a_policy_and_knobs_to_drop() -> None:
    assert parse_variant("ka=keep_alive_s=0.5,down_step=1") == ("ka", None, {"keep_alive_s": 0.5, "down_step": 1.0}, [])
    assert parse_variant("x=policy=concurrency,-activation_scale") == ("x", "concurrency", {}, ["activation_scale"])
    assert parse_variant("committed=") == ("committed", None, {}, [])


def test_with_knobs_overrides_on_top_of_the_configuration() -> None:
    md = ModelDeployment("m", Path("/sim/m"), min_replicas=0, max_replicas=4, policy="rate",
                         knobs={"keep_alive_s": 4.0, "activation_scale": 4.0})  # fmt: skip
    topo = Topology(hosts=1, accelerators_per_host=1)
    sc = Scenario(name="s", topology=topo, settings=MeshSettings(), deployment=Deployment((md,)), models={},
                  arrivals=[])  # fmt: skip
    (out,) = with_knobs(sc, None, {"keep_alive_s": 0.5}, ["activation_scale"]).deployment.models
    assert out.knobs == {"keep_alive_s": 0.5} and out.policy == "rate"
    (out,) = with_knobs(sc, "concurrency", {}, []).deployment.models
    assert out.policy == "concurrency" and out.knobs == md.knobs
