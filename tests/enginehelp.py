"""Engine-level test helpers: a whole model loaded from a checkpoint folder, and an engine stepped
until it has no work, its token events gathered per request."""

from __future__ import annotations

from pathlib import Path

from cascade.messages import TokenEvent
from cascade.models.checkpoint import Checkpoint
from services.worker.engine import Engine
from services.worker.model import LlamaModel


def load_model(path: Path) -> LlamaModel:
    """Every unit of the checkpoint at `path`."""
    ck = Checkpoint(path)
    m = LlamaModel(ck.config)
    for u in range(ck.config.num_units):
        m.load_unit(u, ck.unit_tensors(u))
    return m


def run_engine(engine: Engine, max_steps: int = 500) -> dict[str, list[TokenEvent]]:
    """Step `engine` until it has no work; its events by request id."""
    out: dict[str, list[TokenEvent]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return out
        for _, ev in engine.step().events:
            out.setdefault(ev.request_id, []).append(ev)
    raise AssertionError("engine did not finish")
