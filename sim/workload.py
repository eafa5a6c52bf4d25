"""Workloads: the Azure code trace (parsed, windowed and scaled by bench/tracelib.py, which the
replay benchmarks use too), synthetic gamma arrivals with a burstiness knob, and many models
with skewed (Zipf) popularity.

Only the code trace is on disk (../shared/traces/, CC BY 4.0, Patel et al., "Splitwise", ISCA
2024). The conversation-style workload is synthetic: token counts drawn lognormal around the
medians the Splitwise paper reports for its conversation trace (1,020 prompt and 129 output
tokens), arrivals a gamma renewal process whose coefficient of variation is the burstiness
knob (1: Poisson), under a rate that changes level every `level_s`.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.tracelib import DEFAULT_TRACE, ScheduleSpec, build_schedule, load_trace, rate_bins
from sim.mesh import Arrival


def trace_arrivals(
    model: str,
    *,
    trace: Path = DEFAULT_TRACE,
    start_s: float = 0.0,
    duration_s: float | None = None,
    compress: float = 1.0,
    rate_scale: float = 1.0,
    prompt_scale: float = 1.0,
    max_prompt: int = 0,
    max_output: int = 0,
    seed: int = 0,
) -> list[Arrival]:
    spec = ScheduleSpec(
        start_s=start_s,
        duration_s=duration_s,
        compress=compress,
        rate_scale=rate_scale,
        seed=seed,
        prompt_scale=prompt_scale,
        max_prompt=max_prompt,
        max_output=max_output,
    )
    return [Arrival(a.t, model, a.prompt_tokens, a.output_tokens) for a in build_schedule(load_trace(trace), spec)]


def trace_peak_rate(trace: Path, start_s: float, duration_s: float | None, bin_s: float) -> tuple[float, float]:
    """(mean, busiest-bin) req/s of a trace window, in trace time."""
    rows = [r for r in load_trace(trace) if r.t >= start_s and (duration_s is None or r.t < start_s + duration_s)]
    span = duration_s if duration_s is not None else (rows[-1].t - start_s if rows else 1.0)
    bins = rate_bins((r.t - start_s for r in rows), bin_s, span)
    return len(rows) / span, max(bins) / bin_s


@dataclass(frozen=True, slots=True)
class Conversation:
    """Conversation-style synthetic workload (module docstring)."""

    mean_rate: float  # req/s over the whole run
    duration_s: float
    cv: float = 2.0  # inter-arrival coefficient of variation: the burstiness knob
    level_s: float = 60.0  # the rate changes level this often
    level_lo: float = 0.1  # levels uniform in [lo, 1] of the peak
    prompt_median: float = 1020.0
    prompt_sigma: float = 1.0
    output_median: float = 129.0
    output_sigma: float = 1.0
    max_prompt: int = 4096
    max_output: int = 1024
    seed: int = 0

    def peak_rate(self) -> float:
        return self.mean_rate / ((1 + self.level_lo) / 2)


def conversation_arrivals(model: str, w: Conversation) -> list[Arrival]:
    rng = random.Random(w.seed)
    peak = w.peak_rate()
    levels = [peak * rng.uniform(w.level_lo, 1.0) for _ in range(math.ceil(w.duration_s / w.level_s) + 1)]
    shape = 1 / (w.cv * w.cv)
    out: list[Arrival] = []
    t = 0.0
    while True:
        rate = levels[int(t // w.level_s)]
        # A gamma gap of mean 1/rate and the knob's CV; a level change applies from the next gap.
        t += rng.gammavariate(shape, 1 / (rate * shape))
        if t >= w.duration_s:
            break
        p = min(w.max_prompt, max(1, round(w.prompt_median * math.exp(rng.gauss(0, w.prompt_sigma)))))
        o = min(w.max_output, max(1, round(w.output_median * math.exp(rng.gauss(0, w.output_sigma)))))
        out.append(Arrival(t, model, p, o))
    return out


def gamma_arrivals(
    model: str, rate: float, duration_s: float, cv: float, prompt: int, output: int, seed: int = 0
) -> list[Arrival]:
    """Fixed-size requests at a constant mean rate with gamma inter-arrivals (CV `cv`)."""
    rng = random.Random(seed)
    shape = 1 / (cv * cv)
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.gammavariate(shape, 1 / (rate * shape))
        if t >= duration_s:
            return out
        out.append(Arrival(t, model, prompt, output))


def zipf_models(arrivals: Sequence[Arrival], models: Sequence[str], s: float = 1.0, seed: int = 0) -> list[Arrival]:
    """Each request to one of `models`, the i-th with weight 1 / i^s (skewed popularity)."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(len(models))]
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    return [a._replace(model=models[bisect.bisect_left(cum, rng.random() * acc)]) for a in arrivals]


def describe(arrivals: Sequence[Arrival], bin_s: float = 10.0) -> dict[str, float]:
    if not arrivals:
        return {"requests": 0}
    span = max(a.t for a in arrivals) or 1.0
    bins = rate_bins((a.t for a in arrivals), bin_s, span)
    return {
        "requests": len(arrivals),
        "span_s": span,
        "mean_req_s": len(arrivals) / span,
        "peak_req_s": max(bins) / bin_s,
        "idle_bins": sum(1 for b in bins if b == 0),
        "prompt_mean": sum(a.prompt for a in arrivals) / len(arrivals),
        "output_mean": sum(a.out for a in arrivals) / len(arrivals),
    }
