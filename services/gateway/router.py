"""Routing: which instance gets the next batch of a model. Pure functions over a
snapshot; the registry builds the snapshot, the batcher asks, nothing here does I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What the gateway knows about one worker when it routes."""

    worker_id: str
    model: str | None
    state: str  # idle | loading | serving | draining
    units_ready: int
    num_units: int
    running: int  # from the worker's last heartbeat
    waiting: int  # from the worker's last heartbeat
    max_batch: int
    inflight: int = 0  # this gateway's requests on the worker now
    inflight_at_heartbeat: int = 0  # this gateway's requests on it when that heartbeat arrived


def serves_fully(view: InstanceView, model: str) -> bool:
    """True when `view` can run every unit of `model` and admits new work."""
    return view.state == "serving" and view.model == model and view.num_units > 0 and view.units_ready >= view.num_units


def estimated_load(view: InstanceView) -> int:
    """Sequences on the worker now, as best the gateway can tell.

    The heartbeat's running + waiting was true when it was sent, and already counts this
    gateway's requests of that moment; what this gateway dispatched or finished since then is
    the difference of its own counts. Never less than what this gateway alone has there.
    """
    fresh = view.running + view.waiting + view.inflight - view.inflight_at_heartbeat
    return max(fresh, view.inflight, 0)


def choose_instance(
    instances: Iterable[InstanceView], model: str, avoid: Sequence[str] | frozenset[str] = ()
) -> str | None:
    """The least-loaded instance serving `model` fully, or None when there is none.

    Load is relative to the instance's batch size, so a bigger instance takes more. Instances
    in `avoid` (ones that already failed this request) are used only when nothing else can
    serve: a retry on the same instance beats no answer. Ties go to the smaller worker id, so
    the choice is deterministic.
    """
    best: tuple[bool, float, int, str] | None = None
    for v in instances:
        if not serves_fully(v, model):
            continue
        load = estimated_load(v)
        key = (v.worker_id in avoid, load / max(v.max_batch, 1), load, v.worker_id)
        if best is None or key < best:
            best = key
    return None if best is None else best[3]


def models_without_instance(instances: Sequence[InstanceView], required: Iterable[str]) -> list[str]:
    """The models in `required` that no instance can serve fully (what /health reports)."""
    return [m for m in required if not any(serves_fully(v, m) for v in instances)]
