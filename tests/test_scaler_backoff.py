"""Per (model, worker) back-off after failed scale-ups: the pure core (services/scaler/backoff.py)
and the scaler's tick driving it against a scripted loader whose chosen worker always fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cascade.config import Deployment, ModelDeployment
from cascade.messages import ScaleAck, ScaleDecision, ScaleRequest
from cascade.scalefailures import reason_kind
from services.scaler import core
from services.scaler.backoff import Backoff
from services.scaler.replicas import Settings

SETTINGS = Settings(ack_timeout_s=60.0, warmup_s=0.0, settle_s=2.0, retry_base_s=1.0, retry_max_s=15.0)


def test_failures_double_up_to_the_cap_and_a_success_clears_them() -> None:
    b = Backoff(base_s=5, max_s=30)
    untils = [b.failed("m", "w1", "w1 refused the load (load_failed: no config.json)", now=100).until for _ in range(5)]
    assert untils == [105, 110, 120, 130, 130]
    assert b.avoided("m", 129) == {"w1"} and b.avoided("m", 130) == frozenset()
    assert b.avoided("other", 100) == frozenset(), "only for the model it failed"
    assert b.status(100)[0]["failures"] == 5 and b.status(100)[0]["kind"] == "no_model_files"
    b.on_ack("m", ["w1"], {}, now=131)
    assert b.avoided("m", 131) == frozenset() and b.status(131) == []
    assert b.totals[("m", "w1", "no_model_files")] == 5, "what failed stays counted"


def test_hold_until_only_when_every_idle_worker_is_backed_off() -> None:
    b = Backoff(base_s=5, max_s=300)
    b.on_ack("m", [], {"a": "a gave up loading m", "b": "b did not answer"}, now=0)
    b.failed("m", "b", "again", now=1)  # b: 10 s from t=1
    assert b.hold_until("m", {"a", "b"}, now=2) == 5
    assert b.hold_until("m", {"a", "b", "c"}, now=2) is None, "c may try"
    assert b.hold_until("m", set(), now=2) is None
    assert b.hold_until("m", {"a", "b"}, now=6) is None, "a's back-off is over"


def test_hold_until_counts_a_worker_per_stage() -> None:
    """A pipelined model needs `stages` free idle workers for one instance: with one free of two
    it waits for the first back-off to end; with none free, for the second (then two are free)."""
    b = Backoff(base_s=5, max_s=300)
    b.on_ack("p", [], {"a": "a gave up loading p"}, now=0)  # a: until 5
    b.on_ack("p", [], {"b": "b gave up loading p"}, now=2)  # b: until 7
    assert b.hold_until("p", {"a", "c"}, now=3, need=2) == 5
    assert b.hold_until("p", {"a", "b"}, now=3, need=2) == 7
    assert b.hold_until("p", {"a", "c", "d"}, now=3, need=2) is None, "c and d may take it"
    assert b.hold_until("p", {"a"}, now=3, need=2) is None, "too few idle anyway: no back-off to wait for"
    assert b.hold_until("p", {"a", "b"}, now=3) == 5, "a whole instance: the first end"


def test_reason_kinds_are_bounded_labels() -> None:
    assert reason_kind("w has --model-source network: it does not read the model store at /m") == "no_model_store"
    assert reason_kind("w2 stopped heart-beating while loading m") == "worker_lost"
    assert reason_kind("something new") == "other"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(base_s=0)
    with pytest.raises(ValueError):
        Backoff(base_s=10, max_s=5)


# --------------------------------------------------------------------------- through the tick


@dataclass
class FailingLoader:
    """Acks every up at the next tick; a chosen worker in `bad` fails it, others load."""

    workers: dict[str, str | None]
    bad: set[str]
    decisions: list[ScaleDecision] = field(default_factory=list)
    pending: list[ScaleAck] = field(default_factory=list)

    def idle(self) -> frozenset[str]:
        return frozenset(w for w, m in self.workers.items() if m is None)

    def instances(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        for w, m in self.workers.items():
            if m is not None:
                out.setdefault(m, set()).add(w)
        return {k: frozenset(v) for k, v in out.items()}

    def carry_out(self, d: ScaleDecision) -> None:
        self.decisions.append(d)
        chosen = sorted(self.idle() - set(d.avoid))[: d.count]
        ok = [w for w in chosen if w not in self.bad]
        failed = {
            w: f"{w} refused the receive order (load_failed: /m has no config.json)" for w in chosen if w in self.bad
        }
        for w in ok:
            self.workers[w] = d.model
        error = "; ".join(failed.values()) if failed or not chosen else ""
        if not chosen:
            error = "no idle worker"
        self.pending.append(ScaleAck(d.decision_id, d.model, not error, ok, error, failed=failed))


@dataclass
class FailingPipelinedLoader(FailingLoader):
    """Acks every up of a 2-stage model at the next tick: a group (the first idle pair by id
    outside the decision's avoid list) with a stage in `bad` fails, and its bad stages are named."""

    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def idle(self) -> frozenset[str]:
        return frozenset(self.workers) - {w for ws in self.groups.values() for w in ws}

    def instances(self) -> dict[str, frozenset[str]]:
        return {"m": frozenset(self.groups)} if self.groups else {}

    def carry_out(self, d: ScaleDecision) -> None:
        self.decisions.append(d)
        free = sorted(self.idle() - set(d.avoid))
        pair = tuple(free[:2])
        failed = {w: f"{w} gave up loading m (now idle; see its log)" for w in pair if w in self.bad}
        ok = len(pair) == 2 and not failed
        if ok:
            self.groups[f"{d.decision_id}.0"] = pair
        error = "; ".join(failed.values()) or ("" if ok else "too few idle workers")
        self.pending.append(
            ScaleAck(d.decision_id, d.model, ok, [f"{d.decision_id}.0"] if ok else [], error, failed=failed)
        )


def _run(loader: FailingLoader, seconds: int, target: int, stages: int = 1) -> core.ScalerState:
    deployment = Deployment((ModelDeployment("m", Path("/m"), 0, 4, policy="manual", stages=stages),))
    now = 1000.0
    state = core.new_state(deployment, SETTINGS, core.Now(now, now), "s")
    core.set_target(state, ScaleRequest("m", target), core.Mesh(idle=loader.idle()), core.Now(now, now))
    loader_up: str | None = "loader"
    for _ in range(seconds):
        acks, loader.pending = loader.pending, []
        inputs = core.Inputs(
            mesh=core.Mesh(instances=loader.instances(), idle=loader.idle()), acks=acks, loader_up=loader_up
        )
        loader_up = None
        state, effects = core.tick(state, inputs, core.Now(now, now))
        for e in effects:
            if isinstance(e, core.Publish):
                loader.carry_out(e.decision)
        now += 1.0
    return state


def test_a_failing_only_worker_is_retried_with_back_off_not_every_tick() -> None:
    loader = FailingLoader({"bad": None}, bad={"bad"})
    state = _run(loader, seconds=300, target=1)
    # 5 s doubling to 300 s from t=0: tries at about 0, 5, 15, 35, 75, 155 (+ a tick each for the
    # ack) — a handful in five minutes, where a fixed 10 s retry made 30.
    assert 4 <= len(loader.decisions) <= 8, [d.decision_id for d in loader.decisions]
    (row,) = core.status(state, core.Mesh(idle=loader.idle()), core.Now(1300, 1300))["backoff"]
    assert row["worker"] == "bad" and row["failures"] == len(loader.decisions) and row["kind"] == "no_model_files"


def test_another_idle_worker_is_chosen_while_the_failing_one_is_avoided() -> None:
    loader = FailingLoader({"a-bad": None, "b-good": None}, bad={"a-bad"})
    _run(loader, seconds=30, target=1)
    first, second = loader.decisions[:2]
    assert first.avoid == [] and second.avoid == ["a-bad"]
    assert loader.workers == {"a-bad": None, "b-good": "m"}
    assert len(loader.decisions) == 2, "served after the second decision; nothing more"


def test_a_pipelined_up_avoids_a_failing_stage_and_waits_out_its_back_off() -> None:
    """Issue 22: the stage that failed is named in the ack and avoided by the model's next
    decision, as for a single worker; with too few free workers left the up waits for back-offs."""
    loader = FailingPipelinedLoader({"a-bad": None, "b": None, "c": None}, bad={"a-bad"})
    _run(loader, seconds=30, target=1, stages=2)
    first, second = loader.decisions[:2]
    assert first.avoid == [] and second.avoid == ["a-bad"]
    assert loader.groups == {f"{second.decision_id}.0": ("b", "c")}
    assert len(loader.decisions) == 2, "served after the second decision; nothing more"

    # Two idle workers, one failing: after its failure only one is free for two stages, so the
    # model waits for the back-off (5 s doubling) rather than deciding every tick.
    loader = FailingPipelinedLoader({"a-bad": None, "b": None}, bad={"a-bad"})
    _run(loader, seconds=60, target=1, stages=2)
    assert 3 <= len(loader.decisions) <= 6, [(d.decision_id, d.avoid) for d in loader.decisions]


def _first_up(loader_idle: frozenset[str]) -> tuple[core.ScalerState, ScaleDecision]:
    deployment = Deployment((ModelDeployment("m", Path("/m"), 0, 4, policy="manual"),))
    state = core.new_state(deployment, SETTINGS, core.Now(1000.0, 1000.0), "s")
    core.set_target(state, ScaleRequest("m", 1), core.Mesh(idle=loader_idle), core.Now(1000.0, 1000.0))
    state, effects = core.tick(
        state, core.Inputs(mesh=core.Mesh(idle=loader_idle), loader_up="loader"), core.Now(1000.0, 1000.0)
    )
    (d,) = [e.decision for e in effects if isinstance(e, core.Publish)]
    return state, d


@pytest.mark.parametrize(
    ("why", "again_at_once"),
    [("a stopped heart-beating while loading m", True), ("a refused the load (load_failed: disk full)", False)],
)
def test_an_up_whose_worker_died_is_asked_again_at_once(why: str, again_at_once: bool) -> None:
    """A worker killed mid-load (chaos bench's stage fault) says nothing about the model: the
    lost capacity is asked for again in the tick that hears the ack, on another idle worker (the
    dead one avoided), not after the model's retry delay, which a real failure still waits out."""
    state, d = _first_up(frozenset({"a", "b"}))
    ack = ScaleAck(d.decision_id, "m", False, [], why, failed={"a": why})
    now = core.Now(1000.2, 1000.2)
    state, effects = core.tick(state, core.Inputs(mesh=core.Mesh(idle=frozenset({"b"})), acks=[ack]), now)
    again = [e.decision for e in effects if isinstance(e, core.Publish)]
    if again_at_once:
        (d2,) = again
        assert (d2.action, d2.count, d2.avoid) == ("up", 1, ["a"])
    else:
        assert again == [], "a real failure waits out the model's retry delay"
