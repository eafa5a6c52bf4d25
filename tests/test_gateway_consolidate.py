"""Consolidation (services/gateway/router.py `consolidations`): which requests decoding on a
partial route move onto one whole instance, and where. Pure decisions over routing snapshots."""

from __future__ import annotations

from dataclasses import replace

from services.gateway.router import BUSY_LOAD, InstanceView, PartialRoute, choose_route, consolidations

LAYERS = 8
UNITS = LAYERS + 2  # embedding, decoder layers, LM head


def whole(wid: str, running: int = 0, max_batch: int = 16, **kw: object) -> InstanceView:
    v = InstanceView(wid, "m", "serving", UNITS, UNITS, running, 0, max_batch, stage_addr=f"tcp://{wid}")
    return replace(v, **kw)  # type: ignore[arg-type]


def loading(wid: str, units: int) -> InstanceView:
    return InstanceView(wid, "m", "loading", units, UNITS, 0, 0, 16, prefix_units=units, stage_addr=f"tcp://{wid}")


def partial(
    rid: str, remaining: int = 20, workers: tuple[str, ...] = ("new", "busy"), context: int = 40
) -> PartialRoute:
    return PartialRoute(rid, workers, context, remaining)


def test_nothing_moves_while_no_whole_instance_has_room() -> None:
    busy = whole("busy", running=int(16 * BUSY_LOAD))
    assert consolidations([busy, loading("new", 5)], "m", [partial("r1")], min_remaining=4) == []
    # The head finished loading: it is a whole instance now, with room, and takes the route over.
    assert consolidations([busy, whole("new")], "m", [partial("r1")], min_remaining=4) == [("r1", "new")]


def test_a_route_made_by_choose_route_while_busy_moves_once_its_head_holds_every_layer() -> None:
    busy = whole("busy", running=int(16 * BUSY_LOAD))
    route = choose_route([busy, loading("new", 4)], "m")
    assert route is not None and len(route.stages) == 2  # a live route: new[0,3) -> busy[3,8)
    p = partial("r1", workers=tuple(s.worker_id for s in route.stages))
    assert consolidations([busy, loading("new", 6)], "m", [p], min_remaining=4) == []
    assert consolidations([busy, whole("new")], "m", [p], min_remaining=4) == [("r1", "new")]


def test_nothing_moves_while_the_routes_head_still_loads_even_onto_a_whole_instance_with_room() -> None:
    # The busy instance's own load figure can dip under BUSY_LOAD while it relays routes' stages
    # (a scale-up's window): moving routes onto it then undid live scaling (bench scaleup 1→2 went
    # from 0.55x to 1.02x stop-the-world's p99 TTFT).
    relaying = whole("busy", running=2)
    assert consolidations([relaying, loading("new", 6)], "m", [partial("r1")], min_remaining=4) == []
    assert consolidations([relaying, whole("new")], "m", [partial("r1")], min_remaining=4) == [("r1", "new")]


def test_requests_near_their_end_stay_and_the_most_remaining_go_first() -> None:
    views = [whole("busy", running=8), whole("a")]
    parts = [partial("short", remaining=3), partial("long", remaining=30), partial("mid", remaining=10)]
    # The prefill bound lets two re-prefills queue on "a" (Room.admits): the two with most to go.
    assert consolidations(views, "m", parts, min_remaining=4) == [("long", "a"), ("mid", "a")]
    assert consolidations(views, "m", parts, min_remaining=40) == []


def test_moves_spread_by_load_and_respect_the_busy_bound_and_pending_moves() -> None:
    views = [whole("a", running=2), whole("b", running=0)]
    parts = [partial(f"r{i}") for i in range(4)]
    moves = consolidations(views, "m", parts, min_remaining=4)
    # Each to the least loaded, counting the moves before it: b 0, 1, then a 2 (ties by id), b 2.
    assert moves == [("r0", "b"), ("r1", "b"), ("r2", "a"), ("r3", "b")]
    # Moves decided earlier and not sent yet count on their target: a at 2 + 5, b at 0 + 7 is full.
    limit = int(16 * BUSY_LOAD)
    assert consolidations(views, "m", parts, min_remaining=4, pending={"a": (5, 0), "b": (limit - 1, 0)}) == []
    assert consolidations(views, "m", parts, min_remaining=4, pending={"a": (4, 0), "b": (limit - 1, 0)}) == [
        ("r0", "a")
    ]
    # An instance at BUSY_LOAD of its batch limit, or with work waiting, takes none.
    assert consolidations([whole("a", running=limit - 1)], "m", parts, min_remaining=4) == []
    assert consolidations([whole("a", waiting=1)], "m", parts, min_remaining=4) == []


def test_prefill_backlog_on_the_target_holds_moves() -> None:
    # Two prompts of this gateway without a token yet, four steps' worth: backlogged.
    backlogged = whole("a", unstarted_prompts=2, unstarted_tokens=400, prefill_budget=100)
    assert consolidations([backlogged], "m", [partial("r1")], min_remaining=4) == []
    assert consolidations([replace(backlogged, unstarted_prompts=1)], "m", [partial("r1")], min_remaining=4) == [
        ("r1", "a")
    ]


def test_pipeline_parallel_stages_draining_and_other_models_are_no_targets_and_stay() -> None:
    parts = [partial("r1")]
    assert consolidations([whole("a", state="draining")], "m", parts, min_remaining=1) == []
    assert consolidations([whole("a", model="x")], "m", parts, min_remaining=1) == []
    assert consolidations([whole("a", group="pp")], "m", parts, min_remaining=1) == []
    # A request on a pipeline-parallel instance's stages is not a partial route to undo.
    stage0 = whole("s0", group="pp", units_ready=5, stage_start=0, stage_end=4)
    stage1 = whole("s1", group="pp", units_ready=5, stage_start=4, stage_end=8)
    pp = partial("r1", workers=("s0", "s1"))
    assert consolidations([stage0, stage1, whole("a")], "m", [pp], min_remaining=1) == []
    # A lone worker is no partial route.
    assert consolidations([whole("a")], "m", [partial("r1", workers=("b",))], min_remaining=1) == []
