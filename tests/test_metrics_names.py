"""The metric names people's dashboards expect: vLLM's (under `cascade:`, with `model` and
`worker` labels) and Cascade's own, checked against the registry the gateway exports."""

from __future__ import annotations

from services.gateway.metrics import GatewayMetrics
from services.gateway.testing import parse_prometheus

# vLLM's production metrics (docs.vllm.ai, "Production Metrics"), as issue 15 lists them.
VLLM_NAMES = {
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "request_time_per_output_token_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge",
    "prompt_tokens_total": "counter",
    "generation_tokens_total": "counter",
    "request_success_total": "counter",
    "num_preemptions_total": "counter",
}
# Cascade's own: layers ready per instance, transfers by source, scale decisions by policy and
# reason, partial routes by split depth, failures by cause, migrations.
CASCADE_NAMES = {
    "layers_ready": ("model", "worker"),
    "layers_total": ("model", "worker"),
    "loading_mb_per_s": ("model", "worker"),
    "transfer_bytes_total": ("model", "worker", "source"),
    "transfer_mb_per_s": ("model", "worker", "source"),
    "scale_decisions_total": ("model", "policy", "action", "reason"),
    "partial_routes_total": ("model", "worker", "depth"),
    "request_failures_total": ("model", "worker", "cause", "mid_stream"),
    "migrations_total": ("model", "reason"),
    "scale_failures_total": ("model", "worker", "reason"),
}


def _metrics() -> GatewayMetrics:
    return GatewayMetrics(queue_depth=dict, in_flight=dict, instances=dict)


def test_every_vllm_name_is_exported_with_model_and_worker_labels() -> None:
    cat = _metrics().catalogue()
    for name, kind in VLLM_NAMES.items():
        full = "cascade:" + name
        assert full in cat, f"{full} is not exported"
        got_kind, labels = cat[full]
        assert got_kind == kind, f"{full} is a {got_kind}, vLLM's is a {kind}"
        assert labels[:2] == ("model", "worker"), f"{full} labels {labels}"
    assert cat["cascade:request_success_total"][1] == ("model", "worker", "finished_reason")


def test_cascade_own_metrics_are_exported() -> None:
    cat = _metrics().catalogue()
    for name, labels in CASCADE_NAMES.items():
        assert cat["cascade:" + name][1] == labels, name


def test_the_registry_renders_valid_exposition_with_every_name_typed() -> None:
    m = _metrics()
    m.ttft.observe(0.2, model="m", worker="w")
    m.success.inc(model="m", worker="w", finished_reason="stop")
    text = m.render()
    parse_prometheus(text)  # strict: TYPE before samples, cumulative buckets
    typed = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert typed == set(m.names())
