from __future__ import annotations

from dataclasses import replace

import pytest

from cascade.messages import RouteStage
from services.gateway.router import (
    LATE_SPLIT_STEPS,
    PREFILL_AHEAD_STEPS,
    QUEUE_AHEAD,
    InstanceView,
    Room,
    Route,
    choose_instance,
    choose_route,
    estimated_load,
    front_layers,
    head_split,
    models_without_instance,
    serves_fully,
    split_later,
)


def inst(
    wid: str,
    model: str | None = "m",
    state: str = "serving",
    units: int = 4,
    num_units: int = 4,
    running: int = 0,
    waiting: int = 0,
    max_batch: int = 8,
    inflight: int = 0,
    inflight_at_hb: int = 0,
) -> InstanceView:
    return InstanceView(wid, model, state, units, num_units, running, waiting, max_batch, inflight, inflight_at_hb)


def test_no_instances_gives_none() -> None:
    assert choose_instance([], "m") is None


def test_only_full_serving_instances_of_the_model_qualify() -> None:
    views = [
        inst("loading", state="loading"),
        inst("partial", units=3),
        inst("other", model="x"),
        inst("draining", state="draining"),
        inst("idle", model=None, state="idle", units=0, num_units=0),
    ]
    assert choose_instance(views, "m") is None
    assert choose_instance([*views, inst("ok", running=100)], "m") == "ok"
    assert choose_instance(views, "x") == "other"


def test_least_loaded_relative_to_batch_size() -> None:
    views = [inst("a", running=6, max_batch=8), inst("b", running=10, max_batch=32), inst("c", running=7, max_batch=8)]
    assert choose_instance(views, "m") == "b"  # 10/32 beats 6/8


def test_own_inflight_since_heartbeat_counts() -> None:
    # Both reported idle at their last heartbeat, but we just sent 5 requests to a.
    a = inst("a", inflight=5, inflight_at_hb=0)
    b = inst("b")
    assert choose_instance([a, b], "m") == "b"
    # a's heartbeat counted our 5 requests; they have finished since: a is empty now.
    a_done = inst("a", running=5, inflight=0, inflight_at_hb=5)
    b_busy = inst("b", running=2)
    assert estimated_load(a_done) == 0
    assert choose_instance([a_done, b_busy], "m") == "a"


def test_estimate_never_below_own_inflight() -> None:
    assert estimated_load(inst("a", running=0, inflight=3, inflight_at_hb=9)) == 3


def test_ties_break_on_worker_id() -> None:
    assert choose_instance([inst("w2"), inst("w1"), inst("w3")], "m") == "w1"


def test_avoided_instances_only_as_last_resort() -> None:
    views = [inst("a"), inst("b", running=7)]
    assert choose_instance(views, "m", avoid=frozenset({"a"})) == "b"
    assert choose_instance([inst("a")], "m", avoid=frozenset({"a"})) == "a"


def test_health_helpers() -> None:
    views = [inst("a"), inst("b", model="x", units=1)]
    assert serves_fully(views[0], "m")
    assert not serves_fully(views[1], "x")
    assert models_without_instance(views, ["m", "x", "y"]) == ["x", "y"]


# --------------------------------------------------------------------------- live routes


def loading(
    wid: str, prefix: int, running: int = 0, stage: str | None = "h:2", driven_layers: int | None = None
) -> InstanceView:
    # By default its running routes each run every layer it holds now (prefix - 1 of them).
    dl = running * max(prefix - 1, 0) if driven_layers is None else driven_layers
    return InstanceView(wid, "m", "loading", prefix, 6, running, 0, 8, 0, 0, prefix, stage, dl, driven=running)


def full(wid: str, running: int = 0, stage: str | None = "h:1") -> InstanceView:
    return InstanceView(wid, "m", "serving", 6, 6, running, 0, 8, 0, 0, 6, stage)


def test_lightly_loaded_full_instance_is_not_split() -> None:
    # Below half its batch limit and no backlog: a pipelined route would only add a hop.
    assert choose_route([full("f", running=3), loading("n", 3)], "m") == Route("f")
    # From half on, new work sheds its front layers to the loading instance.
    r = choose_route([full("f", running=4), loading("n", 3)], "m")
    assert r is not None and r.worker_id == "n"


def test_busy_full_instance_sheds_front_layers_to_a_loading_one() -> None:
    # 6 units = embedding, 4 layers, head. n holds the embedding and layers 0-1.
    r = choose_route([full("f", running=8), loading("n", 3)], "m")
    assert r == Route("n", (RouteStage("n", 0, 2, "h:2"), RouteStage("f", 2, 4, "h:1")))


def test_deepest_loading_instance_wins_and_the_tail_keeps_a_layer() -> None:
    views = [full("f", running=9), loading("n1", 2), loading("n2", 4), loading("n3", 5)]
    # n3 holds every layer but not the head: splitting would leave f no layer, so n2 is deepest.
    r = choose_route(views, "m")
    assert r is not None and r.worker_id == "n2" and r.stages[0].end == 3


def test_no_split_when_it_cannot_help() -> None:
    busy = full("f", running=8)
    assert choose_route([busy, loading("n", 3)], "m", live=False) == Route("f")  # stop-the-world
    assert choose_route([busy, loading("n", 1)], "m") == Route("f")  # only the embedding
    # The head busy too: its routes run 2 of 4 layers there in every other step, so it holds four
    # times its batch limit.
    assert choose_route([busy, loading("n", 3, running=32)], "m") == Route("f")
    r = choose_route([busy, loading("n", 3, running=31)], "m")
    assert r is not None and r.worker_id == "n"
    assert choose_route([busy, loading("n", 3, stage=None)], "m") == Route("f")  # no stage link
    assert choose_route([full("f", running=8, stage=None), loading("n", 3)], "m") == Route("f")
    assert choose_route([busy, loading("n", 3)], "m", avoid=frozenset({"n"})) == Route("f")
    assert choose_route([loading("n", 5)], "m") is None  # no instance holds the tail


def test_front_layers() -> None:
    assert front_layers(loading("n", 0), "m") == 0
    assert front_layers(loading("n", 1), "m") == 0  # the embedding alone runs no layer
    assert front_layers(loading("n", 3), "m") == 2
    assert front_layers(loading("n", 6), "m") == 4
    assert front_layers(loading("n", 3), "other") == 0


def test_late_binding_holds_requests_when_every_instance_is_past_its_queue() -> None:
    # Within the batch limit plus half of it queued ahead, an instance still takes work...
    assert choose_route([inst("a", running=8, waiting=3)], "m") == Route("a")
    # ...past it, the request waits in the gateway, where a freed slot or a new instance takes it.
    assert choose_route([inst("a", running=8, waiting=4)], "m") is None
    assert choose_route([inst("a", running=8, waiting=4), inst("b", running=2)], "m") == Route("b")
    # A retry whose only possible instance is the one it avoids still goes there.
    assert choose_route([inst("a", running=8, waiting=9)], "m", avoid=frozenset({"a"})) == Route("a")


def test_a_backlog_on_the_full_instance_sends_new_work_through_the_loading_one() -> None:
    loading = InstanceView("n", "m", "loading", 3, 6, 0, 0, 8, stage_addr="n:1", prefix_units=3)
    calm = InstanceView("f", "m", "serving", 6, 6, 2, 0, 8, stage_addr="f:1", prefix_units=6)
    assert choose_route([calm, loading], "m") == Route("f")
    behind = InstanceView("f", "m", "serving", 6, 6, 2, 3, 8, stage_addr="f:1", prefix_units=6)
    route = choose_route([behind, loading], "m")
    assert route is not None and route.worker_id == "n"
    assert [(s.worker_id, s.start, s.end) for s in route.stages] == [("n", 0, 2), ("f", 2, 4)]
    assert choose_route([behind, loading], "m", live=False) == Route("f")


def test_a_heads_room_weighs_its_routes_by_the_layers_they_run_there() -> None:
    busy = full("f", running=8)
    # 48 routes made when it held one layer take half of 48 of its 4 x 8 sequence-layers: room
    # for more, though 48 routes are six times its batch limit.
    r = choose_route([busy, loading("n", 3, running=48, driven_layers=48)], "m")
    assert r is not None and r.worker_id == "n"
    # Routes sent since its heartbeat count at the current depth (2 layers each): 48 + 2 x 8 = 64.
    v = InstanceView("n", "m", "loading", 3, 6, 48, 0, 8, 56, 48, 3, "h:2", 48, driven=48)
    assert choose_route([busy, v], "m") == Route("f")
    v = InstanceView("n", "m", "loading", 3, 6, 48, 0, 8, 55, 48, 3, "h:2", 48, driven=48)
    assert choose_route([busy, v], "m") is not None and choose_route([busy, v], "m").worker_id == "n"  # type: ignore[union-attr]


def test_a_new_instance_counts_the_routes_it_still_drives_by_their_share_once_it_serves() -> None:
    # Loaded at last, it still drives 40 routes made at 6 of its 8 layers (plus embedding and head:
    # 10 units): 40 x 6 / 8 / 2 = 15 full sequences' worth, so it has room for whole requests.
    n = InstanceView("n", "m", "serving", 10, 10, 42, 0, 32, 42, 42, 10, "h:2", 240, driven=40)
    assert estimated_load(n) == pytest.approx(2 + 15)
    busy = InstanceView("f", "m", "serving", 10, 10, 32, 2, 32, 34, 34, 10, "h:1")
    assert choose_route([busy, n], "m") == Route("n")
    # Counted one for one, they would have kept it out until they ended.
    assert choose_route([busy, replace(n, driven=0, driven_layers=0)], "m") == Route("f")


def test_a_route_bounds_its_batch_by_the_room_its_instance_has() -> None:
    def f(wid: str, running: int = 0, unstarted: int = 0, prompts: int = 0) -> InstanceView:
        return InstanceView(wid, "m", "serving", 6, 6, running, 0, 8, 0, 0, 6, "h:1", 0, 100, unstarted, prompts)

    # Alone and idle: its batch slots and queue places, and two steps' prefill (2 x 100 tokens).
    room = choose_route([f("a")], "m", live=False).room  # type: ignore[union-attr]
    assert room == Room(requests=8 + QUEUE_AHEAD, prompts=0, tokens=0, prefill_budget=100)
    assert room.admits(0, 0) and room.admits(1, 150)
    assert not room.admits(2, 200)  # two prompts, two steps' worth: backlogged, as the router counts
    assert room.admits(2, 199)  # short prompts: more fit in the same two steps
    assert not room.admits(8 + QUEUE_AHEAD, 0)
    # A second idle instance: one request here, the next pick goes there.
    room = choose_route([f("a"), f("b")], "m", live=False).room  # type: ignore[union-attr]
    assert room is not None and room.requests == 1
    # The other is busier by three sequences: three here before they are level.
    route = choose_route([f("a"), f("b", running=3)], "m", live=False)
    assert route is not None and route.worker_id == "a" and route.room is not None and route.room.requests == 3
    # An instance with no room (a prefill backlog) does not bound the batch of one that has.
    room = choose_route([f("a", running=5), f("b", unstarted=200, prompts=2)], "m", live=False).room  # type: ignore[union-attr]
    assert room is not None and room.requests == 8 + QUEUE_AHEAD - 5
    # A prefill backlog under way counts: one more prompt, then two steps' worth are waiting.
    room = choose_route([f("a", unstarted=150, prompts=1)], "m", live=False).room  # type: ignore[union-attr]
    assert room is not None and room.admits(0, 0) and not room.admits(1, 50)
    # An unknown budget bounds only by slots.
    assert Room(requests=3, prompts=5, tokens=10**6, prefill_budget=0).admits(2, 10**6)


def test_backlog_waits_in_the_gateway_past_a_few_queued_per_instance() -> None:
    # Batch limit 8: up to 8 + QUEUE_AHEAD requests go to the instance, the rest wait here, where
    # an instance that comes up later can take them.
    assert QUEUE_AHEAD == 4
    assert choose_route([full("f", running=8 + QUEUE_AHEAD - 1)], "m", live=False) == Route("f")
    assert choose_route([full("f", running=8 + QUEUE_AHEAD)], "m", live=False) is None


def test_a_prefill_backlog_holds_requests_here_and_prefers_other_instances() -> None:
    def f(wid: str, unstarted: int, prompts: int = 2) -> InstanceView:
        return InstanceView(wid, "m", "serving", 6, 6, 1, 0, 8, 1, 1, 6, "h:1", 0, 100, unstarted, prompts)

    # Free batch slots, but two steps' worth of prompts (2 x 100 tokens) without a token yet.
    assert choose_route([f("a", 199)], "m", live=False) == Route("a")
    assert choose_route([f("a", 200)], "m", live=False) is None
    # One prompt longer than two steps' budget is being chunked: the next one may queue behind it.
    assert choose_route([f("a", 500, prompts=1)], "m", live=False) == Route("a")
    # Another instance without a backlog is chosen though it is busier.
    busier = InstanceView("b", "m", "serving", 6, 6, 5, 0, 8, 0, 0, 6, "h:1", 0, 100, 0)
    assert choose_route([f("a", 200), busier], "m", live=False) == Route("b")
    # An unknown budget (an older worker) never holds.
    assert choose_route([InstanceView("c", "m", "serving", 6, 6, 1, 0, 8, 1, 1, 6, "h:1", 0, 0, 10**6)], "m") == Route(
        "c"
    )


def test_a_worker_full_of_kv_is_loaded_whatever_its_free_slots() -> None:
    # Two requests each, but a's KV cache is nearly full (long contexts): b takes the next one,
    # and a counts as at its batch limit, no room left.
    a = replace(inst("a", running=2), kv_cache_usage=0.97)
    b = replace(inst("b", running=2), kv_cache_usage=0.10)
    assert choose_instance([a, b], "m") == "b"
    assert estimated_load(a) == pytest.approx(0.97 * 8) and estimated_load(b) == 2
    assert choose_instance([replace(a, kv_cache_usage=0.0), b], "m") == "a"  # ties by id without KV


# ---- from zero: pipelines across loading instances ------------------------------------------------


def held(wid: str, units: set[int], num_units: int = 10, **kw: object) -> InstanceView:
    """A loading instance of "m" (8 layers) holding exactly `units` (readiness known)."""
    return replace(
        inst(wid, state="loading", units=len(units), num_units=num_units, **kw),  # type: ignore[arg-type]
        stage_addr=f"h:{wid}",
        prefix_units=next(n for n in range(num_units + 1) if n not in units),
        ready_units=frozenset(units),
    )


def test_from_zero_the_loading_instances_own_blocks_make_one_pipeline() -> None:
    # An ordered load at about a third: each instance holds its own block (planner.ordered_units).
    views = [held("a", {0, 1, 2, 3}), held("b", {4, 5, 6}), held("c", {7, 8, 9})]
    r = choose_route(views, "m")
    assert r == Route("a", (RouteStage("a", 0, 3, "h:a"), RouteStage("b", 3, 6, "h:b"), RouteStage("c", 6, 8, "h:c")))
    # Later, "b" also holds c's block (its next one): two stages, the longer run wins.
    views[1] = held("b", {4, 5, 6, 7, 8, 9})
    r = choose_route(views, "m")
    assert r is not None and [(s.worker_id, s.start, s.end) for s in r.stages] == [("a", 0, 3), ("b", 3, 8)]
    # Stop-the-world scaling never routes through a loading instance.
    assert choose_route(views, "m", live=False) is None


def test_from_zero_needs_every_layer_in_order() -> None:
    # Layer 6 (unit 7) nowhere: no route, the request waits.
    assert choose_route([held("a", {0, 1, 2, 3}), held("b", {4, 5, 6}), held("c", {8, 9})], "m") is None
    # No embedding anywhere.
    assert choose_route([held("a", {1, 2, 3}), held("b", {4, 5, 6, 7, 8, 9})], "m") is None
    # Every layer but no LM head: nobody can end the route.
    assert choose_route([held("a", {0, 1, 2, 3, 4}), held("b", {5, 6, 7, 8})], "m") is None
    # The head must have room for the route it drives (routes weighed by the layers they run there).
    busy = replace(held("a", {0, 1, 2, 3}), driven_layers=2 * 8 * 8, driven=8, running=8)
    assert choose_route([busy, held("b", {4, 5, 6, 7, 8, 9})], "m") is None
    # Readiness not known yet (the heartbeat's count only), avoided, or no stage link: not used.
    unsynced = replace(held("b", {4, 5, 6, 7, 8, 9}), ready_units=None)
    assert choose_route([held("a", {0, 1, 2, 3}), unsynced], "m") is None
    two = [held("a", {0, 1, 2, 3}), held("b", {4, 5, 6, 7, 8, 9})]
    assert choose_route(two, "m", avoid=frozenset({"b"})) is None
    assert choose_route([two[0], replace(two[1], stage_addr=None)], "m") is None


def test_from_zero_the_lm_head_holder_runs_the_last_layer() -> None:
    # "a" holds every layer but not the LM head; "c" holds layer 7 and the head.
    views = [held("a", {0, 1, 2, 3, 4, 5, 6, 7, 8}), held("c", {8, 9})]
    r = choose_route(views, "m")
    assert r is not None and [(s.worker_id, s.start, s.end) for s in r.stages] == [("a", 0, 7), ("c", 7, 8)]


def test_from_zero_gives_way_to_a_full_instance() -> None:
    views = [held("a", {0, 1, 2, 3}), held("b", {4, 5, 6, 7, 8, 9}), inst("f", units=10, num_units=10)]
    assert choose_route(views, "m") == Route("f", room=None)


def test_from_zero_a_pipeline_with_its_prefill_queued_takes_no_more_prompts() -> None:
    """A wave from zero: the one pipeline there is takes prompts only while its head has fewer than
    PREFILL_AHEAD_STEPS steps of them queued at the pipeline's pace (a stage running half the
    layers does half of each prompt: twice a whole instance's tokens per step); the rest wait here
    for another head or the whole instances the load brings, rather than pinned behind them."""
    budget = 100
    pace = 2 * budget  # the largest stage runs 4 of 8 layers

    def head(prompts: int, tokens: int) -> InstanceView:
        return replace(
            held("a", {0, 1, 2, 3, 4}), prefill_budget=budget, unstarted_prompts=prompts, unstarted_tokens=tokens
        )

    tail = held("b", {5, 6, 7, 8, 9})
    # Under the bound at the pipeline's pace (a whole instance would count as backlogged here).
    r = choose_route([head(2, PREFILL_AHEAD_STEPS * pace - 1), tail], "m")
    assert r is not None and [(s.worker_id, s.start, s.end) for s in r.stages] == [("a", 0, 4), ("b", 4, 8)]
    # The batch is bounded at the same pace: a third prompt of the same length does not join it.
    assert r.room is not None and r.room.prefill_budget == pace
    assert r.room.admits(0, 0) and not r.room.admits(1, budget)
    # Backlogged: the request waits here...
    assert choose_route([head(2, PREFILL_AHEAD_STEPS * pace), tail], "m") is None
    # ...unless another loading instance can head a pipeline.
    other = held("c", {0, 1, 2, 3, 4})
    r = choose_route([head(2, PREFILL_AHEAD_STEPS * pace), tail, other], "m")
    assert r is not None and r.worker_id == "c" and [s.worker_id for s in r.stages] == ["c", "b"]
    # Budget unknown (an older worker): no prefill bound, as for whole instances.
    unknown = replace(head(8, 10 * pace), prefill_budget=0)
    assert choose_route([unknown, tail], "m") is not None


def test_a_route_waits_here_while_the_busy_instance_has_prefill_queued_then_splits_deeper() -> None:
    """Late split: a route made now would queue behind the full instance's prefill at the split of
    this moment; waiting here until that queue is short gets it the head's layers of then."""
    budget = 100
    tail = LATE_SPLIT_STEPS * budget

    def f(unstarted: int = 0, relayed: int = 0) -> InstanceView:
        return InstanceView(
            "f", "m", "serving", 6, 6, 8, 0, 8, 0, 0, 6, "h:1", 0, budget, unstarted, 2,
            relayed_unstarted_tokens=relayed,
        )  # fmt: skip

    # Its own prompts and the later stages of routes both count, by tokens.
    assert not split_later(f(unstarted=tail - 1))
    assert split_later(f(unstarted=tail // 2, relayed=tail - tail // 2))
    assert not split_later(replace(f(relayed=tail), prefill_budget=0))  # budget unknown: no bound
    r = choose_route([f(relayed=tail - 1), loading("n", 3)], "m")
    assert r is not None and r.stages[0].end == 2
    assert choose_route([f(relayed=tail), loading("n", 3)], "m") is None  # held here
    # The queue drained while the head loaded one more layer: the route runs three of four there.
    r = choose_route([f(relayed=tail - 1), loading("n", 4)], "m")
    assert r is not None and r.worker_id == "n" and r.stages[0].end == 3
    # Stop-the-world and no head: as before (the full instance, its queue permitting).
    assert choose_route([f(relayed=tail), loading("n", 3)], "m", live=False) == Route("f")
    assert choose_route([f(relayed=tail)], "m") == Route("f")


# ---- live routes across two loading instances (front and back, planner.front_back_units) ----------


def busy_full(wid: str = "f", budget: int = 100, queued: int = 0) -> InstanceView:
    """A full instance of "m" (10 units: embedding, 8 layers, head) out of batch slots."""
    return InstanceView(
        wid, "m", "serving", 10, 10, 8, 0, 8, 0, 0, 10, f"h:{wid}", 0, budget, queued, 2
    )  # fmt: skip


def test_a_live_route_ends_on_a_loading_instance_that_fills_from_the_back() -> None:
    # n1 holds the embedding and layers 0-1; n2 the LM head and layers 6-7: f runs only 2..6.
    views = [busy_full(), held("n1", {0, 1, 2}), held("n2", {7, 8, 9})]
    r = choose_route(views, "m")
    assert r is not None and [(s.worker_id, s.start, s.end) for s in r.stages] == [
        ("n1", 0, 2),
        ("f", 2, 6),
        ("n2", 6, 8),
    ]
    assert r.worker_id == "n1"
    # Without the LM head, or with readiness unknown, n2 ends nothing: the usual two stages.
    for n2 in (held("n2", {7, 8}), replace(held("n2", {7, 8, 9}), ready_units=None)):
        r = choose_route([busy_full(), held("n1", {0, 1, 2}), n2], "m")
        assert r is not None and [(s.worker_id, s.start, s.end) for s in r.stages] == [("n1", 0, 2), ("f", 2, 8)]
    # A tail with LATE_SPLIT_STEPS steps of relayed prefill queued is skipped too.
    full_tail = replace(held("n2", {7, 8, 9}), prefill_budget=100, relayed_unstarted_tokens=LATE_SPLIT_STEPS * 100)
    r = choose_route([busy_full(), held("n1", {0, 1, 2}), full_tail], "m")
    assert r is not None and len(r.stages) == 2
    # Avoided, or stop-the-world: not used.
    r = choose_route(views, "m", avoid=frozenset({"n2"}))
    assert r is not None and len(r.stages) == 2
    assert choose_route(views, "m", live=False) == Route("f")


def test_two_loading_instances_that_meet_serve_routes_without_the_busy_one() -> None:
    # n1 holds layers 0-4, n2 layers 3-7 and the head: together every layer; split mid-model.
    views = [busy_full(), held("n1", {0, 1, 2, 3, 4, 5}), held("n2", {4, 5, 6, 7, 8, 9})]
    r = choose_route(views, "m")
    assert r is not None and [(s.worker_id, s.start, s.end) for s in r.stages] == [("n1", 0, 4), ("n2", 4, 8)]
    # Not held back by the busy instance's queue: the route does not touch it.
    views[0] = busy_full(queued=LATE_SPLIT_STEPS * 100)
    r = choose_route(views, "m")
    assert r is not None and [s.worker_id for s in r.stages] == ["n1", "n2"]
    # Where the two only just meet, the split is where they do.
    r = choose_route([busy_full(), held("n1", {0, 1, 2, 3}), held("n2", {4, 5, 6, 7, 8, 9})], "m")
    assert r is not None and [(s.worker_id, s.start, s.end) for s in r.stages] == [("n1", 0, 3), ("n2", 3, 8)]


def test_a_live_routes_batch_stops_where_the_busy_instance_would_split_later() -> None:
    # f has room for 3 more steps' worth (of LATE_SPLIT_STEPS) of prefill: a route runs 6 of 8
    # layers there (n1 holds 2), so 400 prompt tokens of routes are 300 of f's.
    budget = 100
    f = busy_full(budget=budget, queued=(LATE_SPLIT_STEPS - 3) * budget)
    r = choose_route([f, held("n1", {0, 1, 2})], "m")
    assert r is not None and r.room is not None and len(r.stages) == 2
    assert r.room.admits(0, 0) and r.room.admits(3, 300)
    assert not r.room.admits(4, 400)
    # The head's own room bounds it as well (routes weighed by their layers there): 8 routes
    # through 2 layers are 1 full sequence (HEAD_DUTY 1/2), so a head holding 62 such has room for 2.
    crowded = replace(held("n1", {0, 1, 2}), driven_layers=62 * 2, driven=62, running=62)
    r = choose_route([f, crowded], "m")
    assert r is not None and r.room is not None and r.room.requests == 2
    # With an unknown prefill budget, only the head's room.
    r = choose_route([replace(f, prefill_budget=0), held("n1", {0, 1, 2})], "m")
    assert r is not None and r.room is not None and r.room.admits(4, 100_000)


def test_a_live_route_splits_where_the_heads_queue_meets_the_busy_instances() -> None:
    """A loading head whose prefill queue is long runs fewer of its layers: both queues drain at
    once instead of the head becoming the bottleneck (router.head_split)."""
    # f: 200 prompt tokens of its own queued (two 100-token prompts), budget 100 a step.
    f = replace(busy_full(budget=100, queued=200), unstarted_prompts=2)

    def head(queued: int = 0, since: int = 0, budget: int = 100) -> InstanceView:
        n = held("n", set(range(7)), inflight=since)  # the embedding and layers 0-5
        return replace(n, prefill_budget=budget, prefill_queued=queued)

    def stages(r: Route | None) -> list[tuple[str, int, int]]:
        assert r is not None
        return [(s.worker_id, s.start, s.end) for s in r.stages]

    # An idle head takes all 6 layers it holds.
    assert head_split(head(), f, 6) == 6
    assert stages(choose_route([f, head()], "m")) == [("n", 0, 6), ("f", 6, 8)]
    # 3 steps queued on the head: with a route's m/8 of a 100-token prompt it stays within a step
    # of f's 2 steps plus (8 - m)/8 of the prompt while m <= 4.
    assert stages(choose_route([f, head(queued=300)], "m")) == [("n", 0, 4), ("f", 4, 8)]
    # Routes sent since its heartbeat count at the current depth: 4 x 6/8 x 100 = 300 tokens.
    assert head_split(head(since=4), f, 6) == 4
    # Far behind: one layer (still a route; the late split bounds f's queue).
    assert stages(choose_route([f, head(queued=1000)], "m")) == [("n", 0, 1), ("f", 1, 8)]
    # With a tail loaded from the back (layer 7 and the head), f runs [m, 7) only: its side is
    # lighter, m smaller.
    r = choose_route([f, head(queued=300), held("n2", {8, 9})], "m")
    assert stages(r) == [("n", 0, 3), ("f", 3, 7), ("n2", 7, 8)]
    # No budget known on either side: every layer the head has, as before.
    assert head_split(head(queued=1000, budget=0), f, 6) == 6
    assert head_split(head(queued=1000), replace(f, prefill_budget=0), 6) == 6


def test_a_full_instance_relaying_routes_prompts_counts_as_busy() -> None:
    """Its own batch nearly empty (routes took its requests' place), but routes' later stages
    queued there: a new request sent whole would wait behind them, so it sheds its front layers."""
    budget = 100

    def f(relayed: int) -> InstanceView:
        return replace(busy_full(budget=budget), running=1, unstarted_prompts=0, relayed_unstarted_tokens=relayed)

    n = held("n", {0, 1, 2, 3})
    assert choose_route([f(2 * budget - 1), n], "m") == Route("f")
    r = choose_route([f(2 * budget), n], "m")
    assert r is not None and r.worker_id == "n"
    assert [(s.worker_id, s.start, s.end) for s in r.stages] == [("n", 0, 3), ("f", 3, 8)]
    # Stop-the-world: still the full instance.
    assert choose_route([f(2 * budget), n], "m", live=False) == Route("f")
