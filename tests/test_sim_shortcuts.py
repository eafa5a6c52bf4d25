"""The simulator's shortcuts change nothing a service decides: a worker skips its per-instance
metrics when no policy of its model reads them (`Mesh.wants_loads`), and the run is the run it
would have been with them."""

from __future__ import annotations

import pytest

from sim.mesh import Mesh, Result, run
from sim.scenarios import ScaleSpec, build


def _outcome(r: Result) -> tuple[list[tuple[float, float, str]], list[tuple[float, str, int]]]:
    reqs = [(q.first, q.end, q.status) for q in r.reqs]
    decisions = [(d["t"], d["action"], d["count"]) for d in r.decisions]
    return reqs, decisions


@pytest.mark.parametrize("system", ["serverlessllm", "cascade"])
def test_skipping_unread_instance_metrics_changes_no_decision(system: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ScaleSpec(accelerators=16, workload="conversation", duration_s=40.0, seed=3)
    built = build(spec, system)
    assert not Mesh(built.scenario).wants_loads("model")  # the shortcut is taken
    quick = run(built.scenario)
    assert quick.decisions, "the scenario should scale, or it pins nothing"
    monkeypatch.setattr(Mesh, "wants_loads", lambda self, model: True)
    full = run(build(spec, system).scenario)
    assert _outcome(quick) == _outcome(full)
