"""A load left behind by a dead loader: undone once it stops progressing, never while it does."""

from __future__ import annotations

from cascade.workers import WorkerView
from services.loader.orphans import OrphanLoads


def view(w: str, state: str, units: int, model: str | None = "m") -> WorkerView:
    return WorkerView(worker_id=w, state=state, model=model, units_ready=units, num_units=4)  # type: ignore[arg-type]


def test_a_stuck_load_nobody_owns_is_returned_once_after_the_stall() -> None:
    o = OrphanLoads(stall_s=5.0)
    stuck, moving, mine = view("a", "loading", 0), view("b", "loading", 1), view("c", "loading", 0)
    assert o.stalled([stuck, moving, mine, view("d", "serving", 4)], {"c"}, 0.0) == []
    assert o.stalled([stuck, view("b", "loading", 2), mine], {"c"}, 4.0) == []
    # a has not moved for 5 s; b grew at 4 s; c is this loader's own target.
    assert o.stalled([stuck, view("b", "loading", 2), mine], {"c"}, 5.0) == ["a"]
    assert o.stalled([stuck, view("b", "loading", 2), mine], {"c"}, 6.0) == []  # once, then counted anew
    # a again 5 s after it was counted anew; b has not grown since 4 s either.
    assert o.stalled([stuck, view("b", "loading", 2), mine], {"c"}, 11.0) == ["a", "b"]


def test_a_load_that_finishes_or_changes_model_is_forgotten() -> None:
    o = OrphanLoads(stall_s=5.0)
    assert o.stalled([view("a", "loading", 1)], (), 0.0) == []
    assert o.stalled([view("a", "serving", 4)], (), 3.0) == []
    assert o.stalled([view("a", "loading", 1, "other")], (), 4.0) == []
    assert o.stalled([view("a", "loading", 1, "other")], (), 8.0) == []
    assert o.stalled([view("a", "loading", 1, "other")], (), 9.0) == ["a"]
