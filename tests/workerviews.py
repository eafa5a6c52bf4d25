"""Worker messages as the shared worker table hears them, for the table's and the gateway
registry's unit tests: one 2-layer model "m" (embedding, 2 layers, head)."""

from __future__ import annotations

from typing import Any, Protocol

from cascade.messages import Heartbeat, LayerReady, WorkerSnapshot

NUM_UNITS = 4


def hb(wid: str = "w1", state: str = "serving", units: int = NUM_UNITS, ready_seq: int = 0, **kw: int) -> Heartbeat:
    return Heartbeat(
        worker_id=wid,
        state=state,  # type: ignore[arg-type]
        model="m" if units else None,
        units_ready=units,
        num_units=NUM_UNITS,
        running=kw.get("running", 0),
        waiting=kw.get("waiting", 0),
        max_batch=8,
        tokens_per_s=0.0,
        ready_seq=ready_seq,
        pid=kw.get("pid", 1),
        host="h",
    )


def ready(seq: int, unit: int, wid: str = "w1", model: str = "m", reset: bool = False) -> LayerReady:
    return LayerReady(wid, model, -1 if reset else unit, NUM_UNITS, seq, 0.0, reset=reset)


def snap(seq: int, units: list[int], wid: str = "w1", state: str = "loading") -> WorkerSnapshot:
    return WorkerSnapshot(wid, state, "m", units, NUM_UNITS, seq)  # type: ignore[arg-type]


class HasViews(Protocol):
    def views(self) -> Any: ...


def view(source: HasViews, wid: str = "w1") -> Any:
    """The worker's view in a worker table or a gateway registry."""
    return next(v for v in source.views() if v.worker_id == wid)
