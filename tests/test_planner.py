from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from cascade.workers import WorkerView
from services.loader.planner import (
    MeshSnapshot,
    PlanError,
    PlanRequest,
    first_break,
    ordered_units,
    plan_orders,
    plan_transfer,
    replan,
)

M = "m"
N_UNITS = 6
SIZES = tuple(100 * (u + 1) for u in range(N_UNITS))


def fixed_tokens() -> Callable[[], str]:
    c = itertools.count()
    return lambda: f"tok{next(c)}"


def idle(wid: str) -> WorkerView:
    return WorkerView(wid, "idle", None, 0, 0, data_addr=f"h:{wid}")


def holder(wid: str, load: int = 0) -> WorkerView:
    return WorkerView(wid, "serving", M, N_UNITS, N_UNITS, running=load, data_addr=f"h:{wid}")


def req(targets: tuple[str, ...], mode: str = "multicast", **kw: object) -> PlanRequest:
    return PlanRequest(M, targets, mode, SIZES, model_path="/models/m", **kw)  # type: ignore[arg-type]


def snap(*ws: WorkerView, cached: bool = False) -> MeshSnapshot:
    return MeshSnapshot(tuple(ws), frozenset({M}) if cached else frozenset(), "h:cache" if cached else None)


T3 = ("t1", "t2", "t3")
TARGETS = (idle("t1"), idle("t2"), idle("t3"))


def test_chain_from_idle_holder_front_to_back() -> None:
    p = plan_transfer(snap(holder("a"), *TARGETS), req(T3), "p1", fixed_tokens())
    assert len(p.chains) == 1
    c = p.chains[0]
    assert c.source.kind == "worker" and c.source.worker_id == "a" and not c.source.serving
    assert [h.worker_id for h in c.targets] == list(T3)
    assert c.units == tuple(range(N_UNITS))
    assert c.token == "tok0" and c.transfer_id == "p1-0"
    assert p.targets == T3


def test_prefers_non_serving_holders_and_splits_targets_over_them() -> None:
    s = snap(holder("busy", load=3), holder("a"), holder("b"), *TARGETS, idle("t4"))
    p = plan_transfer(s, req((*T3, "t4")), "p")
    assert {c.source.worker_id for c in p.chains} == {"a", "b"}
    assert sorted(len(c.targets) for c in p.chains) == [2, 2]
    assert sorted(p.targets) == ["t1", "t2", "t3", "t4"]
    assert len({c.token for c in p.chains}) == 2  # one secret per chain
    assert all(len(c.token) >= 32 for c in p.chains)


def test_serving_holder_only_when_nothing_else_and_rate_limited() -> None:
    p = plan_transfer(snap(holder("busy", load=2), *TARGETS), req(T3), "p")
    (c,) = p.chains
    assert c.source.worker_id == "busy" and c.source.serving and c.source.rate_limit_bps > 0
    assert "rate-limited" in p.note
    # With the host cache available, the serving worker is spared.
    p = plan_transfer(snap(holder("busy", load=2), *TARGETS, cached=True), req(T3), "p")
    assert p.chains[0].source.kind == "host-cache" and p.chains[0].source.addr == "h:cache"
    assert [h.worker_id for h in p.chains[0].targets] == list(T3)


def test_disk_when_nothing_holds_the_model() -> None:
    loading = WorkerView("l", "loading", M, 3, N_UNITS, data_addr="h:l")  # partial: not a source
    p = plan_transfer(snap(loading, *TARGETS), req(T3), "p")
    assert [c.source.kind for c in p.chains] == ["disk"] * 3
    assert [c.targets[0].worker_id for c in p.chains] == list(T3)
    assert "disk" in p.note
    with pytest.raises(PlanError, match="no checkpoint path"):
        plan_transfer(snap(*TARGETS), PlanRequest(M, T3, "multicast", SIZES), "p")


def test_modes() -> None:
    s = snap(holder("a"), *TARGETS, cached=True)
    star = plan_transfer(s, req(T3, "star"), "p")
    assert [(c.source.worker_id, len(c.targets)) for c in star.chains] == [("a", 1)] * 3
    hc = plan_transfer(s, req(T3, "host-cache"), "p")
    assert [(c.source.kind, len(c.targets)) for c in hc.chains] == [("host-cache", 1)] * 3
    disk = plan_transfer(s, req(T3, "disk"), "p")
    assert [c.source.kind for c in disk.chains] == ["disk"] * 3
    uncached = plan_transfer(snap(holder("a"), *TARGETS), req(T3, "host-cache"), "p")
    assert [c.source.kind for c in uncached.chains] == ["disk"] * 3
    assert "not in the host cache" in uncached.note


def test_rejects_bad_requests() -> None:
    with pytest.raises(PlanError, match="not in the mesh"):
        plan_transfer(snap(holder("a")), req(("ghost",)), "p")
    with pytest.raises(PlanError, match="already holds"):
        plan_transfer(snap(holder("a"), holder("b")), req(("b",)), "p")
    with pytest.raises(PlanError, match="twice"):
        plan_transfer(snap(holder("a"), idle("t1")), req(("t1", "t1")), "p")
    with pytest.raises(PlanError, match="data-plane address"):
        plan_transfer(snap(holder("a"), WorkerView("t1", "idle", None, 0, 0)), req(("t1",)), "p")


def test_orders_wire_the_chain() -> None:
    p = plan_transfer(snap(holder("a", load=1), *TARGETS), req(T3), "p", fixed_tokens())
    orders = plan_orders(p)
    (send,) = orders["a"]
    assert send.role == "send" and send.downstream == "h:t1" and send.rate_limit_bps > 0
    assert [orders[t][0].downstream for t in T3] == ["h:t2", "h:t3", None]
    assert all(orders[t][0].role == "receive" and orders[t][0].token == "tok0" for t in T3)
    assert all(o.units == list(range(N_UNITS)) and o.num_units == N_UNITS for os_ in orders.values() for o in os_)
    disk = plan_orders(plan_transfer(snap(*TARGETS), req(T3), "p"))
    assert [disk[t][0].role for t in T3] == ["disk"] * 3 and disk["t1"][0].path == "/models/m"


def test_replan_middle_target_failed() -> None:
    p = plan_transfer(snap(holder("a"), *TARGETS), req(T3), "p1")
    after = snap(holder("a"), holder("b"), idle("t1"), idle("t3"))  # t2 gone from the mesh
    new = replan(p, "t2", after, {"t1": 4, "t3": 2}, "p2")
    assert new is not None
    (c,) = new.chains
    assert [h.worker_id for h in c.targets] == ["t3"]  # t1 is upstream: unaffected
    assert c.units == (2, 3, 4, 5)  # t3 holds units 0 and 1 already
    assert c.source.worker_id in ("a", "b") and c.token != p.chains[0].token
    assert "t2" in new.note


def test_replan_source_failed_falls_back() -> None:
    p = plan_transfer(snap(holder("a"), *TARGETS), req(T3), "p1")
    # The source died: another holder if any ...
    new = replan(p, "a", snap(holder("b"), *TARGETS), {}, "p2")
    assert new is not None and new.chains[0].source.worker_id == "b"
    assert [h.worker_id for h in new.chains[0].targets] == list(T3)
    # ... else the host cache ...
    new = replan(p, "a", snap(*TARGETS, cached=True), {"t1": 1, "t2": 1, "t3": 1}, "p2")
    assert new is not None and new.chains[0].source.kind == "host-cache" and new.chains[0].units[0] == 1
    # ... else disk, each target on its own.
    new = replan(p, "a", snap(*TARGETS), {}, "p2")
    assert new is not None and [c.source.kind for c in new.chains] == ["disk"] * 3
    # The host cache failing as a head: never chosen again for that re-plan.
    hp = plan_transfer(snap(*TARGETS, cached=True), req(T3), "p1")
    new = replan(hp, "host-cache", snap(*TARGETS, cached=True), {}, "p2")
    assert new is not None and [c.source.kind for c in new.chains] == ["disk"] * 3


def test_replan_nothing_left() -> None:
    p = plan_transfer(snap(holder("a"), *TARGETS), req(T3), "p1")
    assert replan(p, "t3", snap(holder("a"), *TARGETS), {}, "p2") is None  # last in chain: nobody downstream
    assert replan(p, "t1", snap(holder("a"), *TARGETS), {"t2": N_UNITS, "t3": N_UNITS}, "p2") is None
    assert replan(p, "zz", snap(holder("a"), *TARGETS), {}, "p2") is None


def test_only_chain_with_failure_is_replanned() -> None:
    s = snap(holder("a"), holder("b"), *TARGETS, idle("t4"))
    p = plan_transfer(s, req((*T3, "t4")), "p1")
    c0, c1 = p.chains
    failed = c0.targets[0].worker_id
    new = replan(p, failed, s, {}, "p2")
    assert new is not None
    assert {h.worker_id for c in new.chains for h in c.targets} == {c0.targets[1].worker_id}
    assert not set(new.targets) & {h.worker_id for h in c1.targets}


def test_first_break_names_the_member_to_replan_around() -> None:
    (c,) = plan_transfer(snap(holder("a"), *TARGETS), req(T3), "p").chains
    assert first_break(c, dead=set(), failed=set()) is None
    # t2 crashed: t3's stream broke with it, t1 only lost its downstream.
    assert first_break(c, dead={"t2"}, failed={"t3"}) == "t2"
    # Nobody is dead yet (heartbeats lag) but t2 and t3 failed: t2's upstream, t1, broke.
    assert first_break(c, dead=set(), failed={"t2", "t3"}) == "t1"
    # Every target failed: the source's stream broke.
    assert first_break(c, dead=set(), failed=set(T3)) == "a"
    assert first_break(c, dead={"a"}, failed=set(T3)) == "a"
    (hc,) = plan_transfer(snap(*TARGETS, cached=True), req(T3), "p").chains
    assert first_break(hc, dead=set(), failed={"t1", "t2", "t3"}) == "host-cache"


# ---- hosts (--host-id) and workers that read no model store ------------------------------------


def on(w: WorkerView, host: str) -> WorkerView:
    from dataclasses import replace

    return replace(w, host=host)


def test_prefers_an_idle_holder_on_the_targets_host() -> None:
    ws = (on(holder("a"), "h1"), on(holder("b"), "h2"), on(idle("t1"), "h2"))
    p = plan_transfer(snap(*ws), req(("t1",)), "p1", fixed_tokens())
    assert p.chains[0].source.worker_id == "b"


def test_same_host_cache_beats_a_holder_on_another_host_but_not_one_on_the_same() -> None:
    s = MeshSnapshot((on(holder("a"), "h1"), on(idle("t1"), "h2")), frozenset({M}), "h:cache", host_cache_host="h2")
    assert plan_transfer(s, req(("t1",)), "p1", fixed_tokens()).chains[0].source.kind == "host-cache"
    s2 = MeshSnapshot((on(holder("a"), "h1"), on(idle("t1"), "h2")), frozenset({M}), "h:cache", host_cache_host="h1")
    assert plan_transfer(s2, req(("t1",)), "p1", fixed_tokens()).chains[0].source.worker_id == "a"
    # No host known: today's order (an idle holder first).
    s3 = MeshSnapshot((holder("a"), idle("t1")), frozenset({M}), "h:cache")
    assert plan_transfer(s3, req(("t1",)), "p1", fixed_tokens()).chains[0].source.worker_id == "a"


def test_busy_holders_on_the_targets_host_come_first() -> None:
    ws = (on(holder("a", load=1), "h1"), on(holder("b", load=3), "h2"), on(idle("t1"), "h2"))
    src = plan_transfer(snap(*ws), req(("t1",)), "p1", fixed_tokens()).chains[0].source
    assert src.worker_id == "b" and src.serving


def test_a_diskless_target_is_never_told_to_read_the_disk() -> None:
    from dataclasses import replace

    t = replace(idle("t1"), model_source="network")
    with pytest.raises(PlanError, match="t1 read no model store"):
        plan_transfer(snap(t), req(("t1",)), "p1", fixed_tokens())
    # With the host cache holding the model it is planned from there.
    assert plan_transfer(snap(t, cached=True), req(("t1",)), "p1", fixed_tokens()).chains[0].source.kind == "host-cache"


# ---- ordered plans: execute-while-load from zero --------------------------------------------------


def test_ordered_units_start_each_target_at_its_own_block() -> None:
    units = tuple(range(10))  # embedding, 8 layers, head
    orders = [ordered_units(units, i, 3) for i in range(3)]
    assert orders[0] == units  # the first block holds the embedding: front to back
    assert orders[1] == (3, 4, 5, 6, 7, 8, 9, 0, 1, 2)
    assert orders[2] == (7, 8, 9, 0, 1, 2, 3, 4, 5, 6)
    # The first blocks are disjoint, contiguous and together the whole range.
    firsts = [o[: len(b)] for o, b in zip(orders, ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9)), strict=True)]
    assert sorted(u for f in firsts for u in f) == list(units)
    for o in orders:
        assert sorted(o) == list(units)
    assert ordered_units(units, 0, 1) == units
    # By bytes: a small embedding, layers of 3 each, a larger head (30 bytes: blocks of 10, 9, 11).
    sizes = (1, 3, 3, 3, 3, 3, 3, 3, 3, 5)
    assert [ordered_units(units, i, 3, sizes)[:4] for i in range(3)] == [
        (0, 1, 2, 3),
        (4, 5, 6, 7),
        (7, 8, 9, 0),
    ]
    assert ordered_units((4, 5), 1, 5) == (5, 4)  # more targets than units: one unit each, wrapping


def test_ordered_plan_from_the_host_cache_gives_each_target_its_own_stream_and_block() -> None:
    s = snap(*TARGETS, cached=True)
    p = plan_transfer(s, req(T3, ordered=True), "p1", fixed_tokens())
    assert [(c.source.kind, tuple(h.worker_id for h in c.targets)) for c in p.chains] == [
        ("host-cache", ("t1",)),
        ("host-cache", ("t2",)),
        ("host-cache", ("t3",)),
    ]
    # Blocks of about a third of the bytes each (unit u has 100 (u + 1) bytes): 600, 900, 600.
    assert [c.units[:3] for c in p.chains] == [(0, 1, 2), (3, 4, 5), (5, 0, 1)]
    assert "ordered" in p.note
    # The orders carry that order, with each unit's size beside it.
    orders = plan_orders(p)
    t2 = orders["t2"][0]
    assert t2.units == [3, 4, 5, 0, 1, 2] and t2.unit_nbytes == [SIZES[u] for u in t2.units]
    assert [o.units[0] for o in orders["host-cache"]] == [0, 3, 5]
    # Unordered (stop-the-world), the same request stays one chain front to back.
    plain = plan_transfer(s, req(T3), "p1", fixed_tokens())
    assert len(plain.chains) == 1 and plain.chains[0].units == tuple(range(N_UNITS))


def test_ordered_plan_from_disk_orders_each_read() -> None:
    p = plan_transfer(snap(*TARGETS), req(T3, "disk", ordered=True), "p1", fixed_tokens())
    assert [c.units[0] for c in p.chains] == [0, 3, 5]
    assert all(c.source.kind == "disk" for c in p.chains)


def test_ordered_changes_nothing_when_a_worker_holds_the_model() -> None:
    # A holder serves already: the gateway has a full instance, the usual chain is best.
    p = plan_transfer(snap(holder("a"), *TARGETS, cached=True), req(T3, ordered=True), "p1", fixed_tokens())
    assert len(p.chains) == 1 and p.chains[0].source.worker_id == "a"
    assert p.chains[0].units == tuple(range(N_UNITS))
    # One target alone: nothing to spread.
    one = plan_transfer(snap(*TARGETS, cached=True), req(("t1",), ordered=True), "p1", fixed_tokens())
    assert one.chains[0].units == tuple(range(N_UNITS))


def test_ordered_plan_beside_a_busy_holder_loads_the_front_and_the_back_in_turn() -> None:
    # A full instance serves requests (live scaling): routes run the front layers on one loading
    # target, the middle on the full one and the back (with the LM head) on the other.
    busy = holder("f", load=5)
    p = plan_transfer(snap(busy, idle("t1"), idle("t2")), req(("t1", "t2"), "disk", ordered=True), "p1", fixed_tokens())
    assert [c.units for c in p.chains] == [tuple(range(N_UNITS)), tuple(reversed(range(N_UNITS)))]
    # From the host cache (preferred to a serving holder's rate-limited send) the same, one stream each.
    p = plan_transfer(snap(busy, *TARGETS, cached=True), req(T3, ordered=True), "p1", fixed_tokens())
    assert [c.source.kind for c in p.chains] == ["host-cache"] * 3
    assert [c.units[0] for c in p.chains] == [0, N_UNITS - 1, 0]
    # Stop-the-world (unordered): front to back as before.
    p = plan_transfer(snap(busy, idle("t1"), idle("t2")), req(("t1", "t2"), "disk"), "p1", fixed_tokens())
    assert all(c.units == tuple(range(N_UNITS)) for c in p.chains)


def test_ordered_plan_sends_a_diskless_target_unit_0_first() -> None:
    # Unit 0 carries the model files a worker without the model store builds the model from.
    net = WorkerView("t2", "idle", None, 0, 0, data_addr="h:t2", model_source="network")
    p = plan_transfer(snap(idle("t1"), net, idle("t3"), cached=True), req(T3, ordered=True), "p1", fixed_tokens())
    assert [c.units for c in p.chains] == [(0, 1, 2, 3, 4, 5), (0, 3, 4, 5, 1, 2), (5, 0, 1, 2, 3, 4)]
