"""The pure parts of trace replay: load a request trace, pick a window, scale its rate, time and
token counts into an arrival schedule, and summarise what the replay recorded.

No I/O beyond reading the trace file, no clock: `bench/trace.py` does the sending. The Azure LLM
inference trace 2023 (code service) lives in ../shared/traces/ with its licence notice
(CC BY 4.0, attribution to Patel et al., "Splitwise", ISCA 2024); keep the notice with any copy.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.common import dist_ms


def _traces_dir() -> Path:
    """`shared/traces` beside the checkout: the nearest ancestor that has one (a git worktree
    sits deeper than the main checkout, and must find the same traces)."""
    here = Path(__file__).resolve().parent
    for parent in here.parents:
        if (parent / "shared" / "traces").is_dir():
            return parent / "shared" / "traces"
    return here.parents[1] / "shared" / "traces"


TRACES_DIR = _traces_dir()
DEFAULT_TRACE = TRACES_DIR / "azure_llm_2023_code.csv"
# The notice that goes with the default trace and with any figure derived from it.
LICENCE = (
    "Azure LLM inference trace 2023, CC BY 4.0. Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini: "
    '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.'
)


class TraceError(ValueError):
    """A trace file or a replay option that cannot be used; the message says which and why."""


def missing_trace(path: Path) -> str:
    """What is missing and where it was looked for, in words a user can act on."""
    if path.resolve() == DEFAULT_TRACE.resolve():
        looked = "shared/traces/ in the checkout's folder or any folder above it"
        if not TRACES_DIR.is_dir():
            where = f"there is no {looked}"
        else:
            where = f"{TRACES_DIR} has no {DEFAULT_TRACE.name}"
        return (
            f"the default trace (the Azure LLM inference trace 2023, code service) is missing: {where}. "
            f"Put azure_llm_2023_code.csv (from the Azure Public Dataset, AzureLLMInferenceDataset2023) at "
            f"{DEFAULT_TRACE}, or pass --trace FILE: any CSV with the columns TIMESTAMP,ContextTokens,GeneratedTokens"
        )
    return f"no trace at {path}: pass --trace FILE, a CSV with the columns TIMESTAMP,ContextTokens,GeneratedTokens"


@dataclass(frozen=True, slots=True)
class TraceRow:
    t: float  # seconds since the trace's first request
    prompt_tokens: int
    output_tokens: int


def parse_timestamp(text: str) -> float:
    """`2023-11-16 18:17:03.9799600` → POSIX seconds, as UTC. The trace has 7 fractional digits,
    more than `datetime.fromisoformat` takes in Python 3.11, so the fraction is parsed apart."""
    text = text.strip()
    head, _, frac = text.partition(".")
    try:
        base = dt.datetime.strptime(head, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
    except ValueError:
        raise TraceError(f"bad timestamp {text!r}: expected YYYY-MM-DD HH:MM:SS[.fraction]") from None
    if frac and not frac.isdigit():
        raise TraceError(f"bad timestamp {text!r}: fraction must be digits")
    return base.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


def load_trace(path: Path) -> list[TraceRow]:
    """Rows of a `TIMESTAMP,ContextTokens,GeneratedTokens` CSV, sorted by time, times relative to
    the first request."""
    if not path.exists():
        raise TraceError(missing_trace(path))
    try:
        f = path.open(newline="")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise TraceError(f"trace {path} needs the columns {sorted(need)}, has {reader.fieldnames}")
        raw: list[tuple[float, int, int]] = []
        for n, r in enumerate(reader, start=2):
            try:
                raw.append((parse_timestamp(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"])))
            except (TraceError, ValueError) as e:
                raise TraceError(f"trace {path} line {n}: {e}") from None
    if not raw:
        raise TraceError(f"trace {path} has no requests")
    raw.sort(key=lambda x: x[0])
    t0 = raw[0][0]
    return [TraceRow(t - t0, max(p, 0), max(g, 0)) for t, p, g in raw]


def window(rows: Sequence[TraceRow], start_s: float, duration_s: float | None) -> list[TraceRow]:
    """Rows with start_s <= t < start_s + duration_s (None: to the end), rebased to start at 0."""
    if start_s < 0 or (duration_s is not None and duration_s <= 0):
        raise TraceError("window start must be >= 0 and duration > 0")
    end = math.inf if duration_s is None else start_s + duration_s
    return [TraceRow(r.t - start_s, r.prompt_tokens, r.output_tokens) for r in rows if start_s <= r.t < end]


def scale_rate(rows: Sequence[TraceRow], factor: float, seed: int) -> list[TraceRow]:
    """Thin (factor < 1) or multiply (factor > 1) arrivals, deterministically for a seed.

    Each row is kept floor(factor) times, plus once more with probability frac(factor). Copies of
    one row are spread evenly over the gap to the next arrival rather than stacked at one instant,
    so the rate curve scales without inventing bursts the trace did not have."""
    if factor <= 0:
        raise TraceError("rate scale must be > 0")
    rng = random.Random(seed)
    whole, frac = int(factor), factor - int(factor)
    out: list[TraceRow] = []
    for i, r in enumerate(rows):
        copies = whole + (1 if rng.random() < frac else 0)
        gap = rows[i + 1].t - r.t if i + 1 < len(rows) else 0.0
        out.extend(TraceRow(r.t + gap * j / copies, r.prompt_tokens, r.output_tokens) for j in range(copies))
    return out


def scale_time(rows: Sequence[TraceRow], compress: float) -> list[TraceRow]:
    """Divide every time by `compress` (2 = replay twice as fast: same requests, double rate)."""
    if compress <= 0:
        raise TraceError("time compression must be > 0")
    return [TraceRow(r.t / compress, r.prompt_tokens, r.output_tokens) for r in rows]


def scale_count(n: int, scale: float, lo: int, hi: int) -> int:
    """round(n × scale), clamped to [lo, hi] (hi 0 = no upper bound)."""
    v = max(lo, round(n * scale))
    return min(v, hi) if hi > 0 else v


@dataclass(frozen=True, slots=True)
class Arrival:
    index: int
    t: float  # seconds after the replay starts
    prompt_tokens: int
    output_tokens: int
    trace_t: float  # where it came from in the original trace (seconds since its first request)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    start_s: float = 0.0  # window start, trace seconds
    duration_s: float | None = None  # window length, trace seconds (None: to the end)
    compress: float = 1.0  # time compression
    rate_scale: float = 1.0  # arrivals multiplied (or thinned) by this
    seed: int = 0
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    min_prompt: int = 1
    max_prompt: int = 0  # 0: no cap
    min_output: int = 1
    max_output: int = 0


def build_schedule(rows: Sequence[TraceRow], spec: ScheduleSpec) -> list[Arrival]:
    """Window → rate scaling → time compression → token scaling, in that order: the window and
    the rate are chosen in trace time, the way one reads the trace's rate plot."""
    if spec.min_prompt < 1 or spec.min_output < 1:
        raise TraceError("min prompt and output tokens must be >= 1")
    if spec.prompt_scale <= 0 or spec.output_scale <= 0:
        raise TraceError("token scales must be > 0")
    for lo, hi, what in ((spec.min_prompt, spec.max_prompt, "prompt"), (spec.min_output, spec.max_output, "output")):
        if hi and hi < lo:
            raise TraceError(f"max {what} tokens ({hi}) is below the minimum ({lo})")
    w = window(rows, spec.start_s, spec.duration_s)
    scaled = scale_rate(w, spec.rate_scale, spec.seed)
    timed = scale_time(scaled, spec.compress)
    return [
        Arrival(
            index=i,
            t=r.t,
            prompt_tokens=scale_count(r.prompt_tokens, spec.prompt_scale, spec.min_prompt, spec.max_prompt),
            output_tokens=scale_count(r.output_tokens, spec.output_scale, spec.min_output, spec.max_output),
            trace_t=spec.start_s + o.t,
        )
        for i, (r, o) in enumerate(zip(timed, scaled, strict=True))
    ]


def prompt_ids(n: int, seed: int, index: int, lo: int = 32, hi: int = 127) -> list[int]:
    """`n` deterministic token ids in [lo, hi): printable ASCII by default, which the byte-level
    tokenizer reads as bytes and every real vocabulary also has. Differing per request, so no
    prefix cache makes the replay cheaper than the trace was."""
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(lo, hi) for _ in range(n)]


# --------------------------------------------------------------------------- rate analysis


def rate_bins(times: Iterable[float], bin_s: float, duration_s: float | None = None) -> list[int]:
    """Arrivals per `bin_s` bin from 0 (to `duration_s`, else to the last arrival)."""
    ts = list(times)
    if bin_s <= 0:
        raise TraceError("bin must be > 0")
    end = duration_s if duration_s is not None else (max(ts) if ts else 0.0)
    bins = [0] * max(1, math.ceil(end / bin_s) if duration_s is not None else int(end // bin_s) + 1)
    for t in ts:
        i = int(t // bin_s)
        if 0 <= i < len(bins):
            bins[i] += 1
    return bins


@dataclass(frozen=True, slots=True)
class WindowStat:
    start_s: float
    duration_s: float
    requests: int
    mean_rate: float  # req/s over the window
    peak_rate: float  # req/s in the busiest bin
    peak_to_mean: float
    idle_bins: int  # bins with no arrivals
    bins: tuple[int, ...] = field(default=(), repr=False)


def window_stat(rows: Sequence[TraceRow], start_s: float, duration_s: float, bin_s: float) -> WindowStat:
    w = window(rows, start_s, duration_s)
    bins = rate_bins((r.t for r in w), bin_s, duration_s)
    mean = len(w) / duration_s
    peak = max(bins) / bin_s
    return WindowStat(
        start_s=start_s,
        duration_s=duration_s,
        requests=len(w),
        mean_rate=mean,
        peak_rate=peak,
        peak_to_mean=peak / mean if mean > 0 else 0.0,
        idle_bins=sum(1 for b in bins if b == 0),
        bins=tuple(bins),
    )


def bursty_windows(
    rows: Sequence[TraceRow],
    duration_s: float,
    bin_s: float = 10.0,
    step_s: float = 30.0,
    min_rate: float = 0.0,
    top: int = 5,
) -> list[WindowStat]:
    """Windows of `duration_s` (starts every `step_s`), with at least `min_rate` req/s on average,
    ranked by peak-to-mean ratio: the burstiest stretches of the trace. Windows overlapping a
    better-ranked one by more than half are left out, so the list shows distinct stretches."""
    end = rows[-1].t if rows else 0.0
    stats = []
    start = 0.0
    while start + duration_s <= end + bin_s:
        s = window_stat(rows, start, duration_s, bin_s)
        if s.requests and s.mean_rate >= min_rate:
            stats.append(s)
        start += step_s
    stats.sort(key=lambda s: (-s.peak_to_mean, s.start_s))
    chosen: list[WindowStat] = []
    for s in stats:
        if all(abs(s.start_s - c.start_s) >= duration_s / 2 for c in chosen):
            chosen.append(s)
        if len(chosen) == top:
            break
    return chosen


# --------------------------------------------------------------------------- records and summary


@dataclass(slots=True)
class RequestRecord:
    """One replayed request. Times are seconds since the replay started."""

    index: int
    scheduled: float
    prompt_tokens: int
    output_tokens: int  # asked for
    trace_t: float = 0.0
    sent: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    status: str = "pending"  # ok | http_error | timeout | stream_error | error
    http_status: int | None = None
    error: str | None = None
    completion_tokens: int = 0  # as the server's usage says (else the chunks counted)
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        if self.first_token is None or self.sent is None:
            return None
        return self.first_token - self.sent

    @property
    def gaps(self) -> list[float]:
        ts = self.token_times
        return [b - a for a, b in pairwise(ts)]

    @property
    def tpot(self) -> float | None:
        """Mean time between tokens (None with fewer than two tokens)."""
        ts = self.token_times
        return (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) >= 2 else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(records: Sequence[RequestRecord], slo_ttft_ms: float, slo_tbt_ms: float) -> dict[str, Any]:
    """Counts, latency distributions and SLO attainment of a replay.

    A request meets the SLO when it finished ok, its TTFT is within `slo_ttft_ms`, and its mean
    time between tokens (TPOT) is within `slo_tbt_ms`. Every scheduled request counts in the
    denominator: one that failed or timed out missed its SLO, it did not vanish."""
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    ok = [r for r in records if r.status == "ok"]
    ttfts = [x for r in records if (x := r.ttft) is not None]
    gaps = [g for r in ok for g in r.gaps]
    tpots = [x for r in ok if (x := r.tpot) is not None]
    lags = [r.sent - r.scheduled for r in records if r.sent is not None]

    def meets_ttft(r: RequestRecord) -> bool:
        return r.status == "ok" and r.ttft is not None and r.ttft * 1000 <= slo_ttft_ms

    def meets_tbt(r: RequestRecord) -> bool:
        return r.status == "ok" and (r.tpot is None or r.tpot * 1000 <= slo_tbt_ms)

    n = len(records)
    starts = [r.sent for r in records if r.sent is not None]
    ends = [r.end for r in records if r.end is not None]
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": n,
        "status": dict(sorted(statuses.items())),
        "ok": len(ok),
        "span_s": span,
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "completion_tokens": tokens,
        "ttft_ms": dist_ms(ttfts),
        "itl_ms": dist_ms(gaps),
        "tpot_ms": dist_ms(tpots),
        "send_lag_ms": dist_ms(lags),
        "slo": {
            "ttft_ms": slo_ttft_ms,
            "tbt_ms": slo_tbt_ms,
            "definition": "ok, TTFT <= ttft_ms and mean time between tokens <= tbt_ms; failures count as misses",
            "attainment": sum(1 for r in records if meets_ttft(r) and meets_tbt(r)) / n if n else float("nan"),
            "ttft_attainment": sum(1 for r in records if meets_ttft(r)) / n if n else float("nan"),
            "tbt_attainment": sum(1 for r in records if meets_tbt(r)) / n if n else float("nan"),
        },
    }


def format_summary(s: dict[str, Any]) -> str:
    def dist(name: str, d: dict[str, float]) -> str:
        figures = "  ".join(f"{k} {d[k]:8.1f}" for k in ("p50", "p95", "p99", "max"))
        return f"{name:<10} {figures} ms  (n={d['n']})"

    slo = s["slo"]
    status = ", ".join(f"{k} {v}" for k, v in s["status"].items())
    lines = [
        f"requests   {s['requests']} ({status})",
        f"served     {s['ok']} ok in {s['span_s']:.1f} s: "
        f"{s['throughput_rps']:.2f} req/s, {s['tokens_per_s']:.1f} tokens/s",
        dist("TTFT", s["ttft_ms"]),
        dist("ITL", s["itl_ms"]),
        dist("TPOT", s["tpot_ms"]),
        dist("send lag", s["send_lag_ms"]),
        f"SLO        TTFT <= {slo['ttft_ms']:g} ms and TBT (mean) <= {slo['tbt_ms']:g} ms: "
        f"{100 * slo['attainment']:.1f} % attained "
        f"(TTFT alone {100 * slo['ttft_attainment']:.1f} %, TBT alone {100 * slo['tbt_attainment']:.1f} %)",
    ]
    return "\n".join(lines)
