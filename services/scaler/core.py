"""The scaler as one pure core: what it knows is a `ScalerState`, what happens is an input, what
it does is a list of effects.

    state = new_state(deployment, settings, now)
    state, effects = tick(state, inputs, now)       # every tick: metrics, acks, the mesh in
    reply, effects = set_target(state, request, mesh, now)   # `cascade scale`
    reply, effects = configure(state, request, now)          # `cascade deploy`

No I/O and no clock: `now` carries both the scaler's own clock (`mono`: timers, ack deadlines,
back-off) and the wall clock (`wall`: the senders' metric timestamps, decision timestamps). The
NATS adapter (main.py) queues what arrives between ticks and carries out the effects; the
simulator drives the same functions with modelled time. (Dynamo's planner core and Ray Serve's
`autoscaling_policy` are the models: decisions as functions of a snapshot, effects out.)

A tick, per model, in name order:
1. fold the metrics that arrived into the model's signal window; forget instance loads of
   workers that hold another model now or are gone;
2. run the model's policy (`controls.Controls.evaluate`) on its signals: its target and reason go
   into the replica book unless a decision is in flight; a silent policy's target follows what
   runs; a new batch limit becomes `SetLimit` effects for the model's instances;
2b. the models with `coscale = true` on shared workers (quotas.py): quota changes become
   `SetQuota` effects, an instance the policy adds or removes a target one above or below what
   runs (their own policy's target is not used meanwhile);
3. the replica book (`replicas.ReplicaBook.tick`) turns every gap into at most one
   `ScaleDecision` per model, bounded by the idle pool, lending instances between models when the
   pool is empty; decisions whose ack never came expire and are retried after a back-off.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cascade.config import Deployment, ModelDeployment
from cascade.messages import (
    ApplyPlan,
    DeployReply,
    DeployRequest,
    InstanceMetrics,
    ModelMetrics,
    Ok,
    PlanApplied,
    ScaleAck,
    ScaleDecision,
    ScaleRequest,
)
from cascade.scalefailures import reason_kind
from services.scaler.backoff import DEFAULT_BASE_S as DEFAULT_BACKOFF_S
from services.scaler.backoff import DEFAULT_MAX_S as DEFAULT_BACKOFF_MAX_S
from services.scaler.backoff import Backoff
from services.scaler.controls import Controls, UnknownModel
from services.scaler.policies import KnobError
from services.scaler.quotas import CoScaler, SharedSlot
from services.scaler.replicas import ModelBounds, Pool, ReplicaBook, Settings, TargetError
from services.scaler.signals import LoadSignals

__all__ = [
    "Effect",
    "Inputs",
    "Mesh",
    "Note",
    "Now",
    "Publish",
    "ScalerState",
    "SetLimit",
    "SetQuota",
    "SharedSlot",
    "apply_plan",
    "configure",
    "new_state",
    "set_target",
    "status",
    "tick",
]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Now:
    mono: float  # the scaler's own clock: timers, ack deadlines, back-off
    wall: float  # wall clock: metric windows (the senders' timestamps) and decision timestamps


@dataclass(frozen=True, slots=True)
class Mesh:
    """The workers as the shared worker table shows them at the tick."""

    instances: Mapping[str, frozenset[str]] = field(default_factory=dict)  # model → loading or serving
    idle: frozenset[str] = frozenset()
    loading: Mapping[str, int] = field(default_factory=dict)  # model → still loading
    holding: Mapping[str, str | None] = field(default_factory=dict)  # live worker → its model (None: none)
    # Serving instances on shared workers, with their quotas (what co-scaling reads).
    shared: tuple[SharedSlot, ...] = ()


@dataclass(frozen=True, slots=True)
class Inputs:
    """What reached the scaler since the last tick."""

    mesh: Mesh = field(default_factory=Mesh)
    metrics: Sequence[ModelMetrics | InstanceMetrics] = ()
    acks: Sequence[ScaleAck] = ()
    workers_lost: Collection[str] = ()
    # A loader (re)started: decisions it may never have heard are dropped, to be re-decided.
    loader_up: str | None = None
    # The decisions that loader says it carries out (taken over as in flight, see ReplicaBook.resume).
    resumed: Sequence[ScaleDecision] = ()


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish this decision (to the loader and anyone tapping the mesh)."""

    decision: ScaleDecision


@dataclass(frozen=True, slots=True)
class SetLimit:
    """Ask `worker` to run `model` at batch limit `limit` (0: back to its own)."""

    worker: str
    model: str
    limit: int
    decision_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetQuota:
    """Ask `worker` (an instance on a shared worker) to run `model` at compute quota `quota`."""

    worker: str
    model: str
    quota: float
    decision_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line (the adapter logs it; the simulator may record it)."""

    event: str
    fields: dict[str, Any]
    level: Literal["info", "warning"] = "info"


@dataclass(frozen=True, slots=True)
class Announce:
    """Tell every service the deployment changed (and keep it where a restart reads it)."""

    deployment: Deployment
    added: tuple[str, ...]


Effect = Publish | SetLimit | Note | Announce | SetQuota


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class ScalerState:
    book: ReplicaBook
    controls: Controls
    scaler_id: str
    vertical_seq: int = 0
    # Why no decision could be made at the last tick (logged when it changes).
    held_back: str | None = None
    # Workers that failed a model lately, avoided for it for a while (backoff.py).
    backoff: Backoff = field(default_factory=Backoff)
    # 2-D co-scaling of the models that ask for it (quotas.py).
    coscale: CoScaler = field(default_factory=lambda: CoScaler({}))
    quota_seq: int = 0
    # Model → its p95 latency over its SLO at the last tick (> 1: the SLO is missed), for models
    # whose policy has latency SLOs (two-stage's ttft_slo_ms, tbt_slo_ms).
    slo_ratio: dict[str, float] = field(default_factory=dict)
    ticks: int = 0  # ticks run so far (status: a caller waits for one past its request)


def new_state(
    deployment: Deployment,
    settings: Settings,
    now: Now,
    scaler_id: str = "scaler",
    window_s: float = 30.0,
    rate_window_s: float = 10.0,
    stale_s: float = 5.0,
    id_prefix: str | None = None,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> ScalerState:
    """Parse every model's policy and knobs now: a bad deployment fails at start (KnobError).
    `id_prefix` starts every decision id (default `scaler_id`); the service makes it unique per
    start, so that a restarted scaler's ids never repeat one a loader has already seen."""
    controls = Controls(deployment, window_s=window_s, rate_window_s=rate_window_s, stale_s=stale_s)
    bounds = {m.name: ModelBounds(m.min_replicas, m.max_replicas, m.stages) for m in deployment.models}
    # Every model starts from what runs once the warm-up ends (see ReplicaBook.adopt).
    book = ReplicaBook(bounds, settings, now.mono, id_prefix=id_prefix or scaler_id, adopt=list(bounds))
    return ScalerState(
        book,
        controls,
        scaler_id,
        coscale=CoScaler.of(deployment.models, stale_s=stale_s),
        backoff=Backoff(base_s=backoff_s, max_s=max(DEFAULT_BACKOFF_MAX_S, backoff_s)),
    )


# --------------------------------------------------------------------------- the tick


def tick(state: ScalerState, inputs: Inputs, now: Now) -> tuple[ScalerState, list[Effect]]:
    effects: list[Effect] = []
    book, controls = state.book, state.controls
    state.ticks += 1
    if inputs.loader_up is not None:
        dropped = book.loader_ready()
        taken = [d.decision_id for d in inputs.resumed if book.resume(d, now.mono)]
        effects.append(
            Note(
                "loader_seen",
                {
                    "loader": inputs.loader_up,
                    "dropped": [f.decision.decision_id for f in dropped if f.decision.decision_id not in taken],
                    "resumed": taken,
                },
            )
        )
    for ack in inputs.acks:
        effects += _ack(book, ack, now)
        for w, e in zip(
            sorted(ack.failed), state.backoff.on_ack(ack.model, ack.workers, ack.failed, now.mono), strict=True
        ):
            effects.append(
                Note(
                    "worker_backed_off",
                    {
                        "model": ack.model, "worker": w, "failures": e.failures,
                        "retry_in_s": round(e.until - now.mono, 1), "kind": e.kind, "reason": e.reason,
                    },
                    "warning",
                )
            )  # fmt: skip
    # After the acks: one that came just before its worker died counts it no longer.
    book.workers_lost(inputs.workers_lost)
    for m in inputs.metrics:
        controls.fold(m)
        if isinstance(m, InstanceMetrics):
            state.coscale.fold(m)
    controls.sync_workers(inputs.mesh.holding, inputs.workers_lost)

    mesh = inputs.mesh
    book.adopt(now.mono, mesh.instances)
    # Before the policies look: a down whose workers drain no longer holds their model's decisions.
    book.park_drains(now.mono, mesh.instances)
    needs: dict[str, int] = {}
    governed = state.coscale.governed(mesh.shared)
    for model in sorted(controls.models):
        need, more = _evaluate(state, model, mesh, now, policy_targets=model not in governed)
        if need is not None:
            needs[model] = need
        effects += more
    effects += _coscale(state, mesh, now)
    for model in sorted(controls.models):
        # Too few idle workers are free of a back-off for this model (one per stage of an
        # instance): its next up waits until enough are, rather than going out (and failing)
        # again every tick.
        b = book.bounds.get(model)
        until = state.backoff.hold_until(model, mesh.idle, now.mono, need=b.stages if b is not None else 1)
        if until is not None and book.targets.get(model, 0) > book.current(model, mesh.instances, now.mono):
            book.hold(model, until)
    result = book.tick(now.mono, mesh.instances, Pool(mesh.idle, needs), wall=now.wall)
    for f in result.expired:
        effects.append(
            Note(
                "scale_ack_timeout",
                {
                    "decision_id": f.decision.decision_id,
                    "model": f.decision.model,
                    "waited_s": round(now.mono - f.sent_at, 1),
                    "retry_in_s": round((book.retry_at(f.decision.model) or now.mono) - now.mono, 1),
                },
                "warning",
            )
        )
    for d in result.decisions:
        # The policy in force names the decision on the wire (metrics count by it); the book
        # that made it knows targets, not policies.
        d = replace(d, policy="coscale" if d.model in governed else controls.get(d.model).policy.name)
        if d.action == "up":
            d = replace(d, avoid=sorted(state.backoff.avoided(d.model, now.mono)))
        effects.append(Publish(d))
        effects.append(
            Note(
                "scale_decision",
                {
                    "decision_id": d.decision_id, "model": d.model, "action": d.action, "count": d.count,
                    "target": d.target_replicas, "reason": d.reason,
                },
            )
        )  # fmt: skip
    if result.held_back != state.held_back:
        state.held_back = result.held_back
        if result.held_back:
            effects.append(Note("holding_back", {"reason": result.held_back}))
    return state, effects


def _evaluate(
    state: ScalerState, model: str, mesh: Mesh, now: Now, policy_targets: bool = True
) -> tuple[int | None, list[Effect]]:
    """Run one model's policy: its target (and reason) into the book, a new batch limit noted;
    returns the model's need and the effects (batch-limit orders, notes). Without
    `policy_targets` (a co-scaled model) the policy runs but its target is not used."""
    book, controls = state.book, state.controls
    effects: list[Effect] = []
    current = book.current(model, mesh.instances, now.mono)
    loading = min(mesh.loading.get(model, 0), current)
    in_flight = model in book.in_flight
    ev = controls.evaluate(
        model, now.wall, serving=current - loading, loading=loading, idle_pool=len(mesh.idle), in_flight=in_flight
    )
    t = ev.target
    c = controls.get(model)
    state.slo_ratio[model] = _slo_ratio(c.knobs, ev.signals)
    # Until the warm-up ends the instance counts are not the whole mesh yet: the policy runs (its
    # timers and fits go on) but its targets wait.
    ready = book.ready(now.mono) and policy_targets
    wants = t is not None and t.target_replicas != current
    if ready and wants and not in_flight and t is not None:
        b = book.bounds[model]
        target = max(b.min_replicas, min(b.max_replicas, t.target_replicas))
        if target != book.targets[model]:
            previous = book.set_target(model, target, reason=t.reason, figures=t.figures)
            effects.append(
                Note(
                    "policy_target",
                    {"model": model, "target": target, "previous": previous, "current": current, "reason": t.reason},
                )
            )
    elif ready and not wants and c.policy.name != "manual":
        book.follow(model, current)
    if ev.limit_changed:
        state.vertical_seq += 1
        c.limit_decision = f"{state.scaler_id}-v{state.vertical_seq}"
        effects.append(
            Note(
                "batch_limit_decision",
                {
                    "model": model, "decision_id": c.limit_decision, "limit": c.batch_limit, "reason": c.limit_reason,
                    "figures": t.figures if t is not None else {},
                },
            )
        )  # fmt: skip
    for worker, limit in controls.limit_orders(ev.signals, now.wall):
        effects.append(SetLimit(worker, model, limit, c.limit_decision, c.limit_reason))
    return ev.need, effects


def _coscale(state: ScalerState, mesh: Mesh, now: Now) -> list[Effect]:
    """The co-scaled models' quotas first, instances second (quotas.py, coscale.py): quota orders
    become SetQuota effects, an added or removed instance a replica target one above or below what
    runs, which the book turns into a decision as any target."""
    book = state.book
    plan = state.coscale.tick(
        mesh.shared, mesh.instances, mesh.loading, book.in_flight, now.mono, now.wall, state.slo_ratio
    )
    effects: list[Effect] = []
    for o in plan.quotas:
        state.quota_seq += 1
        did = f"{state.scaler_id}-q{state.quota_seq}"
        effects.append(SetQuota(o.worker, o.model, o.quota, did, o.reason))
        effects.append(
            Note(
                "quota_decision",
                {"decision_id": did, "worker": o.worker, "model": o.model, "quota": o.quota, "reason": o.reason},
            )
        )
    if not book.ready(now.mono):
        return effects
    moves = [(a.model, 1, a.reason) for a in plan.add] + [(r.model, -1, r.reason) for r in plan.remove]
    for model, step, reason in moves:
        if model in book.in_flight or model not in book.bounds:
            continue
        b = book.bounds[model]
        current = book.current(model, mesh.instances, now.mono)
        target = max(b.min_replicas, min(b.max_replicas, current + step))
        if target == book.targets[model]:
            continue
        previous = book.set_target(model, target, reason=f"coscale: {reason}")
        effects.append(
            Note(
                "policy_target",
                {"model": model, "target": target, "previous": previous, "current": current, "reason": reason},
            )
        )
    return effects


def _slo_ratio(knobs: Any, s: LoadSignals) -> float:
    """How far the model's p95 TTFT and inter-token gap are past its SLOs (the larger ratio; 0 when
    its policy has no SLO or nothing was measured)."""
    out = 0.0
    for stats, slo in ((s.ttft, getattr(knobs, "ttft_slo_ms", 0.0)), (s.itl, getattr(knobs, "tbt_slo_ms", 0.0))):
        if slo and stats.count:
            out = max(out, stats.p95_ms / slo)
    return out


def lost_only(ack: ScaleAck) -> bool:
    """A failed ack whose every failure is a worker that died mid-way (its process killed, its
    heartbeats stopped): nothing the model did. The dead workers are out of the idle pool, and
    each is backed off for the model should it come back (`Backoff`), so the lost capacity is
    asked for again at once: a model-wide retry delay would only add to the recovery."""
    parts = [p for p in ack.error.split("; ") if p]
    return not ack.ok and bool(ack.failed) and bool(parts) and all(reason_kind(p) == "worker_lost" for p in parts)


def _ack(book: ReplicaBook, ack: ScaleAck, now: Now) -> list[Effect]:
    d = book.on_ack(ack.decision_id, ack.ok, ack.workers, now.mono, back_off=not lost_only(ack))
    if d is None:
        return []  # another scaler's decision, or one from before a restart
    fields: dict[str, Any] = {"decision_id": ack.decision_id, "model": ack.model, "action": d.action}
    if ack.ok:
        return [Note("scale_done", {**fields, "workers": ack.workers})]
    retry_in = round((book.retry_at(d.model) or now.mono) - now.mono, 1)
    return [
        Note("scale_failed", {**fields, "workers": ack.workers, "error": ack.error, "retry_in_s": retry_in}, "warning")
    ]


# --------------------------------------------------------------------------- operator requests


def set_target(state: ScalerState, req: ScaleRequest, mesh: Mesh, now: Now) -> tuple[Ok, list[Effect]]:
    """`cascade scale`: an operator's replica target. Raises TargetError when it cannot be set."""
    book = state.book
    previous = book.set_target(req.model, req.replicas)
    current = book.current(req.model, mesh.instances, now.mono)
    policy = state.controls.get(req.model).policy.name
    note = "" if policy == "manual" else f"; policy {policy} manages it and may change it"
    wanted, idle = req.replicas - current, len(mesh.idle)
    if wanted > idle:
        # Accepted all the same: the scaler keeps the target and starts instances as workers
        # join the pool (or another model lends one), so say what happens meanwhile.
        note += (
            f". Only {idle} idle worker(s) for {wanted} more instance(s): {idle + current} will run, and "
            f"{wanted - idle} will start when workers join (`cascade up --workers N`, "
            "`docker compose up --scale worker=N`) or another model gives one back"
        )
    ok = Ok(f"{req.model}: target {req.replicas} replicas (was {previous}); {current} running now{note}")
    return ok, [Note("target_set", {"model": req.model, "replicas": req.replicas, "previous": previous})]


def configure(state: ScalerState, req: DeployRequest, now: Now) -> tuple[DeployReply, list[Effect]]:
    """`cascade deploy`: a model's policy and knobs, changed (or just read). Raises UnknownModel or
    KnobError, and nothing changes then."""
    controls = state.controls
    before = controls.get(req.model).policy.name
    r = controls.configure(req.model, now.wall, req.policy, req.knobs, req.replace_knobs)
    c = r.control
    effects: list[Effect] = []
    if r.changed:
        effects.append(
            Note(
                "policy_set",
                {
                    "model": req.model, "policy": c.policy.name, "previous": before, "knobs": c.knobs_set,
                    "batch_limit": c.batch_limit,
                },
            )
        )  # fmt: skip
        # Instances of a model that left a vertical policy go back to their own batch limit.
        effects += [SetLimit(w, req.model, 0, "", f"policy {c.policy.name}") for w in r.restore]
    b = state.book.bounds[req.model]
    reply = DeployReply(
        model=req.model,
        policy=c.policy.name,
        knobs=dict(c.knobs_set),
        effective=c.policy.effective_knobs(c.knobs),
        min_replicas=b.min_replicas,
        max_replicas=b.max_replicas,
        target_replicas=state.book.targets[req.model],
        changed=r.changed,
        batch_limit=c.batch_limit or 0,
    )
    return reply, effects


def apply_plan(state: ScalerState, req: ApplyPlan, mesh: Mesh, now: Now) -> tuple[PlanApplied, list[Effect]]:
    """`cascade apply`: each planned model's instance count becomes its floor and target
    (min_replicas = target = instances; max_replicas raised to it when below) and its stage count
    the plan's, so neither a load policy nor co-scaling releases below the plan; the book turns the
    gaps into decisions at the next tick. A stage count can change only while the model runs no
    instance (a running instance of the old shape would count as one of the new). Checked whole
    first: raises UnknownModel or TargetError and nothing changes. Applying the same plan again
    changes nothing and leads to no decision."""
    controls, book = state.controls, state.book
    seen: set[str] = set()
    knobs: dict[str, Any] = {}
    for p in req.models:
        c = controls.get(p.model)
        dep = c.deployment
        if p.model in seen:
            raise TargetError("bad_plan", f"the plan names {p.model} twice")
        seen.add(p.model)
        if p.instances < 0 or p.stages < 1:
            raise TargetError("bad_plan", f"{p.model}: {p.instances} instance(s) of {p.stages} stage(s)")
        running = book.current(p.model, mesh.instances, now.mono) + (1 if p.model in book.in_flight else 0)
        if p.stages != dep.stages and running:
            raise TargetError(
                "bad_plan",
                f"{p.model} runs instances of {dep.stages} stage(s) and the plan wants {p.stages}: scale it to 0 "
                f"first (`cascade scale {p.model} --replicas 0`; min_replicas is {dep.min_replicas}), then apply again",
            )
        try:
            knobs[p.model] = c.policy.knobs(c.knobs_set, p.instances, max(dep.max_replicas, p.instances))
        except KnobError as e:
            raise TargetError("bad_plan", f"{p.model}: its policy cannot take the plan's count: {e}") from None
    changed: list[str] = []
    lines: list[str] = []
    deployment = controls.deployment
    for p in req.models:
        c = controls.get(p.model)
        dep = c.deployment
        new = replace(
            dep,
            min_replicas=p.instances,
            max_replicas=max(dep.max_replicas, p.instances),
            stages=p.stages,
            stage_layers=dep.stage_layers if p.stages == dep.stages else (),
        )
        moved = new != dep or book.targets[p.model] != p.instances
        if new != dep:
            c.deployment = new
            c.knobs = knobs[p.model]
            deployment = Deployment(tuple(new if m.name == p.model else m for m in deployment.models))
            book.bounds[p.model] = ModelBounds(new.min_replicas, new.max_replicas, new.stages)
            if p.model in state.coscale.models:
                state.coscale.models[p.model] = new
        if book.targets[p.model] != p.instances:
            book.set_target(p.model, p.instances)
        current = book.current(p.model, mesh.instances, now.mono)
        what = "changed" if moved else "unchanged"
        lines.append(
            f"{p.model}: {what}: {p.instances} instance(s) of {p.stages} stage(s) "
            f"(min {new.min_replicas}, max {new.max_replicas}); {current} running now"
        )
        if moved:
            changed.append(p.model)
    effects: list[Effect] = [
        Note("plan_applied", {"plan": req.plan, "changed": changed, "models": [p.model for p in req.models]})
    ]
    if deployment != controls.deployment:
        controls.deployment = deployment
        # The loader reads a model's stage count from its deployment when it places an instance.
        effects.append(Announce(deployment, ()))
    return PlanApplied(changed, lines), effects


class ModelExists(ValueError):
    """`cascade deploy --model` named a model already deployed from another folder."""


def add_model(state: ScalerState, dep: ModelDeployment, now: Now) -> tuple[DeployReply, list[Effect]]:
    """`cascade deploy NAME --model X`: a new model, scaled from now on like the deployment's own.
    Deploying the same model again (same name and folder) changes nothing. Raises ModelExists or
    KnobError, and nothing changes then."""
    controls, book = state.controls, state.book
    known = controls.models.get(dep.name)
    if known is not None:
        if known.deployment.path != dep.path:
            raise ModelExists(
                f"{dep.name!r} is deployed already (from {known.deployment.path}); "
                "give the new one another name (--served-model-name)"
            )
        return configure(state, DeployRequest(dep.name), now)
    c = controls.add(dep)
    state.coscale.add_model(dep)
    bounds = ModelBounds(dep.min_replicas, dep.max_replicas, dep.stages)
    book.add_model(dep.name, bounds, adopt=c.policy.name != "manual")
    reply, effects = configure(state, DeployRequest(dep.name), now)
    fields = {"model": dep.name, "path": str(dep.path), "min_replicas": dep.min_replicas, "policy": dep.policy}
    return replace(reply, changed=True), [
        *effects,
        Note("model_added", fields),
        Announce(controls.deployment, (dep.name,)),
    ]


def status(state: ScalerState, mesh: Mesh, now: Now | None = None) -> dict[str, Any]:
    detail = state.book.status()
    detail["ticks"] = state.ticks
    if now is not None:
        detail["backoff"] = state.backoff.status(now.mono)
    detail["instances"] = {m: len(ws) for m, ws in mesh.instances.items()}
    detail["idle_pool"] = len(mesh.idle)
    detail["policies"] = state.controls.describe()
    if state.coscale.models:
        detail["coscale"] = state.coscale.describe()
    return detail


# Errors the request functions raise, for the adapter to answer with.
REQUEST_ERRORS = (TargetError, UnknownModel, KnobError)
