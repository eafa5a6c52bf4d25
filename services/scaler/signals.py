"""Load signals: what a scaling policy sees about one model at one tick.

`LoadSignals` is the frozen snapshot a policy decides on. `SignalWindow` is the pure aggregator
that builds it: the scaler folds every `ModelMetrics` (from gateways) and `InstanceMetrics` (from
workers) it receives into the window of the model they name, and asks for a snapshot on each tick.
Tests and the simulator can also feed raw request events (arrival, first token, token, end) with
timestamps. Nothing here reads a clock or touches NATS: every call carries its own time.

Figures over a window are sums over the slices that end inside (now - window, now] divided by the
time observed, so a model seen for 3 s of a 30 s window is not reported at a tenth of its rate.
Times are the senders' `ts` (wall clock, `time.time()`), so `snapshot(now)` takes the scaler's
wall clock too; a sender's clock skew shifts its slices by that much, which a window of tens of
seconds tolerates.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cascade.messages import LATENCY_BUCKETS_MS, InstanceMetrics, ModelMetrics, latency_bucket

_NBUCKETS = len(LATENCY_BUCKETS_MS) + 1  # + overflow


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Percentiles (ms) of a latency over the window; all 0 when `count` is 0."""

    count: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class StepSample:
    """Mean engine step time at one batch size, pooled over the model's instances in the window."""

    batch: int
    mean_ms: float
    steps: int


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    worker_id: str
    state: str  # "serving" | "loading" | "draining"
    running: int
    waiting: int
    max_batch: int  # batch limit in force
    tokens_per_s: float  # measured generated tokens/s
    mean_batch: float = 0.0  # mean engine batch size over the last interval (0 = no steps)
    ts: float = 0.0
    kv_slots: int = 0  # the most its batch limit can be raised to (0 = unknown)
    kv_cache_usage: float = 0.0  # KV blocks held over usable blocks (0..1)

    @property
    def load(self) -> float:
        """Requests held per batch slot (> 1 when requests queue on the instance), or its KV
        usage when that is higher: an instance whose KV cache is full is loaded whatever its
        free batch slots (requests sent there wait for blocks)."""
        slots = (self.running + self.waiting) / self.max_batch if self.max_batch > 0 else 0.0
        return max(slots, self.kv_cache_usage)

    @property
    def batch_occupancy(self) -> float:
        """How full the engine's batches were: mean batch size over the batch limit."""
        return self.mean_batch / self.max_batch if self.max_batch > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LoadSignals:
    """One model's load at time `now`, as a policy sees it."""

    model: str
    now: float
    window_s: float
    arrival_rate: float = 0.0  # requests/s
    completion_rate: float = 0.0  # requests/s
    running: int = 0  # placed on a worker, not finished
    waiting: int = 0  # queued in gateways
    prompt_tps: float = 0.0
    generated_tps: float = 0.0
    ttft: LatencyStats = field(default_factory=LatencyStats)
    itl: LatencyStats = field(default_factory=LatencyStats)
    instances: tuple[InstanceLoad, ...] = ()
    serving: int = 0
    loading: int = 0
    idle_pool: int = 0  # workers with no model, shared by every model
    decision_in_flight: bool = False
    step_samples: tuple[StepSample, ...] = ()
    last_arrival: float | None = None  # time of the latest arrival seen (None = never)

    @property
    def ongoing(self) -> int:
        return self.running + self.waiting

    @property
    def replicas(self) -> int:
        """Capacity already committed: serving plus loading instances."""
        return self.serving + self.loading

    @property
    def tokens_per_request(self) -> float:
        """Generated tokens per finished request over the window (0 when nothing finished)."""
        return self.generated_tps / self.completion_rate if self.completion_rate > 0 else 0.0

    @property
    def batch_occupancy(self) -> float:
        """Mean engine batch over total batch limit across serving instances."""
        serving = [i for i in self.instances if i.state == "serving"]
        slots = sum(i.max_batch for i in serving)
        return sum(i.mean_batch for i in serving) / slots if slots else 0.0

    @property
    def kv_held(self) -> float:
        """KV cache held across serving instances, in whole instances' worth (sum of usages)."""
        return sum(i.kv_cache_usage for i in self.instances if i.state == "serving")

    @property
    def tokens_per_s_per_instance(self) -> float:
        serving = [i for i in self.instances if i.state == "serving"]
        return sum(i.tokens_per_s for i in serving) / len(serving) if serving else 0.0


# --------------------------------------------------------------------------- histograms


def histogram_percentile(counts: Sequence[int], p: float) -> float:
    """The `p`-th percentile (0..100) of a `LATENCY_BUCKETS_MS` histogram, in ms.

    Interpolates geometrically inside the bucket, matching the buckets' geometric spacing; the
    overflow bucket reads as its lower bound (the last finite bound)."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = p / 100 * total
    seen = 0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        if seen + c >= rank:
            if i >= len(LATENCY_BUCKETS_MS):
                return LATENCY_BUCKETS_MS[-1]
            hi = LATENCY_BUCKETS_MS[i]
            lo = LATENCY_BUCKETS_MS[i - 1] if i > 0 else hi / 2**0.25
            frac = min(max((rank - seen) / c, 0.0), 1.0)
            return float(lo * (hi / lo) ** frac)
        seen += c
    return LATENCY_BUCKETS_MS[-1]


def _stats(counts: Sequence[int]) -> LatencyStats:
    n = sum(counts)
    if n == 0:
        return LatencyStats()
    return LatencyStats(
        count=n,
        p50_ms=histogram_percentile(counts, 50),
        p95_ms=histogram_percentile(counts, 95),
        p99_ms=histogram_percentile(counts, 99),
    )


def _add_into(acc: list[int], counts: Iterable[int]) -> None:
    if isinstance(counts, (list, tuple)) and len(counts) <= _NBUCKETS:
        # The common case, in one pass at C speed: the simulator adds millions of these.
        acc[: len(counts)] = map(operator.add, acc, counts)
        return
    for i, c in enumerate(counts):
        if i >= _NBUCKETS:
            acc[-1] += c  # a sender with more buckets than us: count it as overflow
        else:
            acc[i] += c


# --------------------------------------------------------------------------- window


@dataclass(slots=True)
class _Slice:
    """What happened in (start, end]: one metrics interval of one sender, or raw events
    coalesced to the window's resolution."""

    start: float
    end: float
    arrivals: int = 0
    completions: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    itl: list[int] = field(default_factory=lambda: [0] * _NBUCKETS)
    steps: dict[int, tuple[int, float]] = field(default_factory=dict)  # batch → (steps, total ms)


@dataclass(slots=True)
class _Gauge:
    ts: float
    running: int
    waiting: int


class SignalWindow:
    """Windowed load figures for one model, built from timestamped metrics or raw events.

    `window_s` bounds the latency percentiles and step samples; `rate_window_s` (default: the
    same) bounds the rates, which policies usually want more responsive. Gauges (requests running
    and waiting per gateway, per-instance load) keep the latest value per sender and are dropped
    when older than `stale_s` (a gateway or worker that stopped reporting)."""

    def __init__(
        self,
        model: str,
        window_s: float = 30.0,
        rate_window_s: float | None = None,
        stale_s: float = 5.0,
        resolution_s: float = 1.0,
    ) -> None:
        if window_s <= 0 or stale_s <= 0 or resolution_s <= 0:
            raise ValueError("window_s, stale_s and resolution_s must be > 0")
        self.model = model
        self.window_s = window_s
        self.rate_window_s = rate_window_s if rate_window_s is not None else window_s
        if self.rate_window_s <= 0:
            raise ValueError("rate_window_s must be > 0")
        self.stale_s = stale_s
        self.resolution_s = resolution_s
        self._slices: deque[_Slice] = deque()
        self._since: float | None = None
        self._gateways: dict[str, _Gauge] = {}
        self._instances: dict[str, InstanceLoad] = {}
        self._raw_gauge = _Gauge(0.0, 0, 0)
        self._raw_seen = False
        self.last_arrival: float | None = None

    # ---- folding published metrics ---------------------------------------
    def add_model_metrics(self, m: ModelMetrics) -> None:
        """Fold one gateway's interval report for this model."""
        self._check_model(m.model)
        s = _Slice(start=m.ts - m.interval_s, end=m.ts)
        s.arrivals, s.completions, s.errors = m.arrivals, m.completions, m.errors
        s.prompt_tokens, s.generated_tokens = m.prompt_tokens, m.generated_tokens
        _add_into(s.ttft, m.ttft_hist)
        _add_into(s.itl, m.itl_hist)
        self._append(s)
        prev = self._gateways.get(m.gateway_id)
        if prev is None or prev.ts <= m.ts:
            self._gateways[m.gateway_id] = _Gauge(m.ts, m.running, m.waiting)
        if m.arrivals > 0 and m.last_arrival_ts > 0:
            self._note_arrival(m.last_arrival_ts)

    def add_instance_metrics(self, m: InstanceMetrics) -> None:
        """Fold one worker's interval report (its load and its engine steps)."""
        self._check_model(m.model)
        steps = sum(st.steps for st in m.steps)
        mean_batch = sum(st.batch * st.steps for st in m.steps) / steps if steps else 0.0
        prev = self._instances.get(m.worker_id)
        if prev is None or prev.ts <= m.ts:
            self._instances[m.worker_id] = InstanceLoad(
                worker_id=m.worker_id,
                state=m.state,
                running=m.running,
                waiting=m.waiting,
                max_batch=m.max_batch,
                tokens_per_s=m.tokens_per_s,
                mean_batch=mean_batch,
                ts=m.ts,
                kv_slots=m.kv_slots,
                kv_cache_usage=m.kv_cache_usage,
            )
        if m.steps:
            s = _Slice(start=m.ts - m.interval_s, end=m.ts)
            for st in m.steps:
                n, total = s.steps.get(st.batch, (0, 0.0))
                s.steps[st.batch] = (n + st.steps, total + st.total_ms)
            self._append(s)

    def instance_ids(self) -> list[str]:
        return list(self._instances)

    def forget_instance(self, worker_id: str) -> None:
        """The worker left this model (unloaded, or stopped heart-beating)."""
        self._instances.pop(worker_id, None)

    # ---- raw events (tests, simulator, a scaler colocated with a gateway) --
    def arrival(self, t: float, prompt_tokens: int = 0) -> None:
        s = self._raw_slice(t)
        s.arrivals += 1
        s.prompt_tokens += prompt_tokens
        self._note_arrival(t)

    def first_token(self, t: float, ttft_s: float) -> None:
        s = self._raw_slice(t)
        s.ttft[latency_bucket(ttft_s * 1000)] += 1
        s.generated_tokens += 1

    def token(self, t: float, gap_s: float) -> None:
        """A token after the first, `gap_s` after the previous one of the same request."""
        s = self._raw_slice(t)
        s.itl[latency_bucket(gap_s * 1000)] += 1
        s.generated_tokens += 1

    def completion(self, t: float, error: bool = False) -> None:
        s = self._raw_slice(t)
        s.completions += 1
        s.errors += int(error)

    def requests(self, t: float, running: int, waiting: int) -> None:
        """Gauge for raw-event use: requests running and waiting at `t`."""
        self._raw_gauge = _Gauge(t, running, waiting)
        self._raw_seen = True

    def instance(self, load: InstanceLoad) -> None:
        """Set one instance's load directly (raw-event use)."""
        self._instances[load.worker_id] = load

    def step(self, t: float, batch: int, ms: float) -> None:
        s = self._raw_slice(t)
        n, total = s.steps.get(batch, (0, 0.0))
        s.steps[batch] = (n + 1, total + ms)

    # ---- snapshot ----------------------------------------------------------
    def snapshot(
        self,
        now: float,
        *,
        idle_pool: int = 0,
        decision_in_flight: bool = False,
        serving: int | None = None,
        loading: int | None = None,
    ) -> LoadSignals:
        """The model's signals at `now`. `serving` and `loading` override the instance counts
        derived from worker reports: the scaler learns of an instance it asked for (from the
        loader's ack and heartbeats) before that instance sends metrics."""
        self._evict(now)
        lat_from = now - self.window_s
        rate_from = now - self.rate_window_s
        ttft = [0] * _NBUCKETS
        itl = [0] * _NBUCKETS
        steps: dict[int, tuple[int, float]] = {}
        arrivals = completions = prompt = generated = 0
        for s in self._slices:
            if s.end > lat_from:
                _add_into(ttft, s.ttft)
                _add_into(itl, s.itl)
                for b, (n, total) in s.steps.items():
                    n0, t0 = steps.get(b, (0, 0.0))
                    steps[b] = (n0 + n, t0 + total)
            if s.end > rate_from:
                arrivals += s.arrivals
                completions += s.completions
                prompt += s.prompt_tokens
                generated += s.generated_tokens
        span = self._span(now, self.rate_window_s)
        instances = tuple(
            sorted(
                (i for i in self._instances.values() if now - i.ts <= self.stale_s),
                key=lambda i: i.worker_id,
            )
        )
        n_serving = sum(1 for i in instances if i.state == "serving") if serving is None else serving
        n_loading = sum(1 for i in instances if i.state == "loading") if loading is None else loading
        running = waiting = 0
        for g in self._gateways.values():
            if now - g.ts <= self.stale_s:
                running += g.running
                waiting += g.waiting
        if self._raw_seen:
            running += self._raw_gauge.running
            waiting += self._raw_gauge.waiting
        return LoadSignals(
            model=self.model,
            now=now,
            window_s=self.window_s,
            arrival_rate=arrivals / span if span else 0.0,
            completion_rate=completions / span if span else 0.0,
            running=running,
            waiting=waiting,
            prompt_tps=prompt / span if span else 0.0,
            generated_tps=generated / span if span else 0.0,
            ttft=_stats(ttft),
            itl=_stats(itl),
            instances=instances,
            serving=n_serving,
            loading=n_loading,
            idle_pool=idle_pool,
            decision_in_flight=decision_in_flight,
            step_samples=tuple(StepSample(b, total / n, n) for b, (n, total) in sorted(steps.items()) if n > 0),
            last_arrival=self.last_arrival,
        )

    # ---- internals ---------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise ValueError(f"metrics for {model!r} folded into the window of {self.model!r}")

    def _note_arrival(self, t: float) -> None:
        if self.last_arrival is None or t > self.last_arrival:
            self.last_arrival = t

    def _append(self, s: _Slice) -> None:
        if self._since is None or s.start < self._since:
            self._since = s.start
        self._slices.append(s)

    def _raw_slice(self, t: float) -> _Slice:
        # Coalesce raw events into resolution-wide slices so memory stays bounded by
        # window / resolution, not by the request rate.
        start = math.floor(t / self.resolution_s) * self.resolution_s
        last = self._slices[-1] if self._slices else None
        if last is not None and last.start == start and last.end == start + self.resolution_s:
            return last
        s = _Slice(start=start, end=start + self.resolution_s)
        if self._since is None or t < self._since:
            self._since = t
        self._slices.append(s)
        return s

    def _span(self, now: float, window: float) -> float:
        """Time the rate is averaged over: the window, or less when we have not seen that long."""
        if self._since is None:
            return window
        return max(min(window, now - self._since), self.resolution_s)

    def _evict(self, now: float) -> None:
        horizon = now - max(self.window_s, self.rate_window_s)
        # Slices arrive roughly in time order (several senders interleave); evicting only from the
        # left until the first live one keeps this O(1) per slice, and a late straggler costs at
        # most one window of memory.
        while self._slices and self._slices[0].end <= horizon:
            self._slices.popleft()
