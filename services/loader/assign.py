"""Which workers carry out a scale decision. Pure: a mesh snapshot in, worker ids out.

The snapshot is the planner's (`planner.MeshSnapshot`), so the same view of the mesh serves the
choice of *targets* here and the choice of *sources and chain order* in the planner.

- up:   idle workers, least loaded first (an idle worker may still be finishing relayed work),
        then by id so the choice is reproducible;
- down: instances of the model, loading ones first (they serve nobody yet, and the worker
        cancels a load at once), then serving ones least loaded first (fewest requests to drain).
Workers already busy with another decision (`reserved`) are never chosen twice.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from cascade.workers import WorkerView
from services.loader.planner import MeshSnapshot


@dataclass(frozen=True, slots=True)
class Assignment:
    workers: tuple[str, ...]
    wanted: int

    @property
    def shortfall(self) -> int:
        return self.wanted - len(self.workers)


def _idle_targets(snapshot: MeshSnapshot, reserved: Collection[str], avoid: Collection[str]) -> list[WorkerView]:
    """Idle workers a scale-up may take, least loaded first, then by id.

    Not one whose heartbeat and readiness disagree: a worker that has just unloaded a model
    heart-beats idle before its readiness reset arrives, and meanwhile still shows the model's
    every unit, so the planner refuses it as a target that "already holds" the model. Seen in
    bench/burst.py: a scale-up 3-8 ms after a scale-down to zero failed so, and the model's retry
    delay held a wave at zero 1.1 s longer. The reset comes within moments (`wait_for_idle` waits
    for such changes)."""
    idle = [
        w
        for w in snapshot.workers
        if w.state == "idle" and w.consistent and w.worker_id not in reserved and w.worker_id not in avoid
    ]
    idle.sort(key=lambda w: (w.load, w.worker_id))
    return idle


def choose_for_up(
    snapshot: MeshSnapshot, count: int, reserved: Collection[str] = (), avoid: Collection[str] = ()
) -> Assignment:
    """`avoid`: workers the scaler backs off from for this model (they failed it lately)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    idle = _idle_targets(snapshot, reserved, avoid)
    return Assignment(tuple(w.worker_id for w in idle[:count]), count)


def choose_for_down(snapshot: MeshSnapshot, model: str, count: int, reserved: Collection[str] = ()) -> Assignment:
    if count < 1:
        raise ValueError("count must be at least 1")
    holders = [w for w in snapshot.workers if w.takes(model) and w.worker_id not in reserved]
    holders.sort(key=lambda w: (w.state != "loading", w.load, w.worker_id))
    return Assignment(tuple(w.worker_id for w in holders[:count]), count)


def describe(snapshot: MeshSnapshot) -> str:
    """The mesh in words, for an ack's error ("2 workers: 1 serving m, 1 loading m")."""
    if not snapshot.workers:
        return "no workers alive"
    counts: dict[str, int] = {}
    for w in snapshot.workers:
        key = w.state if w.model is None or w.state == "idle" else f"{w.state} {w.model}"
        counts[key] = counts.get(key, 0) + 1
    parts = [f"{n} {k}" for k, n in sorted(counts.items())]
    return f"{len(snapshot.workers)} worker(s): " + ", ".join(parts)


def choose_instances_for_down(
    snapshot: MeshSnapshot, model: str, count: int, reserved: Collection[str] = ()
) -> list[tuple[str, tuple[str, ...]]]:
    """Instances of `model` to remove, each as (instance id, its workers): a pipelined instance
    goes whole, every stage of it (a stage left behind serves nobody). The order is
    `choose_for_down`'s, per instance: loading ones first, then the least loaded (summed over
    its stages); an instance with a worker in `reserved` is not chosen."""
    if count < 1:
        raise ValueError("count must be at least 1")
    members: dict[str, list[str]] = {}
    loading: dict[str, bool] = {}
    load: dict[str, int] = {}
    for w in snapshot.workers:
        if w.model != model or w.state not in ("loading", "serving"):
            continue
        key = w.instance
        members.setdefault(key, []).append(w.worker_id)
        loading[key] = loading.get(key, False) or w.state == "loading"
        load[key] = load.get(key, 0) + w.load
    free = [k for k, ws in members.items() if not any(w in reserved for w in ws)]
    free.sort(key=lambda k: (not loading[k], load[k], k))
    return [(k, tuple(sorted(members[k]))) for k in free[:count]]


def choose_groups_for_up(
    snapshot: MeshSnapshot,
    count: int,
    stages: int,
    reserved: Collection[str] = (),
    avoid: Collection[str] = (),
) -> list[tuple[str, ...]]:
    """Up to `count` groups of `stages` idle workers, each group's stages on distinct devices
    (two stages of one instance on one shared worker would take turns on the same compute and
    pipeline nothing). Workers are taken least loaded first, then by id, as `choose_for_up`
    takes them, and never one in `avoid` (backed off for the model, as for a whole instance); a
    group that cannot be completed on distinct devices is not formed."""
    if count < 1 or stages < 1:
        raise ValueError("count and stages must be at least 1")
    idle = _idle_targets(snapshot, reserved, avoid)
    groups: list[tuple[str, ...]] = []
    while len(groups) < count:
        group: list[str] = []
        devices: set[str] = set()
        for w in idle:
            if w.device not in devices:
                group.append(w.worker_id)
                devices.add(w.device)
                if len(group) == stages:
                    break
        if len(group) < stages:
            break
        groups.append(tuple(group))
        idle = [w for w in idle if w.worker_id not in group]
    return groups
