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

from cascade.messages import Heartbeat
from services.loader.planner import MeshSnapshot, WorkerView


@dataclass(frozen=True, slots=True)
class Assignment:
    workers: tuple[str, ...]
    wanted: int

    @property
    def shortfall(self) -> int:
        return self.wanted - len(self.workers)


def fully_serving(w: WorkerView, model: str) -> bool:
    """The protocol's "serves the model fully": every unit ready and state serving."""
    return w.state == "serving" and w.model == model and w.num_units > 0 and w.units_ready == w.num_units


def choose_for_up(snapshot: MeshSnapshot, count: int, reserved: Collection[str] = ()) -> Assignment:
    if count < 1:
        raise ValueError("count must be at least 1")
    idle = [w for w in snapshot.workers if w.state == "idle" and w.worker_id not in reserved]
    idle.sort(key=lambda w: (w.load, w.worker_id))
    return Assignment(tuple(w.worker_id for w in idle[:count]), count)


def choose_for_down(snapshot: MeshSnapshot, model: str, count: int, reserved: Collection[str] = ()) -> Assignment:
    if count < 1:
        raise ValueError("count must be at least 1")
    holders = [
        w
        for w in snapshot.workers
        if w.model == model and w.state in ("loading", "serving") and w.worker_id not in reserved
    ]
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


def view_of(hb: Heartbeat) -> WorkerView:
    return WorkerView(
        worker_id=hb.worker_id,
        state=hb.state,
        model=hb.model,
        units_ready=hb.units_ready,
        num_units=hb.num_units,
        running=hb.running,
        waiting=hb.waiting,
        data_addr=hb.data_addr,
    )


class WorkerTable:
    """Workers by their latest heartbeat, with the time passed in. A worker that misses
    `dead_after_missed` heartbeats is gone (the protocol's rule)."""

    def __init__(self, heartbeat_s: float, dead_after_missed: int = 3) -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be above 0")
        self.dead_after_s = heartbeat_s * dead_after_missed
        self._seen: dict[str, tuple[WorkerView, float]] = {}

    def observe(self, hb: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True if the worker is new to the table."""
        new = hb.worker_id not in self._seen
        self._seen[hb.worker_id] = (view_of(hb), now)
        return new

    def prune(self, now: float) -> list[str]:
        dead = [w for w, (_, at) in self._seen.items() if now - at > self.dead_after_s]
        for w in dead:
            del self._seen[w]
        return dead

    def get(self, worker_id: str, now: float) -> WorkerView | None:
        entry = self._seen.get(worker_id)
        if entry is None or now - entry[1] > self.dead_after_s:
            return None
        return entry[0]

    def snapshot(self, now: float) -> MeshSnapshot:
        alive = [v for v, at in self._seen.values() if now - at <= self.dead_after_s]
        return MeshSnapshot(workers=tuple(sorted(alive, key=lambda v: v.worker_id)))
