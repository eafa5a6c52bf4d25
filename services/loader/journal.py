"""The leader's decisions in flight, written ahead to the control store so that a loader taking
over finishes them: each decision when it arrives, then the workers it was given to (before any
order goes out), deleted once its ack is out. A decision is carried out and acked by one
loader at a time, the one holding the lease (lease.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from cascade.controlstore import ControlStore, journal_key
from cascade.messages import MessageError, ScaleDecision, decode_object, encode

KIND = "decision"


@dataclass(frozen=True, slots=True)
class Journaled:
    decision: ScaleDecision
    workers: tuple[str, ...]  # empty: none chosen yet (no order sent)
    state: str  # "received" | "ordered"
    ts: float  # wall clock when written
    by: str  # the loader that wrote it


class DecisionJournal:
    """Best effort: a write that fails is logged, and the decision goes on (a lost journal
    entry costs a re-decision by the scaler after a takeover, never a stuck decision)."""

    def __init__(self, store: ControlStore, loader_id: str, log: Any) -> None:
        self.store = store
        self.loader_id = loader_id
        self.log = log

    async def received(self, d: ScaleDecision) -> None:
        await self._put(d, (), "received")

    async def ordered(self, d: ScaleDecision, workers: tuple[str, ...]) -> None:
        await self._put(d, workers, "ordered")

    async def done(self, d: ScaleDecision) -> None:
        try:
            await self.store.delete(journal_key(KIND, d.decision_id))
        except Exception as e:  # the broker away: a successor re-acks a done decision, harmless
            self.log.warning("journal_write_failed", decision_id=d.decision_id, error=repr(e))

    async def pending(self) -> list[Journaled]:
        out = []
        for e in await self.store.entries(KIND):
            try:
                d = decode_object(orjson.loads(e.value["decision"]), ScaleDecision)
            except (MessageError, KeyError, orjson.JSONDecodeError) as err:
                self.log.warning("journal_entry_unreadable", key=e.key, error=str(err))
                continue
            v = e.value
            workers = tuple(v.get("workers", ()))
            out.append(Journaled(d, workers, str(v.get("state")), float(v.get("ts", 0)), str(v.get("by", ""))))
        return sorted(out, key=lambda j: j.ts)

    async def _put(self, d: ScaleDecision, workers: tuple[str, ...], state: str) -> None:
        value = {
            "decision": encode(d).decode(),
            "workers": list(workers),
            "state": state,
            "ts": time.time(),
            "by": self.loader_id,
        }
        try:
            await self.store.put(journal_key(KIND, d.decision_id), value)
        except Exception as e:  # nats-py's timeouts and JetStream errors alike
            self.log.warning("journal_write_failed", decision_id=d.decision_id, state=state, error=repr(e))
