"""A request's life cycle, and the StreamHub's per-worker figures the router uses."""

from __future__ import annotations

import pytest

from cascade.messages import SamplingParams, TokenEvent, TokenEvents
from services.gateway.streams import Failure, Phase, PhaseError, RequestState, StreamHub


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
