"""The router weighing instances on shared workers by their compute quota (`quota_share`): of
two instances of a model, the one whose worker gives the model more share takes the request,
unless it is that much more loaded; an idle neighbour lends its share; whole workers route as
before. Pipelined instances are paced by their least-share stage."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.gateway.router import InstanceView, choose_instance, choose_pipeline, quota_share


def inst(
    wid: str, device: str = "", quota: float = 0.0, model: str | None = "m", running: int = 0, max_batch: int = 8
) -> InstanceView:
    return InstanceView(wid, model, "serving", 4, 4, running, 0, max_batch, shared_device=device, quota=quota)


def test_share_counts_only_neighbours_with_work() -> None:
    a = inst("p0", "p0", 0.3)
    busy = inst("p0-2", "p0", 0.7, model="x", running=2)
    idle = inst("p0-2", "p0", 0.7, model="x")
    assert quota_share(a, [a, busy]) == pytest.approx(0.3)
    assert quota_share(a, [a, idle]) == 1.0  # the stride scheduler lends an idle instance's steps
    assert quota_share(a, [a, busy, inst("p1", "p1", 0.1, running=5)]) == pytest.approx(0.3)  # another process
    assert quota_share(inst("w"), [inst("w")]) == 1.0  # a worker of its own
    assert quota_share(inst("p0", "p0", 0.0), [busy]) == 1.0  # no quota known: as before


def test_the_instance_with_more_share_takes_the_request() -> None:
    # m on two processes, each shared with a busy x: 0.3 of p0 against 0.7 of p1.
    views = [
        inst("p0", "p0", 0.3),
        inst("p0-2", "p0", 0.7, model="x", running=4),
        inst("p1", "p1", 0.7),
        inst("p1-2", "p1", 0.3, model="x", running=4),
    ]
    assert choose_instance(views, "m") == "p1"
    # Equally loaded: still the larger share (its steps come 0.7/0.3 as often).
    views[0], views[2] = replace(views[0], running=2), replace(views[2], running=2)
    assert choose_instance(views, "m") == "p1"
    # Load relative to quota: 5 of 8 at 0.7 (0.89 per share) is more loaded than 2 of 8 at 0.3 (0.83).
    views[2] = replace(views[2], running=5)
    assert choose_instance(views, "m") == "p0"
    # p0's neighbour goes idle: p0 has the whole process, and wins while less loaded per share.
    views[1] = replace(views[1], running=0)
    assert choose_instance(views, "m") == "p0"


def test_whole_workers_route_as_before() -> None:
    views = [inst("a", running=6), inst("b", running=10, max_batch=32), inst("c", running=7)]
    assert choose_instance(views, "m") == "b"  # 10/32 beats 6/8, no quota anywhere


def _stage(wid: str, device: str, quota: float, group: str, a: int, b: int, running: int = 0) -> InstanceView:
    return InstanceView(
        wid, "m", "serving", 4, 6, running, 0, 8, stage_addr=f"{wid}:1", group=group, stage_start=a, stage_end=b,
        shared_device=device, quota=quota,
    )  # fmt: skip


def test_a_pipeline_is_paced_by_its_least_share_stage() -> None:
    # Two 2-stage instances of m; g1's second stage shares p1 with a busy model at 0.2 of it.
    views = [
        _stage("p0", "p0", 0.8, "g1", 0, 2),
        _stage("p1", "p1", 0.2, "g1", 2, 4),
        InstanceView("p1-2", "x", "serving", 6, 6, 4, 0, 8, shared_device="p1", quota=0.8),
        _stage("p2", "p2", 0.5, "g2", 0, 2),
        _stage("p3", "p3", 0.5, "g2", 2, 4),
        InstanceView("p2-2", "x", "serving", 6, 6, 4, 0, 8, shared_device="p2", quota=0.5),
    ]
    route = choose_pipeline(views, "m")
    assert route is not None and route.worker_id == "p2"  # g2: its slowest stage has 0.5, g1's 0.2
    views[2] = replace(views[2], running=0)  # x on p1 idles: g1 runs at full speed there
    route = choose_pipeline(views, "m")
    assert route is not None and route.worker_id == "p0"
