"""Per (model, worker) back-off after failed scale-ups. Pure: no I/O, no clock (times are numbers).

A worker that failed to load a model (it cannot read the checkpoint, its transfer broke, it ran
out of memory...) would fail the same way if chosen again at once: the loader's ack names it and
why (`ScaleAck.failed`), and it is avoided for that model for a while, 5 s doubling up to 300 s
by default. Decisions for the model name the workers to avoid (`ScaleDecision.avoid`), so the
loader picks another idle worker (for a pipelined model: S others, one per stage); when too few
idle workers are free the model's next decision waits until enough come out of their back-off
(`hold_until`), instead of being re-issued every tick. A success for the pair clears it. The
state is small (one entry per failing pair) and what `cascade status` shows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from cascade.scalefailures import reason_kind

DEFAULT_BASE_S = 5.0
DEFAULT_MAX_S = 300.0


@dataclass(slots=True)
class Entry:
    failures: int
    until: float  # avoided until then (the scaler's clock)
    reason: str  # the loader's words for the last failure
    kind: str  # a short label of it, for metrics
    last: float  # when it last failed


@dataclass
class Backoff:
    base_s: float = DEFAULT_BASE_S
    max_s: float = DEFAULT_MAX_S
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    # Failures seen, by (model, worker, kind): what the scaler counts for its status.
    totals: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ValueError("need 0 < base_s <= max_s")

    def failed(self, model: str, worker: str, reason: str, now: float) -> Entry:
        """Record a failure of `worker` for `model`; returns its entry (avoided until `until`)."""
        e = self.entries.get((model, worker))
        n = 1 if e is None else e.failures + 1
        delay = min(self.base_s * 2 ** (n - 1), self.max_s)
        kind = reason_kind(reason)
        e = Entry(n, now + delay, reason, kind, now)
        self.entries[(model, worker)] = e
        key = (model, worker, kind)
        self.totals[key] = self.totals.get(key, 0) + 1
        return e

    def succeeded(self, model: str, workers: Collection[str]) -> None:
        for w in workers:
            self.entries.pop((model, w), None)

    def on_ack(self, model: str, ok_workers: Collection[str], failed: Mapping[str, str], now: float) -> list[Entry]:
        """An ack's outcome: its ready workers clear their back-off, its failed ones get one."""
        self.succeeded(model, ok_workers)
        return [self.failed(model, w, why, now) for w, why in sorted(failed.items())]

    def avoided(self, model: str, now: float) -> frozenset[str]:
        """Workers in back-off for `model` now."""
        return frozenset(w for (m, w), e in self.entries.items() if m == model and e.until > now)

    def hold_until(self, model: str, idle: Collection[str], now: float, need: int = 1) -> float | None:
        """When too few idle workers are free to try `model` (out of back-off) for one instance of
        it (`need`: its stages, one worker each): when enough of them come out of their back-off
        (the model's next up waits until then). None when enough are free, or when the idle pool
        is too small anyway (then the wait is for workers, not for back-offs)."""
        if not idle:
            return None
        free = 0
        ends = []
        for w in idle:
            e = self.entries.get((model, w))
            if e is None or e.until <= now:
                free += 1
            else:
                ends.append(e.until)
        if free >= need or free + len(ends) < need:
            return None
        return sorted(ends)[need - free - 1]

    def status(self, now: float) -> list[dict[str, Any]]:
        """Every pair in back-off or that failed lately, newest failure first."""
        newest = sorted(self.entries.items(), key=lambda kv: (-kv[1].last, kv[0]))
        return [
            {
                "model": m,
                "worker": w,
                "failures": e.failures,
                "retry_in_s": round(max(0.0, e.until - now), 1),
                "reason": e.reason,
                "kind": e.kind,
            }
            for (m, w), e in newest
        ]
