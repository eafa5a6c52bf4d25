"""What `cascade status` shows: the mesh's answers to one status scatter-gather
(`natsutil.gather_status`) merged with the worker heartbeats heard during the same
window, rendered as tables or JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cascade.console import bar, human_bytes, table
from cascade.natsutil import MeshStatus

_INSTANCE_FIELDS = (
    "state",
    "model",
    "units_ready",
    "num_units",
    "running",
    "waiting",
    "max_batch",
    "tokens_per_s",
    "loading_mb_s",
    "group",
    "stage_start",
    "stage_end",
    "shared_device",
    "quota",
)


def instances(status: MeshStatus) -> list[dict[str, Any]]:
    """One row per worker: heartbeat figures first (freshest), the status reply's detail for the rest."""
    rows: dict[str, dict[str, Any]] = {}
    for st in status.services:
        if st.service != "worker":
            continue
        d = st.detail
        rows[st.instance] = {"worker_id": st.instance, "pid": st.pid, **{k: d.get(k) for k in _INSTANCE_FIELDS}}
    for wid, hb in status.heartbeats.items():
        row = rows.setdefault(wid, {"worker_id": wid})
        row["pid"] = hb.pid
        for k in _INSTANCE_FIELDS:
            row[k] = getattr(hb, k)
    out = []
    for wid in sorted(rows):
        row = rows[wid]
        running, max_batch = row.get("running"), row.get("max_batch")
        row["load"] = (
            round(running / max_batch, 3)
            if isinstance(running, int) and isinstance(max_batch, int) and max_batch > 0
            else None
        )
        out.append(row)
    return out


def pipelined(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One row per pipelined instance: its stages in layer order, each as worker [start, end) state."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("group"):
            groups.setdefault(str(r["group"]), []).append(r)
    out = []
    for g, members in sorted(groups.items()):
        members.sort(key=lambda r: r.get("stage_start") or 0)
        stages = "  ".join(
            f"{r['worker_id']} [{r.get('stage_start')}, {r.get('stage_end')}) {r.get('state') or '?'}" for r in members
        )
        out.append([g, str(members[0].get("model") or "-"), stages])
    return out


def shared(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One row per shared worker: each instance on it with its model (or stage), quota and share."""
    devices: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("shared_device"):
            devices.setdefault(str(r["shared_device"]), []).append(r)
    out = []
    for d, members in sorted(devices.items()):
        total = sum(float(r.get("quota") or 0) for r in members) or 1.0
        cells = []
        for r in members:
            what = str(r.get("model") or "idle")
            if r.get("group"):
                what += f" [{r.get('stage_start')}, {r.get('stage_end')})"
            q = float(r.get("quota") or 0)
            cells.append(f"{r['worker_id']} {what} quota {q:g} ({100 * q / total:.0f}%)")
        out.append([d, "  ".join(cells)])
    return out


def transfers(status: MeshStatus) -> list[dict[str, Any]]:
    """Parameter transfers the loaders report: one row per target, in flight and recently done."""
    rows: list[dict[str, Any]] = []
    for st in status.services:
        if st.service == "loader" and isinstance(st.detail.get("transfers"), list):
            rows += [dict(r, loader=st.instance) for r in st.detail["transfers"] if isinstance(r, dict)]
    return rows


def host_cache(status: MeshStatus) -> list[dict[str, Any]]:
    """What each loader's host cache holds: one row per model."""
    rows: list[dict[str, Any]] = []
    for st in status.services:
        held = st.detail.get("host_cache") if st.service == "loader" else None
        if isinstance(held, dict):
            host = st.detail.get("host_id", "")
            rows += [
                dict(v, model=k, loader=st.instance, host=host) for k, v in sorted(held.items()) if isinstance(v, dict)
            ]
    return rows


def backoff(status: MeshStatus) -> list[dict[str, Any]]:
    """Workers the scaler avoids for a model after they failed it: one row per (model, worker)."""
    rows: list[dict[str, Any]] = []
    for st in status.services:
        held = st.detail.get("backoff") if st.service == "scaler" else None
        if isinstance(held, list):
            rows += [r for r in held if isinstance(r, dict)]
    return rows


def _mb(v: Any) -> str:
    return human_bytes(float(v) * 1e6) if isinstance(v, int | float) else "?"


def local_caches(status: MeshStatus) -> list[dict[str, Any]]:
    """Each worker's own host-memory checkpoint cache, where one is configured."""
    rows: list[dict[str, Any]] = []
    for st in status.services:
        held = st.detail.get("local_cache") if st.service == "worker" else None
        if isinstance(held, dict):
            rows.append(dict(held, worker_id=st.instance))
    return sorted(rows, key=lambda r: str(r["worker_id"]))


def to_json(status: MeshStatus, nats_url: str, prefix: str) -> dict[str, Any]:
    return {
        "nats_url": nats_url,
        "prefix": prefix,
        "services": [asdict(s) for s in status.services],
        "instances": instances(status),
        "transfers": transfers(status),
        "host_cache": host_cache(status),
        "backoff": backoff(status),
    }


def _scalar_summary(detail: dict[str, Any], limit: int = 70) -> str:
    parts = []
    for k, v in detail.items():
        if isinstance(v, bool | int | float | str) or v is None:
            parts.append(f"{k}={v}")
        elif isinstance(v, dict) and all(isinstance(x, bool | int | float | str) for x in v.values()):
            parts.append(f"{k}=" + ",".join(f"{a}:{b}" for a, b in v.items()))
        elif isinstance(v, list):
            parts.append(f"{k}={len(v)}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _units_cell(row: dict[str, Any]) -> str:
    ready, total = row.get("units_ready"), row.get("num_units")
    if not isinstance(ready, int) or not isinstance(total, int) or total <= 0:
        return "-"
    if row.get("state") == "loading" or ready < total:
        mb_s = row.get("loading_mb_s")
        rate = f" {mb_s:.0f} MB/s" if isinstance(mb_s, int | float) and mb_s > 0 else ""
        return f"{bar(ready, total, 12)} {ready}/{total}{rate}"
    return f"{ready}/{total}"


def _transfer_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        ready, total = r.get("units_ready"), r.get("num_units")
        progress = (
            f"{bar(ready, total, 12)} {ready}/{total}" if isinstance(ready, int) and isinstance(total, int) else "-"
        )
        mb_s = r.get("mb_s")
        state = str(r.get("state", "?"))
        if r.get("error"):
            state += f": {str(r['error'])[:60]}"
        out.append(
            [
                str(r.get("worker", "?")),
                str(r.get("model", "-")),
                progress,
                "-" if not isinstance(mb_s, int | float) else f"{mb_s:.0f}",
                f"{r.get('source', '?')} ({r.get('mode', '?')})",
                str(r.get("decision_id", "-")),
                state,
            ]
        )
    return out


def render(status: MeshStatus, nats_url: str, prefix: str) -> str:
    lines = [f"mesh '{prefix}' at {nats_url}: {len(status.services)} service instance(s) answered", ""]
    srows = []
    for st in status.services:
        detail = str(st.detail.get("state", "")) if st.service == "worker" else _scalar_summary(st.detail)
        srows.append([st.service, st.instance, str(st.pid), detail])
    lines.append(table(["SERVICE", "INSTANCE", "PID", "DETAIL"], srows))
    rows = instances(status)
    if rows:
        irows = []
        for r in rows:
            tps = r.get("tokens_per_s")
            load = r.get("load")
            irows.append(
                [
                    r["worker_id"],
                    str(r.get("model") or "-"),
                    _units_cell(r),
                    str(r.get("state") or "?"),
                    f"{r.get('running', '?')}/{r.get('waiting', '?')}",
                    "-" if load is None else f"{100 * load:.0f}%",
                    "-" if not isinstance(tps, int | float) else f"{tps:.1f}",
                ]
            )
        lines += ["", table(["INSTANCE", "MODEL", "UNITS", "STATE", "RUN/WAIT", "LOAD", "TOK/S"], irows)]
        per_model: dict[str, float] = {}
        for r in rows:
            tps = r.get("tokens_per_s")
            if r.get("model") and isinstance(tps, int | float):
                per_model[str(r["model"])] = per_model.get(str(r["model"]), 0.0) + tps
        if per_model:
            # Heartbeat figures: generated over the last few seconds, 0 once an engine goes quiet.
            now = ", ".join(f"{m} {v:.1f}" for m, v in sorted(per_model.items()))
            lines.append(f"tokens/s now (last 5 s): {now}")
    prows = pipelined(rows)
    if prows:
        lines += ["", "pipelined instances (a stage per worker: decoder layers [start, end)):"]
        lines.append(table(["GROUP", "MODEL", "STAGES"], prows))
    srows = shared(rows)
    if srows:
        lines += ["", "shared workers (instances stepped by compute quota; share = quota / sum on that worker):"]
        lines.append(table(["WORKER", "INSTANCES"], srows))
    trows = transfers(status)
    if trows:
        lines += ["", "transfers (in flight first, then the latest done):"]
        lines.append(table(["TARGET", "MODEL", "UNITS", "MB/S", "SOURCE", "DECISION", "STATE"], _transfer_rows(trows)))
    lrows = local_caches(status)
    if lrows:
        lines += ["", "worker host-memory caches (--local-cache-mb):"]
        lines.append(
            table(
                ["WORKER", "USED/BUDGET", "MODELS", "HITS", "MISSES", "EVICTED"],
                [
                    [
                        str(r["worker_id"]),
                        f"{_mb(r.get('used_mb'))}/{_mb(r.get('budget_mb'))}",
                        ",".join(str(m.get("model")) for m in r.get("models", []) if isinstance(m, dict)) or "-",
                        str(r.get("hits", 0)),
                        str(r.get("misses", 0)),
                        str(r.get("evicted", 0)),
                    ]
                    for r in lrows
                ],
            )
        )
    brows = backoff(status)
    if brows:
        lines += ["", "failed scale-ups (worker avoided for the model until its retry):"]
        lines.append(
            table(
                ["MODEL", "WORKER", "FAILURES", "RETRY IN", "WHY"],
                [
                    [
                        str(r.get("model")),
                        str(r.get("worker")),
                        str(r.get("failures")),
                        f"{r.get('retry_in_s', 0)}s",
                        str(r.get("reason", ""))[:100],
                    ]
                    for r in brows
                ],
            )
        )
    crows = host_cache(status)
    if any(st.service == "loader" for st in status.services):
        total = sum(int(r.get("nbytes", 0)) for r in crows)
        models = {r["model"] for r in crows}
        # Several loaders may each hold a copy of a model (its host_copies).
        copies = f" in {len(crows)} copies" if len(crows) != len(models) else ""
        lines += ["", f"host cache: {len(models)} model(s), {human_bytes(total)}{copies}"]
        if crows:
            lines.append(
                table(
                    ["MODEL", "LOADER", "HOST", "SIZE", "MODE", "LOCKED", "IDLE", "SENDING"],
                    [
                        [
                            str(r["model"]),
                            str(r.get("loader", "")),
                            str(r.get("host", "")),
                            human_bytes(float(r.get("nbytes", 0))),
                            str(r.get("mode", "?")),
                            "yes" if r.get("locked") else "no",
                            f"{r.get('idle_s', 0)}s",
                            str(r.get("in_use", 0)),
                        ]
                        for r in crows
                    ],
                )
            )
    return "\n".join(lines)
