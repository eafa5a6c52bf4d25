"""The loader's transfer-following core, event by event with a fake clock: progress, done, the
break a failure names, what a repair keeps following, and the outcome."""

from __future__ import annotations

from cascade.cli.statusview import render, to_json
from cascade.messages import Heartbeat, LayerReady, ServiceStatus, TransferEvent, WorkerSnapshot
from cascade.natsutil import MeshStatus
from cascade.workers import WorkerTable, WorkerView
from services.loader.planner import MeshSnapshot, PlanRequest, plan_transfer, replan
from services.loader.transfers import TransferSession

M = "m"
N = 5
SIZES = (10, 20, 20, 20, 30)


def idle(wid: str) -> WorkerView:
    return WorkerView(wid, "idle", None, 0, 0, data_addr=f"h:{wid}")


def holder(wid: str) -> WorkerView:
    return WorkerView(wid, "serving", M, N, N, data_addr=f"h:{wid}")


def loading(wid: str, units: int) -> WorkerView:
    return WorkerView(wid, "loading", M, units, N, data_addr=f"h:{wid}")


def session(mode: str = "multicast", *, disk: bool = False) -> TransferSession:
    workers = (idle("t1"), idle("t2"), idle("t3")) if disk else (holder("a"), idle("t1"), idle("t2"), idle("t3"))
    plan = plan_transfer(MeshSnapshot(workers), PlanRequest(M, ("t1", "t2", "t3"), mode, SIZES, "/m"), "p1")  # type: ignore[arg-type]
    s = TransferSession("d1", M, mode, SIZES, started=0.0, grace_s=2.0)
    s.adopt(plan)
    return s


def failed(worker: str, transfer_id: str, held: int, role: str = "receive") -> TransferEvent:
    return TransferEvent(worker, transfer_id, M, role, "failed", "stream ended", held, N)  # type: ignore[arg-type]


def test_progress_in_order_then_done() -> None:
    s = session()
    s.unit_ready("t1", 0, 0.5)
    s.unit_ready("t1", 0, 0.6)  # a repeat is not progress
    t1 = s.targets["t1"]
    assert (t1.phase, t1.units, t1.nbytes, t1.first_unit_at) == ("loading", 1, SIZES[0], 0.5)
    s.unit_ready("t1", 2, 0.7)  # a jump (an ordered plan's next block) is held, not counted front to back
    assert (t1.units, t1.nbytes) == (1, SIZES[0] + SIZES[2])
    s.unit_ready("t1", 1, 0.8)  # the hole filled: front to back through unit 2
    assert (t1.units, t1.nbytes) == (3, SIZES[0] + SIZES[1] + SIZES[2])
    s.observe("t1", WorkerView("t1", "serving", M, N, N), 1.0)
    assert s.targets["t1"].phase == "done" and s.ready() == ["t1"]
    assert s.pending() == ["t2", "t3"]
    (row,) = [r for r in s.rows(2.0) if r["worker"] == "t1"]
    assert row["units_ready"] == N and row["mb_s"] == round(sum(SIZES) / 1e6 / 1.0, 1) and row["source"] == "a"
    assert s.breaks(dead=()) == []


def test_middle_dies_then_the_survivor_is_replanned_and_the_rest_goes_on() -> None:
    s = session()
    (chain,) = s.chains
    for u in range(3):
        s.unit_ready("t3", u, 1.0)
    # t2 crashed: t3's stream broke first (heartbeats lag), so t3's report names t2.
    s.transfer_event(failed("t3", chain.transfer_id, 3))
    assert s.breaks(dead=()) == [(chain, "t2")]
    assert s.survivors(chain, "t2") == ["t3"]
    new = replan(s.plan_of(chain), "t2", MeshSnapshot((holder("a"), idle("t1"), loading("t3", 3))),
                 {"t3": s.targets["t3"].units}, "p2")  # fmt: skip
    assert new is not None and new.chains[0].units == (3, 4)
    s.repaired(chain, "t2", dead=())
    s.adopt(new)
    assert s.targets["t3"].transfer_id == new.chains[0].transfer_id
    # What goes on: a → t1 → t2 (t2 is not known dead yet), and a → t3.
    assert sorted([h.worker_id for h in c.targets] for c in s.chains) == [["t1", "t2"], ["t3"]]
    assert s.breaks(dead=()) == []
    # Now t2 misses its heartbeats: a break with nobody behind it, and t2 fails.
    s.observe("t2", None, 3.0)
    ((part, at),) = s.breaks(dead={"t2"})
    assert at == "t2" and s.survivors(part, "t2") == []
    s.repaired(part, "t2", dead={"t2"})
    assert sorted([h.worker_id for h in c.targets] for c in s.chains) == [["t1"], ["t3"]]
    assert s.breaks(dead={"t2"}) == []
    # An old report about the replaced transfer changes nothing.
    s.transfer_event(failed("t3", chain.transfer_id, 3))
    assert s.breaks(dead={"t2"}) == []
    for w in ("t1", "t3"):
        s.observe(w, WorkerView(w, "serving", M, N, N), 4.0)
    assert s.pending() == [] and s.ready() == ["t1", "t3"]
    assert s.failures() == ["t2 stopped heart-beating while loading m"]


def test_a_source_that_fails_to_send_is_not_blamed_until_a_target_says_so() -> None:
    s = session()
    (chain,) = s.chains
    s.transfer_event(failed("a", chain.transfer_id, 0, role="send"))
    assert s.breaks(dead=()) == []
    s.transfer_event(failed("t1", chain.transfer_id, 0))
    assert s.breaks(dead=()) == [(chain, "a")]
    assert s.survivors(chain, "a") == ["t1", "t2", "t3"]
    s.repaired(chain, "a", dead=())
    assert s.chains == []


def test_a_refused_order_breaks_the_chain_there() -> None:
    s = session()
    (chain,) = s.chains
    s.refused("t2", "t2 refused the receive order (busy: loading x)")
    assert s.targets["t2"].phase == "failed" and "busy" in s.targets["t2"].error
    assert s.breaks(dead=()) == [(chain, "t2")]
    s.repaired(chain, "t2", dead=())
    assert [[h.worker_id for h in c.targets] for c in s.chains] == [["t1"]]


def test_a_failed_disk_read_fails_its_target_only() -> None:
    s = session("disk", disk=True)
    assert len(s.chains) == 3 and all(c.source.kind == "disk" for c in s.chains)
    c2 = next(c for c in s.chains if c.targets[0].worker_id == "t2")
    s.transfer_event(failed("t2", c2.transfer_id, 1))
    assert s.breaks(dead=()) == [(c2, "t2")]
    assert s.survivors(c2, "t2") == []
    s.repaired(c2, "t2", dead=())
    assert s.targets["t2"].phase == "failed" and s.targets["t2"].error == "stream ended"
    assert s.breaks(dead=()) == [] and s.pending() == ["t1", "t3"]


def test_a_target_that_gives_up_fails_with_its_reason() -> None:
    s = session()
    s.observe("t1", idle("t1"), 1.0)  # within the grace: its heartbeat may predate the order
    assert s.targets["t1"].phase == "pending"
    s.observe("t1", loading("t1", 1), 1.5)
    s.reasons["t1"] = "transfer p1-0: no connection within 30s"
    s.observe("t1", idle("t1"), 1.6)
    assert s.targets["t1"].phase == "failed"
    assert s.targets["t1"].error == "t1 gave up loading m (now idle: transfer p1-0: no connection within 30s)"
    s.observe("t2", idle("t2"), 2.5)  # never seen loading, and the grace is over
    assert s.targets["t2"].phase == "failed"


def heartbeat(wid: str, state: str, model: str | None, units: int = 0) -> Heartbeat:
    return Heartbeat(wid, state, model, units, N if model else 0, 0, 0, 8, 0.0, units, 1, "h", data_addr=f"h:{wid}")  # type: ignore[arg-type]


def test_a_target_whose_first_unit_is_slow_is_still_loading() -> None:
    """Issue 22: the loader's table, synced with the worker while it was idle, names no model
    until the first readiness event; the heartbeat names it from the order on. A first unit that
    takes longer than the grace (a slow disk, a big embedding) is a load, not a give-up."""
    s = session()
    table = WorkerTable(heartbeat_s=1.0)
    table.on_heartbeat(heartbeat("t1", "idle", None), now=0.0)
    table.on_snapshot(WorkerSnapshot("t1", "idle", None, [], 0, 0))
    table.on_heartbeat(heartbeat("t1", "loading", M), now=0.5)  # took its order, no unit yet
    for now in (1.5, 2.5, 5.0):  # well past the 2 s grace
        table.on_heartbeat(heartbeat("t1", "loading", M), now=now)
        view = table.get("t1", now)
        assert view is not None and view.synced and view.model is None
        s.observe("t1", view, now)
        assert s.targets["t1"].phase == "pending", s.targets["t1"].error
    assert s.targets["t1"].seen_loading
    for unit in range(N):
        table.on_layer_ready(LayerReady("t1", M, unit, N, unit + 1, 0.0), now=5.5)
        s.unit_ready("t1", unit, 5.5)
    table.on_heartbeat(heartbeat("t1", "serving", M, N), now=6.0)
    s.observe("t1", table.get("t1", 6.0), 6.0)
    assert s.targets["t1"].phase == "done"


def test_a_target_loading_another_model_or_gone_back_idle_gives_up() -> None:
    s = session()
    table = WorkerTable(heartbeat_s=1.0)
    table.on_heartbeat(heartbeat("t1", "idle", None), now=0.0)
    table.on_snapshot(WorkerSnapshot("t1", "idle", None, [], 0, 0))
    table.on_heartbeat(heartbeat("t1", "loading", "other"), now=3.0)
    s.observe("t1", table.get("t1", 3.0), 3.0)
    assert s.targets["t1"].phase == "failed" and "gave up loading m (now loading" in s.targets["t1"].error
    table.on_heartbeat(heartbeat("t2", "loading", M), now=1.0)
    table.on_snapshot(WorkerSnapshot("t2", "loading", None, [], 0, 0))
    s.observe("t2", table.get("t2", 1.0), 1.0)
    assert s.targets["t2"].seen_loading
    table.on_heartbeat(heartbeat("t2", "idle", None), now=1.5)  # dropped it before any unit
    s.observe("t2", table.get("t2", 1.5), 1.5)
    assert s.targets["t2"].phase == "failed" and "now idle" in s.targets["t2"].error


def test_status_shows_transfers_with_a_progress_bar_and_the_host_cache() -> None:
    s = session()
    for u in range(2):
        s.unit_ready("t1", u, 0.5)
    s.observe("t2", None, 1.0)
    detail = {
        "transfers": s.rows(1.0),
        "host_cache": {M: {"nbytes": 100_000_000, "mode": "mmap", "locked": False, "idle_s": 3.0, "in_use": 1}},
        "host_cache_bytes": 100_000_000,
    }
    st = MeshStatus(services=[ServiceStatus("loader", "l1", 1, detail)], heartbeats={})
    text = render(st, "nats://x:1", "cascade")
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith(("t1", "t2", "t3", M + " "))}
    assert "[#####.......] 2/5" in lines["t1"] and "a (multicast)" in lines["t1"] and "loading" in lines["t1"]
    assert "failed: t2 stopped heart-beating" in lines["t2"]
    assert "pending" in lines["t3"]
    assert "host cache: 1 model(s), 100.0 MB" in text and "mmap" in lines[M]
    data = to_json(st, "nats://x:1", "cascade")
    assert [r["worker"] for r in data["transfers"]] == ["t1", "t2", "t3"] and data["host_cache"][0]["model"] == M
