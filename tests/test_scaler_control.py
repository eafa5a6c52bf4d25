"""The scaler's pure core (`core.tick`) without NATS: metrics messages (through their wire
encoding) and acks in, decisions out to a scripted loader that acks after a load time, tick by
tick on a fake clock. Also the admin API's core (`Controls.configure`) and the batch-limit
orders of the two-stage policy."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest

from cascade.config import Deployment, ModelDeployment
from cascade.messages import (
    InstanceMetrics,
    ModelMetrics,
    ScaleAck,
    ScaleDecision,
    ScaleRequest,
    StepStat,
    decode,
    encode,
)
from services.scaler import core
from services.scaler.controls import Controls, UnknownModel
from services.scaler.policies import KnobError
from services.scaler.replicas import Settings, TargetError

SETTINGS = Settings(ack_timeout_s=60.0, warmup_s=0.0, settle_s=2.0, retry_base_s=1.0, retry_max_s=8.0)
TOKENS = 50  # generated per request


def dep(name: str, policy: str, lo: int = 1, hi: int = 8, **knobs: float) -> ModelDeployment:
    return ModelDeployment(name, Path(f"/m/{name}"), lo, hi, policy=policy, knobs=dict(knobs))


def wire(m: ModelMetrics | InstanceMetrics) -> ModelMetrics | InstanceMetrics:
    out: ModelMetrics | InstanceMetrics = decode(encode(m))
    return out


@dataclass
class Mesh:
    """Workers that a scripted loader assigns: an up takes idle workers and acks `load_s` later,
    a down frees them and acks at the next tick (a drain of idle instances)."""

    workers: dict[str, str | None]  # worker → model
    load_s: float = 3.0
    pending: list[tuple[float, ScaleDecision, list[str]]] = field(default_factory=list)
    decisions: list[ScaleDecision] = field(default_factory=list)

    def instances(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        for w, m in self.workers.items():
            if m is not None:
                out.setdefault(m, set()).add(w)
        return {m: frozenset(ws) for m, ws in out.items()}

    def idle(self) -> frozenset[str]:
        return frozenset(w for w, m in self.workers.items() if m is None)

    def carry_out(self, d: ScaleDecision, now: float) -> None:
        self.decisions.append(d)
        if d.action == "up":
            chosen = sorted(self.idle())[: d.count]
            for w in chosen:
                self.workers[w] = d.model  # loading counts as an instance at once
            self.pending.append((now + self.load_s, d, chosen))
        else:
            held = sorted(w for w, m in self.workers.items() if m == d.model)[: d.count]
            for w in held:
                self.workers[w] = None
            self.pending.append((now, d, held))

    def acks(self, now: float) -> list[tuple[ScaleDecision, list[str]]]:
        due = [(d, ws) for t, d, ws in self.pending if t <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        return due


@dataclass
class Run:
    """The scaler's core, ticked over a scripted mesh."""

    deployment: Deployment
    mesh: Mesh
    now: float = 1000.0
    state: core.ScalerState = field(init=False)
    metrics: list[ModelMetrics | InstanceMetrics] = field(default_factory=list)
    loader_up: str | None = "loader"

    def __post_init__(self) -> None:
        self.state = core.new_state(
            self.deployment, SETTINGS, core.Now(self.now, self.now), "s", window_s=30, rate_window_s=5, stale_s=5
        )

    @property
    def controls(self) -> Controls:
        return self.state.controls

    def report(self, model: str, arrivals: int, waiting: int = 0) -> None:
        """One second of a gateway's report and every instance's, as the messages carry them."""
        insts = sorted(self.mesh.instances().get(model, ()))
        tokens = arrivals * TOKENS
        self.metrics.append(
            wire(
                ModelMetrics(
                    "gw", model, ts=self.now, interval_s=1.0, arrivals=arrivals, completions=arrivals,
                    prompt_tokens=arrivals * 8, generated_tokens=tokens, running=arrivals, waiting=waiting,
                    last_arrival_ts=self.now if arrivals else 0.0,
                )
            )
        )  # fmt: skip
        for w in insts:
            per = tokens / len(insts)
            batch = max(1, round(arrivals / len(insts)))
            self.metrics.append(
                wire(
                    InstanceMetrics(
                        w, model, ts=self.now, interval_s=1.0, running=batch, max_batch=32, tokens_per_s=per,
                        generated_tokens=int(per), steps=[StepStat(batch, 40, 40 * (20 + batch))], kv_slots=32,
                    )
                )
            )  # fmt: skip

    def tick(self) -> list[ScaleDecision]:
        acks = [ScaleAck(d.decision_id, d.model, True, ws) for d, ws in self.mesh.acks(self.now)]
        mesh = core.Mesh(instances=self.mesh.instances(), idle=self.mesh.idle())
        inputs = core.Inputs(mesh=mesh, metrics=self.metrics, acks=acks, loader_up=self.loader_up)
        self.metrics, self.loader_up = [], None
        self.state, effects = core.tick(self.state, inputs, core.Now(self.now, self.now))
        out = [e.decision for e in effects if isinstance(e, core.Publish)]
        for d in out:
            self.mesh.carry_out(d, self.now)
        self.now += 1.0
        return out


def reversals(ds: list[ScaleDecision]) -> int:
    signs = [1 if d.action == "up" else -1 for d in ds]
    return sum(1 for a, b in pairwise(signs) if a != b)


def test_rate_step_then_noisy_plateau_one_decision_no_reversal() -> None:
    deployment = Deployment((dep("m", "rate", 1, 8, capacity_tps=200.0),))
    mesh = Mesh({f"w{i}": ("m" if i < 5 else None) for i in range(8)})
    run = Run(deployment, mesh)
    rng = random.Random(7)
    for t in range(240):
        base = 12 if t < 60 else 24
        run.report("m", max(0, round(base * (1 + rng.uniform(-0.15, 0.15)))))
        run.tick()
    ds = mesh.decisions
    assert reversals(ds) == 0
    assert [d.action for d in ds] == ["up"], [(d.action, d.count, d.reason) for d in ds]
    # One decision adds several instances: it fires as soon as the windowed rate puts utilisation
    # above the band, with the demand seen then (the plateau's full demand would want 9 → max 8).
    assert ds[0].count >= 2 and ds[0].target_replicas >= 7
    assert "utilisation" in ds[0].reason and ds[0].figures["demand_tps"] > 0
    assert len(mesh.instances()["m"]) == ds[0].target_replicas


def test_concurrency_noisy_plateau_through_the_wiring_does_not_oscillate() -> None:
    knobs = {"target_ongoing_requests": 4.0, "upscale_delay_s": 5.0, "downscale_delay_s": 30.0}
    deployment = Deployment((dep("m", "concurrency", 1, 8, **knobs),))
    mesh = Mesh({f"w{i}": ("m" if i < 3 else None) for i in range(8)})
    run = Run(deployment, mesh)
    rng = random.Random(3)
    for _ in range(300):
        run.report("m", max(0, round(10 * (1 + rng.uniform(-0.3, 0.3)))))
        run.tick()
    assert reversals(mesh.decisions) == 0
    assert len(mesh.decisions) <= 1


def test_an_idle_model_lends_its_instance_to_one_waiting_at_zero() -> None:
    deployment = Deployment(
        (
            dep("a", "concurrency", 1, 3, target_ongoing_requests=1.0, upscale_delay_s=0.0, downscale_delay_s=600.0),
            dep("b", "concurrency", 0, 1, keep_alive_s=600.0),
        )
    )
    mesh = Mesh({"w1": "a", "w2": None, "w3": None}, load_s=2.0)
    run = Run(deployment, mesh)
    for _ in range(10):  # a burst on a takes the whole pool
        run.report("a", 4, waiting=2)
        run.tick()
    assert len(mesh.instances()["a"]) == 3 and not mesh.idle()
    for _ in range(8):  # the burst is over: a keeps three (a long downscale delay)
        run.report("a", 0)
        run.tick()
    assert len(mesh.instances()["a"]) == 3
    for _ in range(8):  # a request waits for b, at zero
        run.report("b", 0, waiting=1)
        run.tick()
    loans = [d for d in mesh.decisions if d.model == "a" and d.action == "down"]
    assert len(loans) == 1 and loans[0].count == 1 and "lend 1 to b" in loans[0].reason
    assert len(mesh.instances()["a"]) == 2 and len(mesh.instances()["b"]) == 1
    # Nothing is taken below a's need while b is served, and nothing moves back and forth.
    for _ in range(20):
        run.report("a", 1)
        run.report("b", 1)
        run.tick()
    assert len([d for d in mesh.decisions if d.action == "down"]) == 1


def test_a_model_at_its_minimum_lends_nothing() -> None:
    deployment = Deployment((dep("a", "concurrency", 1, 2), dep("b", "concurrency", 0, 1)))
    mesh = Mesh({"w1": "a"})
    run = Run(deployment, mesh)
    for _ in range(20):
        run.report("b", 0, waiting=1)
        run.tick()
    assert mesh.decisions == [] and mesh.instances() == {"a": frozenset({"w1"})}


# --------------------------------------------------------------------------- controls


def test_a_bad_policy_or_knob_fails_at_start() -> None:
    with pytest.raises(KnobError, match="unknown scaling policy"):
        Controls(Deployment((dep("m", "fastest"),)))
    with pytest.raises(KnobError, match="unknown knobs"):
        Controls(Deployment((dep("m", "rate", speed=2.0),)))


def test_fold_ignores_models_outside_the_deployment_and_manual_never_decides() -> None:
    c = Controls(Deployment((dep("m", "manual"),)))
    assert c.fold(ModelMetrics("gw", "other", ts=1.0, arrivals=3)) is False
    assert c.fold(ModelMetrics("gw", "m", ts=1.0, arrivals=3, waiting=5)) is True
    ev = c.evaluate("m", 1.5, serving=0, loading=0, idle_pool=2, in_flight=False)
    assert ev.target is None and ev.need is None and ev.signals.waiting == 5
    with pytest.raises(UnknownModel):
        c.evaluate("other", 1.5, serving=0, loading=0, idle_pool=2, in_flight=False)


def test_configure_switches_policy_merges_and_replaces_knobs() -> None:
    c = Controls(Deployment((dep("m", "concurrency", 0, 4, keep_alive_s=30.0),)))
    r = c.configure("m", 0.0, knobs={"target_ongoing_requests": 3})
    assert r.changed and r.control.knobs_set == {"keep_alive_s": 30.0, "target_ongoing_requests": 3.0}
    assert r.control.knobs.min_replicas == 0 and r.control.knobs.max_replicas == 4
    assert c.configure("m", 0.0, knobs={"target_ongoing_requests": 3}).changed is False
    r = c.configure("m", 0.0, knobs={"keep_alive_s": 5}, replace=True)
    assert r.control.knobs_set == {"keep_alive_s": 5.0}
    # A new policy starts from its defaults and its own initial state.
    r = c.configure("m", 0.0, policy="rate", knobs={"capacity_tps": 50})
    assert r.control.policy.name == "rate" and r.control.knobs_set == {"capacity_tps": 50.0}
    # A knob the policy does not take changes nothing.
    with pytest.raises(KnobError, match="unknown knobs"):
        c.configure("m", 0.0, knobs={"target_ongoing_requests": 3})
    with pytest.raises(KnobError, match="finite"):
        c.configure("m", 0.0, knobs={"capacity_tps": float("nan")})
    assert c.get("m").policy.name == "rate" and c.get("m").knobs_set == {"capacity_tps": 50.0}
    assert c.describe()["m"]["policy"] == "rate"


def test_two_stage_holds_instances_at_its_batch_limit_within_their_kv_slots() -> None:
    c = Controls(Deployment((dep("m", "two-stage", 1, 4, base_batch=8, max_batch=64),)))
    assert c.get("m").batch_limit == 8
    for w, slots in (("w1", 32), ("w2", 4)):
        c.fold(InstanceMetrics(w, "m", ts=10.0, max_batch=32 if slots == 32 else 4, kv_slots=slots))
    c.fold(InstanceMetrics("w3", "m", ts=10.0, state="draining", max_batch=32, kv_slots=32))
    ev = c.evaluate("m", 10.5, serving=2, loading=0, idle_pool=0, in_flight=False)
    # w2 cannot go above its 4 slots and is there already; a draining instance is left alone.
    assert c.limit_orders(ev.signals, 10.5) == [("w1", 8)]
    assert c.limit_orders(ev.signals, 11.0) == []  # sent; not repeated at once
    assert c.limit_orders(ev.signals, 10.5 + c.limit_resend_s) == [("w1", 8)]  # never showed up: again
    c.fold(InstanceMetrics("w1", "m", ts=16.0, max_batch=8, kv_slots=32))
    c.fold(InstanceMetrics("w2", "m", ts=16.0, max_batch=4, kv_slots=4))
    ev = c.evaluate("m", 16.2, serving=2, loading=0, idle_pool=0, in_flight=False)
    assert c.limit_orders(ev.signals, 16.2) == []
    # Leaving the vertical policy puts its instances back on their own limits.
    r = c.configure("m", 16.3, policy="rate")
    assert set(r.restore) == {"w1", "w2"} and c.get("m").batch_limit is None
    assert c.limit_orders(ev.signals, 16.4) == []


def test_a_model_deployed_at_run_time_is_scaled_to_its_minimum_and_announced() -> None:
    run = Run(Deployment((dep("a", "manual"),)), Mesh({"w1": "a", "w2": None}))
    for _ in range(3):
        assert run.tick() == []
    reply, effects = core.add_model(run.state, dep("b", "concurrency", lo=1, hi=2), core.Now(run.now, run.now))
    assert reply.changed and (reply.model, reply.min_replicas, reply.max_replicas) == ("b", 1, 2)
    announced = [e for e in effects if isinstance(e, core.Announce)]
    assert len(announced) == 1 and announced[0].added == ("b",)
    assert announced[0].deployment.names() == ["a", "b"]
    ups = [d for _ in range(3) for d in run.tick()]
    assert [(d.model, d.action, d.count) for d in ups] == [("b", "up", 1)]
    # The same model again changes nothing; the same name from another folder is refused.
    again, effects = core.add_model(run.state, dep("b", "concurrency", lo=1, hi=2), core.Now(run.now, run.now))
    assert not again.changed and not any(isinstance(e, core.Announce) for e in effects)
    other = ModelDeployment("b", Path("/elsewhere"), 1, 2)
    with pytest.raises(core.ModelExists, match="deployed already"):
        core.add_model(run.state, other, core.Now(run.now, run.now))
    with pytest.raises(KnobError):
        core.add_model(run.state, dep("c", "no-such-policy"), core.Now(run.now, run.now))
    assert sorted(run.controls.models) == ["a", "b"] and "c" not in run.state.book.targets


def test_a_target_beyond_the_idle_workers_is_kept_and_says_what_will_happen() -> None:
    run = Run(Deployment((dep("a", "manual", lo=1, hi=5),)), Mesh({"w1": "a", "w2": None}))
    run.tick()
    now = core.Now(run.now, run.now)
    mesh = core.Mesh(instances=run.mesh.instances(), idle=run.mesh.idle())
    reply, _ = core.set_target(run.state, ScaleRequest("a", 4), mesh, now)
    assert "target 4 replicas" in reply.detail
    assert "Only 1 idle worker(s) for 3 more instance(s): 2 will run, and 2 will start when workers join" in (
        reply.detail
    )
    # Within the idle pool: no warning.
    reply, _ = core.set_target(run.state, ScaleRequest("a", 2), mesh, now)
    assert "idle worker" not in reply.detail
    # Beyond max_replicas: refused, and the reply says the target stays and how to raise the bound.
    with pytest.raises(TargetError, match=r"the target stays 2\. Ask for at most 5, or raise max_replicas"):
        core.set_target(run.state, ScaleRequest("a", 6), mesh, now)


# --------------------------------------------------------------------------- restarts


def _mesh(held: dict[str, set[str]], idle: set[str]) -> core.Mesh:
    holding: dict[str, str | None] = {w: m for m, ws in held.items() for w in ws}
    holding.update(dict.fromkeys(idle))
    return core.Mesh(instances={m: frozenset(ws) for m, ws in held.items()}, idle=frozenset(idle), holding=holding)


def test_a_restarted_scaler_keeps_what_runs_and_takes_over_the_loaders_decision() -> None:
    """A predecessor (operator target 3, manual policy) left `up 1` at the loader, and 2 of 3 run:
    the new scaler neither scales back to min_replicas nor decides the same gap again."""
    deployment = Deployment((dep("m", "manual", lo=1, hi=4), dep("k", "manual", lo=1, hi=4)))
    now = core.Now(0.0, 1000.0)
    state = core.new_state(deployment, SETTINGS, now, "scaler", id_prefix="scaler-b")
    left = ScaleDecision("scaler-a-7", "m", "up", 1, 3, "operator")
    mesh = _mesh({"m": {"w1", "w2"}, "k": {"w4", "w5"}}, {"w3"})
    state, effects = core.tick(state, core.Inputs(mesh=mesh, loader_up="loader", resumed=[left]), now)
    assert [e for e in effects if isinstance(e, core.Publish)] == []
    assert state.book.targets == {"m": 3, "k": 2} and state.book.in_flight["m"].decision == left
    # The ack of the decision taken over settles it; nothing is decided again.
    ack = ScaleAck("scaler-a-7", "m", True, ["w3"])
    later = core.Now(1.0, 1001.0)
    state, effects = core.tick(state, core.Inputs(mesh=mesh, acks=[ack]), later)
    assert [e for e in effects if isinstance(e, core.Publish)] == []
    assert "m" not in state.book.in_flight
    full = _mesh({"m": {"w1", "w2", "w3"}, "k": {"w4", "w5"}}, set())
    state, effects = core.tick(state, core.Inputs(mesh=full), core.Now(9.0, 1009.0))
    assert [e for e in effects if isinstance(e, core.Publish)] == []


def test_an_ack_that_overtakes_the_loaders_answer_is_not_waited_for() -> None:
    deployment = Deployment((dep("m", "manual", lo=1, hi=4),))
    now = core.Now(0.0, 1000.0)
    state = core.new_state(deployment, SETTINGS, now, "scaler", id_prefix="scaler-b")
    left = ScaleDecision("scaler-a-7", "m", "up", 1, 3, "operator")
    mesh = _mesh({"m": {"w1", "w2"}}, {"w3"})
    # The ack arrives at a tick before the loader's answer does.
    state, _ = core.tick(state, core.Inputs(mesh=mesh, acks=[ScaleAck("scaler-a-7", "m", True, ["w3"])]), now)
    state, effects = core.tick(state, core.Inputs(mesh=mesh, loader_up="loader", resumed=[left]), now)
    assert "m" not in state.book.in_flight  # acked already: not waited for until the ack timeout
    assert state.book.targets["m"] == 3
    # w3 counts (settling) until heartbeats show it: no second up.
    assert [e for e in effects if isinstance(e, core.Publish)] == []


def test_decision_ids_carry_the_start_so_a_restart_never_repeats_one() -> None:
    deployment = Deployment((dep("m", "manual", lo=2, hi=4),))
    now = core.Now(0.0, 1000.0)
    ids = []
    for start in ("a1", "b2"):
        state = core.new_state(deployment, SETTINGS, now, "scaler", id_prefix=f"scaler-{start}")
        state, effects = core.tick(state, core.Inputs(mesh=_mesh({}, {"w1", "w2"}), loader_up="l"), now)
        ids += [e.decision.decision_id for e in effects if isinstance(e, core.Publish)]
    assert ids == ["scaler-a1-1", "scaler-b2-1"]
