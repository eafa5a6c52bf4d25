"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges
read at scrape time, and histograms with fixed buckets."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

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


class Gauge(_Metric):
    """A gauge set from events (the last transfer's rate)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = value

    def value(self, **labels: str) -> float | None:
        return self._values.get(self._key(labels))

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


class CounterFunc(GaugeFunc):
    """A counter another process keeps (a worker's preemptions since it started), read at scrape
    time from its last report; it restarts at 0 with that process, which Prometheus' rate() expects."""

    kind = "counter"


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

    def names(self) -> list[str]:
        return [m.name for m in self._metrics]

    def catalogue(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """name -> (kind, label names) of every metric registered."""
        return {m.name: (m.kind, m.label_names) for m in self._metrics}

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.header()
            lines += m.samples()
        return "\n".join(lines) + "\n"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# vLLM's own bounds for inter-token latency and time per output token: finer below 100 ms.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# vLLM's metric names (vllm/v1/metrics/loggers.py) under Cascade's own prefix, so a dashboard
# written for vLLM works after replacing `vllm:` with `cascade:`. Labels: `model` (vLLM's
# `model_name`) and `worker` (the instance; vLLM's `engine`).
VLLM = "cascade:"


class WorkerFigures(Protocol):
    """What the gateway knows of one worker from its heartbeats (cascade.workers.WorkerView)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def model(self) -> str | None: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float: ...
    @property
    def num_preemptions(self) -> int: ...
    @property
    def units_ready(self) -> int: ...
    @property
    def num_units(self) -> int: ...
    @property
    def tokens_per_s(self) -> float: ...
    @property
    def loading_mb_s(self) -> float: ...


def _per_model(name: str, help: str, counts: Callable[[], Mapping[str, int]]) -> GaugeFunc:
    """A gauge of live gateway state: one series per model."""
    return GaugeFunc(name, help, ("model",), lambda: {(k,): float(v) for k, v in counts().items()})


def _per_worker(
    name: str,
    help: str,
    workers: Callable[[], Sequence[WorkerFigures]],
    figure: Callable[[WorkerFigures], float],
    kind: type[GaugeFunc] = GaugeFunc,
) -> GaugeFunc:
    """A metric of every worker's last heartbeat: one series per worker that holds a model."""

    def read() -> dict[LabelValues, float]:
        return {(w.model, w.worker_id): float(figure(w)) for w in workers() if w.model}

    return kind(VLLM + name, help, ("model", "worker"), read)


class GatewayMetrics:
    """Every metric the gateway exports: its own requests, and every worker's figures from the
    heartbeats it receives anyway (one scrape target for the whole mesh). Gauges read live state
    through the callables given."""

    def __init__(
        self,
        queue_depth: Callable[[], Mapping[str, int]],
        in_flight: Callable[[], Mapping[str, int]],
        instances: Callable[[], Mapping[str, int]],
        workers: Callable[[], Sequence[WorkerFigures]] = lambda: (),
    ) -> None:
        self.set = MetricSet()
        p = "cascade_gateway_"
        mw = ("model", "worker")
        self.requests = Counter(
            p + "requests_total",
            "HTTP requests answered, by endpoint and status; a stream that failed after its 200 "
            "counts under the failure's status.",
            ("endpoint", "status"),
        )
        self.latency = Histogram(
            p + "request_duration_seconds", "Request arrival to last byte, by endpoint.", LATENCY_BUCKETS, ("endpoint",)
        )
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

        # ---- vLLM's request metrics, measured where the client's stream is ----
        self.ttft = Histogram(
            VLLM + "time_to_first_token_seconds", "Request arrival to its first token.", LATENCY_BUCKETS, mw
        )
        self.itl = Histogram(
            VLLM + "inter_token_latency_seconds", "Time between two token deliveries of a request.", TOKEN_BUCKETS, mw
        )
        self.tpot = Histogram(
            VLLM + "request_time_per_output_token_seconds",
            "Per finished request: decode time over its output tokens after the first.",
            TOKEN_BUCKETS,
            mw,
        )
        self.e2e = Histogram(
            VLLM + "e2e_request_latency_seconds", "Per finished request: arrival to last token.", LATENCY_BUCKETS, mw
        )
        self.queue_time = Histogram(
            VLLM + "request_queue_time_seconds",
            "Per finished request: arrival to its (last) dispatch to a worker.",
            LATENCY_BUCKETS,
            mw,
        )
        self.prefill_time = Histogram(
            VLLM + "request_prefill_time_seconds",
            "Per finished request: dispatch to first token.",
            LATENCY_BUCKETS,
            mw,
        )
        self.decode_time = Histogram(
            VLLM + "request_decode_time_seconds", "Per finished request: first to last token.", LATENCY_BUCKETS, mw
        )
        self.prompt_tokens = Counter(
            VLLM + "prompt_tokens_total", "Prompt tokens of requests whose prefill finished.", mw
        )
        self.generation_tokens = Counter(VLLM + "generation_tokens_total", "Tokens streamed back to clients.", mw)
        self.success = Counter(
            VLLM + "request_success_total",
            "Requests that finished, by why they stopped (stop, length).",
            ("model", "worker", "finished_reason"),
        )

        # ---- Cascade's own -----------------------------------------------------
        self.failures = Counter(
            VLLM + "request_failures_total",
            "Requests that ended in an error, by its code (queue_full, no_instance, worker_died, "
            "timeout, ...); mid_stream=true when tokens had reached the client already.",
            ("model", "worker", "cause", "mid_stream"),
        )
        self.partial_routes = Counter(
            VLLM + "partial_routes_total",
            "Requests dispatched along a pipelined route, by the layers the loading instance runs.",
            ("model", "worker", "depth"),
        )
        self.migrations = Counter(
            VLLM + "migrations_total",
            "Requests moved to another instance mid-stream: their worker was lost, or (consolidate) off a "
            "partial route onto one whole instance; by why.",
            ("model", "reason"),
        )
        self.migration_failures = Counter(
            VLLM + "migration_failures_total",
            "Requests that lost their worker mid-stream and could not move on (limit reached).",
            ("model", "reason"),
        )
        self.scale_decisions = Counter(
            VLLM + "scale_decisions_total",
            "Scale decisions seen on the bus, by the model's policy, the action and why "
            "(load: the policy's target; target: an operator's or the replica bounds; lend: pool sharing).",
            ("model", "policy", "action", "reason"),
        )
        self.scale_failures = Counter(
            VLLM + "scale_failures_total",
            "Workers that failed a scale-up, by model, worker and the kind of failure (the scaler backs off "
            "from that worker for the model).",
            ("model", "worker", "reason"),
        )
        self.transfer_bytes = Counter(
            VLLM + "transfer_bytes_total",
            "Parameter bytes received by new instances, by source (chain, host_cache, disk).",
            ("model", "worker", "source"),
        )
        self.transfer_seconds = Counter(
            VLLM + "transfer_seconds_total", "Time those transfers took, by source.", ("model", "worker", "source")
        )
        self.transfer_rate = Gauge(
            VLLM + "transfer_mb_per_s",
            "MB/s of the last finished transfer into the worker, by source.",
            ("model", "worker", "source"),
        )
        for m in (
            self.requests,
            _per_model(
                p + "requests_in_flight", "Admitted requests not finished yet (queued or on a worker).", in_flight
            ),
            _per_model(
                p + "queue_depth",
                "Requests waiting in the gateway for dispatch (the workers' own queues: num_requests_waiting).",
                queue_depth,
            ),
            _per_model(p + "instances_serving", "Instances that serve the model fully.", instances),
            self.latency,
            self.batches,
            self.batch_size,
            self.routed,
            self.retries,
            self.dead_workers,
            self.ttft,
            self.itl,
            self.tpot,
            self.e2e,
            self.queue_time,
            self.prefill_time,
            self.decode_time,
            _per_worker(
                "num_requests_running",
                "Sequences in the worker's running batch (its last heartbeat).",
                workers,
                lambda w: w.running,
            ),
            _per_worker(
                "num_requests_waiting",
                "Sequences admitted by the worker, waiting for a batch slot (its last heartbeat).",
                workers,
                lambda w: w.waiting,
            ),
            _per_worker(
                "kv_cache_usage_perc",
                "KV-cache blocks held over usable blocks, 0..1 (its last heartbeat).",
                workers,
                lambda w: w.kv_cache_usage,
            ),
            _per_worker(
                "num_preemptions_total",
                "Sequences the worker preempted for KV blocks since it started.",
                workers,
                lambda w: w.num_preemptions,
                kind=CounterFunc,
            ),
            self.prompt_tokens,
            self.generation_tokens,
            self.success,
            self.failures,
            _per_worker(
                "layers_ready",
                "Units (embedding, decoder layers, head) of the model the instance holds ready.",
                workers,
                lambda w: w.units_ready,
            ),
            _per_worker(
                "layers_total", "Units the model has (embedding, decoder layers, head).", workers, lambda w: w.num_units
            ),
            _per_worker(
                "generation_tokens_per_s",
                "Tokens/s the worker generated over its last interval.",
                workers,
                lambda w: w.tokens_per_s,
            ),
            _per_worker(
                "loading_mb_per_s",
                "MB/s at which the worker receives parameters now (0 once it holds every unit).",
                workers,
                # A worker's heartbeat keeps its last load's rate after the load ends.
                lambda w: w.loading_mb_s if w.units_ready < w.num_units else 0.0,
            ),
            self.transfer_bytes,
            self.transfer_seconds,
            self.transfer_rate,
            self.scale_decisions,
            self.scale_failures,
            self.partial_routes,
            self.migrations,
            self.migration_failures,
        ):
            self.set.add(m)

    def names(self) -> list[str]:
        """Every metric name exported (tests check dashboards against it)."""
        return self.set.names()

    def catalogue(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        return self.set.catalogue()

    def render(self) -> str:
        return self.set.render()
