"""The simulator's event engine (sim/engine.py): time order, ties in scheduling order, cancel,
halt, and no clock but its own."""

from __future__ import annotations

from sim.engine import Sim


def test_events_run_in_time_order_and_ties_in_scheduling_order() -> None:
    sim = Sim()
    seen: list[tuple[float, str]] = []
    sim.at(2.0, lambda: seen.append((sim.now, "c")))
    sim.at(1.0, lambda: seen.append((sim.now, "a")))
    sim.at(1.0, lambda: seen.append((sim.now, "b")))
    sim.run()
    assert seen == [(1.0, "a"), (1.0, "b"), (2.0, "c")]
    assert sim.events == 3


def test_an_event_can_schedule_more_and_the_past_means_now() -> None:
    sim = Sim()
    seen: list[float] = []

    def tick(n: int) -> None:
        seen.append(sim.now)
        if n:
            sim.after(0.5, tick, n - 1)
            sim.at(sim.now - 10, seen.append, -1.0)  # never before now

    sim.at(1.0, tick, 2)
    sim.run()
    assert seen == [1.0, -1.0, 1.5, -1.0, 2.0]


def test_cancel_halt_and_until() -> None:
    sim = Sim()
    seen: list[str] = []
    ev = sim.at(1.0, seen.append, "cancelled")
    Sim.cancel(ev)
    assert not Sim.pending(ev)
    sim.at(2.0, seen.append, "two")
    sim.at(3.0, sim.halt)
    sim.at(4.0, seen.append, "after halt")
    sim.run(until=2.5)
    assert seen == ["two"] and sim.now == 2.5
    sim.run()
    assert seen == ["two"] and sim.now == 3.0  # halted at 3: the 4 s event is still there
    sim.run()
    assert seen == ["two", "after halt"]
