"""The placer (cascade/placement.py) and its scorer (sim/multimodel.py) on small hand-checked
cases: stage splits and bytes, memory fit, and AlpaServe's point — a burst on one model served
by a pipelined group that holds two models, where one model per worker cannot."""

from __future__ import annotations

import json

import pytest

from cascade.config import ConfigError
from cascade.placement import (
    Group,
    PoolSpec,
    fits,
    model_spec,
    place,
    plan_from_json,
    plan_json,
    workload_from_dict,
)
from sim.multimodel import Req, gamma_arrivals, scorer, simulate_shared, zipf_rates

PROFILE = "llama2-7b-a100-80gb"


def test_split_and_bytes() -> None:
    m = model_spec("a", PROFILE, layers=10)
    assert m.split(3) == [(0, 4), (4, 7), (7, 10)]
    assert sum(m.stage_bytes(3)) == m.nbytes
    assert m.stage_bytes(1) == [m.nbytes]
    with pytest.raises(ValueError):
        m.split(11)


def test_stage_seconds_add_up_to_the_single_worker_time() -> None:
    m = model_spec("a", PROFILE)
    one = m.stage_seconds(1)[0]
    two = m.stage_seconds(2)
    # Splitting adds one step overhead per pass per extra stage, nothing else.
    extra = max(1, m.output_tokens) * m.profile.step_overhead_ms / 1000
    assert sum(two) == pytest.approx(one + extra)
    assert max(two) < one
    assert m.latency_s(2, hop_s=0.001) == pytest.approx(sum(two) + m.output_tokens * 0.001)
    assert m.slo_s == pytest.approx(5 * m.latency_s(1))


def test_fits_counts_every_stage_of_every_model() -> None:
    m = model_spec("a", PROFILE)
    models = {"a": m, "b": model_spec("b", PROFILE)}
    half = max(m.stage_bytes(2))
    assert fits(Group((0, 1)), m, models, half)
    assert not fits(Group((0, 1), ("b",)), m, models, half)  # two halves on one worker
    assert fits(Group((0, 1), ("b",)), m, models, 2 * half)
    assert not fits(Group((0,)), m, models, half)


def _burst_case() -> tuple[dict, PoolSpec, list[Req], float]:
    """Two equal models; memory holds one whole model per worker, or half of each. Two requests
    to A at t=0, two to B later; SLO 1.75x one request alone."""
    base = model_spec("a", PROFILE)
    lat = base.latency_s(1)
    a = model_spec("a", PROFILE, slo_ms=1000 * 1.75 * lat)
    b = model_spec("b", PROFILE, slo_ms=1000 * 1.75 * lat)
    models = {"a": a, "b": b}
    pool = PoolSpec(workers=2, memory_bytes=int(a.nbytes * 1.2), hop_s=0.0)
    arrivals = [Req(0.0, "a"), Req(0.0, "a"), Req(10 * lat, "b"), Req(10 * lat, "b")]
    return models, pool, arrivals, lat


def test_one_model_per_worker_misses_half_of_a_burst() -> None:
    models, pool, arrivals, _ = _burst_case()
    st = simulate_shared([Group((0,), ("a",)), Group((1,), ("b",))], models, pool, arrivals)
    # The second request of each burst waits for the first: 2x the latency > 1.75x.
    assert st.attainment == 0.5
    assert st.rejected == 2


def test_pipelined_group_absorbs_the_burst() -> None:
    models, pool, arrivals, _ = _burst_case()
    st = simulate_shared([Group((0, 1), ("a", "b"))], models, pool, arrivals)
    s1, s2 = models["a"].stage_seconds(2)
    # By hand: the second request enters stage 1 when the first leaves it, stage 2 after both
    # its own stage 1 and the first's stage 2.
    second = max(2 * s1, s1 + s2) + s2
    assert second < models["a"].slo_s
    assert st.attainment == 1.0


def test_placer_picks_the_pipelined_group() -> None:
    models, pool, arrivals, _ = _burst_case()
    score = scorer(models, pool, arrivals)
    plan = place(list(models.values()), pool, score)
    assert plan.group_size == 2
    assert plan.groups == (Group((0, 1), ("a", "b")),) or plan.groups == (Group((0, 1), ("b", "a")),)
    assert plan.attainment == 1.0
    assert plan.notes["attainment_by_group_size"][1] == 0.5
    # The baseline: whole models only, one per worker.
    base = place(list(models.values()), pool, score, group_sizes=(1,), max_models_per_group=1)
    # (A on both workers ties with A and B: either way two of the four requests miss.)
    assert all(len(g.models) == 1 and g.stages == 1 for g in base.groups)
    assert base.attainment == 0.5


def test_greedy_replicates_the_popular_model() -> None:
    names = ["hot", "cold"]
    models = {n: model_spec(n, PROFILE) for n in names}
    pool = PoolSpec(workers=3, memory_bytes=int(models["hot"].nbytes * 1.1))
    lat = models["hot"].latency_s(1)
    # hot alone needs about two workers; cold needs a fraction of one.
    rates = {"hot": 1.4 / lat, "cold": 0.2 / lat}
    arrivals = gamma_arrivals(rates, 200 * lat, 1.0, seed=3)
    plan = place(list(models.values()), pool, scorer(models, pool, arrivals), group_sizes=(1,), max_models_per_group=1)
    held = sorted(m for g in plan.groups for m in g.models)
    assert held == ["cold", "hot", "hot"]


def test_plan_file_round_trip() -> None:
    models, pool, arrivals, _ = _burst_case()
    plan = place(list(models.values()), pool, scorer(models, pool, arrivals))
    doc = plan_json(plan, models, pool)
    assert doc["groups"][0]["workers"] == ["w0", "w1"]
    stages = doc["groups"][0]["models"][0]["stages"]
    assert [s["layers"] for s in stages] == [[0, 16], [16, 32]]
    back = plan_from_json(doc)
    assert back.groups == plan.groups
    with pytest.raises(ConfigError):
        plan_from_json({"type": "something-else"})


def test_workload_file_errors_are_clear() -> None:
    w = workload_from_dict({"rates": {"a": 2, "b": 0.5}, "cv": 3}, "w.toml")
    assert w.rates == {"a": 2.0, "b": 0.5} and w.cv == 3.0
    with pytest.raises(ConfigError, match="rates"):
        workload_from_dict({"cv": 2}, "w.toml")
    with pytest.raises(ConfigError, match="cv"):
        workload_from_dict({"rates": {"a": 1}, "cv": 0}, "w.toml")


def test_zipf_rates_sum_and_skew() -> None:
    r = zipf_rates(["a", "b", "c"], 11.0)
    assert sum(r.values()) == pytest.approx(11.0)
    assert r["a"] == pytest.approx(2 * r["b"]) and r["a"] == pytest.approx(3 * r["c"])


def test_cli_place_prints_the_plan_and_its_file(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from cascade.cli import main

    ex = Path(__file__).resolve().parent.parent / "examples" / "placement"
    out = tmp_path / "plan.json"
    argv = ["place", "--config", str(ex / "deploy.toml"), "--workload", str(ex / "workload.toml")]
    assert main([*argv, "--json", "--out", str(out), "--workers", "4", "--group-sizes", "1,2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert doc["type"] == "cascade-placement-plan" and doc["pool"]["workers"] == 4
    assert 0.0 <= doc["predicted_attainment"] <= 1.0
    assert set(doc["notes"]["attainment_by_group_size"]) <= {"1", "2"}
    held = {m["model"] for g in doc["groups"] for m in g["models"]}
    assert held <= {"chat-7b", "code-7b", "chat-10b", "code-10b", "chat-13b", "summarise-17b"} and held
    assert plan_from_json(doc).groups  # what a loader reads back
    assert main([*argv, "--workers", "4", "--group-sizes", "3"]) == 1
    assert "do not divide" in capsys.readouterr().err
    bad = tmp_path / "w.toml"
    bad.write_text("[rates]\nnobody = 1.0\n")
    assert main(["place", "--config", str(ex / "deploy.toml"), "--workload", str(bad)]) == 1
    assert "nobody" in capsys.readouterr().err


def test_quota_mode_allocates_what_the_load_needs_and_accounts_every_second() -> None:
    from sim.multimodel import QuotaRun, simulate_quota

    models = {"a": model_spec("a", PROFILE), "b": model_spec("b", PROFILE, layers=48)}
    pool = PoolSpec(workers=2, memory_bytes=int(60e9))
    groups = [Group((0,), ("a", "b")), Group((1,), ("a",))]
    lat = models["a"].latency_s(1)
    rates = {"a": 0.6 / lat, "b": 0.2 / models["b"].latency_s(1)}
    arrivals = gamma_arrivals(rates, 200.0, 1.0, seed=5)
    st = simulate_quota(groups, models, pool, arrivals, rates, QuotaRun(window_s=10.0))
    work = sum(
        sum(models[r.model].stage_seconds(1)) for r in arrivals
    )  # every request admitted runs its whole work once
    assert st.attainment > 0.99
    assert st.busy_s + st.borrowed_s == pytest.approx(work * st.attainment, rel=0.02)
    # Quotas follow a load of about 0.4 of the pool: well below the whole pool, above the work.
    assert st.busy_s <= st.allocated_s < 0.8 * pool.workers * st.span_s
    shared = simulate_shared(groups, models, pool, arrivals)
    assert shared.allocated_s == pytest.approx(pool.workers * shared.span_s)
    assert st.idle_allocated_s < shared.idle_allocated_s


def test_replan_when_the_mix_or_the_total_rate_drifts() -> None:
    from cascade.placement import replan_reason

    planned = {"a": 6.0, "b": 3.0, "c": 1.0}
    assert replan_reason(planned, {"a": 6.5, "b": 2.8, "c": 1.1}) == ""
    # The same total, but b became the popular one: 0.5 * (|.6-.3| + |.3-.6| + 0) = 0.3 > 0.2.
    assert "mix" in replan_reason(planned, {"a": 3.0, "b": 6.0, "c": 1.0})
    assert "total rate" in replan_reason(planned, {"a": 9.0, "b": 4.5, "c": 1.5})  # +50 %
    assert "mix" in replan_reason(planned, {"a": 6.0, "b": 3.0, "c": 1.0, "new": 4.0}, rate_tol=1.0)
    assert replan_reason({}, {}) == "" and replan_reason({}, {"a": 1.0}) != ""
