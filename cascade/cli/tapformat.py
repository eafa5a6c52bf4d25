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
        f"run={x.running} wait={x.waiting} tok/s={x.tokens_per_s:.1f} kv={x.kv_cache_usage:.0%}"
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
    text = (
        f"{x.decision_id} {x.model} {x.action} {x.count} -> target {x.target_replicas} reason={_short(x.reason, 60)!r}"
    )
    if x.policy or x.trigger:
        text += f" policy={x.policy or '?'}/{x.trigger or '?'}"
    return text + (f" loading={x.loading}" if x.loading else "")


def _units(units: list[int]) -> str:
    if not units:
        return "-"
    if units == list(range(units[0], units[-1] + 1)):
        return f"{units[0]}-{units[-1]}" if len(units) > 1 else str(units[0])
    return _short(units, 32)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _transfer_order(x: m.TransferOrder) -> str:
    # Never the token: anyone tapping the mesh would read it.
    text = f"{x.transfer_id} {x.role} model={x.model} units={_units(x.units)}/{x.num_units}"
    if x.downstream:
        text += f" -> {x.downstream}"
    if x.rate_limit_bps > 0:
        text += f" limit={x.rate_limit_bps / 1e6:g}MB/s"
    if x.role == "disk":
        text += f" path={x.path}"
    return text


def _transfer_event(x: m.TransferEvent) -> str:
    text = f"{x.worker_id} {x.role} {x.transfer_id} {x.kind.upper() if x.kind != 'complete' else 'complete'}"
    if x.kind == "complete" and x.seconds > 0:
        text += f" {_mb(x.nbytes)} in {x.seconds:.3f}s ({x.nbytes / 1e6 / x.seconds:.0f} MB/s)"
    if x.role != "send":
        text += f" held={x.units_held}/{x.num_units}"
    return text + (f" reason={_short(x.reason, 80)!r}" if x.reason else "")


def _transfer_plan(x: m.TransferPlanned) -> str:
    chains = "; ".join(
        f"{c.source} -> {' -> '.join(c.targets)} [{_units(c.units)}]"
        + (f" limit={c.rate_limit_bps / 1e6:g}MB/s" if c.rate_limit_bps > 0 else "")
        for c in x.chains
    )
    text = f"{x.plan_id} decision={x.decision_id} {x.model} {x.mode} {x.num_units} units {_mb(x.nbytes)}: {chains}"
    if x.replaces:
        text += f" replaces={x.replaces}"
    return text + (f" note={_short(x.note, 60)!r}" if x.note else "")


def _scale_ack(x: m.ScaleAck) -> str:
    text = f"{x.decision_id} {x.model} {'ok' if x.ok else 'FAILED'} workers={','.join(x.workers) or '-'}"
    return text + (f" error={_short(x.error, 80)!r}" if x.error else "")


def _quota_set(x: m.QuotaSet) -> str:
    every = ",".join(f"{k}:{v:g}" for k, v in sorted(x.quotas.items()))
    text = f"{x.worker_id} on {x.device} quota={x.quota:g} share={100 * x.share:.0f}% all={every}"
    return text + f" decision={x.decision_id or '-'}"


_FORMATS: dict[type[Any], Callable[[Any], str]] = {
    m.Heartbeat: _heartbeat,
    m.LayerReady: _layer_ready,
    m.GenerateBatch: _generate_batch,
    m.BatchReply: _batch_reply,
    m.TokenEvents: _token_events,
    m.ScaleDecision: _scale_decision,
    m.ScaleAck: _scale_ack,
    m.TransferOrder: _transfer_order,
    m.TransferEvent: _transfer_event,
    m.TransferPlanned: _transfer_plan,
    m.HostCacheRequest: lambda x: f"{x.action} {x.model}",
    m.LoadModel: lambda x: (
        f"model={x.model} path={x.path} decision={x.decision_id or '-'}"
        + (f" stage={x.group}[{x.stage_start},{x.stage_end})" if x.stage_end else "")
    ),
    m.UnloadModel: lambda x: f"decision={x.decision_id or '-'}",
    m.Cancel: lambda x: f"ids={_ids(x.request_ids)}",
    m.ScaleRequest: lambda x: f"{x.model} replicas={x.replicas}",
    m.ServiceReady: lambda x: f"{x.service} {x.instance} pid={x.pid}",
    m.ServiceStatus: lambda x: f"{x.service} {x.instance} pid={x.pid}",
    m.StatusRequest: lambda x: f"from={x.requester or '-'}",
    m.ErrorReply: lambda x: f"{x.code}: {_short(x.message, 80)}",
    m.SetQuota: lambda x: (
        f"quota={x.quota:g} decision={x.decision_id or '-'}" + (f" reason={_short(x.reason, 60)!r}" if x.reason else "")
    ),
    m.QuotaSet: _quota_set,
    m.InstancePlaced: lambda x: (
        f"{x.group} {x.model} {x.state.upper() if x.state == 'failed' else x.state} "
        + " ".join(f"{s.worker_id}[{s.start},{s.end})" for s in x.stages)
        + (f" reason={_short(x.reason, 80)!r}" if x.reason else "")
    ),
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
