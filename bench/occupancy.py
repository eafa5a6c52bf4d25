"""How many workers held a model, read from their heartbeats: per worker, the times its
"holding" flag changed, in order. The real burst benchmark and the simulator count
instance-seconds with the same two functions, so their figures compare."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Beats = Mapping[str, Sequence[tuple[float, bool]]]


def holding_at(beats: Beats, t: float) -> int:
    """Workers holding the model at time `t` (each as its last beat up to `t` said)."""
    n = 0
    for seq in beats.values():
        state = False
        for ts, h in seq:
            if ts > t:
                break
            state = h
        n += state
    return n


def instance_seconds(beats: Beats, t0: float, t1: float) -> float:
    """The integral of the number of workers holding the model over [t0, t1]."""
    total = 0.0
    for seq in beats.values():
        state, since = False, t0
        for ts, h in seq:
            if ts <= t0:
                state = h
                continue
            if ts >= t1:
                break
            if state:
                total += ts - since
            state, since = h, ts
        if state:
            total += t1 - since
    return total
