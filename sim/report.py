"""What a run measured, by the definitions bench/burst.py uses for the real mesh: TTFT over the
requests that got a first token; time per output token after the first, per request, over the
completed ones with two tokens or more; SLO attainment over every request (a failure or a
timeout is a miss); instance-seconds of workers holding a model (loading, serving, draining), by
their heartbeats, over the workload's window. Percentiles interpolate linearly, as
bench/tracelib.py's `percentile`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sim.mesh import Result


def _dist(xs: np.ndarray) -> dict[str, float]:
    if xs.size == 0:
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    p50, p95, p99 = np.percentile(xs, [50, 95, 99])
    return {
        "n": int(xs.size),
        "mean": float(xs.mean()),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(xs.max()),
    }


def request_arrays(r: Result) -> dict[str, np.ndarray]:
    """Per request (arrival order): TTFT and TPOT in ms (NaN: none), and whether it completed."""
    timeout = r.scenario.settings.client_timeout_s
    n = len(r.reqs)
    arrived = np.fromiter((q.arrived for q in r.reqs), float, n)
    first = np.fromiter((q.first for q in r.reqs), float, n)
    end = np.fromiter((q.end for q in r.reqs), float, n)
    out = np.fromiter((q.out for q in r.reqs), float, n)
    ok = np.fromiter((q.status == "ok" for q in r.reqs), bool, n)
    ttft = first - arrived
    # The client gives up at its timeout: what came later it never saw.
    ttft[~(ttft <= timeout)] = np.nan
    ok &= (end - arrived) <= timeout
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(ok & (out >= 2), (end - first) / (out - 1), np.nan)
    return {"t": arrived - r.t0, "ttft_ms": ttft * 1000, "tpot_ms": tpot * 1000, "ok": ok}


def summary(r: Result, slo_ttft_ms: float, slo_tpot_ms: float, window_s: float | None = None) -> dict[str, Any]:
    a = request_arrays(r)
    ttft, tpot, ok = a["ttft_ms"], a["tpot_ms"], a["ok"]
    n = ttft.size
    meets_ttft = ok & (ttft <= slo_ttft_ms)
    meets_tpot = ok & ~(tpot > slo_tpot_ms)
    window = window_s or r.scenario.window_s or (max((q.arrived for q in r.reqs), default=r.t0) - r.t0)
    inst_s = r.instance_seconds(r.t0, r.t0 + window)
    ups = [d for d in r.decisions if d["t"] >= r.t0 and d["action"] == "up"]
    downs = [d for d in r.decisions if d["t"] >= r.t0 and d["action"] == "down"]
    return {
        "requests": n,
        "ok": int(ok.sum()),
        "ttft_ms": _dist(ttft[~np.isnan(ttft)]),
        "tpot_ms": _dist(tpot[~np.isnan(tpot)]),
        "slo": {
            "ttft_ms": slo_ttft_ms,
            "tpot_ms": slo_tpot_ms,
            "attainment": float((meets_ttft & meets_tpot).sum() / n) if n else math.nan,
            "ttft_attainment": float(meets_ttft.sum() / n) if n else math.nan,
            "tpot_attainment": float(meets_tpot.sum() / n) if n else math.nan,
        },
        "window_s": window,
        "instance_seconds": inst_s,
        "accelerator_seconds": inst_s * r.accelerators_per_instance,
        "scale_up_events": len(ups),
        "scale_down_events": len(downs),
        "instances_added": sum(d["count"] for d in ups),
        "routed": r.routed,
        "events": r.events,
        "wall_s": r.wall_s,
        "events_per_s": r.events / r.wall_s if r.wall_s > 0 else math.nan,
        "cpu_s": r.cpu_s,
        "events_per_cpu_s": r.events / r.cpu_s if r.cpu_s > 0 else math.nan,
        "sim_s": r.sim_s,
        "cache_bytes_peak": r.cache_bytes_peak,
    }


def timeline(r: Result, step: float = 1.0, window_s: float | None = None) -> dict[str, list[float]]:
    """Instances holding a model over the window, every `step` seconds (for plots)."""
    window = window_s or r.scenario.window_s or max((q.arrived for q in r.reqs), default=r.t0) - r.t0
    ts = [i * step for i in range(int(window / step) + 1)]
    # Walk each worker's transitions once, not once per sample.
    counts = [0] * len(ts)
    for seq in r.beats.values():
        state, j = False, 0
        for i, t in enumerate(ts):
            while j < len(seq) and seq[j][0] <= r.t0 + t:
                state = seq[j][1]
                j += 1
            counts[i] += state
    return {"t": ts, "instances": [float(c) for c in counts]}
