"""2-D co-scaling (services/scaler/coscale.py) tick by tick on a fake clock: quota first (from
free compute, then from co-located slack), instances if the pressure lasts, released the other
way round."""

from __future__ import annotations

import pytest

from cascade.config import ConfigError
from services.scaler.coscale import (
    AddInstance,
    CoScaleKnobs,
    CoScaleSignals,
    CoScaleState,
    Decision,
    ModelView,
    QuotaChange,
    RemoveInstance,
    Slot,
    decide_coscale,
)

K = CoScaleKnobs(target_util=0.5, high_util=0.8, low_util=0.3, min_quota=0.05, horizontal_delay_s=3, release_delay_s=10)


def view(name: str, instances: tuple[str, ...], *, added: tuple[str, ...] = (), loading: int = 0) -> ModelView:
    return ModelView(name=name, planned=1, instances=instances, added=added, loading=loading, max_instances=4)


def quotas(ds: list[Decision]) -> dict[tuple[str, str], float]:
    return {(d.instance, d.worker): d.quota for d in ds if isinstance(d, QuotaChange)}


def test_hot_slot_takes_free_compute_first() -> None:
    s = CoScaleSignals(
        now=0.0,
        slots=(Slot("a", "a1", "w0", 0.2, 0.2), Slot("b", "b1", "w0", 0.3, 0.1)),
        models=(view("a", ("a1",)), view("b", ("b1",))),
    )
    ds, _ = decide_coscale(s, K, CoScaleState())
    # a needs 0.2 / 0.5 = 0.4; the worker has 0.5 free, so b keeps its quota.
    assert quotas(ds) == {("a1", "w0"): 0.4}


def test_hot_slot_borrows_slack_but_not_below_the_donors_need() -> None:
    s = CoScaleSignals(
        now=0.0,
        slots=(Slot("a", "a1", "w0", 0.3, 0.3), Slot("b", "b1", "w0", 0.7, 0.1)),
        models=(view("a", ("a1",)), view("b", ("b1",))),
    )
    ds, st = decide_coscale(s, K, CoScaleState())
    q = quotas(ds)
    # a wants 0.6: 0.3 more, all from b, whose own need is 0.1 / 0.5 = 0.2 (slack 0.5).
    assert q == {("b1", "w0"): pytest.approx(0.4), ("a1", "w0"): pytest.approx(0.6)}
    assert "a" not in st.pressure_since
    assert not any(isinstance(d, AddInstance) for d in ds)


def apply(slots: tuple[Slot, ...], ds: list[Decision]) -> tuple[Slot, ...]:
    """The quotas after the decisions, as the next tick's signals would show them."""
    q = quotas(ds)
    return tuple(Slot(x.model, x.instance, x.worker, q.get((x.instance, x.worker), x.quota), x.demand) for x in slots)


def test_lasting_shortage_adds_one_instance_then_waits_for_it() -> None:
    # a needs 0.65 / 0.5 -> all of w0, b needs 0.2 / 0.5 = 0.4: w0 is shared 1.0 : 0.4, and a
    # stays hot (0.65 on 0.71) with nothing left to lend.
    slots: tuple[Slot, ...] = (Slot("a", "a1", "w0", 0.6, 0.65), Slot("b", "b1", "w0", 0.4, 0.2))
    st = CoScaleState()
    adds: list[tuple[int, AddInstance]] = []
    for t in range(0, 8):
        loading = 1 if adds else 0
        s = CoScaleSignals(now=float(t), slots=slots, models=(view("a", ("a1",), loading=loading), view("b", ("b1",))))
        ds, st = decide_coscale(s, K, st)
        if t == 0:
            assert quotas(ds) == {
                ("b1", "w0"): pytest.approx(0.4 / 1.4, abs=1e-3),
                ("a1", "w0"): pytest.approx(1 / 1.4, abs=1e-3),
            }
        else:
            assert quotas(ds) == {}  # nothing left to lend
        slots = apply(slots, ds)
        adds += [(t, d) for d in ds if isinstance(d, AddInstance)]
    assert [t for t, _ in adds] == [3]  # after horizontal_delay_s, once: none while one loads
    assert adds[0][1].model == "a"


def test_short_but_not_yet_long_enough_adds_nothing() -> None:
    slots: tuple[Slot, ...] = (Slot("a", "a1", "w0", 0.6, 0.65), Slot("b", "b1", "w0", 0.4, 0.2))
    st = CoScaleState()
    for t in (0.0, 1.0, 2.9):
        ds, st = decide_coscale(CoScaleSignals(t, slots, (view("a", ("a1",)), view("b", ("b1",)))), K, st)
        assert not any(isinstance(d, AddInstance) for d in ds)
        slots = apply(slots, ds)
    assert st.pressure_since == {"a": 0.0}


def test_release_removes_the_added_instance_before_any_quota_shrinks() -> None:
    # Load fell: a's two instances have demand 0.05 each against quotas of 0.5.
    slots: tuple[Slot, ...] = (Slot("a", "a1", "w0", 0.5, 0.05), Slot("a", "a2", "w1", 0.5, 0.05))
    st = CoScaleState()
    seen: list[tuple[float, Decision]] = []
    for t in range(0, 12):
        s = CoScaleSignals(float(t), slots, (view("a", ("a1", "a2"), added=("a2",)),))
        ds, st = decide_coscale(s, K, st)
        seen += [(t, d) for d in ds]
    assert [(t, type(d)) for t, d in seen] == [(10, RemoveInstance)]
    assert isinstance(seen[0][1], RemoveInstance) and seen[0][1].instance == "a2"
    # Once it is gone, the remaining quota shrinks to what the window's peak needs.
    slots = (Slot("a", "a1", "w0", 0.5, 0.1),)
    for t in range(12, 24):
        ds, st = decide_coscale(CoScaleSignals(float(t), slots, (view("a", ("a1",)),)), K, st)
        if ds:
            break
    assert quotas(ds) == {("a1", "w0"): pytest.approx(0.2)}


def test_quota_follows_the_peak_not_the_last_tick() -> None:
    st = CoScaleState()
    # Demand swings between 0.05 and 0.12 on a quota of 0.5: it shrinks to 0.12 / 0.5, not below.
    for t in range(0, 30):
        d = 0.12 if t % 4 == 0 else 0.05
        s = CoScaleSignals(float(t), (Slot("a", "a1", "w0", 0.5, d),), (view("a", ("a1",)),))
        ds, st = decide_coscale(s, K, st)
        if ds:
            assert t >= K.release_delay_s  # a whole window of demand seen first
            assert quotas(ds) == {("a1", "w0"): pytest.approx(0.24)}
            return
    raise AssertionError("the quota never shrank")


def test_knobs_are_checked() -> None:
    with pytest.raises(ConfigError):
        CoScaleKnobs(target_util=0.9, high_util=0.8)
    with pytest.raises(ConfigError):
        CoScaleKnobs(min_quota=0)


def test_an_oversubscribed_worker_is_shared_in_proportion_to_need() -> None:
    # a needs 0.6 / 0.5 = 1.2 -> capped 1.0, b needs 0.25 / 0.5 = 0.5: together 1.5 of one worker.
    s = CoScaleSignals(
        now=0.0,
        slots=(Slot("a", "a1", "w0", 0.9, 0.6), Slot("b", "b1", "w0", 0.1, 0.25)),
        models=(view("a", ("a1",)), view("b", ("b1",))),
    )
    ds, st = decide_coscale(s, K, CoScaleState())
    # b is hot (0.25 > 0.8 x 0.1) and gets its fair share 0.5 / 1.5 from a, which keeps 1.0 / 1.5.
    assert quotas(ds) == {("a1", "w0"): pytest.approx(2 / 3, abs=1e-3), ("b1", "w0"): pytest.approx(1 / 3, abs=1e-3)}
    # b is short of its need; a, not hot before lending, shows its shortage on the next tick.
    assert set(st.pressure_since) == {"b"}


def test_a_quota_never_shrinks_below_its_slo_floor() -> None:
    st = CoScaleState()
    slot = Slot("a", "a1", "w0", 0.5, 0.01, floor=0.3)
    for t in range(0, 30):
        ds, st = decide_coscale(CoScaleSignals(float(t), (slot,), (view("a", ("a1",)),)), K, st)
        if ds:
            assert quotas(ds) == {("a1", "w0"): pytest.approx(0.3)}  # not 0.01 / 0.5 = 0.02
            return
    raise AssertionError("the quota never shrank")
