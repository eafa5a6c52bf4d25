"""The gateway's routing picture: the mesh's shared worker table (`cascade.workers`), plus what
only this gateway knows about each worker — how many of its own requests were there when the
worker's last heartbeat left (the heartbeat's load already counts them), and whether the worker
turned one of its requests away since (draining, another model) — turned into the
`InstanceView`s the router decides on. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cascade.messages import Heartbeat
from cascade.workers import MISSED_HEARTBEATS, WorkerTable
from services.gateway.router import InstanceView


class Registry:
    def __init__(self, heartbeat_s: float, missed: int = MISSED_HEARTBEATS) -> None:
        self.table = WorkerTable(heartbeat_s, missed)
        self._inflight_at_heartbeat: dict[str, int] = {}
        # Workers that turned a request away as draining or for another model; their next
        # heartbeat tells their real state.
        self._suspended: set[str] = set()

    def heartbeat_seen(self, hb: Heartbeat, inflight: int) -> None:
        """Before the table takes `hb`: this gateway had `inflight` requests on that worker."""
        self._inflight_at_heartbeat[hb.worker_id] = inflight
        self._suspended.discard(hb.worker_id)

    def on_heartbeat(self, hb: Heartbeat, now: float, inflight: int = 0) -> bool:
        """Both steps at once (tests); True: request a snapshot of that worker."""
        self.heartbeat_seen(hb, inflight)
        return self.table.on_heartbeat(hb, now)

    def suspend(self, worker_id: str) -> None:
        if worker_id in self.table:
            self._suspended.add(worker_id)

    def forget(self, worker_id: str) -> None:
        self._inflight_at_heartbeat.pop(worker_id, None)
        self._suspended.discard(worker_id)

    def views(
        self,
        inflight: Mapping[str, int] | None = None,
        unstarted: Mapping[str, tuple[int, int]] | None = None,
        relayed: Mapping[str, int] | None = None,
    ) -> list[InstanceView]:
        """The routing snapshot. Until a worker's readiness is known from a snapshot, its
        heartbeat's unit count stands in (a worker whose snapshot handler is slow is still used)."""
        inflight = inflight or {}
        unstarted = unstarted or {}
        relayed = relayed or {}
        out = []
        for v in self.table.views():
            state: str = v.state
            if v.worker_id in self._suspended or not v.consistent:
                state = "unavailable"  # turned work away, or heartbeat and readiness disagree for now
            prompts, tokens = unstarted.get(v.worker_id, (0, 0))
            out.append(
                InstanceView(
                    worker_id=v.worker_id,
                    model=v.model,
                    state=state,
                    units_ready=v.units_ready,
                    num_units=v.num_units,
                    running=v.running,
                    waiting=v.waiting,
                    max_batch=v.max_batch,
                    inflight=inflight.get(v.worker_id, 0),
                    inflight_at_heartbeat=self._inflight_at_heartbeat.get(v.worker_id, 0),
                    prefix_units=v.prefix_units,
                    stage_addr=v.stage_addr,
                    driven_layers=v.driven_layers,
                    driven=v.driven,
                    prefill_budget=v.prefill_budget,
                    prefill_queued=v.prefill_queued,
                    kv_cache_usage=v.kv_cache_usage,
                    unstarted_tokens=tokens,
                    unstarted_prompts=prompts,
                    relayed_unstarted_tokens=relayed.get(v.worker_id, 0),
                    group=v.group,
                    stage_start=v.stage_start,
                    stage_end=v.stage_end,
                    shared_device=v.shared_device,
                    quota=v.quota,
                    ready_units=v.ready_units if v.synced else None,
                )
            )
        return out

    def max_model_len(self, model: str) -> int:
        """The longest sequence an instance holding `model` serves, as their heartbeats announce
        it (0: none has said). The largest: a prompt that fits one of them is routable."""
        return max((v.max_model_len for v in self.table.views() if v.model == model), default=0)

    def describe(self) -> list[dict[str, Any]]:
        return self.table.describe()
