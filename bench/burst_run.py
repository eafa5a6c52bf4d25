"""One configuration of bench/burst.py against a mesh of its own: start the mesh with the
configuration's deployment, replay the schedule open loop while recording what the mesh says
(heartbeats, scale decisions, acks, the emulated device's counters), and turn it into a result row
with its per-request timeline."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import occupancy
from bench.burst_configs import Config, mesh_env
from bench.burst_metrics import request_summary, tpot_s
from bench.burst_plan import MODEL, Emulation, Plan
from bench.mesh import Mesh, worker_details
from bench.trace import replay
from bench.tracelib import Arrival, RequestRecord
from cascade.messages import Heartbeat, HostCacheRequest, Ok, ScaleAck, ScaleDecision, decode
from cascade.natsutil import request
from cascade.subjects import Subjects

HOLDING = ("loading", "serving", "draining")  # states in which a worker holds the model (GPU memory)
EMU_KEYS = ("steps", "overrun_steps", "overrun_s", "padded_s")  # the emulated device's counters


@dataclass
class Recorder:
    """What the mesh says while a configuration runs: heartbeats (who holds the model, when),
    scale decisions and their acks. Times are the event loop's clock."""

    clock: Any
    beats: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)

    async def on_heartbeat(self, m: Any) -> None:
        hb = decode(m.data, Heartbeat)
        holding = hb.model == MODEL and hb.state in HOLDING
        seq = self.beats.setdefault(hb.worker_id, [])
        if not seq or seq[-1][1] != holding:
            seq.append((self.clock(), holding))

    async def on_decision(self, m: Any) -> None:
        d = decode(m.data, ScaleDecision)
        if d.model == MODEL:
            self.decisions.append({"t": self.clock(), "id": d.decision_id, "action": d.action, "count": d.count,
                                   "target": d.target_replicas, "reason": d.reason})  # fmt: skip

    async def on_ack(self, m: Any) -> None:
        ack = decode(m.data, ScaleAck)
        if ack.model == MODEL:
            self.acks.append({"t": self.clock(), "id": ack.decision_id, "ok": ack.ok, "error": ack.error})

    def holding_at(self, t: float) -> int:
        return occupancy.holding_at(self.beats, t)

    def instance_seconds(self, t0: float, t1: float) -> float:
        return occupancy.instance_seconds(self.beats, t0, t1)


async def run_config(a: argparse.Namespace, cfg: Config, plan: Plan, emu: Emulation, model_dir: Path) -> dict[str, Any]:
    mesh = Mesh(["--workers", str(a.workers)], {**mesh_env(a, emu), **cfg.env}, deploy_toml=cfg.toml(model_dir))
    t_start = time.monotonic()
    try:
        url = mesh.start(timeout_s=300.0)
        print(f"  mesh up in {time.monotonic() - t_start:.0f} s ({cfg.min_replicas} instance(s) loaded)", flush=True)
        return await drive(a, cfg, plan, mesh, url)
    finally:
        mesh.stop()


async def drive(a: argparse.Namespace, cfg: Config, plan: Plan, mesh: Mesh, url: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    subjects = Subjects(str(mesh.info.get("prefix", "cascade")))
    nc = await mesh.connect("bench-burst")
    rec = Recorder(loop.time)
    await nc.subscribe(subjects.heartbeat_all(), cb=rec.on_heartbeat)
    await nc.subscribe(subjects.scale_decision(), cb=rec.on_decision)
    await nc.subscribe(subjects.scale_ack(), cb=rec.on_ack)
    try:
        if cfg.fill_host_cache:
            await request(nc, subjects.host_cache(), HostCacheRequest("load", MODEL), Ok, 60.0)
        # Warm-up: two short requests per initial instance, or for the first one a model at zero
        # scales up for (first-call costs), not recorded.
        warm = [Arrival(i, 0.0, 16, 4, 0.0) for i in range(2 * max(1, cfg.min_replicas))]
        await replay(url, MODEL, warm, timeout_s=30.0, seed=a.seed + 1)
        await asyncio.sleep(1.0)
        # The workers' emulation counters before the replay: the figures reported are the difference.
        before = emulation_counters(await worker_details(nc, subjects, "emulated_device", 1.0))
        done = [0]
        t0 = loop.time()

        async def progress() -> None:
            while True:
                await asyncio.sleep(20.0)
                t = loop.time() - t0
                sent = sum(1 for x in plan.arrivals if x.t <= t)
                print(f"    t={t:5.0f} s: {sent}/{len(plan.arrivals)} sent, {done[0]} done, "
                      f"{rec.holding_at(loop.time())} instance(s)", flush=True)  # fmt: skip

        def on_record(_: RequestRecord) -> None:
            done[0] += 1

        ticker = asyncio.create_task(progress())
        try:
            records = await replay(url, MODEL, plan.arrivals, timeout_s=a.timeout, seed=a.seed, on_record=on_record)
        finally:
            ticker.cancel()
        t_end = loop.time()
        await asyncio.sleep(1.0)  # the last heartbeats and acks
        after = emulation_counters(await worker_details(nc, subjects, "emulated_device", 2.0))
    finally:
        await nc.drain()
    return analyse(a, cfg, plan, rec, records, t0, t_end, before, after)


def emulation_counters(details: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per worker, the emulated device's counters (its status detail `emulated_device`)."""
    return {w: {k: float(e.get(k, 0.0)) for k in EMU_KEYS} for w, e in details.items() if e}


def analyse(
    a: argparse.Namespace,
    cfg: Config,
    plan: Plan,
    rec: Recorder,
    records: list[RequestRecord],
    t0: float,
    t_end: float,
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
) -> dict[str, Any]:
    s = request_summary(records, a.slo_ttft_ms, a.slo_tbt_ms)
    span = t_end - t0
    decisions = [d for d in rec.decisions if t0 <= d["t"] <= t_end]
    zero = dict.fromkeys(EMU_KEYS, 0.0)
    per_worker = {w: {k: round(c[k] - before.get(w, zero)[k], 3) for k in EMU_KEYS} for w, c in after.items()}
    steps, overrun_steps, overrun_s, padded_s = (sum(c[k] for c in per_worker.values()) for k in EMU_KEYS)
    # Significant: the time real compute lost over the device exceeds 1 % of the time padded to it
    # (the device time is at least the padding), i.e. the emulated instances ran >1 % slow.
    significant = overrun_s > 0.01 * padded_s
    step = 0.5
    grid = [i * step for i in range(int(span / step) + 2)]

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 1)

    return {
        "key": cfg.key,
        "label": cfg.label,
        "deployment": {
            "policy": cfg.policy,
            "loading": cfg.loading,
            "scaling": cfg.scaling,
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "knobs": cfg.knobs,
            "host_cache_filled_at_start": cfg.fill_host_cache,
            "env": cfg.env,
        },
        "summary": s,
        "instance_seconds": rec.instance_seconds(t0, t0 + plan.window_s),
        "instance_seconds_to_last_answer": rec.instance_seconds(t0, t_end),
        "span_s": span,
        "scale_events": len(decisions),
        "scale_up_events": sum(1 for d in decisions if d["action"] == "up"),
        "scale_down_events": sum(1 for d in decisions if d["action"] == "down"),
        "instances_added": sum(d["count"] for d in decisions if d["action"] == "up"),
        "decisions": [{**d, "t": round(d["t"] - t0, 3)} for d in decisions],
        "acks": [{**k, "t": round(k["t"] - t0, 3)} for k in rec.acks if t0 <= k["t"] <= t_end + 1],
        "emulated_device": {
            "during": "the replay (counters after it minus counters before it)",
            "steps": int(steps),
            "overrun_steps": int(overrun_steps),
            "overrun_s": round(overrun_s, 3),
            "padded_s": round(padded_s, 3),
            "significant": significant,
            "significance_rule": "overrun_s > 1 % of padded_s",
            "per_worker": per_worker,
        },
        "timeline": {
            "scheduled": [round(r.scheduled, 3) for r in records],
            "ttft_ms": [ms(r.ttft) for r in records],
            "tpot_ms": [ms(tpot_s(r)) for r in records],
            "status": [r.status for r in records],
            "t": grid,
            "instances": [rec.holding_at(t0 + t) for t in grid],
        },
    }
