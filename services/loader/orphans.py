"""Loads nobody owns: a worker left loading by a loader that died. Pure: views and time in,
workers to unload out.

A loader that dies between ordering a chain's receiver and its sender leaves the receiver armed
and waiting: it counts as an instance for the scaler (loading), so nobody decides again, and it
serves nothing until its own transfer timeout. A loader that (re)starts sees such a worker as
loading without being one of its own targets. Loads that still make progress (a chain whose
sender got its order, a disk read) are left to finish: they complete without a loader. One whose
units stop growing for `stall_s` is unloaded: the worker returns to the idle pool, the scaler
sees the gap at its next tick, and this loader plans the load again (re-planned, not lost).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from cascade.workers import WorkerView


@dataclass
class OrphanLoads:
    stall_s: float
    # worker → (model, units ready when last seen growing, since when)
    _seen: dict[str, tuple[str | None, int, float]] = field(default_factory=dict)

    def stalled(self, views: Iterable[WorkerView], owned: Collection[str], now: float) -> list[str]:
        """Workers loading for no one here whose load has not grown for `stall_s`; each is
        returned once (then forgotten: if it is still stuck later, it counts from then)."""
        out: list[str] = []
        alive: set[str] = set()
        for v in views:
            if v.state != "loading" or v.worker_id in owned:
                continue
            alive.add(v.worker_id)
            seen = self._seen.get(v.worker_id)
            if seen is None or seen[0] != v.model or seen[1] != v.units_ready:
                self._seen[v.worker_id] = (v.model, v.units_ready, now)
            elif now - seen[2] >= self.stall_s:
                out.append(v.worker_id)
                alive.discard(v.worker_id)
        for w in list(self._seen):
            if w not in alive:
                del self._seen[w]
        return sorted(out)
