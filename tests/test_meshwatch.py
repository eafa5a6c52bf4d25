"""The gateway's view of decisions and transfers (services/gateway/meshwatch.py), message by
message, no broker: what each bus message adds to /metrics and sends to the dashboard."""

from __future__ import annotations

import pytest

from cascade.messages import PlannedChain, ScaleAck, ScaleDecision, TransferEvent, TransferPlanned
from services.gateway.meshwatch import IntervalStats, MeshWatch, source_kind
from services.gateway.metrics import GatewayMetrics


def _watch() -> tuple[MeshWatch, GatewayMetrics]:
    m = GatewayMetrics(queue_depth=dict, in_flight=dict, instances=dict)
    return MeshWatch(m), m


def test_sources_are_named_by_kind() -> None:
    assert [source_kind(s) for s in ("disk", "host-cache", "worker-3")] == ["disk", "host_cache", "chain"]


def test_receivers_count_bytes_by_their_chains_source_and_senders_do_not() -> None:
    w, m = _watch()
    plan = TransferPlanned(
        "p1",
        "d1",
        "m",
        "multicast",
        [PlannedChain("t-cache", "host-cache", ["a", "b"], [0, 1]), PlannedChain("t-peer", "w0", ["c"], [0, 1])],
        2,
        3_000_000,
    )
    assert w.on_plan(plan)[0] == "plan"
    w.on_transfer_event(TransferEvent("a", "t-cache", "m", "receive", "complete", nbytes=2_000_000, seconds=0.5))
    w.on_transfer_event(TransferEvent("c", "t-peer", "m", "receive", "complete", nbytes=3_000_000, seconds=1.0))
    assert w.on_transfer_event(TransferEvent("w0", "t-peer", "m", "send", "complete", nbytes=3_000_000)) is None
    w.on_transfer_event(TransferEvent("d", "t-disk", "m", "disk", "complete", nbytes=1_000_000, seconds=2.0))
    w.on_transfer_event(TransferEvent("e", "t-gone", "m", "receive", "failed", reason="x", nbytes=10, seconds=1.0))
    b = m.transfer_bytes
    assert b.value(model="m", worker="a", source="host_cache") == 2_000_000
    assert b.value(model="m", worker="c", source="chain") == 3_000_000
    assert b.value(model="m", worker="w0", source="chain") == 0  # the sender's copy of the same bytes
    assert b.value(model="m", worker="d", source="disk") == 1_000_000
    assert b.value(model="m", worker="e", source="unknown") == 10  # its plan was not heard
    assert m.transfer_rate.value(model="m", worker="a", source="host_cache") == pytest.approx(4.0)
    assert m.transfer_rate.value(model="m", worker="e", source="unknown") is None  # failed: no rate


def test_decisions_are_counted_by_policy_and_trigger_and_acks_attach_to_them() -> None:
    w, m = _watch()
    w.on_decision(ScaleDecision("d1", "m", "up", 2, 3, "below target", policy="manual", trigger="target"))
    w.on_decision(ScaleDecision("d2", "m", "down", 1, 2, "old scaler"))  # one that names neither
    assert m.scale_decisions.value(model="m", policy="manual", action="up", reason="target") == 1
    assert m.scale_decisions.value(model="m", policy="unknown", action="down", reason="unknown") == 1
    event, body = w.on_ack(ScaleAck("d1", "m", True, ["a", "b"]))
    assert event == "ack" and body["workers"] == ["a", "b"]
    assert [d["ack"] is not None for d in w.decisions] == [True, False]


def test_interval_stats_give_medians_and_rates_then_start_afresh() -> None:
    s = IntervalStats()
    for x in (0.1, 0.3, 0.2):
        s.first_token("m", x)
    s.token_gap("m", 0.01)
    s.generated("m", 50)
    assert s.take(2.0) == {"m": {"ttft_ms": 200.0, "itl_ms": 10.0, "tokens_per_s": 25.0}}
    assert s.take(1.0) == {}


def test_failed_workers_of_an_ack_are_counted_by_kind_and_kept_until_a_success() -> None:
    w, m = _watch()
    why = "w2 refused the receive order of p-0 (load_failed: /m has no config.json)"
    w.on_ack(ScaleAck("d1", "m", False, [], why, failed={"w2": why}))
    w.on_ack(ScaleAck("d2", "m", False, [], why, failed={"w2": why}))
    assert m.scale_failures.value(model="m", worker="w2", reason="no_model_files") == 2
    assert w.last_failure["m"]["workers"] == {"w2": why}
    w.on_ack(ScaleAck("d3", "m", True, ["w3"]))
    assert "m" not in w.last_failure
