"""StreamHub's per-worker figures the router uses."""

from __future__ import annotations

from cascade.messages import SamplingParams
from services.gateway.streams import RequestState, StreamHub


def req(rid: str, n: int) -> RequestState:
    return RequestState(request_id=rid, model="m", prompt_ids=list(range(n)), params=SamplingParams())


def test_unstarted_tokens_count_prompts_without_a_token_yet() -> None:
    hub = StreamHub(on_stray=lambda w, ids: None)
    a, b, c = req("a", 100), req("b", 30), req("c", 7)
    for r, w in ((a, "w1"), (b, "w1"), (c, "w2")):
        hub.open(r)
        hub.bind(r, w)
    assert hub.unstarted_by_worker() == {"w1": (2, 130), "w2": (1, 7)}
    a.produced = True  # its first token arrived: its prompt is no longer queued there
    hub.close(c)
    assert hub.unstarted_by_worker() == {"w1": (1, 30)}
    assert hub.inflight_by_worker() == {"w1": 2}
