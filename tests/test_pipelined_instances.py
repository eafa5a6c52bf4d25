"""Pipeline-parallel instances, the pure parts: the deployment's `stages` / `stage_layers`, how
layers split into stages and which units each holds, the gateway's route through a complete
instance (and none through one with a gap), the replica count by instance, and scale-down taking
every stage of an instance."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cascade.cli.supervisor import Readiness
from cascade.config import ConfigError, Deployment, ModelDeployment, entry_json, load_deployment, model_from_entry
from cascade.messages import Heartbeat, RouteStage, WorkerState
from cascade.stages import StageError, covers, even_split, stage_ranges, stage_units
from cascade.workers import WorkerTable, WorkerView
from services.gateway.router import QUEUE_AHEAD, InstanceView, choose_route, models_without_instance, pipelines
from services.loader.assign import choose_groups_for_up, choose_instances_for_down
from services.loader.planner import MeshSnapshot

# ---- the stage split --------------------------------------------------------------------------


def test_even_split_is_contiguous_and_balanced() -> None:
    assert even_split(8, 2) == ((0, 4), (4, 8))
    assert even_split(8, 3) == ((0, 3), (3, 6), (6, 8))
    assert even_split(5, 5) == tuple((i, i + 1) for i in range(5))
    assert covers(even_split(30, 4), 30)
    with pytest.raises(StageError, match="at least 3 layers"):
        even_split(2, 3)


def test_explicit_ranges_must_tile_the_model() -> None:
    assert stage_ranges(8, 2, [[0, 6], [6, 8]]) == ((0, 6), (6, 8))
    with pytest.raises(StageError, match="end at layer 6"):
        stage_ranges(8, 2, [[0, 2], [2, 6]])
    with pytest.raises(StageError, match="contiguous"):
        stage_ranges(8, 2, [[0, 4], [5, 8]])
    with pytest.raises(StageError, match="3 stage ranges given for 2"):
        stage_ranges(8, 2, [[0, 2], [2, 4], [4, 8]])


def test_stage_units_hold_embedding_and_head_at_the_ends() -> None:
    # 0 embedding, 1..8 layers, 9 head.
    assert stage_units(0, 4, 8) == (0, 1, 2, 3, 4)
    assert stage_units(4, 8, 8) == (5, 6, 7, 8, 9)
    assert stage_units(2, 5, 8) == (3, 4, 5)
    assert stage_units(0, 8, 8) == tuple(range(10))
    with pytest.raises(StageError):
        stage_units(4, 9, 8)


# ---- the deployment file ----------------------------------------------------------------------


def test_stages_in_toml_and_json(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text(
        '[[models]]\nname = "a"\npath = "a"\nstages = 2\n'
        '[[models]]\nname = "b"\npath = "b"\nstage_layers = [[0, 1], [1, 3], [3, 4]]\n'
        '[[models]]\nname = "c"\npath = "c"\n'
    )
    dep = load_deployment(f, tmp_path)
    a, b, c = dep.models
    assert (a.stages, a.stage_layers) == (2, ())
    assert (b.stages, b.stage_layers) == (3, ((0, 1), (1, 3), (3, 4)))
    assert (c.stages, c.stage_layers) == (1, ())
    # The JSON form (deployment.json, DeploymentChanged) round-trips.
    back = Deployment(tuple(model_from_entry(entry_json(m)) for m in dep.models))
    assert back == dep
    j = tmp_path / "d.json"
    j.write_bytes(__import__("orjson").dumps(dep.to_json()))
    assert load_deployment(j, tmp_path) == dep


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("stages = 0", "stages must be a whole number >= 1"),
        ('stages = "2"', "stages must be a whole number >= 1"),
        ("stages = true", "stages must be a whole number >= 1"),
        ("stages = 3\nstage_layers = [[0, 2], [2, 4]]", "gives 2 ranges for stages = 3"),
        ("stage_layers = [[0, 2], [3, 4]]", "contiguous"),
        ("stage_layers = [[1, 2]]", "contiguous from layer 0"),
        ("stage_layers = [[0, 0]]", "empty"),
        ("stage_layers = 4", "list of"),
    ],
)
def test_bad_stage_settings_are_refused_clearly(tmp_path: Path, extra: str, message: str) -> None:
    f = tmp_path / "d.toml"
    f.write_text(f'[[models]]\nname = "a"\npath = "a"\n{extra}\n')
    with pytest.raises(ConfigError, match=message):
        load_deployment(f, tmp_path)


# ---- the gateway's route ----------------------------------------------------------------------

L = 6  # layers; units 0..7


def stage(
    wid: str, group: str, a: int, b: int, state: str = "serving", running: int = 0, ready: int | None = None
) -> InstanceView:
    need = b - a + (a == 0) + (b == L)
    return InstanceView(
        wid, "m", state, need if ready is None else ready, L + 2, running, 0, 4,
        stage_addr=f"{wid}:1", group=group, stage_start=a, stage_end=b,
    )  # fmt: skip


def whole(wid: str, running: int = 0) -> InstanceView:
    return InstanceView(wid, "m", "serving", L + 2, L + 2, running, 0, 4, stage_addr="127.0.0.1:9")


def test_a_complete_pipelined_instance_is_a_steady_route() -> None:
    views = [stage("b", "g", 3, 6), stage("a", "g", 0, 3)]
    r = choose_route(views, "m")
    assert r is not None and r.worker_id == "a"
    assert r.stages == (
        RouteStage("a", 0, 3, views[1].stage_addr or ""),
        RouteStage("b", 3, 6, views[0].stage_addr or ""),
    )
    assert models_without_instance(views, ["m"]) == []


@pytest.mark.parametrize(
    "broken",
    [
        [stage("a", "g", 0, 3)],  # the tail is gone
        [stage("a", "g", 0, 3), stage("b", "g", 3, 6, state="loading")],
        [stage("a", "g", 0, 3), stage("b", "g", 3, 6, ready=2)],
        [stage("a", "g", 0, 3), stage("b", "h", 3, 6)],  # stages of two different instances
        [stage("a", "g", 0, 3), stage("b", "g", 3, 6, state="draining")],
    ],
)
def test_an_instance_with_a_gap_is_no_route(broken: list[InstanceView]) -> None:
    assert pipelines(broken, "m") == []
    assert choose_route(broken, "m") is None
    assert models_without_instance(broken, ["m"]) == ["m"]


def test_least_loaded_instance_and_whole_ones_share_the_model() -> None:
    g = [stage("a", "g", 0, 3, running=3), stage("b", "g", 3, 6)]
    h = [stage("c", "h", 0, 2, running=1), stage("d", "h", 2, 6)]
    r = choose_route(g + h, "m")
    assert r is not None and r.worker_id == "c" and [s.worker_id for s in r.stages] == ["c", "d"]
    # A whole instance less loaded than every pipeline takes the request; a busier one does not.
    r = choose_route([*g, *h, whole("w", running=0)], "m")
    assert r is not None and r.worker_id == "w" and not r.stages
    r = choose_route([*g, *h, whole("w", running=3)], "m")
    assert r is not None and r.worker_id == "c"


def test_a_full_pipeline_holds_requests_and_avoid_is_a_last_resort() -> None:
    full = [stage("a", "g", 0, 3, running=4 + QUEUE_AHEAD), stage("b", "g", 3, 6)]
    assert choose_route(full, "m") is None  # waits at the gateway, as for a whole instance
    two = [stage("a", "g", 0, 3), stage("b", "g", 3, 6), stage("c", "h", 0, 3, running=2), stage("d", "h", 3, 6)]
    r = choose_route(two, "m", avoid=frozenset({"b"}))
    assert r is not None and r.worker_id == "c"
    r = choose_route(two[:2], "m", avoid=frozenset({"b"}))
    assert r is not None and r.worker_id == "a"  # a retry on it beats no answer


# ---- replicas and scale-down ------------------------------------------------------------------


def hb(
    wid: str, state: WorkerState = "serving", group: str = "", a: int = 0, b: int = 0, model: str | None = "m"
) -> Heartbeat:
    return Heartbeat(wid, state, model, 4, 8, 0, 0, 4, 0.0, 0, 1, "h", group=group, stage_start=a, stage_end=b)


def test_an_instance_of_stages_counts_once() -> None:
    t = WorkerTable(1.0)
    for h in (hb("a", group="g", a=0, b=3), hb("b", group="g", a=3, b=6), hb("c"), hb("d", "idle", model=None)):
        t.on_heartbeat(h, 0.0)
    assert t.instances(0.0) == {"m": frozenset({"g", "c"})}


def view(wid: str, group: str = "", state: WorkerState = "serving", running: int = 0) -> WorkerView:
    return WorkerView(wid, state, "m", 4, 8, running=running, group=group)


def test_scale_down_takes_every_stage_of_an_instance() -> None:
    snap = MeshSnapshot(
        (view("a", "g", running=5), view("b", "g"), view("c", "h", running=1), view("d", "h"), view("e", "k"))
    )
    snap = replace(snap, workers=(*snap.workers[:4], view("e", "k", state="loading"), view("f", "k", state="loading")))
    chosen = choose_instances_for_down(snap, "m", 2)
    assert chosen == [("k", ("e", "f")), ("h", ("c", "d"))]  # loading first, then least loaded
    assert choose_instances_for_down(snap, "m", 3, reserved={"d"}) == [("k", ("e", "f")), ("g", ("a", "b"))]


def test_cascade_up_counts_a_pipelined_instance_and_each_slot_of_a_shared_worker() -> None:
    m = ModelDeployment("m", Path("/m"), min_replicas=2, stages=2)
    r = Readiness(Deployment((m,)))

    def beat(pid: int, wid: str, group: str, a: int, b: int) -> None:
        units = b - a + (a == 0) + (b == 6)
        hb = Heartbeat(
            wid, "serving", "m", units, 8, 0, 0, 4, 0.0, 0, pid, "h", group=group, stage_start=a, stage_end=b
        )
        r.beats[(pid, wid)] = hb

    # Two shared worker processes (pids 1, 2), two instances each: two pipelined instances.
    beat(1, "p1", "g", 0, 3)
    beat(2, "p2", "g", 3, 6)
    beat(1, "p1-2", "h", 0, 3)
    assert len(r.serving(m, {1, 2})) == 1  # h's tail is missing
    beat(2, "p2-2", "h", 3, 6)
    assert sorted(hb.group for hb in r.serving(m, {1, 2})) == ["g", "h"]
    assert r.serving(m, {1}) == []  # stages of another mesh's workers do not count


def idle(wid: str, device: str = "", running: int = 0) -> WorkerView:
    return WorkerView(wid, "idle", None, 0, 0, running=running, shared_device=device)


def test_stages_of_an_instance_go_to_distinct_devices() -> None:
    # Two shared workers (two instances each) and one worker of its own.
    snap = MeshSnapshot((idle("a", "A"), idle("a-2", "A"), idle("b", "B"), idle("b-2", "B"), idle("c", running=1)))
    # By id alone the first instance would be a and a-2, both on A: no pipelining at all.
    assert choose_groups_for_up(snap, 2, 2) == [("a", "b"), ("a-2", "b-2")]
    # Three stages need three devices: c joins, and only one such instance can be formed.
    assert choose_groups_for_up(snap, 2, 3) == [("a", "b", "c")]
    assert choose_groups_for_up(snap, 1, 2, reserved={"a", "a-2"}) == [("b", "c")]
    assert choose_groups_for_up(snap, 1, 4) == []


def test_stages_avoid_the_workers_backed_off_for_the_model() -> None:
    """Issue 22: a pipelined up honours the decision's avoid list, as a single-worker one does."""
    snap = MeshSnapshot((idle("a"), idle("b"), idle("c"), idle("d")))
    assert choose_groups_for_up(snap, 1, 2) == [("a", "b")]
    assert choose_groups_for_up(snap, 1, 2, avoid={"a"}) == [("b", "c")]
    assert choose_groups_for_up(snap, 2, 2, avoid={"a", "c"}) == [("b", "d")]
    assert choose_groups_for_up(snap, 1, 2, reserved={"b"}, avoid={"a", "c"}) == []


def test_a_journal_of_stages_reads_back_as_its_instances() -> None:
    from services.loader.decisions import journaled_groups

    # scale_up_pipelined journals group after group, S workers each, named <decision>.<i>.
    assert journaled_groups("d", ("a", "b", "c", "e"), 2) == {"d.0": ("a", "b"), "d.1": ("c", "e")}
    assert journaled_groups("d", ("a", "b", "c"), 2) == {"d.0": ("a", "b"), "d.1": ("c",)}  # a gap: fails whole
    assert journaled_groups("d", (), 2) == {}
    with pytest.raises(ValueError):
        journaled_groups("d", ("a",), 0)


def test_a_stage_kv_budget_buys_blocks_of_its_own_layers(tmp_path: Path) -> None:
    from cascade.config import GenerateSpec
    from cascade.models.generate import generate_model
    from cascade.models.tokenizer import ByteTokenizer
    from services.worker.engine import Engine
    from tests.enginehelp import load_model

    generate_model(tmp_path, GenerateSpec(layers=4, hidden=32, heads=2, kv_heads=1, vocab=320, seed=1))
    model = load_model(tmp_path)
    budget = 4_000_000
    whole = Engine(model, ByteTokenizer(), kv_cache_bytes=budget)
    stage = Engine(model, ByteTokenizer(), kv_cache_bytes=budget, kv_layers=1)
    # A quarter of the layers: four times the blocks (give or take the null block) for the same bytes.
    assert abs(stage.blocks.total - 4 * whole.blocks.total) <= 4
    assert stage.geometry.bytes_per_block * 4 == whole.geometry.bytes_per_block


def test_the_scaler_counts_a_worker_per_stage_against_the_idle_pool() -> None:
    from services.scaler.replicas import ModelBounds, Pool, ReplicaBook, Settings

    settings = Settings(ack_timeout_s=30.0, warmup_s=0.0, settle_s=5.0, retry_base_s=1.0, retry_max_s=8.0)
    book = ReplicaBook({"p": ModelBounds(0, 4, stages=2), "w": ModelBounds(0, 4)}, settings, started_at=0.0)
    book.loader_ready()
    book.set_target("p", 2, reason="p busy")
    book.set_target("w", 1, reason="w busy")
    # Five idle workers: two instances of two stages take four, the whole model the last one.
    ds = book.tick(1.0, {}, Pool(frozenset({"a", "b", "c", "d", "e"}), {})).decisions
    assert [(d.model, d.count) for d in ds] == [("p", 2), ("w", 1)]
    # Three idle: one pipelined instance fits (its second waits), and the up in flight claims two.
    book2 = ReplicaBook({"p": ModelBounds(0, 4, stages=2), "w": ModelBounds(0, 4)}, settings, started_at=0.0)
    book2.loader_ready()
    book2.set_target("p", 2, reason="p busy")
    book2.set_target("w", 2, reason="w busy")
    ds = book2.tick(1.0, {}, Pool(frozenset({"a", "b", "c"}), {})).decisions
    assert [(d.model, d.count) for d in ds] == [("p", 1), ("w", 1)]


def test_a_pipeline_that_lost_a_stage_is_returned_to_the_pool_after_a_grace() -> None:
    from services.loader.orphans import BrokenPipelines

    def st(wid: str, a: int, b: int, state: WorkerState = "serving", group: str = "g") -> WorkerView:
        return WorkerView(wid, state, "m", 4, 8, group=group, stage_start=a, stage_end=b)

    bp = BrokenPipelines(grace_s=2.0)
    whole = [st("a", 0, 3), st("b", 3, 6)]
    assert bp.broken(whole, (), 0.0) == []
    # b is gone (its heartbeats stopped): a alone serves nobody; after the grace it goes back.
    assert bp.broken(whole[:1], (), 1.0) == []
    assert bp.broken(whole[:1], (), 2.5) == []
    assert bp.broken(whole[:1], (), 3.0) == ["a"]
    # A stage still loading, or a decision at work on the group (reserved), is not broken.
    bp = BrokenPipelines(grace_s=0.0)
    assert bp.broken([st("a", 0, 3), st("b", 3, 6, "loading")], (), 0.0) == []
    assert bp.broken([st("a", 0, 3)], {"a"}, 0.0) == []
    # A gap that heals within the grace forgets its clock.
    bp = BrokenPipelines(grace_s=2.0)
    assert bp.broken(whole[:1], (), 0.0) == []
    assert bp.broken(whole, (), 1.0) == []
    assert bp.broken(whole[:1], (), 2.5) == []
