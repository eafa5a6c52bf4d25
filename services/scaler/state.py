"""The scaler's view of the workers, from their heartbeats: who is alive and what each holds.

Pure bookkeeping with the time passed in, so the adapter feeds it from NATS and tests feed it
by hand. A worker that misses `dead_after_missed` heartbeats is gone (the protocol's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cascade.messages import Heartbeat

# Workers in these states count toward a model's replicas: a loading one will serve soon, and
# counting it is what stops the scaler from asking for the same capacity twice.
COUNTED_STATES = ("loading", "serving")


@dataclass(frozen=True, slots=True)
class Seen:
    heartbeat: Heartbeat
    at: float


class WorkerTable:
    def __init__(self, heartbeat_s: float, dead_after_missed: int = 3) -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be above 0")
        self.dead_after_s = heartbeat_s * dead_after_missed
        self._seen: dict[str, Seen] = {}

    def observe(self, hb: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True if this worker is new (or back from the dead)."""
        new = hb.worker_id not in self._seen
        self._seen[hb.worker_id] = Seen(hb, now)
        return new

    def prune(self, now: float) -> list[str]:
        """Forget workers silent for too long; returns their ids."""
        dead = [w for w, s in self._seen.items() if now - s.at > self.dead_after_s]
        for w in dead:
            del self._seen[w]
        return dead

    def alive(self, now: float) -> list[Heartbeat]:
        return [s.heartbeat for s in self._seen.values() if now - s.at <= self.dead_after_s]

    def instances(self, now: float) -> dict[str, frozenset[str]]:
        """Model → workers loading or serving it."""
        out: dict[str, set[str]] = {}
        for hb in self.alive(now):
            if hb.model and hb.state in COUNTED_STATES:
                out.setdefault(hb.model, set()).add(hb.worker_id)
        return {m: frozenset(ws) for m, ws in out.items()}

    def idle(self, now: float) -> frozenset[str]:
        """The idle pool: alive workers that hold no model."""
        return frozenset(hb.worker_id for hb in self.alive(now) if hb.state == "idle")

    def loading(self, now: float) -> dict[str, int]:
        """Model → workers still loading it."""
        out: dict[str, int] = {}
        for hb in self.alive(now):
            if hb.model and hb.state == "loading":
                out[hb.model] = out.get(hb.model, 0) + 1
        return out

    def summary(self, now: float) -> dict[str, Any]:
        states: dict[str, int] = {}
        for hb in self.alive(now):
            states[hb.state] = states.get(hb.state, 0) + 1
        return states
