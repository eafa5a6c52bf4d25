from __future__ import annotations

from cascade.messages import latency_bucket
from services.gateway.loadreport import LoadReport


def test_interval_report_and_reset() -> None:
    r = LoadReport("gw1")
    r.arrival("m", 5, wall_ts=1000.5)
    r.arrival("m", 3, wall_ts=1000.7)
    r.first_token("m", 0.010)
    r.token_gap("m", 0.002)
    r.token_gap("m", 0.002)
    r.generated("m", 7)
    r.completed("m")
    r.failed("m")
    (m,) = r.take(ts=1001.0, interval_s=1.0, gauges={"m": (1, 2), "idle": (0, 0)})
    assert (m.gateway_id, m.model, m.seq, m.ts, m.interval_s) == ("gw1", "m", 1, 1001.0, 1.0)
    assert (m.arrivals, m.completions, m.errors, m.prompt_tokens, m.generated_tokens) == (2, 1, 1, 8, 7)
    assert (m.running, m.waiting, m.last_arrival_ts) == (1, 2, 1000.7)
    assert sum(m.ttft_hist) == 1 and m.ttft_hist[latency_bucket(10.0)] == 1
    assert len(m.ttft_hist) == latency_bucket(10.0) + 1  # no trailing empty buckets
    assert m.itl_hist[latency_bucket(2.0)] == 2
    # The next interval starts empty; a model still holding requests is reported anyway.
    (m2,) = r.take(ts=1002.0, interval_s=1.0, gauges={"m": (0, 1)})
    assert (m2.seq, m2.arrivals, m2.waiting, m2.ttft_hist) == (2, 0, 1, [])
    assert r.take(ts=1003.0, interval_s=1.0, gauges={"m": (0, 0)}) == []


def test_models_are_reported_separately() -> None:
    r = LoadReport("gw1")
    r.arrival("a", 1, 1.0)
    r.arrival("b", 1, 1.0)
    r.failed("b")
    out = r.take(ts=2.0, interval_s=1.0, gauges={})
    assert [(m.model, m.seq, m.errors) for m in out] == [("a", 1, 0), ("b", 1, 1)]
