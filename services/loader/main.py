"""The loader service: carries out ScaleDecisions and acks each one (decisions.py), and keeps the
O(1) host cache (cachekeeper.py). This module only wires them to NATS.

Several loaders may run: one leads (lease.py, over the broker's JetStream key-value store) and
alone sends orders and acks; the others follow every announcement, keep the decisions they hear
until they are acked, and the one that takes over finishes what the leader had journaled
(journal.py) or had not yet received.

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
from cascade.controlstore import StoreUnavailable, open_store
from cascade.deployfeed import DeploymentFeed
from cascade.messages import (
    ActiveDecisions,
    ActiveDecisionsRequest,
    HostCacheRequest,
    HostCopies,
    HostCopyOrder,
    LayerReady,
    MessageError,
    Ok,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    ServiceReady,
    ServiceStatus,
    StatusRequest,
    TransferEvent,
    decode,
    encode,
)
from cascade.natsutil import RequestTimeout, TaskSet, request
from cascade.service import Runtime, run_process
from cascade.workerfeed import WorkerFeed, nats_snapshot_fetcher
from cascade.workers import WorkerTable
from services.loader.cachekeeper import HostCacheKeeper
from services.loader.decisions import HISTORY_ROWS, Decisions, MeshChanges
from services.loader.journal import DecisionJournal
from services.loader.leadership import Leadership
from services.loader.lease import Lease
from services.loader.orphans import BrokenPipelines, OrphanLoads
from services.loader.settings import LoaderSettings, settings_from_args
from services.loader.settings import add_arguments as add_arguments

# How long the loader waits for a worker's readiness snapshot before it asks again later.
SNAPSHOT_TIMEOUT_S = 2.0
HEARD_MAX = 256  # decisions a follower keeps until their ack (oldest dropped first)


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
        self.rt: Runtime | None = None
        # None: this loader plans alone (no lease: `--lease off`, or a broker without JetStream).
        self.leadership: Leadership | None = None
        # A follower's decisions heard and not yet acked: the leader may die before journaling one.
        self.heard: OrderedDict[str, tuple[ScaleDecision, float]] = OrderedDict()  # → (decision, heard at)
        self.acked: OrderedDict[str, None] = OrderedDict()
        self.running: dict[str, asyncio.Task[Any]] = {}

    @property
    def leading(self) -> bool:
        return self.leadership is None or self.leadership.leading

    @property
    def instance(self) -> str:
        return self.settings.loader_id

    async def start(self, rt: Runtime) -> None:
        s = rt.subjects
        self.rt = rt
        self.tasks = rt.tasks
        self.keeper = HostCacheKeeper(self.settings, self.deployment, rt.tasks, self.log)
        self.keeper.clock = self.clock
        self.keeper.changed = self.copies_changed
        self.keeper.order = self.send_copy_order
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
        await rt.subscribe(s.scale_ack(), self.on_ack)
        await rt.subscribe(s.deployment_changed(), self.on_deployment)
        await rt.subscribe(s.host_copies_all(), self.on_copies)
        # Models deployed at run time before this loader (re)started: the scaler knows them.
        dep, source = await self.deployments.ask(rt.nc, s, self.instance)
        if dep is None:
            self.log.info("deployment_from_config", models=self.deployment.names(), why=source)
        else:
            self.log.info("deployment_from_scaler", models=dep.names(), scaler=source)
            self.use_deployment(dep)
        await rt.serve(s.status(), self.on_status)
        await rt.serve(s.host_cache(), self.on_host_cache)
        await rt.serve(s.loader_decisions(), self.on_active_decisions)
        await rt.serve(s.host_copy_order(self.instance), self.keeper.on_copy_order)
        await rt.serve(s.loader_send(self.instance), self.keeper.on_send)
        await rt.serve(s.model_files(), self.keeper.on_files)
        await self.announce_copies()
        rt.tasks.spawn(self.pulse(feed), "pulse")
        await self.start_lease(rt)
        self.log.info("ready", models=self.deployment.names())

    # ---- the lease -----------------------------------------------------------------------------
    async def start_lease(self, rt: Runtime) -> None:
        """Take part in the lease (or plan alone, as the settings and the broker allow)."""
        assert self.decisions is not None
        if self.settings.lease == "off":
            self.log.info("lease_off", note="planning alone: run only one loader on this mesh")
            return
        try:
            store = await open_store(rt.nc, rt.subjects.prefix, self.settings.control_replicas)
        except StoreUnavailable as e:
            if self.settings.lease == "required":
                raise ConnectionError(f"--lease required: {e}") from None
            self.log.warning(
                "lease_unavailable", error=str(e), note="planning alone without a lease: run only one loader"
            )
            return
        self.decisions.journal = DecisionJournal(store, self.instance, self.log)
        lease = Lease(self.instance, self.settings.lease_s)
        self.leadership = Leadership(store, lease, self.on_lead, self.on_follow, self.log)
        rt.stack.push_async_callback(self.step_off)
        rt.tasks.spawn(self.leadership.run(), "lease")
        self.log.info("lease_following", bucket=store.bucket, lease_s=self.settings.lease_s)

    async def on_lead(self) -> None:
        """This loader leads now: finish what the last leader journaled, carry out what it heard
        and no one acked, then say `ServiceReady` (the scaler asks what is in flight here)."""
        assert self.decisions is not None and self.decisions.journal is not None and self.rt is not None
        assert self.keeper is not None
        # The copies the loaders hold stay kept (the last leader kept them): with host_copies >= 2
        # this loader usually holds one already, and the next scale-up reads no store. Adopted
        # before the first await: from `leading` on, the pulse places copies for what is wanted,
        # and with nothing wanted yet it would drop every copy, this loader's own first.
        adopted = self.keeper.copies.adopt(self.clock())
        try:
            pending = await self.decisions.journal.pending()
        except Exception as e:  # the broker away: what is heard is still carried out
            self.log.warning("journal_read_failed", error=repr(e))
            pending = []
        stale_s = self.settings.idle_wait_s + self.settings.load_timeout_s
        now = time.time()
        taken, fresh = [], []
        for j in pending:
            d = j.decision
            if d.decision_id in self.running or d.decision_id in self.acked:
                continue
            if now - j.ts > stale_s:
                # Its scaler gave up waiting long ago and decided again: carrying it out would apply it twice.
                self.log.warning("journal_stale", decision_id=d.decision_id, age_s=round(now - j.ts, 1))
                await self.decisions.journal.done(d)
                continue
            self.heard.pop(d.decision_id, None)
            self.launch(d, j.workers, journaled=True)
            taken.append(d.decision_id)
        # Only a decision heard about as the leader died can have gone unjournaled; an older one
        # unjournaled and unacked was lost some other way (a journal write that failed, a missed
        # ack): it is left to the scaler, which re-decides what it dropped when we say ready.
        fresh_s = 2 * self.settings.lease_s + self.settings.request_timeout_s
        dropped = []
        for d, heard_at in list(self.heard.values()):
            if d.decision_id in self.running or d.decision_id in self.acked:
                continue
            if self.clock() - heard_at > fresh_s:
                dropped.append(d.decision_id)
                continue
            self.launch(d)
            fresh.append(d.decision_id)
        self.heard.clear()
        self.log.info("leading", taken_over=taken, heard=fresh, left_to_the_scaler=dropped, host_copies=adopted)
        ready = ServiceReady(self.service, self.instance, os.getpid())
        try:
            await self.rt.nc.publish(self.rt.subjects.service_ready(), encode(ready))
        except Exception as e:  # the broker away: the reconnect announces it again
            self.log.warning("announce_failed", error=repr(e))

    async def on_follow(self, why: str) -> None:
        """This loader lost the lease: stop what it carries out at once (no order, no ack from
        here any more); the leader finishes it from the journal."""
        stopped = await self.stop_running()
        self.log.warning("following", why=why, handed_over=stopped)

    async def stop_running(self) -> list[str]:
        tasks = dict(self.running)
        for t in tasks.values():
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert self.decisions is not None
        for i in tasks:
            self.decisions.active.pop(i, None)
        return sorted(tasks)

    async def step_off(self) -> None:
        """A clean stop: stop carrying out (the journal keeps it), then hand the lease over."""
        assert self.leadership is not None
        self.leadership.closed = True
        await self.stop_running()
        await self.leadership.release()

    async def pulse(self, feed: WorkerFeed) -> None:
        """Let time pass visibly: a worker that stops heart-beating is noticed by no message."""
        assert self.keeper is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)  # a periodic timer, not synchronisation
            feed.reap()
            await self.announce_copies()
            if not self.leading:
                continue
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
        if not self.leading:
            self.heard[d.decision_id] = (d, self.clock())
            while len(self.heard) > HEARD_MAX:
                self.heard.popitem(last=False)
            return
        self.launch(d)

    def launch(self, d: ScaleDecision, given: tuple[str, ...] = (), journaled: bool = False) -> None:
        """Carry out `d` here (written ahead to the journal when there is one)."""
        assert self.decisions is not None and self.tasks is not None
        self._seen_ids[d.decision_id] = None
        self.decisions.active[d.decision_id] = d
        if given:
            # Held from now: the orphan sweep must not undo the loads this decision follows.
            self.decisions.reserved.update(given)

        async def run() -> None:
            assert self.decisions is not None
            try:
                if self.decisions.journal is not None and not journaled:
                    await self.decisions.journal.received(d)
                await self.decisions.carry_out(d, given)
            finally:
                self.decisions.reserved.difference_update(given)
                self.running.pop(d.decision_id, None)

        self.running[d.decision_id] = self.tasks.spawn(run(), f"decision-{d.decision_id}")

    async def on_ack(self, msg: Msg) -> None:
        """Acks (the leader's, or our own): a follower forgets what it kept for a takeover."""
        try:
            ack = decode(msg.data, ScaleAck)
        except MessageError:
            return
        self.heard.pop(ack.decision_id, None)
        self.acked[ack.decision_id] = None
        while len(self.acked) > 1024:
            self.acked.popitem(last=False)

    # ---- host copies across loaders (copies.py) ------------------------------------------------
    async def announce_copies(self) -> None:
        assert self.keeper is not None and self.rt is not None
        try:
            await self.rt.nc.publish(self.rt.subjects.host_copies(self.instance), encode(self.keeper.announcement()))
        except Exception as e:  # the broker away: the next pulse announces again
            self.log.debug("announce_copies_failed", error=repr(e))

    def copies_changed(self) -> None:
        assert self.tasks is not None
        self.tasks.spawn(self.announce_copies(), "announce-copies")

    async def on_copies(self, msg: Msg) -> None:
        assert self.keeper is not None
        try:
            self.keeper.heard(decode(msg.data, HostCopies))
        except MessageError as e:
            self.log.debug("bad_host_copies", subject=msg.subject, error=str(e))

    async def send_copy_order(self, loader: str, order: HostCopyOrder) -> None:
        """The leader's fill or drop order to another loader; a failure is retried by a later pulse."""
        assert self.rt is not None
        try:
            await request(
                self.rt.nc, self.rt.subjects.host_copy_order(loader), order, Ok, self.settings.request_timeout_s
            )
        except (RemoteError, RequestTimeout, MessageError) as e:
            self.log.warning("host_copy_order_failed", to=loader, cached=order.model, action=order.action, error=str(e))

    async def on_host_cache(self, req: HostCacheRequest) -> Ok | None:
        """`cascade cache`: the leader's host cache is the one its plans use; followers keep still."""
        assert self.keeper is not None
        if not self.leading:
            return None
        return await self.keeper.on_request(req)

    async def on_active_decisions(self, _: ActiveDecisionsRequest) -> ActiveDecisions | None:
        """A (re)started scaler asks what is in flight here, so that it waits for these acks
        instead of deciding the same gap again. Only the leader answers: a follower's empty
        list would make the scaler drop and re-decide what the leader carries out."""
        assert self.decisions is not None
        if not self.leading:
            return None
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
            "role": self.lease_status()["role"],  # first: `cascade status` shows the leading scalars
            "workers": self.table.states(now),
            "active": sorted(d.active),
            "reserved": len(d.reserved),
            **d.counters,
            # Transfers in flight, then the most recent finished ones (newest last).
            "transfers": live + d.history[-(HISTORY_ROWS - len(live)) :] if len(live) < HISTORY_ROWS else live,
            **self.keeper.status(),
            "lease": self.lease_status(),
        }
        return ServiceStatus("loader", self.instance, os.getpid(), detail)

    def lease_status(self) -> dict[str, Any]:
        if self.leadership is None:
            return {"role": "alone"}
        lease = self.leadership.lease
        return {"role": "leader" if self.leading else "follower", "holder": lease.holder, "lease_s": lease.lease_s}
