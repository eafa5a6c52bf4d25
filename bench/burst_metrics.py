"""What bench/burst.py measures per request and how a configuration's requests add up: time per
output token, SLO attainment, the latency distributions. Pure functions of the replay's records,
shared by a run's analysis and the pooling of repeated runs."""

from __future__ import annotations

from typing import Any

from bench.common import dist_ms
from bench.tracelib import RequestRecord, summarise


def tpot_s(r: RequestRecord) -> float | None:
    """Time per output token after the first (vLLM's TPOT), from the first token, the stream's end
    and the usage count. SSE chunks are not tokens here: the random model's ids mostly decode to no
    text, and the gateway sends a chunk only for text (and always the first)."""
    if r.status != "ok" or r.first_token is None or r.end is None or r.completion_tokens < 2:
        return None
    return (r.end - r.first_token) / (r.completion_tokens - 1)


def slo_share(
    tl: list[tuple[float | None, float | None, str]], slo_ttft_ms: float, slo_tbt_ms: float, ttft: bool, tbt: bool
) -> float:
    """The share of requests, given as (TTFT ms, time per output token ms, status), that completed
    within the TTFT limit and/or the time-per-output-token limit; a failure is a miss."""

    def meets(t: float | None, p: float | None, st: str) -> bool:
        if st != "ok" or t is None:
            return False
        return (not ttft or t <= slo_ttft_ms) and (not tbt or p is None or p <= slo_tbt_ms)

    return sum(1 for t, p, st in tl if meets(t, p, st)) / len(tl) if tl else float("nan")


def request_summary(records: list[RequestRecord], slo_ttft_ms: float, slo_tbt_ms: float) -> dict[str, Any]:
    """Counts, TTFT and inter-token latency, SLO attainment. A request meets the SLO when it
    completed, its TTFT is within the limit and its time per output token too; every scheduled
    request counts (a failure is a miss)."""
    base = summarise(records, slo_ttft_ms, slo_tbt_ms)  # statuses, throughput, SSE chunk gaps
    n = len(records)
    tl = [(None if r.ttft is None else r.ttft * 1000, None if (t := tpot_s(r)) is None else t * 1000, r.status)
          for r in records]  # fmt: skip

    def share(ttft: bool, tbt: bool) -> float:
        return slo_share(tl, slo_ttft_ms, slo_tbt_ms, ttft, tbt)

    return {
        "requests": n,
        "status": base["status"],
        "ok": base["ok"],
        "span_s": base["span_s"],
        "tokens_per_s": base["tokens_per_s"],
        "ttft_ms": dist_ms([x for r in records if (x := r.ttft) is not None]),
        "itl_ms": dist_ms([x for r in records if (x := tpot_s(r)) is not None]),
        "itl_definition": "per request, time per output token after the first: (end - first token) / "
        "(completion tokens - 1); percentiles over requests",
        "sse_chunk_gap_ms": base["itl_ms"],
        "send_lag_ms": base["send_lag_ms"],
        "slo": {
            "ttft_ms": slo_ttft_ms,
            "tbt_ms": slo_tbt_ms,
            "definition": "completed, TTFT <= ttft_ms and time per output token <= tbt_ms; failures are misses",
            "attainment": share(True, True),
            "ttft_attainment": share(True, False),
            "tbt_attainment": share(False, True),
        },
    }
