"""What the gateway learns about the rest of the mesh from the bus, beyond routing: scale
decisions and their acks, transfer plans and how each transfer ended. It turns them into
metrics (decisions by policy and trigger, transfer bytes and MB/s by source) and keeps the
recent ones for the dashboard. Pure: messages go in, metrics and dashboard frames come out;
the gateway's core subscribes and feeds it.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from cascade.messages import ScaleAck, ScaleDecision, TransferEvent, TransferPlanned
from cascade.scalefailures import reason_kind
from services.gateway.metrics import GatewayMetrics

# Kept for a dashboard that connects later: enough for a timeline of a busy few minutes.
RECENT_DECISIONS = 50
RECENT_PLANS = 20
# Transfer ids remembered to name the source of a transfer event (a plan has a chain per source).
_KNOWN_TRANSFERS = 512

Frame = tuple[str, dict[str, Any]]  # (event name, JSON body) as the dashboard's SSE stream sends it


def source_kind(source: str) -> str:
    """A plan's chain source as a metric label: "disk", "host_cache", or "chain" (a worker that
    holds the model heads it; a star branch is a chain of one)."""
    if source == "disk":
        return "disk"
    if source == "host-cache":
        return "host_cache"
    return "chain"


class MeshWatch:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.decisions: deque[dict[str, Any]] = deque(maxlen=RECENT_DECISIONS)
        self.plans: deque[dict[str, Any]] = deque(maxlen=RECENT_PLANS)
        self._sources: OrderedDict[str, str] = OrderedDict()  # transfer id -> source kind
        # Per model, the last failed scale decision until one succeeds (what /health says when down).
        self.last_failure: dict[str, dict[str, Any]] = {}

    def on_decision(self, d: ScaleDecision) -> Frame:
        self.metrics.scale_decisions.inc(
            model=d.model, policy=d.policy or "unknown", action=d.action, reason=d.trigger or "unknown"
        )
        body = {
            "decision_id": d.decision_id,
            "model": d.model,
            "action": d.action,
            "count": d.count,
            "target": d.target_replicas,
            "reason": d.reason,
            "policy": d.policy,
            "trigger": d.trigger,
            "ts": d.ts,
            "ack": None,
        }
        self.decisions.append(body)
        return "decision", body

    def on_ack(self, a: ScaleAck) -> Frame:
        ack = {"ok": a.ok, "workers": list(a.workers), "error": a.error, "ts": a.ts}
        for w, why in sorted(a.failed.items()):
            self.metrics.scale_failures.inc(model=a.model, worker=w, reason=reason_kind(why))
        if not a.ok:
            self.last_failure[a.model] = {"error": a.error, "workers": dict(a.failed), "ts": a.ts}
        elif a.workers:
            self.last_failure.pop(a.model, None)
        for d in self.decisions:
            if d["decision_id"] == a.decision_id:
                d["ack"] = ack
        return "ack", {"decision_id": a.decision_id, "model": a.model, **ack}

    def on_plan(self, p: TransferPlanned) -> Frame:
        chains = []
        for c in p.chains:
            self._sources[c.transfer_id] = source_kind(c.source)
            chains.append({"transfer_id": c.transfer_id, "source": c.source, "targets": list(c.targets)})
        while len(self._sources) > _KNOWN_TRANSFERS:
            self._sources.popitem(last=False)
        body = {
            "plan_id": p.plan_id,
            "decision_id": p.decision_id,
            "model": p.model,
            "mode": p.mode,
            "chains": chains,
            "num_units": p.num_units,
            "nbytes": p.nbytes,
            "note": p.note,
            "replaces": p.replaces,
            "ts": p.ts,
        }
        self.plans.append(body)
        return "plan", body

    def on_transfer_event(self, ev: TransferEvent) -> Frame | None:
        """Counts what a receiver took in (a sender's bytes would count the same bytes twice)."""
        if ev.role == "send":
            return None
        source = "disk" if ev.role == "disk" else self._sources.get(ev.transfer_id, "unknown")
        labels = {"model": ev.model, "worker": ev.worker_id, "source": source}
        if ev.nbytes:
            self.metrics.transfer_bytes.inc(ev.nbytes, **labels)
        if ev.seconds > 0:
            self.metrics.transfer_seconds.inc(ev.seconds, **labels)
            if ev.kind == "complete":
                self.metrics.transfer_rate.set(ev.nbytes / 1e6 / ev.seconds, **labels)
        mb_s = ev.nbytes / 1e6 / ev.seconds if ev.seconds > 0 else 0.0
        return "transfer", {
            "worker_id": ev.worker_id,
            "transfer_id": ev.transfer_id,
            "model": ev.model,
            "kind": ev.kind,
            "source": source,
            "nbytes": ev.nbytes,
            "seconds": ev.seconds,
            "mb_s": round(mb_s, 1),
            "reason": ev.reason,
            "ts": ev.ts,
        }


@dataclass(slots=True)
class _ModelInterval:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0


class IntervalStats:
    """Per model, what one dashboard interval saw: time to first token, inter-token latency and
    tokens streamed. `take` closes the interval (medians in ms, tokens/s) and starts the next."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelInterval] = {}

    def _get(self, model: str) -> _ModelInterval:
        m = self._models.get(model)
        if m is None:
            m = self._models[model] = _ModelInterval()
        return m

    def first_token(self, model: str, seconds: float) -> None:
        self._get(model).ttft.append(seconds)

    def token_gap(self, model: str, seconds: float) -> None:
        self._get(model).itl.append(seconds)

    def generated(self, model: str, n: int) -> None:
        self._get(model).tokens += n

    def take(self, interval_s: float) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for model, m in self._models.items():
            out[model] = {
                "ttft_ms": round(statistics.median(m.ttft) * 1000, 2) if m.ttft else None,
                "itl_ms": round(statistics.median(m.itl) * 1000, 2) if m.itl else None,
                "tokens_per_s": round(m.tokens / interval_s, 1) if interval_s > 0 else 0.0,
            }
        self._models = {}
        return out
