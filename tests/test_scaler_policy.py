"""The scaler's replica core, tick by tick with a fake clock (no NATS, no sleeping)."""

from __future__ import annotations

import pytest

from cascade.messages import Heartbeat
from cascade.workers import WorkerTable
from services.scaler.replicas import ModelBounds, Pool, ReplicaBook, Settings, TargetError, gap

SETTINGS = Settings(ack_timeout_s=30.0, warmup_s=2.0, settle_s=5.0, retry_base_s=1.0, retry_max_s=8.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def advance(self, s: float) -> float:
        self.now += s
        return self.now


def make(bounds: dict[str, ModelBounds] | None = None, settings: Settings = SETTINGS) -> tuple[ReplicaBook, Clock]:
    clock = Clock()
    core = ReplicaBook(bounds or {"m": ModelBounds(2, 4)}, settings, started_at=clock.now, id_prefix="s1")
    return core, clock


def ready(core: ReplicaBook, clock: Clock) -> None:
    """A loader is known and the warm-up is over."""
    core.loader_ready()
    clock.advance(SETTINGS.warmup_s)


def test_gap() -> None:
    assert gap(3, 1) == ("up", 2)
    assert gap(1, 3) == ("down", 2)
    assert gap(2, 2) is None


def test_holds_back_until_a_loader_is_known_and_warmup_passed() -> None:
    core, clock = make()
    r = core.tick(clock.now, {})
    assert r.decisions == [] and r.held_back == "no loader yet"
    core.loader_ready()
    r = core.tick(clock.advance(1.0), {})
    assert r.decisions == [] and r.held_back is not None and "warming up" in r.held_back
    r = core.tick(clock.advance(1.0), {})
    assert [d.model for d in r.decisions] == ["m"]


def test_one_decision_covers_the_whole_gap() -> None:
    core, clock = make()
    ready(core, clock)
    (d,) = core.tick(clock.now, {}).decisions
    assert (d.action, d.count, d.target_replicas) == ("up", 2, 2)
    assert d.decision_id == "s1-1"
    assert d.figures["current"] == 0 and d.figures["target"] == 2
    assert "0 of 2" in d.reason


def test_never_stacks_a_second_decision_on_a_model_in_flight() -> None:
    core, clock = make()
    ready(core, clock)
    assert len(core.tick(clock.now, {}).decisions) == 1
    for _ in range(10):
        assert core.tick(clock.advance(1.0), {"m": frozenset({"w1"})}).decisions == []
    assert set(core.in_flight) == {"m"}


def test_ack_ok_counts_its_workers_until_heartbeats_catch_up() -> None:
    core, clock = make()
    ready(core, clock)
    (d,) = core.tick(clock.now, {}).decisions
    assert core.on_ack(d.decision_id, True, ["w1", "w2"], clock.advance(1.0)) == d
    # Heartbeats have not shown the new instances yet: no second decision.
    assert core.tick(clock.advance(0.5), {}).decisions == []
    # They show up; still nothing to do.
    assert core.tick(clock.advance(0.5), {"m": frozenset({"w1", "w2"})}).decisions == []
    # If the workers vanish for good, the next tick after the settle window asks again.
    clock.advance(SETTINGS.settle_s)
    (again,) = core.tick(clock.now, {}).decisions
    assert (again.action, again.count) == ("up", 2)


def test_an_acked_worker_that_dies_stops_counting_at_once() -> None:
    """Killed right after its ack (chaos bench's stage fault): its replacement is asked for in
    the tick that hears of the death, not once the settle window has run out."""
    core, clock = make()
    ready(core, clock)
    (d,) = core.tick(clock.now, {}).decisions
    core.on_ack(d.decision_id, True, ["w1", "w2"], clock.advance(1.0))
    assert core.tick(clock.advance(0.2), {"m": frozenset({"w1", "w2"})}).decisions == []
    core.workers_lost(["w2", "other"])
    (again,) = core.tick(clock.advance(0.2), {"m": frozenset({"w1"})}).decisions
    assert (again.action, again.count) == ("up", 1)
    assert core.current("m", {}, clock.now) == 1, "w1 still counts until its heartbeats catch up"


def test_failed_ack_retries_with_exponential_backoff_capped() -> None:
    core, clock = make(settings=Settings(ack_timeout_s=30, warmup_s=0, settle_s=0, retry_base_s=1, retry_max_s=4))
    core.loader_ready()
    # Each failure since the last success doubles the wait before the next try, up to the cap.
    for wait in (1.0, 2.0, 4.0, 4.0):
        (d,) = core.tick(clock.now, {}).decisions
        core.on_ack(d.decision_id, False, [], clock.now)
        assert core.tick(clock.advance(wait - 0.01), {}).decisions == []
        clock.advance(0.01)  # the next loop turn ticks exactly when the back-off ends
    assert len(core.tick(clock.now, {}).decisions) == 1


def test_success_resets_the_backoff() -> None:
    core, clock = make(settings=Settings(ack_timeout_s=30, warmup_s=0, settle_s=0, retry_base_s=1, retry_max_s=64))
    core.loader_ready()
    for _ in range(4):
        (d,) = core.tick(clock.now, {}).decisions
        core.on_ack(d.decision_id, False, [], clock.now)
        clock.advance(100)
    (d,) = core.tick(clock.now, {}).decisions
    core.on_ack(d.decision_id, True, ["w1"], clock.now)
    # Target 2, only one arrived: the gap of one is decided again at once, no back-off.
    (d2,) = core.tick(clock.now, {"m": frozenset({"w1"})}).decisions
    assert (d2.action, d2.count) == ("up", 1)


def test_ack_timeout_expires_then_retries_later() -> None:
    core, clock = make()
    ready(core, clock)
    (d,) = core.tick(clock.now, {}).decisions
    r = core.tick(clock.advance(SETTINGS.ack_timeout_s), {})
    assert [f.decision.decision_id for f in r.expired] == [d.decision_id]
    assert r.decisions == []  # backing off
    (again,) = core.tick(clock.advance(SETTINGS.retry_base_s), {}).decisions
    assert again.decision_id != d.decision_id
    assert core.counters["timeouts"] == 1


def test_a_late_ack_for_an_expired_decision_still_settles_counts() -> None:
    core, clock = make()
    ready(core, clock)
    (d,) = core.tick(clock.now, {}).decisions
    core.tick(clock.advance(SETTINGS.ack_timeout_s), {})
    assert core.on_ack(d.decision_id, True, ["w1", "w2"], clock.now) == d
    assert core.current("m", {}, clock.now) == 2
    # Past the timeout's back-off, inside the settle window: the late ack's workers count.
    assert core.tick(clock.advance(SETTINGS.retry_base_s), {}).decisions == []


def test_unknown_ack_is_ignored() -> None:
    core, clock = make()
    ready(core, clock)
    assert core.on_ack("someone-else-7", True, ["w9"], clock.now) is None
    assert core.current("m", {}, clock.now) == 0


def test_scale_down_when_above_target() -> None:
    core, clock = make({"m": ModelBounds(1, 4)})
    ready(core, clock)
    (d,) = core.tick(clock.now, {"m": frozenset({"a", "b", "c"})}).decisions
    assert (d.action, d.count, d.target_replicas) == ("down", 2, 1)
    core.on_ack(d.decision_id, True, ["b", "c"], clock.advance(1))
    # Stale heartbeats still show three; the ack's removals count.
    assert core.tick(clock.advance(0.5), {"m": frozenset({"a", "b", "c"})}).decisions == []


def test_set_target_is_bounded_and_names_the_bound() -> None:
    core, _ = make({"m": ModelBounds(1, 3)})
    with pytest.raises(TargetError, match="above max_replicas 3") as e:
        core.set_target("m", 4)
    assert e.value.code == "out_of_bounds"
    with pytest.raises(TargetError, match="below min_replicas 1"):
        core.set_target("m", 0)
    with pytest.raises(TargetError, match="not in the deployment") as e2:
        core.set_target("other", 1)
    assert e2.value.code == "unknown_model"
    assert core.set_target("m", 3) == 1
    assert core.targets["m"] == 3


def test_new_target_is_acted_on_at_once_despite_backoff() -> None:
    core, clock = make({"m": ModelBounds(1, 4)})
    ready(core, clock)
    (d,) = core.tick(clock.now, {}).decisions
    core.on_ack(d.decision_id, False, [], clock.now)
    assert core.tick(clock.now, {}).decisions == []  # backing off
    core.set_target("m", 3)
    (d2,) = core.tick(clock.now, {}).decisions
    assert (d2.action, d2.count, d2.target_replicas) == ("up", 3, 3)


def test_a_restarted_loader_drops_in_flight_decisions() -> None:
    core, clock = make()
    ready(core, clock)
    (d,) = core.tick(clock.now, {}).decisions
    dropped = core.loader_ready()
    assert [f.decision.decision_id for f in dropped] == [d.decision_id]
    (d2,) = core.tick(clock.advance(0.1), {}).decisions
    assert d2.decision_id != d.decision_id


def test_models_are_independent() -> None:
    core, clock = make({"a": ModelBounds(1, 2), "b": ModelBounds(2, 2)})
    ready(core, clock)
    ds = core.tick(clock.now, {"a": frozenset({"w1"})}).decisions
    assert [(d.model, d.count) for d in ds] == [("b", 2)]
    core.set_target("a", 2)
    ds = core.tick(clock.advance(1), {"a": frozenset({"w1"})}).decisions
    assert [(d.model, d.count) for d in ds] == [("a", 1)]  # b is still in flight


def test_bad_settings_and_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        Settings(ack_timeout_s=0)
    with pytest.raises(ValueError):
        ReplicaBook({"m": ModelBounds(3, 2)}, SETTINGS, 0.0)


# --------------------------------------------------------------------------- worker table


def hb(worker: str, state: str = "serving", model: str | None = "m") -> Heartbeat:
    return Heartbeat(
        worker_id=worker,
        state=state,  # type: ignore[arg-type]
        model=model,
        units_ready=4 if state == "serving" else 1,
        num_units=4 if model else 0,
        running=0,
        waiting=0,
        max_batch=8,
        tokens_per_s=0.0,
        ready_seq=1,
        pid=1,
        host="h",
    )


def test_worker_table_counts_loading_and_serving_and_forgets_the_dead() -> None:
    t = WorkerTable(heartbeat_s=1.0)
    assert "a" not in t
    t.on_heartbeat(hb("a"), 0.0)
    assert "a" in t
    t.on_heartbeat(hb("a"), 0.5)
    t.on_heartbeat(hb("b", "loading"), 0.5)
    t.on_heartbeat(hb("c", "idle", None), 0.5)
    t.on_heartbeat(hb("d", "draining"), 0.5)
    assert t.instances(1.0) == {"m": frozenset({"a", "b"})}
    # Three missed heartbeats (3 s) later, a worker is gone; one still heard stays.
    t.on_heartbeat(hb("b", "serving"), 3.4)
    assert t.instances(3.6) == {"m": frozenset({"b"})}
    assert sorted(t.expire(3.6)) == ["a", "c", "d"]
    assert t.states(3.6) == {"serving": 1}


# --------------------------------------------------------------------------- idle pool and loans


def pool(*idle: str, **needs: int) -> Pool:
    return Pool(frozenset(idle), needs)


def test_policy_target_carries_its_reason_and_figures() -> None:
    core, clock = make({"m": ModelBounds(1, 4)})
    ready(core, clock)
    core.set_target("m", 3, reason="surge: 6 ongoing", figures={"ongoing": 6.0})
    (d,) = core.tick(clock.now, {"m": frozenset({"a"})}).decisions
    assert (d.action, d.count, d.reason) == ("up", 2, "surge: 6 ongoing")
    assert d.figures["ongoing"] == 6.0 and d.figures["current"] == 1 and d.figures["target"] == 3
    assert core.reason("m") == "surge: 6 ongoing"
    core.set_target("m", 1)  # an operator's target forgets the policy's reason
    assert core.reason("m") == ""


def test_a_policy_target_does_not_cut_the_backoff_short() -> None:
    core, clock = make({"m": ModelBounds(1, 4)})
    ready(core, clock)
    core.set_target("m", 2, reason="policy")
    (d,) = core.tick(clock.now, {"m": frozenset({"a"})}).decisions
    core.on_ack(d.decision_id, False, [], clock.now)
    core.set_target("m", 3, reason="policy again")
    assert core.tick(clock.advance(0.1), {"m": frozenset({"a"})}).decisions == []  # still backing off
    (again,) = core.tick(clock.advance(SETTINGS.retry_base_s), {"m": frozenset({"a"})}).decisions
    assert again.reason == "policy again (retry 1)"


def test_ups_take_at_most_the_idle_workers_not_claimed_in_flight() -> None:
    core, clock = make({"a": ModelBounds(0, 4), "b": ModelBounds(0, 4)})
    ready(core, clock)
    core.set_target("a", 2, reason="a busy")
    core.set_target("b", 2, reason="b busy")
    # Three idle workers: a takes two, b the one left (the rest of its gap waits).
    ds = core.tick(clock.now, {}, pool("w1", "w2", "w3")).decisions
    assert [(d.model, d.count) for d in ds] == [("a", 2), ("b", 1)]
    assert ds[1].figures["idle_pool"] == 1
    # b's worker serves; heartbeats still show a's two idle, but a's up in flight has claimed them.
    core.on_ack(ds[1].decision_id, True, ["w3"], clock.advance(0.5))
    assert core.tick(clock.now, {"b": frozenset({"w3"})}, pool("w1", "w2")).decisions == []


def test_an_empty_pool_holds_an_up_back_rather_than_ask_for_nothing() -> None:
    core, clock = make({"m": ModelBounds(0, 4)})
    ready(core, clock)
    core.set_target("m", 1, reason="scale from zero")
    assert core.tick(clock.now, {}, pool()).decisions == []
    (d,) = core.tick(clock.advance(1), {}, pool("w1")).decisions
    assert (d.action, d.count) == ("up", 1)


def test_an_empty_pool_borrows_from_a_model_above_its_need() -> None:
    core, clock = make({"a": ModelBounds(1, 4), "b": ModelBounds(0, 2)})
    ready(core, clock)
    core.set_target("a", 3, reason="burst")
    held = {"a": frozenset({"w1", "w2", "w3"})}
    assert core.tick(clock.now, held, pool(a=3)).decisions == []
    # The burst is over: a needs one, keeps three until its downscale delay; b waits from zero.
    core.set_target("b", 1, reason="scale from zero: 1 waiting")
    (loan,) = core.tick(clock.advance(1), held, pool(a=1, b=1)).decisions
    assert (loan.model, loan.action, loan.count, loan.target_replicas) == ("a", "down", 1, 2)
    assert "lend 1 to b" in loan.reason and loan.figures["need"] == 1
    assert core.targets["a"] == 2 and core.counters["lent"] == 1
    # In flight: nothing more is lent, and b waits.
    assert core.tick(clock.advance(0.5), held, pool(a=1, b=1)).decisions == []
    core.on_ack(loan.decision_id, True, ["w3"], clock.advance(0.5))
    # The worker is back in the pool: b's up takes it; a is not asked for more.
    held = {"a": frozenset({"w1", "w2"})}
    (up,) = core.tick(clock.now, held, pool("w3", a=1, b=1)).decisions
    assert (up.model, up.action, up.count) == ("b", "up", 1)


def test_a_loan_waits_for_a_worker_that_was_just_acked_back() -> None:
    core, clock = make({"a": ModelBounds(0, 4), "b": ModelBounds(0, 2)})
    ready(core, clock)
    core.set_target("a", 0, reason="keep-alive")
    (down,) = core.tick(clock.now, {"a": frozenset({"w1"})}, pool(a=0)).decisions
    core.on_ack(down.decision_id, True, ["w1"], clock.advance(0.2))
    core.set_target("b", 1, reason="scale from zero")
    # Heartbeats still show w1 holding nothing yet (neither idle nor a): it is on its way back,
    # so b's up counts on it and nothing is borrowed from anyone.
    (up,) = core.tick(clock.now, {}, pool(a=0, b=1)).decisions
    assert (up.model, up.action, up.count) == ("b", "up", 1)


def test_never_lends_below_min_replicas_or_need_nor_from_a_manual_model() -> None:
    core, clock = make({"a": ModelBounds(2, 4), "b": ModelBounds(0, 2), "c": ModelBounds(0, 2), "z": ModelBounds(0, 1)})
    ready(core, clock)
    held = {"a": frozenset({"w1", "w2"}), "b": frozenset({"w3", "w4"}), "c": frozenset({"w5"})}
    for m, n in (("a", 2), ("b", 2), ("c", 1)):
        core.set_target(m, n, reason="load")
    core.set_target("z", 1, reason="scale from zero")
    # a is at its min_replicas, b at its need, c has no need (manual): nobody lends.
    assert core.tick(clock.now, held, pool(a=0, b=2)).decisions == []
    assert core.counters["lent"] == 0 and core.targets == {"a": 2, "b": 2, "c": 1, "z": 1}


def test_no_loan_while_a_decision_is_in_flight() -> None:
    core, clock = make({"a": ModelBounds(0, 4), "b": ModelBounds(0, 2), "c": ModelBounds(0, 2)})
    ready(core, clock)
    core.set_target("c", 1, reason="c")
    (up,) = core.tick(clock.now, {}, pool("w9")).decisions
    core.set_target("a", 3, reason="a")
    core.set_target("b", 1, reason="b")
    # c's up may still be taking the pool's last worker: no loan from a, which is above its need.
    held = {"a": frozenset({"w1", "w2", "w3"})}
    assert core.tick(clock.advance(1), held, pool(a=1, b=1)).decisions == []
    core.on_ack(up.decision_id, True, ["w9"], clock.now)
    ds = core.tick(clock.advance(1), {**held, "c": frozenset({"w9"})}, pool(a=1, b=1)).decisions
    assert [(d.model, d.action) for d in ds] == [("a", "down")]


def test_a_policy_managed_model_adopts_what_runs_when_the_warmup_ends() -> None:
    clock = Clock()
    core = ReplicaBook(
        {"p": ModelBounds(1, 4), "q": ModelBounds(1, 4), "z": ModelBounds(1, 2)},
        SETTINGS,
        clock.now,
        "s1",
        adopt=["p", "z"],
    )
    core.loader_ready()
    held = {"p": frozenset({"a", "b", "c"}), "q": frozenset({"d", "e"})}
    assert core.tick(clock.now, held).decisions == []  # warming up: nothing adopted yet
    assert core.targets["p"] == 1
    ds = core.tick(clock.advance(SETTINGS.warmup_s), held).decisions
    # p keeps its three (a restarted scaler does not undo scaling); z (none running) gets its
    # minimum; q, not managed by a policy, goes back to its target.
    assert core.targets["p"] == 3 and core.targets["z"] == 1
    assert sorted((d.model, d.action, d.count) for d in ds) == [("q", "down", 1), ("z", "up", 1)]


def test_a_silent_policy_lets_the_target_follow_what_runs_but_an_operator_target_is_carried_out() -> None:
    core, clock = make({"m": ModelBounds(0, 4)})
    ready(core, clock)
    core.set_target("m", 1, reason="scale from zero: 1 waiting")
    assert core.tick(clock.now, {}, pool()).decisions == []  # no idle worker
    core.follow("m", 0)  # the request timed out; the policy says nothing any more
    assert core.targets["m"] == 0 and core.reason("m") == ""
    assert core.tick(clock.advance(1), {}, pool("w1")).decisions == []  # a worker appears: nothing to do
    core.set_target("m", 2)  # an operator's target survives the policy's silence until carried out
    core.follow("m", 0)
    (d,) = core.tick(clock.now, {}, pool("w1", "w2")).decisions
    assert (d.action, d.count) == ("up", 2)
    core.follow("m", 0)  # in flight: untouched
    assert core.targets["m"] == 2
    core.on_ack(d.decision_id, True, ["w1", "w2"], clock.advance(1))
    core.follow("m", 2)
    assert core.tick(clock.now, {"m": frozenset({"w1", "w2"})}, pool()).decisions == []
    core.follow("m", 1)  # after that, the target follows again (a worker died; the policy is silent)
    assert core.targets["m"] == 1


def test_a_down_whose_workers_drain_does_not_hold_the_next_up_back() -> None:
    """A drain lasts as long as the longest request on the worker. Once heartbeats show the
    down's worker gone from the count, the model may decide again (an up for load that came back),
    and the down's late ack still settles counts."""
    core, clock = make({"m": ModelBounds(0, 4)})
    ready(core, clock)
    four = {"m": frozenset({"a", "b", "c", "d"})}
    core.set_target("m", 4, reason="wave")
    assert core.tick(clock.now, four, pool(m=4)).decisions == []
    core.set_target("m", 3, reason="dip")
    (down,) = core.tick(clock.advance(0.5), four, pool(m=3)).decisions
    assert (down.action, down.count) == ("down", 1)
    # Heartbeats still count d: the down is in flight and holds the model's decisions.
    core.set_target("m", 4, reason="back")
    assert core.tick(clock.advance(0.5), four, pool("e", m=4)).decisions == []
    assert set(core.in_flight) == {"m"}
    # d drains (no longer counted): the down is set aside and the up goes out, for an idle worker.
    three = {"m": frozenset({"a", "b", "c"})}
    (up,) = core.tick(clock.advance(0.5), three, pool("e", m=4)).decisions
    assert (up.action, up.count) == ("up", 1)
    assert core.status()["draining"] == [down.decision_id] and set(core.in_flight) == {"m"}
    assert core.on_ack(down.decision_id, True, ["d"], clock.advance(10)) == down
    assert core.draining == {}
    core.on_ack(up.decision_id, True, ["e"], clock.advance(0.5))
    assert core.current("m", three, clock.now) == 4


def test_a_drained_down_never_acked_is_forgotten_at_the_ack_timeout_without_a_back_off() -> None:
    core, clock = make({"m": ModelBounds(0, 4)})
    ready(core, clock)
    core.set_target("m", 1, reason="tail")
    (down,) = core.tick(clock.now, {"m": frozenset({"a", "b"})}).decisions
    core.tick(clock.advance(0.5), {"m": frozenset({"a"})})
    assert core.status()["draining"] == [down.decision_id]
    core.tick(clock.advance(SETTINGS.ack_timeout_s), {"m": frozenset({"a"})})
    assert core.draining == {} and core.retry_at("m") is None
    # Its late ack still settles the count.
    assert core.on_ack(down.decision_id, True, ["b"], clock.advance(1)) == down
    assert core.current("m", {"m": frozenset({"a", "b"})}, clock.now) == 1


def test_no_loan_while_a_down_drains_back_to_the_pool() -> None:
    core, clock = make({"a": ModelBounds(0, 4), "b": ModelBounds(0, 2)})
    ready(core, clock)
    core.set_target("a", 2, reason="dip")
    (down,) = core.tick(clock.now, {"a": frozenset({"w1", "w2", "w3"})}, pool(a=2)).decisions
    core.set_target("b", 1, reason="scale from zero")
    # w3 drains: it will be idle soon, so nothing is borrowed from a meanwhile.
    assert core.tick(clock.advance(0.5), {"a": frozenset({"w1", "w2"})}, pool(a=1, b=1)).decisions == []
    core.on_ack(down.decision_id, True, ["w3"], clock.advance(3))
    (up,) = core.tick(clock.now, {"a": frozenset({"w1", "w2"})}, pool("w3", a=1, b=1)).decisions
    assert (up.model, up.action) == ("b", "up")
