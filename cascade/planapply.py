"""Applying a placement plan to a running mesh (`cascade apply`, docs/placement.md). Pure: the
plan file and the mesh's worker rows (as `cascade status` merges them) in; what to ask, what is
missing and what to say out.

    plan = read_plan(json_doc)               # groups, their models and starting quotas
    problem = pool_problem(plan, slots)      # '' when the pool can hold it
    plan.targets()                           # model -> (instances, stages): the scaler's ApplyPlan
    progress(plan, slots)                    # model -> (complete instances serving, planned)
    quota_orders(plan, slots)                # SetQuota still to send (none once applied)

A plan's workers (`w0`..) are pool slots, not worker ids. A plan worker is one device: with
shared workers (`--slots N`) a process and its N instance slots, each slot a worker in the mesh;
a group's models share its devices, model by model on their own slots. The mesh binds slots to
devices when the loader places the instances (each pipelined instance on distinct devices); this
module reads the binding back from the heartbeats: the k-th serving instance of a model (by its
id) stands for the k-th plan group holding it, and gets that group's quota on each of its stages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cascade.config import ConfigError
from cascade.placement import plan_from_json

# A quota a heartbeat shows within this of the plan's counts as applied.
QUOTA_TOL = 1e-3


@dataclass(frozen=True, slots=True)
class PlannedGroup:
    index: int
    workers: tuple[str, ...]
    models: tuple[str, ...]
    quotas: Mapping[str, float]  # model -> its starting quota on each of the group's workers

    @property
    def stages(self) -> int:
        return len(self.workers)


@dataclass(frozen=True, slots=True)
class PlanTargets:
    groups: tuple[PlannedGroup, ...]

    def targets(self) -> dict[str, tuple[int, int]]:
        """Model -> (instances, stages): one pipelined instance per group holding it."""
        out: dict[str, tuple[int, int]] = {}
        for g in self.groups:
            for m in g.models:
                n, _ = out.get(m, (0, g.stages))
                out[m] = (n + 1, g.stages)
        return out

    def groups_of(self, model: str) -> list[PlannedGroup]:
        return [g for g in self.groups if model in g.models]


def read_plan(data: Mapping[str, Any]) -> PlanTargets:
    """A plan file (`cascade place --out`) as targets; ConfigError on anything it cannot apply.
    A model entry without `quota` gets an even share of its group."""
    plan = plan_from_json(data)  # the format's own checks
    groups: list[PlannedGroup] = []
    for g, raw in zip(plan.groups, data["groups"], strict=True):
        if len(set(g.models)) != len(g.models):
            raise ConfigError(f"plan group {len(groups)} names a model twice")
        quotas: dict[str, float] = {}
        for entry in raw["models"]:
            q = entry.get("quota", 1.0 / len(g.models))
            if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 1:
                raise ConfigError(
                    f"plan group {len(groups)}, model {entry['model']}: quota must be in (0, 1], got {q!r}"
                )
            quotas[str(entry["model"])] = float(q)
        if sum(quotas.values()) > 1 + QUOTA_TOL:
            raise ConfigError(f"plan group {len(groups)}: quotas sum to {sum(quotas.values()):g}, above one worker")
        names = tuple(str(w) for w in raw["workers"])
        groups.append(PlannedGroup(len(groups), names, g.models, quotas))
    stages = {m: {g.stages for g in groups if m in g.models} for g in groups for m in g.models}
    mixed = sorted(m for m, s in stages.items() if len(s) > 1)
    if mixed:
        raise ConfigError(f"the plan gives {', '.join(mixed)} instances of different stage counts")
    return PlanTargets(tuple(groups))


@dataclass(frozen=True, slots=True)
class MeshSlot:
    """One worker of the mesh (an instance slot; on a shared worker one of its process's)."""

    worker_id: str
    device: str  # the process it shares, or itself
    shared: bool
    state: str
    model: str | None
    group: str  # its pipelined instance ('' for a whole one)
    stage_start: int
    quota: float

    @property
    def instance(self) -> str:
        return self.group or self.worker_id


def mesh_slots(rows: Iterable[Mapping[str, Any]]) -> list[MeshSlot]:
    """The rows `cascade.cli.statusview.instances` gives, as slots."""
    out = []
    for r in rows:
        dev = str(r.get("shared_device") or "")
        out.append(
            MeshSlot(
                worker_id=str(r["worker_id"]),
                device=dev or str(r["worker_id"]),
                shared=bool(dev),
                state=str(r.get("state") or ""),
                model=r.get("model") or None,
                group=str(r.get("group") or ""),
                stage_start=int(r.get("stage_start") or 0),
                quota=float(r.get("quota") or 0.0),
            )
        )
    return sorted(out, key=lambda s: s.worker_id)


def pool_problem(plan: PlanTargets, slots: Iterable[MeshSlot]) -> str:
    """Why the mesh cannot hold the plan ('' when it can): each plan worker needs a device of its
    own with a free instance slot for every model its group holds. A slot is free when it is idle
    or already holds one of the plan's models (applying again, or after a partial apply)."""
    planned = set(plan.targets())
    free: dict[str, int] = {}
    for s in slots:
        free.setdefault(s.device, 0)
        if s.state == "idle" or (s.model in planned and s.state in ("loading", "serving")):
            free[s.device] += 1
    need = sorted((len(g.models) for g in plan.groups for _ in g.workers), reverse=True)
    have = sorted((n for n in free.values() if n > 0), reverse=True)
    if len(have) < len(need):
        return (
            f"the plan names {len(need)} worker(s); the mesh has {len(have)} worker process(es) with a free "
            f"instance slot ({len(free)} in all). Start more workers (`cascade up --workers N`) or plan for "
            f"this pool (`cascade place --workers {len(have)}`)"
        )
    short = [(n, h) for n, h in zip(need, have, strict=False) if h < n]
    if short:
        n, h = short[0]
        return (
            f"the plan puts {n} models on one worker; the mesh has {len(short)} worker(s) too few with {n} free "
            f"instance slots (the fullest free one has {h}). Start shared workers (`cascade worker --slots {n}`, "
            f"CASCADE_WORKER_SLOTS={n} cascade up) or free their slots"
        )
    return ""


def instances_of(slots: Iterable[MeshSlot], model: str, stages: int) -> dict[str, list[MeshSlot]]:
    """The model's complete serving instances of `stages` stages: instance id -> its stages in
    layer order."""
    by: dict[str, list[MeshSlot]] = {}
    for s in slots:
        if s.model == model and s.state == "serving":
            by.setdefault(s.instance, []).append(s)
    return {
        k: sorted(v, key=lambda s: s.stage_start)
        for k, v in sorted(by.items())
        if len(v) == stages and (stages == 1) == (not v[0].group)
    }


def progress(plan: PlanTargets, slots: Iterable[MeshSlot]) -> dict[str, tuple[int, int]]:
    """Model -> (complete instances serving, instances planned)."""
    rows = list(slots)
    return {m: (len(instances_of(rows, m, s)), n) for m, (n, s) in sorted(plan.targets().items())}


@dataclass(frozen=True, slots=True)
class QuotaOrder:
    worker: str
    model: str
    quota: float
    was: float
    group: int


def quota_orders(plan: PlanTargets, slots: Iterable[MeshSlot]) -> list[QuotaOrder]:
    """SetQuota orders that bring each planned instance on a shared worker to its group's quota
    (none when every heartbeat shows it already: applying twice sends nothing)."""
    rows = list(slots)
    out = []
    for model, (_, stages) in sorted(plan.targets().items()):
        mine = list(instances_of(rows, model, stages).values())
        for g, members in zip(plan.groups_of(model), mine, strict=False):
            q = g.quotas[model]
            for s in members:
                if s.shared and abs(s.quota - q) > QUOTA_TOL:
                    out.append(QuotaOrder(s.worker_id, model, q, s.quota, g.index))
    return out


def binding(plan: PlanTargets, slots: Iterable[MeshSlot]) -> tuple[list[str], list[str]]:
    """(one line per plan group: which devices its workers are now, warnings): a group whose
    models ended up on different devices for one plan worker is not co-located as planned."""
    rows = list(slots)
    by_model = {m: list(instances_of(rows, m, s).values()) for m, (_, s) in plan.targets().items()}
    taken = {m: 0 for m in by_model}
    lines, warnings = [], []
    for g in plan.groups:
        devices: list[set[str]] = [set() for _ in g.workers]
        for m in g.models:
            k = taken[m]
            taken[m] += 1
            if k < len(by_model[m]):
                for i, s in enumerate(by_model[m][k]):
                    devices[i].add(s.device)
        cells = [f"{w}={'/'.join(sorted(d)) or '?'}" for w, d in zip(g.workers, devices, strict=True)]
        lines.append(f"group {g.index}: {', '.join(cells)}: {', '.join(g.models)}")
        split = [w for w, d in zip(g.workers, devices, strict=True) if len(d) > 1]
        if split:
            warnings.append(
                f"group {g.index}: its models do not share {', '.join(split)} (the loader placed them on "
                "other idle workers): they run, but not co-located as planned"
            )
    return lines, warnings
