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

from cascade.stages import covers
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


@dataclass
class BrokenPipelines:
    """Pipelined instances that lost a stage (docs/pipelined-and-shared.md): the surviving stages
    serve nobody (the gateway routes only through complete instances) but still count as the
    instance for the scaler, so nothing would replace it. Once a group's stages have not covered
    the model's layers for `grace_s`, with none of them loading, its survivors are returned, to be
    unloaded: the scaler then sees the gap and adds an instance."""

    grace_s: float
    _since: dict[str, float] = field(default_factory=dict)  # group → when it was first seen broken

    def broken(self, views: Iterable[WorkerView], reserved: Collection[str], now: float) -> list[str]:
        groups: dict[str, list[WorkerView]] = {}
        for v in views:
            if v.group and v.model and v.state in ("loading", "serving", "draining"):
                groups.setdefault(v.group, []).append(v)
        out: list[str] = []
        for g, members in groups.items():
            if any(v.state == "loading" or v.worker_id in reserved for v in members):
                self._since.pop(g, None)  # still coming up, or a decision is at work on it
                continue
            members.sort(key=lambda v: v.stage_start)
            layers = members[0].num_units - 2
            if covers([(v.stage_start, v.stage_end) for v in members], layers):
                self._since.pop(g, None)
                continue
            first = self._since.setdefault(g, now)
            if now - first >= self.grace_s:
                out += [v.worker_id for v in members if v.state != "draining"]
                del self._since[g]
        for g in list(self._since):
            if g not in groups:
                del self._since[g]
        return sorted(out)
