"""The scaler's core moving compute quotas (2-D co-scaling, services/scaler/quotas.py) on a fake
clock, over a scripted mesh of shared workers: metrics messages through their wire encoding in,
SetQuota effects and scale decisions out, quotas applied as a worker would and shown back the way
heartbeats show them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cascade.config import ConfigError, Deployment, ModelDeployment, load_deployment
from cascade.messages import (
    InstanceMetrics,
    ModelMetrics,
    ScaleAck,
    ScaleDecision,
    StepStat,
    decode,
    encode,
    latency_bucket,
)
from services.scaler import core
from services.scaler.quotas import CoScaler, SharedSlot
from services.scaler.replicas import Settings

SETTINGS = Settings(ack_timeout_s=60.0, warmup_s=0.0, settle_s=2.0, retry_base_s=1.0, retry_max_s=8.0)


def dep(name: str, coscale: bool, lo: int = 1, hi: int = 4, policy: str = "concurrency") -> ModelDeployment:
    return ModelDeployment(name, Path(f"/m/{name}"), lo, hi, policy=policy, coscale=coscale)


@dataclass
class Slot:
    device: str
    model: str | None = None
    quota: float = 1.0  # a shared worker's default
    loading_until: float = 0.0


@dataclass
class SharedMesh:
    """Slots of shared worker processes (`--slots 2`), a scripted loader that puts an up on the
    first idle slot of another process (acked `load_s` later) and takes a down's newest instance."""

    slots: dict[str, Slot]
    load_s: float = 2.0
    order: list[str] = field(default_factory=list)  # instances, oldest first
    pending: list[tuple[float, ScaleDecision, list[str]]] = field(default_factory=list)

    def mesh(self, now: float) -> core.Mesh:
        inst: dict[str, set[str]] = {}
        loading: dict[str, int] = {}
        for w, s in self.slots.items():
            if s.model is not None:
                inst.setdefault(s.model, set()).add(w)
                if s.loading_until > now:
                    loading[s.model] = loading.get(s.model, 0) + 1
        shared = tuple(
            core.SharedSlot(w, s.device, s.model, w, s.quota)
            for w, s in sorted(self.slots.items())
            if s.model is not None and s.loading_until <= now
        )
        return core.Mesh(
            instances={m: frozenset(ws) for m, ws in inst.items()},
            idle=frozenset(w for w, s in self.slots.items() if s.model is None),
            loading=loading,
            holding={w: s.model for w, s in self.slots.items()},
            shared=shared,
        )

    def carry_out(self, d: ScaleDecision, now: float) -> None:
        if d.action == "up":
            busy = {s.device for s in self.slots.values() if s.model == d.model}
            w = next(w for w, s in sorted(self.slots.items()) if s.model is None and s.device not in busy)
            self.slots[w] = Slot(self.slots[w].device, d.model, 1.0, now + self.load_s)
            self.order.append(w)
            self.pending.append((now + self.load_s, d, [w]))
        else:
            w = [x for x in self.order if self.slots[x].model == d.model][-1]
            self.slots[w] = Slot(self.slots[w].device)
            self.order.remove(w)
            self.pending.append((now, d, [w]))

    def acks(self, now: float) -> list[ScaleAck]:
        due = [ScaleAck(d.decision_id, d.model, True, ws) for t, d, ws in self.pending if t <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        return due


@dataclass
class Run:
    deployment: Deployment
    mesh: SharedMesh
    now: float = 1000.0
    log: list[tuple[float, core.Effect]] = field(default_factory=list)
    loader_up: str | None = "loader"
    gateway: list[ModelMetrics] = field(default_factory=list)  # gateway reports for the next tick
    state: core.ScalerState = field(init=False)

    def __post_init__(self) -> None:
        self.mesh.order = sorted(w for w, s in self.mesh.slots.items() if s.model)
        self.state = core.new_state(self.deployment, SETTINGS, core.Now(self.now, self.now), "s", stale_s=5)

    def tick(self, demand: dict[str, float]) -> list[core.Effect]:
        """One second: each model's demand (a share of a whole worker) split over its serving
        instances, reported as their engine steps would be; then the core's tick."""
        metrics: list[InstanceMetrics | ModelMetrics] = [decode(encode(g)) for g in self.gateway]
        self.gateway = []
        for model, total in demand.items():
            ws = [w for w, s in self.mesh.slots.items() if s.model == model and s.loading_until <= self.now]
            for w in ws:
                ms = 1000.0 * total / len(ws)
                m = InstanceMetrics(w, model, ts=self.now, interval_s=1.0, running=4, steps=[StepStat(4, 10, ms)])
                metrics.append(decode(encode(m)))
        inputs = core.Inputs(
            mesh=self.mesh.mesh(self.now), metrics=metrics, acks=self.mesh.acks(self.now), loader_up=self.loader_up
        )
        self.loader_up = None
        self.state, effects = core.tick(self.state, inputs, core.Now(self.now, self.now))
        for e in effects:
            self.log.append((self.now, e))
            if isinstance(e, core.Publish):
                self.mesh.carry_out(e.decision, self.now)
            elif isinstance(e, core.SetQuota):
                self.mesh.slots[e.worker].quota = e.quota  # applied; the next "heartbeat" shows it
        self.now += 1.0
        return effects

    def quotas(self, model: str) -> list[tuple[float, str, float]]:
        return [
            (t, e.worker, e.quota)
            for t, e in self.log
            if isinstance(e, core.SetQuota) and self.mesh.slots[e.worker].device and e.model == model
        ]

    def decisions(self, model: str) -> list[tuple[float, ScaleDecision]]:
        return [(t, e.decision) for t, e in self.log if isinstance(e, core.Publish) and e.decision.model == model]


def two_models() -> Run:
    slots = {"gpu0": Slot("gpu0", "a"), "gpu0-2": Slot("gpu0", "b"), "gpu1": Slot("gpu1"), "gpu1-2": Slot("gpu1")}
    return Run(Deployment((dep("a", True), dep("b", False, policy="manual"))), SharedMesh(slots))


def test_quota_first_then_an_instance_then_release_in_the_opposite_order() -> None:
    run = two_models()
    # a's demand is 0.9 of a worker where it holds half of one (1.0 : 1.0); b next to it idles.
    first = run.tick({"a": 0.9, "b": 0.03})
    orders = {e.worker: e.quota for e in first if isinstance(e, core.SetQuota)}
    assert not [e for e in first if isinstance(e, core.Publish)], "the quota moves before any instance"
    assert orders["gpu0"] > 0.85 and orders["gpu0-2"] < 0.15
    assert abs(sum(orders.values()) - 1.0) < 1e-3, "quotas written as fractions of the worker"
    assert all(e.decision_id.startswith("s-q") and e.reason for e in first if isinstance(e, core.SetQuota))

    # The pressure lasts (a needs all of a worker at the target utilisation): one more instance.
    for _ in range(6):
        run.tick({"a": 0.9, "b": 0.03})
    ups = [(t, d) for t, d in run.decisions("a") if d.action == "up"]
    assert len(ups) == 1 and ups[0][1].target_replicas == 2 and ups[0][1].policy == "coscale"
    assert ups[0][1].reason.startswith("coscale: quota short")
    assert ups[0][0] > run.quotas("a")[0][0], "the instance comes after the quota"
    assert not [d for _, d in run.decisions("b")], "b is not co-scaled and nothing asked it to move"

    # The load goes down: first the added instance goes, then a's quota shrinks.
    for _ in range(40):
        run.tick({"a": 0.12, "b": 0.03})
    downs = [(t, d) for t, d in run.decisions("a") if d.action == "down"]
    assert len(downs) == 1 and downs[0][1].target_replicas == 1
    shrinks = [(t, q) for t, w, q in run.quotas("a") if w == "gpu0" and q < 0.5]
    assert shrinks, "a's quota follows its demand down"
    assert shrinks[0][0] > downs[0][0], "instances are released before quotas"
    assert run.mesh.slots["gpu0"].quota == pytest.approx(0.2, abs=0.01)  # 0.12 / target 0.6
    assert len([d for _, d in run.decisions("a") if d.action == "up"]) == 1, "no flapping"


def test_a_quota_order_not_shown_by_heartbeats_is_decided_again() -> None:
    run = two_models()
    first = [e for e in run.tick({"a": 0.9, "b": 0.03}) if isinstance(e, core.SetQuota)]
    assert first
    lost = {e.worker: 1.0 for e in first}  # the worker never applied them: heartbeats keep 1.0
    for w, q in lost.items():
        run.mesh.slots[w].quota = q
    again: list[core.SetQuota] = []
    for _ in range(8):
        again += [e for e in run.tick({"a": 0.9, "b": 0.03}) if isinstance(e, core.SetQuota)]
        for w in lost:
            run.mesh.slots[w].quota = 1.0
    assert {e.worker for e in again} >= set(lost), "sent again once the order's time is up"
    assert len(again) <= 2 * len(lost) * 2, "not resent every tick while it may still be on its way"


def test_a_model_without_coscale_keeps_its_policy_and_its_quotas() -> None:
    slots = {"gpu0": Slot("gpu0", "a"), "gpu0-2": Slot("gpu0", "b")}
    run = Run(Deployment((dep("a", False, policy="manual"), dep("b", False, policy="manual"))), SharedMesh(slots))
    for _ in range(5):
        effects = run.tick({"a": 0.9, "b": 0.03})
        assert not [e for e in effects if isinstance(e, core.SetQuota)]


def test_coscale_in_a_deployment_file(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text('[[models]]\nname = "a"\npath = "/m/a"\ncoscale = true\n')
    assert load_deployment(f).models[0].coscale is True
    f.write_text('[[models]]\nname = "a"\npath = "/m/a"\ncoscale = "yes"\n')
    with pytest.raises(ConfigError, match="coscale must be true or false"):
        load_deployment(f)


def test_a_model_with_all_of_its_worker_still_gets_another_instance_under_lasting_pressure() -> None:
    slots = {"gpu0": Slot("gpu0", "a"), "gpu0-2": Slot("gpu0"), "gpu1": Slot("gpu1"), "gpu1-2": Slot("gpu1")}
    run = Run(Deployment((dep("a", True),)), SharedMesh(slots))
    for _ in range(6):
        run.tick({"a": 0.95})
    ups = [d for _, d in run.decisions("a") if d.action == "up"]
    assert len(ups) == 1 and ups[0].target_replicas == 2
    assert not run.quotas("a"), "alone on its worker there is no quota to raise"


def test_a_model_past_its_latency_slo_gets_quota_even_when_its_steps_look_light() -> None:
    shared = (SharedSlot("gpu0", "gpu0", "a", "gpu0", 1.0), SharedSlot("gpu0-2", "gpu0", "b", "gpu0-2", 1.0))
    instances = {"a": frozenset({"gpu0"}), "b": frozenset({"gpu0-2"})}
    for ratio, raised in ((0.9, False), (1.2, True)):
        cs = CoScaler.of((dep("a", True), dep("b", False)))
        for w, d in (("gpu0", 0.2), ("gpu0-2", 0.05)):
            cs.fold(InstanceMetrics(w, "x", ts=100.0, interval_s=1.0, running=1, steps=[StepStat(1, 10, 1000 * d)]))
        plan = cs.tick(shared, instances, {}, (), 100.0, 100.0, {"a": ratio})
        got = {o.worker: o.quota for o in plan.quotas}
        if raised:
            assert got["gpu0"] == pytest.approx(0.5 * ratio * 0.8 / 0.6, abs=0.01)  # r q high / target
            assert got["gpu0-2"] < 0.5
        else:
            assert not got, "demand 0.2 at quota 0.5 and latency within its SLO: nothing moves"


def test_the_core_reads_the_slo_from_a_two_stage_models_knobs() -> None:
    slots = {"gpu0": Slot("gpu0", "a"), "gpu0-2": Slot("gpu0", "b")}
    a = ModelDeployment("a", Path("/m/a"), 1, 1, policy="two-stage", knobs={"ttft_slo_ms": 100.0}, coscale=True)
    run = Run(Deployment((a, dep("b", False, policy="manual"))), SharedMesh(slots))
    for _ in range(3):
        assert not [e for e in run.tick({"a": 0.2, "b": 0.05}) if isinstance(e, core.SetQuota)]
    # A gateway reports a's first tokens at ~150 ms: 1.5 times its TTFT SLO.
    hist = [0] * (latency_bucket(150.0) + 1)
    hist[-1] = 20
    run.gateway.append(ModelMetrics("gw", "a", ts=run.now, interval_s=1.0, arrivals=20, completions=20, ttft_hist=hist))
    raised = [e for e in run.tick({"a": 0.2, "b": 0.05}) if isinstance(e, core.SetQuota) and e.model == "a"]
    assert raised and raised[0].quota > 0.5
    assert run.state.slo_ratio["a"] > 1.0


def test_status_says_which_models_co_scale_and_how_long_one_is_short() -> None:
    run = two_models()
    for _ in range(2):
        run.tick({"a": 0.9, "b": 0.03})
    detail = core.status(run.state, run.mesh.mesh(run.now))
    assert detail["coscale"]["models"] == ["a"]
    assert detail["coscale"]["short_for_s"] == {"a": 1.0}
