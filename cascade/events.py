"""One readable line per NATS message, for `cascade tap`: time, subject,
message type and the fields that matter for that type."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import orjson

from cascade import messages as m
from cascade.messages import MessageError, decode


def _short(v: Any, limit: int = 48) -> str:
    text = v if isinstance(v, str) else orjson.dumps(v).decode() if isinstance(v, list | dict) else str(v)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ids(ids: list[str], keep: int = 3) -> str:
    head = ",".join(ids[:keep])
    return head + (f",+{len(ids) - keep}" if len(ids) > keep else "")


def _heartbeat(x: m.Heartbeat) -> str:
    return (
        f"{x.worker_id} {x.state} model={x.model or '-'} units={x.units_ready}/{x.num_units} "
        f"run={x.running} wait={x.waiting} tok/s={x.tokens_per_s:.1f}"
    )


def _layer_ready(x: m.LayerReady) -> str:
    if x.reset:
        return f"{x.worker_id} RESET model={x.model} seq={x.seq}"
    return f"{x.worker_id} model={x.model} unit={x.unit}/{x.num_units - 1} seq={x.seq}"


def _generate_batch(x: m.GenerateBatch) -> str:
    return f"gateway={x.gateway_id} n={len(x.requests)} ids={_ids([r.request_id for r in x.requests])}"


def _batch_reply(x: m.BatchReply) -> str:
    codes = ",".join(sorted({r.code for r in x.rejected}))
    return f"accepted={len(x.accepted)} rejected={len(x.rejected)}" + (f" ({codes})" if codes else "")


def _token_events(x: m.TokenEvents) -> str:
    done = [e for e in x.events if e.finish_reason]
    ntok = sum(len(e.token_ids) for e in x.events)
    text = f"{x.worker_id} batch={x.batch_size} events={len(x.events)} tokens={ntok}"
    if done:
        text += " finished=" + ",".join(f"{e.request_id}:{e.finish_reason}" for e in done[:3])
    return text


def _scale_decision(x: m.ScaleDecision) -> str:
    return (
        f"{x.decision_id} {x.model} {x.action} {x.count} -> target {x.target_replicas} reason={_short(x.reason, 60)!r}"
    )


def _scale_ack(x: m.ScaleAck) -> str:
    text = f"{x.decision_id} {x.model} {'ok' if x.ok else 'FAILED'} workers={','.join(x.workers) or '-'}"
    return text + (f" error={_short(x.error, 80)!r}" if x.error else "")


_FORMATS: dict[type[Any], Callable[[Any], str]] = {
    m.Heartbeat: _heartbeat,
    m.LayerReady: _layer_ready,
    m.GenerateBatch: _generate_batch,
    m.BatchReply: _batch_reply,
    m.TokenEvents: _token_events,
    m.ScaleDecision: _scale_decision,
    m.ScaleAck: _scale_ack,
    m.LoadModel: lambda x: f"model={x.model} path={x.path} decision={x.decision_id or '-'}",
    m.UnloadModel: lambda x: f"decision={x.decision_id or '-'}",
    m.Cancel: lambda x: f"ids={_ids(x.request_ids)}",
    m.ScaleRequest: lambda x: f"{x.model} replicas={x.replicas}",
    m.ServiceReady: lambda x: f"{x.service} {x.instance} pid={x.pid}",
    m.ServiceStatus: lambda x: f"{x.service} {x.instance} pid={x.pid}",
    m.StatusRequest: lambda x: f"from={x.requester or '-'}",
    m.ErrorReply: lambda x: f"{x.code}: {_short(x.message, 80)}",
}


def _generic(x: Any) -> str:
    parts = []
    for f in dataclasses.fields(x):
        v = getattr(x, f.name)
        parts.append(f"{f.name}={_short(v, 24)}")
    return " ".join(parts)


def format_message(subject: str, data: bytes, *, now: float | None = None, raw: bool = False) -> str:
    """The tap line for one message. `raw` prints the payload as it went over the wire."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now or time.time()))
    stamp += f".{int(((now or time.time()) % 1) * 1000):03d}"
    if raw:
        return f"{stamp} {subject} {data.decode('utf-8', errors='replace')}"
    try:
        msg: Any = decode(data)
    except MessageError as e:
        return f"{stamp} {subject} ?? {len(data)} bytes, not a Cascade message ({e})"
    fmt = _FORMATS.get(type(msg), _generic)
    return f"{stamp} {subject} {msg.TYPE} {fmt(msg)}"
