"""Per-model scaling control: which policy runs a model, its knobs and state, its signal window and
the batch limit its instances should run at. Pure: every call carries its own time.

    controls = Controls(deployment)
    controls.fold(metrics)                                 # ModelMetrics / InstanceMetrics
    ev = controls.evaluate(model, now, serving=.., loading=.., idle_pool=.., in_flight=..)
    ev.target, ev.need                                     # → ReplicaBook targets and Pool.needs
    controls.limit_orders(ev.signals, now)                 # → SetBatchLimit to send
    controls.configure(model, policy, knobs)               # the admin API

The scaler's core (core.py) composes these with the replica book; main.py does the talking.
Changing a model's policy starts the new one from its initial state (its timers and fitted models
belong to the old one); changing only knobs keeps the state, so a tweak does not forget what was
measured.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from cascade.config import Deployment, ModelDeployment
from cascade.messages import InstanceMetrics, ModelMetrics
from services.scaler.policies import KnobError, Policy, Target, get_policy
from services.scaler.signals import LoadSignals, SignalWindow

# A batch-limit order that has not shown up in the worker's metrics after this long is sent again.
DEFAULT_LIMIT_RESEND_S = 5.0


class UnknownModel(KeyError):
    """A model that is not in the deployment."""


@dataclass(slots=True)
class ModelControl:
    deployment: ModelDeployment
    policy: Policy
    knobs_set: dict[str, float]  # as configured (file or admin API); defaults not filled in
    knobs: Any
    state: Any
    window: SignalWindow
    # The limit the model's instances should run at (vertical policies), else None: each worker
    # keeps its own.
    batch_limit: int | None = None
    limit_reason: str = ""
    limit_decision: str = ""
    need: int | None = None
    last_reason: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "knobs": dict(self.knobs_set),
            "batch_limit": self.batch_limit,
            "need": self.need,
            "last_reason": self.last_reason,
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    model: str
    signals: LoadSignals
    target: Target | None
    need: int | None
    limit_changed: bool = False


@dataclass(frozen=True, slots=True)
class Reconfigured:
    control: ModelControl
    changed: bool
    # Instances to put back on their own batch limit (the model left a vertical policy).
    restore: tuple[str, ...] = ()


@dataclass(slots=True)
class _Sent:
    limit: int
    at: float


@dataclass
class Controls:
    deployment: Deployment
    window_s: float = 30.0
    rate_window_s: float = 10.0
    stale_s: float = 5.0
    limit_resend_s: float = DEFAULT_LIMIT_RESEND_S
    models: dict[str, ModelControl] = field(init=False)
    _sent: dict[str, _Sent] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        """Parse every model's policy and knobs now: a bad deployment fails at start (KnobError)."""
        self.models = {dep.name: self._control(dep) for dep in self.deployment.models}

    def _control(self, dep: ModelDeployment) -> ModelControl:
        policy = get_policy(dep.policy)
        knobs = policy.knobs(dep.knobs, dep.min_replicas, dep.max_replicas)
        return ModelControl(
            deployment=dep,
            policy=policy,
            knobs_set=dict(dep.knobs),
            knobs=knobs,
            state=policy.initial_state(),
            window=SignalWindow(dep.name, self.window_s, self.rate_window_s, self.stale_s),
            batch_limit=policy.base_batch_limit(knobs),
        )

    def add(self, dep: ModelDeployment) -> ModelControl:
        """A model deployed at run time; KnobError (and nothing changes) when its policy or knobs
        cannot be used."""
        c = self._control(dep)
        self.models[dep.name] = c
        self.deployment = self.deployment.with_model(dep)
        return c

    def get(self, model: str) -> ModelControl:
        c = self.models.get(model)
        if c is None:
            raise UnknownModel(model)
        return c

    # ---- signals -----------------------------------------------------------
    def fold(self, m: ModelMetrics | InstanceMetrics) -> bool:
        """Fold one metrics message into its model's window; False for a model not deployed."""
        c = self.models.get(m.model)
        if c is None:
            return False
        if isinstance(m, ModelMetrics):
            c.window.add_model_metrics(m)
        else:
            c.window.add_instance_metrics(m)
        return True

    def sync_workers(self, holding: Mapping[str, str | None], lost: Collection[str] = ()) -> None:
        """`holding`: live workers known by their heartbeats and the model each holds (None:
        none); `lost`: workers gone. An instance's load counts only for the model its worker holds
        now (it unloaded, took another, or died). A worker not heard of yet keeps what it reports."""
        for name, c in self.models.items():
            for w in c.window.instance_ids():
                if w in lost or (w in holding and holding[w] != name):
                    c.window.forget_instance(w)
        for w in list(self._sent):
            if w in lost or (w in holding and holding[w] is None):
                self._sent.pop(w, None)

    # ---- the tick ------------------------------------------------------------
    def evaluate(
        self, model: str, now: float, *, serving: int, loading: int, idle_pool: int, in_flight: bool
    ) -> Evaluation:
        """Run the model's policy on its signals at `now` (wall clock, as the metrics' `ts`)."""
        c = self.get(model)
        s = c.window.snapshot(now, idle_pool=idle_pool, decision_in_flight=in_flight, serving=serving, loading=loading)
        target, c.state = c.policy.decide(s, c.knobs, c.state)
        c.need = c.policy.need(s, c.knobs, c.state)
        changed = False
        if target is not None:
            c.last_reason = target.reason
            if target.batch_limit is not None and target.batch_limit != c.batch_limit:
                c.batch_limit = target.batch_limit
                c.limit_reason = target.reason
                changed = True
        return Evaluation(model, s, target, c.need, changed)

    def limit_orders(self, signals: LoadSignals, now: float) -> list[tuple[str, int]]:
        """(worker, limit) for each instance of the model not at the limit the policy wants,
        bounded by the instance's KV slots. An order is not repeated until `limit_resend_s` has
        passed without the worker's metrics showing it (a lost request, a worker that restarted)."""
        c = self.get(signals.model)
        if c.batch_limit is None:
            return []
        out = []
        for inst in signals.instances:
            if inst.state not in ("serving", "loading"):
                continue
            want = min(c.batch_limit, inst.kv_slots) if inst.kv_slots > 0 else c.batch_limit
            if inst.max_batch == want:
                continue
            sent = self._sent.get(inst.worker_id)
            if sent is not None and sent.limit == want and now - sent.at < self.limit_resend_s:
                continue
            self._sent[inst.worker_id] = _Sent(want, now)
            out.append((inst.worker_id, want))
        return out

    # ---- the admin API -----------------------------------------------------
    def configure(
        self,
        model: str,
        now: float,
        policy: str = "",
        knobs: Mapping[str, float] | None = None,
        replace: bool = False,
    ) -> Reconfigured:
        """Set a model's policy and/or knobs at `now` (KnobError when they cannot be used; nothing
        changes then). Knobs merge into the current ones unless the policy changes or `replace`
        is set."""
        c = self.get(model)
        new_policy = get_policy(policy) if policy else c.policy
        switching = new_policy is not c.policy
        base: dict[str, float] = {} if switching or replace else dict(c.knobs_set)
        given = {str(k): float(v) for k, v in (knobs or {}).items()}
        for k, v in given.items():
            if not math.isfinite(v):
                raise KnobError(f"policy {new_policy.name}: knob {k} must be a finite number, got {v}")
        merged = {**base, **given}
        dep = c.deployment
        parsed = new_policy.knobs(merged, dep.min_replicas, dep.max_replicas)
        changed = switching or merged != c.knobs_set
        if not changed:
            return Reconfigured(c, False)
        restore: tuple[str, ...] = ()
        if switching:
            if c.policy.vertical and not new_policy.vertical:
                restore = tuple(i.worker_id for i in c.window.snapshot(now).instances)
                for w in restore:
                    self._sent.pop(w, None)
            c.policy = new_policy
            c.state = new_policy.initial_state()
            c.batch_limit = new_policy.base_batch_limit(parsed)
            c.limit_reason = f"policy {new_policy.name}" if c.batch_limit is not None else ""
            c.last_reason = ""
        elif c.policy.vertical and c.batch_limit == c.policy.base_batch_limit(c.knobs):
            # Not raised by a surge: a new base batch applies at once.
            c.batch_limit = c.policy.base_batch_limit(parsed)
        c.knobs_set = merged
        c.knobs = parsed
        return Reconfigured(c, True, restore)

    def describe(self) -> dict[str, dict[str, Any]]:
        return {name: c.describe() for name, c in sorted(self.models.items())}
