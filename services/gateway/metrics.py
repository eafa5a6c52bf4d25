"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges
read at scrape time, and histograms with fixed buckets."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(labels)

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        k = self._key(labels)
        self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in sorted(self._values.items())]


class GaugeFunc(_Metric):
    """A gauge computed at scrape time, so it can never drift from the state it reports."""

    kind = "gauge"

    def __init__(
        self, name: str, help: str, labels: Sequence[str], read: Callable[[], Mapping[LabelValues, float]]
    ) -> None:
        super().__init__(name, help, labels)
        self._read = read

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in sorted(self._read().items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets or any(math.isinf(b) for b in self.buckets):
            raise ValueError("give finite bucket bounds; +Inf is implicit")
        # per label set: counts per bucket (not cumulative), sum, count
        self._data: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        counts, acc = self._data.setdefault(k, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect_left(self.buckets, value)] += 1
        acc[0] += value

    def count(self, **labels: str) -> int:
        d = self._data.get(self._key(labels))
        return 0 if d is None else sum(d[0])

    def samples(self) -> list[str]:
        out = []
        for k, (counts, acc) in sorted(self._data.items()):
            running = 0
            for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
                running += c
                le = 'le="' + _fmt(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, k, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, k)} {_fmt(acc[0])}")
            out.append(f"{self.name}_count{_labels(self.label_names, k)} {running}")
        return out


class MetricSet:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.header()
            lines += m.samples()
        return "\n".join(lines) + "\n"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GatewayMetrics:
    """Every metric the gateway exports. Gauges read live state through the callables given."""

    def __init__(
        self,
        queue_depth: Callable[[], Mapping[str, int]],
        in_flight: Callable[[], Mapping[str, int]],
        instances: Callable[[], Mapping[str, int]],
    ) -> None:
        self.set = MetricSet()
        p = "cascade_gateway_"
        self.requests = Counter(
            p + "requests_total", "HTTP requests answered, by endpoint and status.", ("endpoint", "status")
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Request arrival to first token.", LATENCY_BUCKETS, ("model",)
        )
        self.latency = Histogram(
            p + "request_duration_seconds", "Request arrival to last byte, by endpoint.", LATENCY_BUCKETS, ("endpoint",)
        )
        self.tokens = Counter(p + "generated_tokens_total", "Completion tokens streamed back.", ("model",))
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens of admitted requests.", ("model",))
        self.batches = Counter(p + "batches_total", "GenerateBatch messages dispatched to workers.", ("model",))
        self.batch_size = Histogram(p + "batch_size", "Requests per dispatched batch.", BATCH_BUCKETS, ("model",))
        self.routed = Counter(
            p + "routed_requests_total",
            "Dispatches by route: the whole model on one instance, or pipelined through a loading one.",
            ("model", "route"),
        )
        self.retries = Counter(
            p + "retries_total", "Requests sent again (rejected, lost, or their worker died).", ("model", "reason")
        )
        self.dead_workers = Counter(p + "dead_workers_total", "Workers dropped after missing heartbeats.")
        self.migrations = Counter(
            p + "migrations_total",
            "Requests moved to another instance after their worker was lost mid-stream, by why.",
            ("model", "reason"),
        )
        self.migration_failures = Counter(
            p + "migration_failures_total",
            "Requests that lost their worker mid-stream and could not move on (limit reached).",
            ("model", "reason"),
        )
        for m in (
            self.requests,
            GaugeFunc(
                p + "requests_in_flight",
                "Admitted requests not finished yet (queued or on a worker).",
                ("model",),
                lambda: {(k,): float(v) for k, v in in_flight().items()},
            ),
            GaugeFunc(
                p + "queue_depth",
                "Requests waiting for dispatch.",
                ("model",),
                lambda: {(k,): float(v) for k, v in queue_depth().items()},
            ),
            GaugeFunc(
                p + "instances_serving",
                "Instances that serve the model fully.",
                ("model",),
                lambda: {(k,): float(v) for k, v in instances().items()},
            ),
            self.ttft,
            self.latency,
            self.tokens,
            self.prompt_tokens,
            self.batches,
            self.batch_size,
            self.routed,
            self.retries,
            self.dead_workers,
            self.migrations,
            self.migration_failures,
        ):
            self.set.add(m)

    def render(self) -> str:
        return self.set.render()
