"""A request's life cycle, and the StreamHub's per-worker figures the router uses."""

from __future__ import annotations

import asyncio

import pytest

from cascade.messages import SamplingParams, TokenEvent, TokenEvents
from services.gateway.streams import EventQueue, Failure, Phase, PhaseError, RequestState, StreamHub


def req(rid: str, n: int) -> RequestState:
    return RequestState(request_id=rid, model="m", prompt_ids=list(range(n)), params=SamplingParams())


def test_unstarted_tokens_count_prompts_without_a_token_yet() -> None:
    hub = StreamHub(on_stray=lambda w, ids: None)
    a, b, c = req("a", 100), req("b", 30), req("c", 7)
    for r, w in ((a, "w1"), (b, "w1"), (c, "w2")):
        hub.open(r)
        r.advance(Phase.PREFILL, w)
    assert hub.unstarted_by_worker() == {"w1": (2, 130), "w2": (1, 7)}
    a.advance(Phase.DECODE)  # its first token arrived: its prompt is no longer queued there
    hub.close(c)
    assert hub.unstarted_by_worker() == {"w1": (1, 30)}
    assert hub.inflight_by_worker() == {"w1": 2}


def test_routes_count_their_unstarted_prompts_on_their_later_stages_by_share() -> None:
    hub = StreamHub(on_stray=lambda w, ids: None)
    a, b, whole = req("a", 100), req("b", 40), req("w", 10)
    for r, head, relays, shares in ((a, "n", ("f",), (0.75,)), (b, "n", ("f", "g"), (0.5, 0.25)), (whole, "f", (), ())):
        hub.open(r)
        r.advance(Phase.PREFILL, head)
        r.relays, r.relay_shares = relays, shares
    # 100 x 0.75 + 40 x 0.5 on f, 40 x 0.25 on g; a whole request is f's own (unstarted_by_worker).
    assert hub.relayed_unstarted_by_worker() == {"f": 95, "g": 10}
    a.advance(Phase.DECODE)  # its first token came back: nothing of it is queued on f any more
    assert hub.relayed_unstarted_by_worker() == {"f": 20, "g": 10}


def test_routing_loads_are_the_three_figures_in_one_pass() -> None:
    hub = StreamHub(on_stray=lambda w, ids: None)
    a, b, c, d, q = req("a", 100), req("b", 40), req("c", 7), req("d", 5), req("q", 3)
    for r, head, relays, shares in (
        (a, "n", ("f",), (0.75,)),
        (b, "n", ("f", "g"), (0.5, 0.25)),
        (c, "f", (), ()),
        (d, "g", (), ()),
    ):
        hub.open(r)
        r.advance(Phase.PREFILL, head)
        r.relays, r.relay_shares = relays, shares
    hub.open(q)  # queued: on no worker
    d.advance(Phase.DECODE)
    expected = (hub.inflight_by_worker(), hub.unstarted_by_worker(), hub.relayed_unstarted_by_worker())
    assert hub.routing_loads() == expected
    assert expected == ({"n": 2, "f": 1, "g": 1}, {"n": (2, 140), "f": (1, 7)}, {"f": 95, "g": 10})


def test_the_life_cycle_allows_only_its_transitions() -> None:
    r = req("r", 3)
    assert r.phase is Phase.QUEUED and r.worker_id is None and not r.produced
    with pytest.raises(PhaseError):
        r.advance(Phase.DECODE)  # no token before a worker has it
    with pytest.raises(PhaseError):
        r.advance(Phase.PREFILL)  # dispatched needs a worker
    r.advance(Phase.PREFILL, "w1")
    assert r.worker_id == "w1" and r.phase.bound
    r.advance(Phase.QUEUED)  # the worker turned it away before its first token
    assert r.worker_id is None
    r.advance(Phase.PREFILL, "w2")
    r.advance(Phase.DECODE)
    assert r.produced and r.worker_id == "w2"
    with pytest.raises(PhaseError):
        r.advance(Phase.QUEUED)  # a retry after tokens reached the client would repeat output
    r.advance(Phase.DONE)
    assert r.ended and r.worker_id is None
    for to in Phase:
        with pytest.raises(PhaseError):
            r.advance(to)  # nothing follows an end


def test_finish_ends_once_done_or_failed_and_frees_the_worker() -> None:
    hub = StreamHub(on_stray=lambda w, ids: None)
    ok, bad, err = req("ok", 1), req("bad", 1), req("err", 1)
    for r in (ok, bad, err):
        hub.open(r)
        r.advance(Phase.PREFILL, "w1")
    hub.finish(ok, TokenEvent("ok", [1], "x", finish_reason="stop"))
    hub.finish(ok, Failure(503, "late", "x"))  # only the first final event counts
    hub.finish(bad, Failure(504, "silent", "timeout"))
    hub.finish(err, TokenEvent("err", [], "", finish_reason="error", error="boom"))
    assert (ok.phase, bad.phase, err.phase) == (Phase.DONE, Phase.FAILED, Phase.FAILED)
    assert ok.events.qsize() == 1 and hub.inflight_by_worker() == {}


def test_a_late_event_of_an_earlier_dispatch_to_the_same_worker_is_not_taken() -> None:
    """A request moved back to the worker it left (its second dispatch): an event the worker
    still sends for the first dispatch carries attempt 1 and is dropped, neither delivered nor
    reported as a stray (that would cancel the new dispatch); attempt 2's event is delivered."""
    strays: list[tuple[str, list[str]]] = []
    hub = StreamHub(on_stray=lambda w, ids: strays.append((w, ids)))
    r = req("r", 2)
    hub.open(r)
    r.advance(Phase.PREFILL, "w1")
    r.dispatches = 2
    old = TokenEvents("w1", [TokenEvent("r", [5], "a", index=3, attempt=1)])
    new = TokenEvents("w1", [TokenEvent("r", [6], "b", index=0, attempt=2)])
    untold = TokenEvents("w1", [TokenEvent("r", [7], "c", index=1)])  # a worker that does not echo
    assert hub.match(old) == []
    assert [ev.token_ids for _, ev in hub.match(new)] == [[6]]
    assert [ev.token_ids for _, ev in hub.match(untold)] == [[7]]
    assert strays == []


async def test_event_queue_wait_returns_when_an_event_comes() -> None:
    q = EventQueue()
    waiting = asyncio.ensure_future(q.wait(60.0))
    await asyncio.sleep(0)  # the reader is waiting now
    q.put_nowait(Failure(503, "x", "y"))
    assert await waiting is True
    assert q.qsize() == 1 and isinstance(q.get_nowait(), Failure) and q.empty()
    q.close()


async def test_event_queue_keeps_one_timer_across_waits() -> None:
    q = EventQueue()
    timer = None
    for i in range(3):
        waiting = asyncio.ensure_future(q.wait(60.0))
        await asyncio.sleep(0)
        timer = timer or q._timer
        assert timer is not None and q._timer is timer  # armed once, not per wait
        q.put_nowait(TokenEvent("r", [i], "x", None))
        assert await waiting is True
        q.get_nowait()
    # A shorter timeout than the armed timer's: the timer moves earlier, and the silent wait ends.
    assert await asyncio.wait_for(q.wait(0.05), 30.0) is False
    q.close()
    assert q._timer is None


async def test_event_queue_wait_ends_after_its_own_timeout_when_the_timer_fires_early() -> None:
    q = EventQueue()
    waiting = asyncio.ensure_future(q.wait(1.0))
    await asyncio.sleep(0)
    q.put_nowait(TokenEvent("r", [1], "x", None))
    assert await waiting is True
    q.get_nowait()
    await asyncio.sleep(0.01)  # a later wait: its deadline is after the armed timer's
    # The timer fires first, finds a wait that began later, re-arms for it; the wait ends silent.
    assert await asyncio.wait_for(q.wait(1.0), 30.0) is False
    q.close()


async def test_event_queue_close_cancels_its_timer_and_a_cancelled_wait_leaves_no_waiter() -> None:
    q = EventQueue()
    waiting = asyncio.ensure_future(q.wait(60.0))
    await asyncio.sleep(0)
    timer = q._timer
    assert timer is not None
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert q._waiter is None  # a later wait may begin
    q.close()
    assert timer.cancelled() and q._timer is None
