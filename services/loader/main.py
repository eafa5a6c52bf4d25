"""The loader service: carries out ScaleDecisions and acks each one (decisions.py), and keeps the
O(1) host cache (cachekeeper.py). This module only wires them to NATS.

In: the workers' heartbeats and readiness events (the shared worker table), ScaleDecision,
TransferEvent, HostCacheRequest, status requests. Out: LoadModel / TransferOrder / UnloadModel
to workers, TransferPlanned (every plan and re-plan, for `cascade tap`), ScaleAck.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog
from nats.aio.msg import Msg

from cascade.cliargs import service_start
from cascade.config import ConfigError, Deployment
from cascade.deployfeed import DeploymentFeed
from cascade.messages import (
    ActiveDecisions,
    ActiveDecisionsRequest,
    LayerReady,
    MessageError,
    ScaleDecision,
    ServiceStatus,
    StatusRequest,
    TransferEvent,
    decode,
)
from cascade.natsutil import TaskSet
from cascade.service import Runtime, run_process
from cascade.workerfeed import WorkerFeed, nats_snapshot_fetcher
from cascade.workers import WorkerTable
from services.loader.cachekeeper import HostCacheKeeper
from services.loader.decisions import HISTORY_ROWS, Decisions, MeshChanges
from services.loader.orphans import BrokenPipelines, OrphanLoads
from services.loader.settings import LoaderSettings, settings_from_args
from services.loader.settings import add_arguments as add_arguments

# How long the loader waits for a worker's readiness snapshot before it asks again later.
SNAPSHOT_TIMEOUT_S = 2.0


def run(args: argparse.Namespace) -> int:
    started = service_start("loader", args, args.loader_id)
    if started is None:
        return 2
    log, deployment, _ = started
    settings = settings_from_args(args)
    return run_process(lambda: Loader(settings, deployment, log), args.nats_url, args.prefix, log)


class Loader:
    service = "loader"

    def __init__(self, settings: LoaderSettings, deployment: Deployment, log: Any = None) -> None:
        self.settings = settings
        self.deployment = deployment
        self.log = log or structlog.get_logger().bind(service="loader", instance=settings.loader_id)
        self.clock: Callable[[], float] = time.monotonic
        self.table = WorkerTable(settings.heartbeat_s)
        # Every wait for the mesh re-checks it when it may have changed.
        self.changes = MeshChanges()
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self.decisions: Decisions | None = None
        self.keeper: HostCacheKeeper | None = None
        self.tasks: TaskSet | None = None
        self.deployments = DeploymentFeed()
        # A load stuck this long with no loader owning it is undone (its loader died mid-plan).
        self.orphans = OrphanLoads(stall_s=max(5.0, 5 * settings.heartbeat_s))
        # Past a heartbeat's death (3 intervals) and a scale-down's unloads in flight.
        self.broken = BrokenPipelines(grace_s=max(3.0, 4 * settings.heartbeat_s))

    @property
    def instance(self) -> str:
        return self.settings.loader_id

    async def start(self, rt: Runtime) -> None:
        s = rt.subjects
        self.tasks = rt.tasks
        self.keeper = HostCacheKeeper(self.settings, self.deployment, rt.tasks, self.log)
        rt.stack.callback(self.keeper.close)
        self.decisions = Decisions(
            rt.nc, s, self.settings, self.deployment, self.table, self.changes, self.keeper, self.log, self.clock
        )
        feed = WorkerFeed(
            self.table,
            fetch_snapshot=nats_snapshot_fetcher(rt.nc, s, self.instance, SNAPSHOT_TIMEOUT_S),
            on_change=self.changes.notify,
            on_dead=lambda w: self.log.warning("worker_lost", worker=w),
            clock=self.clock,
            logger=self.log,
        )
        rt.stack.push_async_callback(feed.close)
        await feed.subscribe(rt.nc, s)
        await rt.subscribe(s.ready_all(), self.on_ready)
        await rt.subscribe(s.transfer_event_all(), self.on_transfer_event)
        await rt.subscribe(s.scale_decision(), self.on_decision)
        await rt.subscribe(s.deployment_changed(), self.on_deployment)
        # Models deployed at run time before this loader (re)started: the scaler knows them.
        dep, source = await self.deployments.ask(rt.nc, s, self.instance)
        if dep is None:
            self.log.info("deployment_from_config", models=self.deployment.names(), why=source)
        else:
            self.log.info("deployment_from_scaler", models=dep.names(), scaler=source)
            self.use_deployment(dep)
        await rt.serve(s.status(), self.on_status)
        await rt.serve(s.host_cache(), self.keeper.on_request)
        await rt.serve(s.loader_decisions(), self.on_active_decisions)
        rt.tasks.spawn(self.pulse(feed), "pulse")
        self.log.info("ready", models=self.deployment.names())

    async def pulse(self, feed: WorkerFeed) -> None:
        """Let time pass visibly: a worker that stops heart-beating is noticed by no message."""
        assert self.keeper is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)  # a periodic timer, not synchronisation
            feed.reap()
            holders: dict[str, int] = {}
            for v in self.table.views(self.clock()):
                if v.model is not None and v.serves_fully(v.model):
                    holders[v.model] = holders.get(v.model, 0) + 1
            self.keeper.sweep(holders)
            self.changes.notify()
            self.unload_orphans()

    def unload_orphans(self) -> None:
        """Unload what a dead loader left loading with no progress (orphans.py), once this loader
        has heard every worker."""
        assert self.decisions is not None and self.tasks is not None
        now = self.clock()
        if now < self.decisions.warm_until:
            return
        for w in self.orphans.stalled(self.table.views(now), self.decisions.reserved, now):
            self.log.warning("orphan_load", worker=w, stall_s=self.orphans.stall_s)
            self.tasks.spawn(self.decisions.unload_orphan(w), f"orphan-{w}")
        for w in self.broken.broken(self.table.views(now), self.decisions.reserved, now):
            self.log.warning("broken_pipeline_stage", worker=w, grace_s=self.broken.grace_s)
            self.tasks.spawn(self.decisions.unload_orphan(w), f"broken-{w}")

    async def on_deployment(self, msg: Msg) -> None:
        """A model deployed at run time: its folder is where orders point workers from now on."""
        try:
            dep, added = self.deployments.changed(msg.data)
        except (MessageError, ConfigError) as e:
            self.log.warning("bad_deployment_message", error=str(e))
            return
        self.use_deployment(dep)
        self.log.info("deployment_changed", models=dep.names(), added=added)

    def use_deployment(self, dep: Deployment) -> None:
        self.deployment = dep
        if self.keeper is not None:
            self.keeper.deployment = dep
        if self.decisions is not None:
            self.decisions.deployment = dep

    # ---- decisions ---------------------------------------------------------
    async def on_decision(self, msg: Msg) -> None:
        try:
            d = decode(msg.data, ScaleDecision)
        except MessageError as e:
            self.log.warning("bad_decision", error=str(e))
            return
        if d.decision_id in self._seen_ids:
            return  # a redelivery: acting twice would load twice as many workers
        self._seen_ids[d.decision_id] = None
        while len(self._seen_ids) > 1024:
            self._seen_ids.popitem(last=False)
        assert self.decisions is not None and self.tasks is not None
        self.decisions.active[d.decision_id] = d
        self.tasks.spawn(self.decisions.carry_out(d), f"decision-{d.decision_id}")

    async def on_active_decisions(self, _: ActiveDecisionsRequest) -> ActiveDecisions:
        """A (re)started scaler asks what is in flight here, so that it waits for these acks
        instead of deciding the same gap again."""
        assert self.decisions is not None
        return ActiveDecisions(list(self.decisions.active.values()), self.instance)

    # ---- events --------------------------------------------------------------------------------
    async def on_ready(self, msg: Msg) -> None:
        try:
            ev = decode(msg.data, LayerReady)
        except MessageError as e:
            self.log.debug("bad_ready", subject=msg.subject, error=str(e))
            return
        assert self.decisions is not None
        if not self.decisions.sessions:
            return
        now = self.clock()
        for session in self.decisions.sessions.values():
            if ev.reset:
                session.reset(ev.worker_id)
            elif ev.model == session.model:
                session.unit_ready(ev.worker_id, ev.unit, now)
        self.changes.notify()

    async def on_transfer_event(self, msg: Msg) -> None:
        try:
            ev = decode(msg.data, TransferEvent)
        except MessageError as e:
            self.log.debug("bad_transfer_event", subject=msg.subject, error=str(e))
            return
        if ev.kind == "failed":
            self.log.warning("transfer_failed", worker=ev.worker_id, transfer=ev.transfer_id, reason=ev.reason)
        assert self.decisions is not None
        for session in self.decisions.sessions.values():
            session.transfer_event(ev)
        self.changes.notify()

    # ---- status ------------------------------------------------------------
    async def on_status(self, _: StatusRequest) -> ServiceStatus:
        assert self.decisions is not None and self.keeper is not None
        d = self.decisions
        now = self.clock()
        live = [row for sess in d.sessions.values() for row in sess.rows(now)]
        detail: dict[str, Any] = {
            "workers": self.table.states(now),
            "active": sorted(d.active),
            "reserved": len(d.reserved),
            **d.counters,
            # Transfers in flight, then the most recent finished ones (newest last).
            "transfers": live + d.history[-(HISTORY_ROWS - len(live)) :] if len(live) < HISTORY_ROWS else live,
            **self.keeper.status(),
        }
        return ServiceStatus("loader", self.instance, os.getpid(), detail)
