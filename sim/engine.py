"""The discrete-event core: a heap of timestamped callbacks and a clock that jumps between them.

    sim = Sim()
    sim.after(0.5, fn, arg)        # fn(arg) at now + 0.5
    ev = sim.at(3.0, fn); sim.cancel(ev)
    sim.run(until=60.0)

No wall-clock sleeps anywhere: `sim.now` is the only time there is. Events at the same instant
run in the order they were scheduled (a sequence number breaks ties), so a run is deterministic.
A hand-written heap rather than simpy: every event here is a plain callback, and a heap of lists
costs about a microsecond an event, which a 1,000-accelerator hour needs (tens of millions).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

# An event is [time, seq, fn, args]; a cancelled one has fn None and is skipped when popped.
Event = list[Any]


class Sim:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[Event] = []
        self._seq = 0
        self.events = 0  # callbacks run so far (cancelled ones not counted)
        self._halt = False

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> Event:
        """Run `fn(*args)` at time `t` (never before now: a time in the past means now)."""
        if t < self.now:
            t = self.now
        self._seq += 1
        ev: Event = [t, self._seq, fn, args]
        heapq.heappush(self._heap, ev)
        return ev

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> Event:
        return self.at(self.now + dt, fn, *args)

    @staticmethod
    def cancel(ev: Event | None) -> None:
        if ev is not None:
            ev[2] = None

    @staticmethod
    def pending(ev: Event | None) -> bool:
        return ev is not None and ev[2] is not None

    def run(self, until: float = math.inf) -> None:
        """Run events in time order until none is left or the next is after `until` (the clock
        then stands at `until`, when finite)."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        self._halt = False
        while heap and not self._halt:
            ev = heap[0]
            if ev[0] > until:
                break
            pop(heap)
            fn = ev[2]
            if fn is None:
                continue
            self.now = ev[0]
            ev[2] = None  # fired: a later cancel is a no-op
            n += 1
            fn(*ev[3])
        self.events += n
        if until != math.inf and self.now < until and not self._halt:
            self.now = until

    def halt(self) -> None:
        """Stop `run` after the event under way (periodic processes never run out of events)."""
        self._halt = True

    def idle(self) -> bool:
        return not any(ev[2] is not None for ev in self._heap)
