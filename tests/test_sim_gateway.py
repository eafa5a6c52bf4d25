"""The simulated gateway hands the router only the instances that can change its answer
(sim/gateway.py); on random snapshots, the route from that subset is the route from all."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from cascade.config import Deployment, ModelDeployment
from cascade.messages import WorkerState
from services.gateway.router import choose_route
from sim.hardware import Topology, model_shape
from sim.mesh import Mesh, Scenario
from sim.settings import MeshSettings
from sim.worker import Beat


def mesh(n: int, live: bool) -> Mesh:
    dep = Deployment(
        (ModelDeployment("m", Path("/sim/m"), 0, n, policy="manual", scaling="live" if live else "stop-the-world"),)
    )
    shape = model_shape("llama2-7b-a100-80gb", name="m")
    return Mesh(Scenario("g", Topology(hosts=1, accelerators_per_host=n), MeshSettings(), dep, {"m": shape}, []))


def snapshot(rng: random.Random, m: Mesh) -> None:
    """Every worker serving, loading or idle, with random loads, batch limits, in-flight counts and
    prefill backlogs, as the gateway would have heard them."""
    gw = m.gateway
    units = m.models["m"].num_units
    for i, wid in enumerate(m.workers):
        state: WorkerState = rng.choice(["serving", "serving", "serving", "loading", "idle", "draining"])
        ready = units if state in ("serving", "draining") else rng.randrange(0, units) if state == "loading" else 0
        mb = rng.choice([8, 16, 32, 32])
        hb = Beat(
            wid,
            state,
            None if state == "idle" else "m",
            ready,
            units if state != "idle" else 0,
            rng.randrange(0, mb + 6),
            rng.randrange(0, 4),
            mb,
            rng.randrange(0, 40),
            rng.randrange(0, 6),
            32,
            0,
            float(i),
        )
        gw.on_heartbeat(hb)
        if state != "idle":
            gw.on_ready(wid, "m", ready, units)
        sw = gw.seen[wid]
        sw.inflight = rng.randrange(0, mb + 6)
        sw.unstarted_prompts = rng.randrange(0, 4)
        sw.unstarted_tokens = sw.unstarted_prompts * rng.randrange(0, 60)
        sw.suspended = rng.random() < 0.05
        gw._refresh(wid)


def key(route: Any) -> Any:
    if route is None:
        return None
    return (
        route.worker_id,
        route.stages,
        None
        if route.room is None
        else (route.room.requests, route.room.prompts, route.room.tokens, route.room.prefill_budget),
    )


def test_the_candidates_route_as_all_instances_would() -> None:
    rng = random.Random(5)
    checked = 0
    for trial in range(300):
        n = rng.choice([2, 5, 16])
        live = trial % 2 == 0
        m = mesh(n, live)
        snapshot(rng, m)
        gw = m.gateway
        views = [sw.view for sw in gw.seen.values() if sw.view is not None]
        workers = list(m.workers)
        for _ in range(4):
            avoid = frozenset(rng.sample(workers, rng.randrange(0, min(3, n))))
            want = choose_route(views, "m", avoid, live)
            got = choose_route(gw.candidates("m", avoid), "m", avoid, live)
            assert key(got) == key(want), (trial, avoid)
            checked += want is not None
    assert checked > 100  # most snapshots have somewhere to go
