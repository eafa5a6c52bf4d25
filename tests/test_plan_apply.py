"""Applying a placement plan (cascade/planapply.py, the scaler's `apply_plan`): the plan file's
targets and quotas, the pool check, the quota orders read back from heartbeats, and the scaler
core taking planned counts as floor and target — once; applying again decides nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from cascade.config import ConfigError, Deployment, ModelDeployment
from cascade.messages import ApplyPlan, PlannedModel, ScaleAck
from cascade.placement import Group, Plan, group_quotas
from cascade.planapply import binding, mesh_slots, pool_problem, progress, quota_orders, read_plan
from services.scaler import core
from services.scaler.replicas import Settings, TargetError

SETTINGS = Settings(ack_timeout_s=60.0, warmup_s=0.0, settle_s=2.0, retry_base_s=1.0, retry_max_s=8.0)


def plan_doc(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "cascade-placement-plan", "version": 1, "group_size": 2, "groups": groups}


def two_model_plan(qa: float = 0.7, qb: float = 0.3) -> dict[str, Any]:
    def stages(m: str) -> list[dict[str, Any]]:
        return [{"worker": "w0", "layers": [0, 2]}, {"worker": "w1", "layers": [2, 4]}]

    return plan_doc(
        [
            {
                "group": 0,
                "workers": ["w0", "w1"],
                "stages": 2,
                "models": [
                    {"model": "a", "quota": qa, "stages": stages("a")},
                    {"model": "b", "quota": qb, "stages": stages("b")},
                ],
            }
        ]
    )


def row(w: str, dev: str, state: str = "idle", model: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"worker_id": w, "shared_device": dev, "state": state, "model": model, "quota": 1.0, **kw}


def test_group_quotas_follow_the_rate_each_group_gets() -> None:
    plan = Plan((Group((0, 1), ("hot", "cold")), Group((2, 3), ("hot",))))
    q = group_quotas(plan, {"hot": 4.0, "cold": 2.0})
    # hot sends half its 4 req/s to each group: 2 against cold's 2 in group 0.
    assert q == [{"hot": 0.5, "cold": 0.5}, {"hot": 1.0}]
    assert group_quotas(plan, {"hot": 100.0, "cold": 0.0})[0] == {"hot": pytest.approx(0.952, abs=1e-3), "cold": 0.048}
    assert group_quotas(plan)[0] == {"hot": 0.5, "cold": 0.5}


def test_read_plan_targets_and_quotas() -> None:
    plan = read_plan(two_model_plan())
    assert plan.targets() == {"a": (1, 2), "b": (1, 2)}
    assert plan.groups[0].quotas == {"a": 0.7, "b": 0.3}
    doc = two_model_plan()
    for m in doc["groups"][0]["models"]:
        del m["quota"]
    assert read_plan(doc).groups[0].quotas == {"a": 0.5, "b": 0.5}  # even shares by default
    with pytest.raises(ConfigError, match=r"sum to 1\.5"):
        read_plan(two_model_plan(0.9, 0.6))
    with pytest.raises(ConfigError, match="quota must be"):
        read_plan(two_model_plan(0.0, 0.3))
    with pytest.raises(ConfigError):
        read_plan({"type": "other"})


def test_pool_check_says_what_is_missing() -> None:
    plan = read_plan(two_model_plan())
    shared = mesh_slots([row("p0", "p0"), row("p0-2", "p0"), row("p1", "p1"), row("p1-2", "p1")])
    assert pool_problem(plan, shared) == ""
    one_slot = mesh_slots([row("p0", ""), row("p1", ""), row("p2", "")])
    assert "--slots 2" in pool_problem(plan, one_slot)
    assert "names 2 worker(s)" in pool_problem(plan, mesh_slots([row("p0", "p0"), row("p0-2", "p0")]))
    # A slot holding another model is not free; one holding a planned model is (applying again).
    busy = mesh_slots([row("p0", "p0"), row("p0-2", "p0", "serving", "other"), row("p1", "p1"), row("p1-2", "p1")])
    assert "--slots 2" in pool_problem(plan, busy)
    again = mesh_slots(
        [
            row("p0", "p0", "serving", "a", group="g1", stage_start=0),
            row("p0-2", "p0", "serving", "b", group="g2", stage_start=0),
            row("p1", "p1", "serving", "a", group="g1", stage_start=2),
            row("p1-2", "p1", "serving", "b", group="g2", stage_start=2),
        ]
    )
    assert pool_problem(plan, again) == ""


def test_quota_orders_once_instances_serve_and_none_once_applied() -> None:
    plan = read_plan(two_model_plan())
    rows = [
        row("p0", "p0", "serving", "a", group="g1", stage_start=0),
        row("p0-2", "p0", "serving", "b", group="g2", stage_start=0),
        row("p1", "p1", "serving", "a", group="g1", stage_start=2),
        row("p1-2", "p1", "loading", "b", group="g2", stage_start=2),
    ]
    assert progress(plan, mesh_slots(rows)) == {"a": (1, 1), "b": (0, 1)}  # b's second stage still loads
    rows[3]["state"] = "serving"
    slots = mesh_slots(rows)
    assert progress(plan, slots) == {"a": (1, 1), "b": (1, 1)}
    orders = quota_orders(plan, slots)
    assert sorted((o.worker, o.model, o.quota) for o in orders) == [
        ("p0", "a", 0.7),
        ("p0-2", "b", 0.3),
        ("p1", "a", 0.7),
        ("p1-2", "b", 0.3),
    ]
    for r in rows:
        r["quota"] = 0.7 if r["model"] == "a" else 0.3
    assert quota_orders(plan, mesh_slots(rows)) == []
    lines, warnings = binding(plan, mesh_slots(rows))
    assert lines == ["group 0: w0=p0, w1=p1: a, b"] and warnings == []
    # b's stages placed on other processes than a's: it serves, but the plan's sharing is not there.
    rows[1]["shared_device"] = "p2"
    _, warnings = binding(plan, mesh_slots(rows))
    assert warnings and "not co-located" in warnings[0]


def _state(models: list[ModelDeployment]) -> core.ScalerState:
    st = core.new_state(Deployment(tuple(models)), SETTINGS, core.Now(0.0, 0.0))
    st.book.loader_known = True
    return st


def _apply(st: core.ScalerState, mesh: core.Mesh, now: float, *pm: PlannedModel) -> Any:
    return core.apply_plan(st, ApplyPlan(list(pm), "plan.json"), mesh, core.Now(now, now))


def test_the_scaler_takes_the_plan_as_floor_and_target_and_decides_once() -> None:
    a = ModelDeployment("a", Path("/m/a"), 0, 1, policy="manual")
    b = ModelDeployment("b", Path("/m/b"), 0, 1, policy="concurrency", coscale=True)
    st = _state([a, b])
    idle = frozenset({"p0", "p0-2", "p1", "p1-2"})
    mesh = core.Mesh(idle=idle, holding=dict.fromkeys(idle))
    st, _ = core.tick(st, core.Inputs(mesh=mesh), core.Now(1.0, 1.0))
    reply, effects = _apply(st, mesh, 1.5, PlannedModel("a", 1, 2), PlannedModel("b", 1, 2))
    assert reply.changed == ["a", "b"]
    assert [e for e in effects if isinstance(e, core.Announce)], "the loader learns the stage counts"
    dep = st.controls.deployment
    assert [(m.name, m.min_replicas, m.max_replicas, m.stages) for m in dep.models] == [
        ("a", 1, 1, 2),
        ("b", 1, 1, 2),
    ]
    assert st.coscale.models["b"].min_replicas == 1  # co-scaling never releases below the plan
    st, effects = core.tick(st, core.Inputs(mesh=mesh), core.Now(2.0, 2.0))
    ups = [e.decision for e in effects if isinstance(e, core.Publish)]
    assert sorted((d.model, d.action, d.count) for d in ups) == [("a", "up", 1), ("b", "up", 1)]
    # The loader places both (its ack names the instance); heartbeats show them.
    acks = [ScaleAck(d.decision_id, d.model, True, [f"g-{d.model}"]) for d in ups]
    held = {"a0": "a", "a1": "a", "b0": "b", "b1": "b"}
    served = core.Mesh(instances={"a": frozenset({"g-a"}), "b": frozenset({"g-b"})}, idle=frozenset(), holding=held)
    st, effects = core.tick(st, core.Inputs(mesh=served, acks=acks), core.Now(3.0, 3.0))
    assert not [e for e in effects if isinstance(e, core.Publish)]
    decided = st.book.counters["decisions"]
    # Applying the same plan again changes nothing and decides nothing, tick after tick.
    reply, effects = _apply(st, served, 4.0, PlannedModel("a", 1, 2), PlannedModel("b", 1, 2))
    assert reply.changed == [] and all("unchanged" in line for line in reply.lines)
    assert not [e for e in effects if isinstance(e, core.Announce)]
    for t in range(5, 40):
        st, effects = core.tick(st, core.Inputs(mesh=served), core.Now(float(t), float(t)))
        assert not [e for e in effects if isinstance(e, core.Publish)], t
    assert st.book.counters["decisions"] == decided


def test_a_plan_that_changes_a_running_models_stages_is_refused_whole() -> None:
    a = ModelDeployment("a", Path("/m/a"), 1, 2, policy="manual")
    b = ModelDeployment("b", Path("/m/b"), 0, 1, policy="manual")
    st = _state([a, b])
    mesh = core.Mesh(instances={"a": frozenset({"w0"})}, idle=frozenset({"w1"}), holding={"w0": "a", "w1": None})
    with pytest.raises(TargetError, match="scale it to 0 first"):
        _apply(st, mesh, 1.0, PlannedModel("b", 1, 1), PlannedModel("a", 1, 2))
    assert st.controls.get("b").deployment.min_replicas == 0  # nothing changed
    with pytest.raises(core.UnknownModel):
        _apply(st, mesh, 1.0, PlannedModel("nope", 1, 1))
    # The same stage count on a running model: its count changes, its instance stays.
    reply, _ = _apply(st, mesh, 1.0, PlannedModel("a", 2, 1))
    assert reply.changed == ["a"] and st.book.targets["a"] == 2


def test_cascade_apply_refuses_a_file_that_is_not_a_plan(tmp_path: Path) -> None:
    from cascade.cli.apply import load_plan
    from cascade.cli.common import CliError

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CliError, match="is not JSON"):
        load_plan(bad)
    bad.write_text('{"type": "cascade-placement-plan", "version": 2, "groups": []}')
    with pytest.raises(CliError, match="not a cascade-placement-plan v1"):
        load_plan(bad)
    with pytest.raises(CliError, match="cannot read plan"):
        load_plan(tmp_path / "missing.json")
    good = tmp_path / "plan.json"
    good.write_text(orjson.dumps(two_model_plan()).decode())
    assert load_plan(good).targets() == {"a": (1, 2), "b": (1, 2)}
