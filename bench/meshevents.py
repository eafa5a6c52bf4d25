"""What a benchmark hears of a mesh it drives over NATS: each worker's readiness events and last
heartbeat state, each decision's ack and transfer plans, and a wait on any of them with a deadline
that shows the services' logs when it runs out (bench/multicast.py's mesh rows, bench/hosts.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cascade.messages import Heartbeat, LayerReady, MessageError, ScaleAck, TransferPlanned, decode
from cascade.subjects import Subjects


def tail_logs(tmp: Path, names: list[str], chars: int = 1500) -> str:
    """The end of each service's log, `tmp/<name>.log`: what a timed-out wait shows."""
    return "\n".join(f"--- {n}\n" + (tmp / f"{n}.log").read_text()[-chars:] for n in names)


class MeshEvents:
    def __init__(self, subjects: Subjects, label: str, logs: Callable[[], str]) -> None:
        self.subjects = subjects
        self.label = label  # names the benchmark in a timeout's message
        self.logs = logs
        self.ready: dict[str, list[tuple[float, LayerReady]]] = {}  # worker → (when, event)
        self.acks: dict[str, tuple[float, ScaleAck]] = {}  # decision id → (when, ack)
        self.plans: dict[str, list[TransferPlanned]] = {}  # decision id → its transfer plans
        self.beats: dict[str, str] = {}  # worker → state in its last heartbeat
        self.changed = asyncio.Event()

    async def subscribe(self, nc: Any) -> None:
        s = self.subjects
        await nc.subscribe(s.ready_all(), cb=self._on_ready)
        await nc.subscribe(s.scale_ack(), cb=self._on_ack)
        await nc.subscribe(s.heartbeat_all(), cb=self._on_beat)
        await nc.subscribe(s.transfer_plan(), cb=self._on_plan)

    async def until(self, pred: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Return once `pred()` holds, re-checked at every event heard; RuntimeError with the
        services' logs after `timeout_s`."""

        async def go() -> None:
            while not pred():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(go(), timeout_s)
        except TimeoutError:
            raise RuntimeError(f"{self.label}: timed out waiting for {what}\n{self.logs()}") from None

    async def _on_ready(self, msg: Any) -> None:
        ev = decode(msg.data, LayerReady)
        self.ready.setdefault(ev.worker_id, []).append((time.monotonic(), ev))
        self.changed.set()

    async def _on_ack(self, msg: Any) -> None:
        try:
            ack = decode(msg.data, ScaleAck)
        except MessageError:
            return
        self.acks[ack.decision_id] = (time.monotonic(), ack)
        self.changed.set()

    async def _on_plan(self, msg: Any) -> None:
        p = decode(msg.data, TransferPlanned)
        self.plans.setdefault(p.decision_id, []).append(p)

    async def _on_beat(self, msg: Any) -> None:
        hb = decode(msg.data, Heartbeat)
        self.beats[hb.worker_id] = hb.state
        self.changed.set()
