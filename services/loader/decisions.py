"""Carrying out scale decisions, one at a time per decision id, and acking each.

    up:   pick idle workers (assign.choose_for_up) → plan where their parameters come from
          (planner.plan_transfer: a chain from live holders, else the host cache, else disk, as
          the deployment's `loading` mode allows) → publish the plan → `TransferOrder`s, receivers
          first, then senders → follow every target's readiness (LayerReady, TransferEvent,
          heartbeats), re-plan a broken chain for its survivors → ScaleAck
    down: pick instances (assign.choose_for_down) → UnloadModel to each (the worker drains its
          requests first, then answers) → ScaleAck

An ack is ok only if the whole decision was carried out; otherwise it says why (no idle worker,
a load that failed, a deadline) and still lists the workers that did change, so the scaler's
count stays right and it retries only the rest.

When the loader cannot read a model's checkpoint itself (no unit sizes to plan with), it falls
back to the simple path: `LoadModel` to each target, which reads the checkpoint on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from cascade.config import LOADING_MODES, Deployment, ModelDeployment
from cascade.messages import (
    InstancePlaced,
    LoadModel,
    MessageError,
    Ok,
    PlacedStage,
    PlannedChain,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    TransferOrder,
    TransferPlanned,
    UnloadModel,
    encode,
)
from cascade.models.checkpoint import Checkpoint
from cascade.models.config import read_config
from cascade.natsutil import RequestTimeout, request
from cascade.stages import stage_ranges
from cascade.subjects import Subjects
from cascade.workers import WorkerTable
from services.loader.assign import (
    Assignment,
    choose_for_down,
    choose_for_up,
    choose_groups_for_up,
    choose_instances_for_down,
    describe,
)
from services.loader.cachekeeper import HostCacheKeeper
from services.loader.journal import DecisionJournal
from services.loader.planner import (
    Chain,
    LoadingMode,
    MeshSnapshot,
    PlanError,
    PlanRequest,
    TransferPlan,
    plan_orders,
    plan_transfer,
    replan,
    select_sources,
)
from services.loader.settings import LoaderSettings
from services.loader.transfers import TransferSession, chain_members

PlacementState = typing.Literal["loading", "serving", "failed", "removed"]

# Modes a decision may ask for: the deployment's three, and "star" (the source sends to every
# target itself) for benchmarks that compare it with the chain.
PLAN_MODES = (*LOADING_MODES, "star")
HISTORY_ROWS = 24  # finished transfers `cascade status` still shows
MAX_PLANS_PER_TARGET = 3  # re-plans a decision may make, per target, before its survivors fail


class MeshChanges:
    """ "The mesh may have changed" (a heartbeat, a readiness or transfer event, a worker lost),
    told to every wait at once. A wait looks at the mesh and then waits with no await in
    between, so a notice can never fall between its look and its wait."""

    def __init__(self) -> None:
        self._notice = asyncio.Event()

    def notify(self) -> None:
        self._notice.set()
        self._notice = asyncio.Event()

    async def wait(self, deadline: float, clock: Callable[[], float]) -> None:
        """Until the next notice or the deadline."""
        notice = self._notice
        remaining = deadline - clock()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(notice.wait(), remaining)


class Decisions:
    """The loader's decisions in flight, and what they hold (reserved workers, transfer sessions)."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        settings: LoaderSettings,
        deployment: Deployment,
        table: WorkerTable,
        changes: MeshChanges,
        keeper: HostCacheKeeper,
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.settings = settings
        self.deployment = deployment
        self.table = table
        self.changes = changes
        self.keeper = keeper
        self.log = log
        self.clock = clock
        self.reserved: set[str] = set()
        # Per decision in progress, the workers that failed it and why (they go into its ack).
        self.failed_workers: dict[str, dict[str, str]] = {}
        self.active: dict[str, ScaleDecision] = {}
        self.sessions: dict[str, TransferSession] = {}
        self.history: list[dict[str, object]] = []
        self.counters = {"acks_ok": 0, "acks_failed": 0, "plans": 0, "replans": 0}
        self._layouts: dict[Path, tuple[tuple[float, ...], tuple[int, ...]]] = {}
        self._plan_seq = 0
        # A (re)started loader knows the workers only from heartbeats heard since it started. Until
        # every live worker was heard once, a worker its predecessor just ordered to load may still
        # look idle here: choosing it, or another in its place, would apply a decision twice.
        self.warm_until = clock() + 1.5 * settings.heartbeat_s
        # With several loaders: where the leader writes what it is in the middle of (journal.py).
        self.journal: DecisionJournal | None = None

    def snapshot(self, now: float) -> MeshSnapshot:
        return self.mesh_snapshot(now)

    async def carry_out(self, d: ScaleDecision, given: Sequence[str] = ()) -> None:
        """Carry out one decision and ack it, whatever happens (the scaler waits for the ack).
        `given`: the workers a loader that died had already ordered for it (taken over)."""
        lg = self.log.bind(decision_id=d.decision_id, model=d.model, action=d.action, count=d.count)
        lg.info("decision_received", target=d.target_replicas, reason=d.reason, taken_over=list(given))
        workers: list[str] = []
        self.failed_workers.pop(d.decision_id, None)
        try:
            while self.clock() < self.warm_until:
                await self.changes.wait(self.warm_until, self.clock)
            if d.count < 1:
                error = f"count {d.count} is not a number of workers"
            elif d.action == "up":
                workers, error = await (self.finish_up(d, given, lg) if given else self.scale_up(d, lg))
            else:
                workers, error = await (self.finish_down(d, given, lg) if given else self.scale_down(d, lg))
        except Exception as e:  # the ack must go out whatever happened, or the scaler waits it out
            lg.exception("decision_failed")
            error = f"internal error in the loader: {type(e).__name__}: {e}"
        finally:
            self.active.pop(d.decision_id, None)
        failed = self.failed_workers.pop(d.decision_id, {}) if error else {}
        ack = ScaleAck(
            d.decision_id, d.model, ok=not error, workers=workers, error=error, ts=time.time(), failed=failed
        )
        await self.nc.publish(self.subjects.scale_ack(), encode(ack))
        if self.journal is not None:
            await self.journal.done(d)
        if ack.ok:
            self.counters["acks_ok"] += 1
            lg.info("decision_done", workers=workers)
        else:
            self.counters["acks_failed"] += 1
            lg.warning("decision_failed", workers=workers, error=error)

    async def finish_up(self, d: ScaleDecision, given: Sequence[str], lg: Any) -> tuple[list[str], str]:
        """A scale-up a dead loader had ordered: its loads go on without a loader (a chain whose
        sender had its order, a disk read), so follow them; plan again what did not make it."""
        lg.info("decision_taken_over", workers=list(given))
        model = self.deployment.get(d.model)
        if model is not None and model.stages > 1:
            return await self.finish_up_pipelined(d, model, given, lg)
        self.reserved.update(given)
        try:
            ready, failed = await self.wait_serving(d.model, given)
        finally:
            self.reserved.difference_update(given)
        self._name_failures(d, given, failed)
        missing = len(given) - len(ready)
        if missing <= 0:
            return ready, ""
        lg.warning("decision_replanned", ready=ready, failed=failed)
        more, error = await self.scale_up(dataclasses.replace(d, count=missing), lg, already=ready)
        return ready + more, error

    async def finish_down(self, d: ScaleDecision, given: Sequence[str], lg: Any) -> tuple[list[str], str]:
        """A scale-down a dead loader had ordered: unload again those still holding the model
        (a worker that already unloaded counts as done)."""
        lg.info("decision_taken_over", workers=list(given))
        now = self.clock()
        holding = [w for w in given if (v := self.table.get(w, now)) is not None and v.model == d.model]
        timeout = self.settings.unload_timeout_s
        self.reserved.update(holding)
        try:
            results = await asyncio.gather(
                *(request(self.nc, self.subjects.unload(w), UnloadModel(d.decision_id), Ok, timeout) for w in holding),
                return_exceptions=True,
            )
        finally:
            self.reserved.difference_update(holding)
        failed = {w: r for w, r in zip(holding, results, strict=True) if not isinstance(r, Ok)}
        done = [w for w in given if w not in failed]
        return done, "; ".join(self._why(w, r, "the unload", timeout) for w, r in failed.items())

    async def scale_up(self, d: ScaleDecision, lg: Any, already: Sequence[str] = ()) -> tuple[list[str], str]:
        model = self.deployment.get(d.model)
        if model is None:
            return [], f"model {d.model} is not in the loader's deployment"
        if model.stages > 1:
            return await self.scale_up_pipelined(d, model, lg, already=already)
        chosen = await self.wait_for_idle(d.count, d.avoid)
        if not chosen.workers:
            return [], f"no idle worker for {d.model} (wanted {d.count}; {describe(self.snapshot(self.clock()))})"
        problems = []
        if chosen.shortfall:
            problems.append(f"only {len(chosen.workers)} idle worker(s) of {d.count} wanted")
        mode = d.loading or model.loading
        if mode not in PLAN_MODES:
            return [], f"loading mode {mode!r} is not one of {', '.join(PLAN_MODES)}"
        self.reserved.update(chosen.workers)
        try:
            if self.journal is not None:
                await self.journal.ordered(d, (*already, *chosen.workers))
            sizes = await self.unit_sizes(model)
            if isinstance(sizes, str):
                # No unit sizes, no plan: the simple path, every target reads the checkpoint itself.
                lg.warning("loading_without_plan", reason=sizes, workers=list(chosen.workers))
                started, failed = await self.start_loads(d, model, chosen.workers)
                ready, failed_later = await self.wait_serving(d.model, started)
            else:
                lg.info("loading", workers=list(chosen.workers), mode=mode, path=str(model.path))
                failed = []
                ready, failed_later = await self.transfer(d, model, mode, chosen.workers, sizes, lg)
        finally:
            self.reserved.difference_update(chosen.workers)
        self._name_failures(d, chosen.workers, failed + failed_later)
        return ready, "; ".join(problems + failed + failed_later)

    def _name_failures(self, d: ScaleDecision, workers: Sequence[str], failures: Sequence[str]) -> None:
        """Each failure names its worker first: those go into the ack, and the scaler backs off
        from them for this model (added to what the decision already named)."""
        named = self.failed_workers.setdefault(d.decision_id, {})
        for why in failures:
            for w in workers:
                if why.startswith((f"{w} ", f"{w}:")):
                    named[w] = why

    # ---- planned transfers ---------------------------------------------------------------------
    async def unit_sizes(self, model: ModelDeployment) -> tuple[int, ...] | str:
        """Bytes of each unit of the model's checkpoint (read from the safetensors headers, cached
        while the files do not change), or why they cannot be read."""

        held = self.keeper.unit_sizes(model.name)
        if held is not None:
            return held  # a plan from the host copy needs no look at the model store

        def read() -> tuple[int, ...] | str:
            path = Path(model.path)
            try:
                stamp = tuple(p.stat().st_mtime for p in sorted(path.glob("*.safetensors")))
                known = self._layouts.get(path)
                if known is not None and known[0] == stamp:
                    return known[1]
                ckpt = Checkpoint(path)
            except (OSError, ValueError) as e:
                return f"cannot read the checkpoint of {model.name} at {path}: {e}"
            try:
                sizes = tuple(ckpt.unit_nbytes(u) for u in range(ckpt.config.num_units))
            finally:
                ckpt.close()
            self._layouts[path] = (stamp, sizes)
            return sizes

        return await asyncio.to_thread(read)

    def mesh_snapshot(self, now: float, exclude: frozenset[str] = frozenset()) -> MeshSnapshot:
        workers = tuple(w for w in self.table.views(now) if w.worker_id not in exclude)
        return MeshSnapshot(
            workers, self.keeper.models(), host_cache_host=self.settings.host, peer_copies=self.keeper.peers(now)
        )

    def _plan_id(self, d: ScaleDecision) -> str:
        self._plan_seq += 1
        if self.journal is not None:
            # Several loaders: a decision taken over is planned again by another loader, whose
            # count starts afresh; its transfers must not reuse the ids a worker may still hold.
            return f"{d.decision_id}-{self.settings.loader_id}-p{self._plan_seq}"
        return f"{d.decision_id}-p{self._plan_seq}"

    async def transfer(
        self,
        d: ScaleDecision,
        model: ModelDeployment,
        mode: str,
        workers: Sequence[str],
        sizes: tuple[int, ...],
        lg: Any,
    ) -> tuple[list[str], list[str]]:
        """Plan, carry out and follow the transfers that give `workers` the model; returns (ready,
        failures in words)."""
        now = self.clock()
        req = PlanRequest(
            model.name,
            tuple(workers),
            typing.cast(LoadingMode, mode),
            sizes,
            str(model.path),
            serving_rate_limit_bps=self.settings.serving_bps,
            # Live scaling routes through loading instances: from zero, each target its own
            # block first (the planner applies it only when nothing holds the model yet).
            ordered=model.scaling == "live",
        )
        snap = self.mesh_snapshot(now)
        if mode in ("multicast", "host-cache") and not select_sources(snap, req) and _diskless(snap, workers):
            # Workers that read no model store: the first load of the model in the mesh is the
            # loader's own read, into the host cache, and they get it over the data plane.
            lg.info("host_cache_fill_first", workers=list(workers))
            await self.keeper.fill_now(model, lg)
            self.keeper.want(model.name)
            snap = self.mesh_snapshot(self.clock())
        try:
            plan = plan_transfer(snap, req, self._plan_id(d))
        except PlanError as e:
            diskless = [w for w in workers if (v := snap.worker(w)) is not None and v.model_source == "network"]
            if diskless:
                # Their own property, not the model's: named, they are backed off for it, not retried at once.
                return [], [f"{w}: cannot plan loading {model.name}: {e}" for w in diskless]
            return [], [f"cannot plan loading {model.name}: {e}"]
        session = TransferSession(
            d.decision_id, model.name, mode, sizes, started=now, grace_s=2 * self.settings.heartbeat_s
        )
        session.adopt(plan)
        self.sessions[d.decision_id] = session
        try:
            await self.publish_plan(d, plan)
            await self.carry_out_plan(session, plan, lg)
            await self.follow(session, lg)
        finally:
            self.sessions.pop(d.decision_id, None)
            self.history = (self.history + session.rows(self.clock()))[-HISTORY_ROWS:]
        read_disk = any(c.source.kind == "disk" for p in session.plans for c in p.chains)
        if read_disk and mode in ("multicast", "host-cache"):
            # The next scale-up of this model must not wait on the disk: keep its host copies.
            self.keeper.want(model.name)
        elif any(c.source.kind == "host-cache" for p in session.plans for c in p.chains):
            self.keeper.touch(model.name)
        lg.info(
            "transfer_done", plans=len(session.plans), ready=session.ready(), failed=session.failures(),
            seconds=round(self.clock() - now, 3),
        )  # fmt: skip
        return session.ready(), session.failures()

    async def publish_plan(self, d: ScaleDecision, plan: TransferPlan, replaces: str = "") -> None:
        self.counters["replans" if replaces else "plans"] += 1
        chains = [
            PlannedChain(
                c.transfer_id,
                c.source.worker_id or c.source.kind,
                [h.worker_id for h in c.targets],
                list(c.units),
                c.source.rate_limit_bps,
            )
            for c in plan.chains
        ]
        ev = TransferPlanned(
            plan.plan_id, d.decision_id, plan.model, plan.mode, chains, plan.num_units, sum(plan.unit_nbytes),
            note=plan.note, replaces=replaces, ts=time.time(),
        )  # fmt: skip
        await self.nc.publish(self.subjects.transfer_plan(), encode(ev))
        self.log.info(
            "plan", plan=plan.plan_id, decision_id=d.decision_id, mode=plan.mode, note=plan.note, replaces=replaces,
            chains=[f"{c.source} -> {' -> '.join(c.targets)} [{c.units[0]}..{c.units[-1]}]" for c in chains],
        )  # fmt: skip

    async def carry_out_plan(self, session: TransferSession, plan: TransferPlan, lg: Any) -> None:
        """Send a plan's orders: every receiver (and disk reader) first — each answers once it
        expects the connection, its buffers reserved — then the senders."""
        nc, s = self.nc, self.subjects
        orders = plan_orders(plan, timeout_s=self.settings.transfer_timeout_s, rate_cap_bps=self.settings.send_cap_bps)
        inbound = [(w, self.with_kv(o)) for w, os_ in orders.items() for o in os_ if o.role != "send"]
        # A receiver reserves (allocates and touches) its buffers before it answers: allow for it.
        reserve_s = sum(plan.unit_nbytes) / 100e6
        timeout = self.settings.request_timeout_s + reserve_s
        results = await asyncio.gather(
            *(request(nc, s.transfer(w), o, Ok, timeout) for w, o in inbound), return_exceptions=True
        )
        for (w, o), r in zip(inbound, results, strict=True):
            if not isinstance(r, Ok):
                session.refused(w, self._why(w, r, f"the {o.role} order of {o.transfer_id}", timeout))
        sends: list[tuple[str, TransferOrder]] = []
        by_id = {c.transfer_id: c for c in plan.chains}
        for w, os_ in orders.items():
            for o in os_:
                first = by_id[o.transfer_id].targets[0].worker_id
                if o.role == "send" and first not in session.broken:
                    sends.append((w, o))
        # Another loader's host copy is asked like a worker (on its own subject); a refusal breaks
        # its chain at "host-cache", as a failed send of our own copy would.
        peer = {
            o.transfer_id: loader
            for w, o in sends
            if w == "host-cache" and (loader := by_id[o.transfer_id].source.loader)
        }
        results = await asyncio.gather(
            *(
                request(nc, s.loader_send(peer[o.transfer_id]), o, Ok, self.settings.request_timeout_s)
                for w, o in sends
                if o.transfer_id in peer
            ),
            return_exceptions=True,
        )
        for (w, o), r in zip([x for x in sends if x[1].transfer_id in peer], results, strict=True):
            if not isinstance(r, Ok):
                what = f"the send order of {o.transfer_id} (host copy of {peer[o.transfer_id]})"
                session.refused(w, self._why(peer[o.transfer_id], r, what, self.settings.request_timeout_s))
        worker_sends = [(w, o) for w, o in sends if w != "host-cache"]
        results = await asyncio.gather(
            *(request(nc, s.transfer(w), o, Ok, self.settings.request_timeout_s) for w, o in worker_sends),
            return_exceptions=True,
        )
        for (w, o), r in zip(worker_sends, results, strict=True):
            if not isinstance(r, Ok):
                session.refused(
                    w, self._why(w, r, f"the send order of {o.transfer_id}", self.settings.request_timeout_s)
                )
        for w, o in sends:
            if w == "host-cache" and o.transfer_id not in peer:
                self.keeper.send(o, lg)
        self.changes.notify()

    def with_kv(self, order: TransferOrder) -> TransferOrder:
        """An order that may start the model on its worker carries the deployment's KV settings
        for it (the worker creates its engine from them)."""
        m = self.deployment.get(order.model)
        if m is None or (m.kv_cache_mb is None and m.max_model_len is None):
            return order
        return dataclasses.replace(order, kv_cache_mb=m.kv_cache_mb, max_model_len=m.max_model_len)

    @staticmethod
    def _why(worker: str, r: object, what: str, timeout: float) -> str:
        if isinstance(r, RemoteError):
            return f"{worker} refused {what} ({r.code}: {r.message})"
        if isinstance(r, RequestTimeout):
            return f"{worker} did not answer {what} within {timeout:g}s"
        return f"{worker}: {type(r).__name__}: {r}"

    async def follow(self, session: TransferSession, lg: Any) -> None:
        """Until every target serves or failed: watch them, and re-plan each chain that breaks."""
        deadline = session.started + self.settings.load_timeout_s
        while True:
            now = self.clock()
            members = chain_members(session.chains) | set(session.targets)
            dead = {w for w in members if self.table.get(w, now) is None}
            for w in session.pending():
                session.observe(w, self.table.get(w, now), now)
            breaks = session.breaks(dead)
            pending = session.pending()
            if not pending:
                return
            if now >= deadline:
                for w in pending:
                    t = session.targets[w]
                    session.fail(
                        w, f"{w} not serving {session.model} after {self.settings.load_timeout_s:g}s "
                        f"({t.units}/{session.num_units} units)",
                    )  # fmt: skip
                return
            if not breaks:
                await self.changes.wait(deadline, self.clock)
                continue
            for chain, brk in breaks:
                await self.repair(session, chain, brk, dead, lg)

    async def repair(self, session: TransferSession, chain: Chain, brk: str, dead: set[str], lg: Any) -> None:
        """Re-plan the survivors of a chain broken at `brk`: another holder, else the host cache,
        else disk; each survivor keeps the units it verified."""
        survivors = session.survivors(chain, brk)
        now = self.clock()
        snap = self.mesh_snapshot(now, exclude=frozenset(dead | session.broken))
        units = {w: session.targets[w].units for w in survivors if w in session.targets}
        decision = ScaleDecision(session.decision_id, session.model, "up", len(survivors), 0, "")
        lg.warning("chain_broken", transfer=chain.transfer_id, at=brk, survivors=survivors, units=units)
        if len(session.plans) > MAX_PLANS_PER_TARGET * len(session.targets):
            # Failures that keep coming back (a corrupt source, a flapping link) end here, not in a loop.
            session.repaired(chain, brk, dead)
            session.give_up(survivors, f"{brk} broke the chain again after {len(session.plans)} plans")
            return
        try:
            new = replan(
                session.plan_of(chain),
                brk,
                snap,
                units,
                self._plan_id(decision),
                serving_rate_limit_bps=self.settings.serving_bps,
            )
        except PlanError as e:
            new = None
            session.give_up(survivors, f"re-plan after {brk} broke the chain failed: {e}")
        session.repaired(chain, brk, dead)
        if new is None:
            return
        session.adopt(new)
        await self.publish_plan(decision, new, replaces=chain.transfer_id)
        await self.carry_out_plan(session, new, lg)

    async def unload_orphan(self, worker: str) -> None:
        """Return a worker a dead loader left loading to the idle pool (see orphans.py)."""
        try:
            await request(
                self.nc, self.subjects.unload(worker), UnloadModel("orphan"), Ok, self.settings.unload_timeout_s
            )
        except (RemoteError, RequestTimeout, MessageError) as e:
            self.log.warning("orphan_unload_failed", worker=worker, error=str(e))
            return
        self.log.info("orphan_unloaded", worker=worker)
        self.changes.notify()

    async def wait_for_idle(self, count: int, avoid: Sequence[str] = ()) -> Assignment:
        """Enough idle workers, or as many as appear before the idle-wait deadline."""
        deadline = self.clock() + self.settings.idle_wait_s
        while True:
            chosen = choose_for_up(self.snapshot(self.clock()), count, self.reserved, avoid)
            if chosen.shortfall == 0 or self.clock() >= deadline:
                return chosen
            await self.changes.wait(deadline, self.clock)

    async def wait_for_groups(self, count: int, stages: int, avoid: Sequence[str] = ()) -> list[tuple[str, ...]]:
        """`count` groups of `stages` idle workers on distinct devices, none in `avoid`, or as many
        as can be formed by the idle-wait deadline."""
        deadline = self.clock() + self.settings.idle_wait_s
        while True:
            groups = choose_groups_for_up(self.snapshot(self.clock()), count, stages, self.reserved, avoid)
            if len(groups) == count or self.clock() >= deadline:
                return groups
            await self.changes.wait(deadline, self.clock)

    async def start_loads(
        self, d: ScaleDecision, model: ModelDeployment, workers: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        """Tell each target to load; returns (started, failures in words).

        The transfer planner's seam: here the plan would decide sources and chains and send
        TransferOrders; today every target reads the checkpoint from disk."""
        nc = self.nc
        msg = LoadModel(model.name, str(model.path), d.decision_id, model.kv_cache_mb, model.max_model_len)
        timeout = self.settings.request_timeout_s
        results = await asyncio.gather(
            *(request(nc, self.subjects.load(w), msg, Ok, timeout) for w in workers), return_exceptions=True
        )
        started, failed = [], []
        for w, r in zip(workers, results, strict=True):
            if isinstance(r, Ok):
                started.append(w)
            elif isinstance(r, RemoteError):
                failed.append(f"{w} refused the load ({r.code}: {r.message})")
            elif isinstance(r, RequestTimeout):
                failed.append(f"{w} did not answer LoadModel within {timeout:g}s")
            elif isinstance(r, BaseException):
                failed.append(f"{w}: {type(r).__name__}: {r}")
        return started, failed

    async def wait_serving(
        self, model: str, workers: Sequence[str], stage: bool = False
    ) -> tuple[list[str], list[str]]:
        """Wait until each worker serves `model` with every unit ready (with `stage`: every unit of
        its stage); returns (ready, failures)."""
        start = self.clock()
        deadline = start + self.settings.load_timeout_s
        # A heartbeat in flight when the worker said Ok may still show it idle; after two
        # intervals an idle worker has really given the load up.
        grace = 2 * self.settings.heartbeat_s
        pending = set(workers)
        seen_loading: set[str] = set()
        ready: list[str] = []
        failed: list[str] = []
        while pending:
            now = self.clock()
            for w in sorted(pending):
                v = self.table.get(w, now)
                if v is None:
                    failed.append(f"{w} stopped heart-beating while loading {model}")
                elif v.serves_stage(model) if stage else v.serves_fully(model):
                    ready.append(w)
                elif v.takes(model):
                    seen_loading.add(w)
                    continue
                elif w in seen_loading or now - start >= grace:
                    failed.append(f"{w} gave up loading {model} (now {v.state}; see its log)")
                else:
                    continue
                pending.discard(w)
            if not pending:
                break
            if now >= deadline:
                for w in sorted(pending):
                    v = self.table.get(w, now)
                    units = f"{v.units_ready}/{v.num_units} units" if v else "no heartbeat"
                    failed.append(f"{w} not serving {model} after {self.settings.load_timeout_s:g}s ({units})")
                break
            await self.changes.wait(deadline, self.clock)
        return ready, failed

    async def scale_down(self, d: ScaleDecision, lg: Any) -> tuple[list[str], str]:
        snap = self.snapshot(self.clock())
        if any(w.group and w.model == d.model for w in snap.workers):
            return await self.scale_down_pipelined(d, lg)
        nc = self.nc
        chosen = choose_for_down(self.snapshot(self.clock()), d.model, d.count, self.reserved)
        if not chosen.workers:
            return [], f"no instance of {d.model} to remove ({describe(self.snapshot(self.clock()))})"
        problems = []
        if chosen.shortfall:
            problems.append(f"only {len(chosen.workers)} instance(s) of {d.model} to remove, {d.count} wanted")
        self.reserved.update(chosen.workers)
        try:
            if self.journal is not None:
                await self.journal.ordered(d, tuple(chosen.workers))
            lg.info("unloading", workers=list(chosen.workers))
            timeout = self.settings.unload_timeout_s
            results = await asyncio.gather(
                *(
                    request(nc, self.subjects.unload(w), UnloadModel(d.decision_id), Ok, timeout)
                    for w in chosen.workers
                ),
                return_exceptions=True,
            )
        finally:
            self.reserved.difference_update(chosen.workers)
        done = []
        for w, r in zip(chosen.workers, results, strict=True):
            if isinstance(r, Ok):
                done.append(w)
            elif isinstance(r, RemoteError):
                problems.append(f"{w} refused the unload ({r.code}: {r.message})")
            elif isinstance(r, RequestTimeout):
                problems.append(f"{w} did not finish unloading within {timeout:g}s")
            elif isinstance(r, BaseException):
                problems.append(f"{w}: {type(r).__name__}: {r}")
        return done, "; ".join(problems)

    # ---- pipeline-parallel instances (docs/pipelined-and-shared.md) -----------------------------
    async def scale_up_pipelined(
        self,
        d: ScaleDecision,
        model: ModelDeployment,
        lg: Any,
        already: Sequence[str] = (),
        first: int = 0,
    ) -> tuple[list[str], str]:
        """`d.count` instances of `model.stages` stages each: S idle workers per instance, each
        loading its stage's layers from the checkpoint (a stage is not a whole model, so no live
        holder can multicast it: every stage reads its own units). An instance counts only once
        every stage serves; one whose stage failed is unloaded whole. The ack lists instance
        (group) ids, the ids the scaler counts replicas by.

        As a single-worker scale-up: no worker the decision avoids (backed off for the model) is
        chosen, the chosen ones are journaled before any order goes out (group after group, S
        each: `journaled_groups` reads them back after a takeover), and the stages that fail are
        named in the ack. `already`: workers journaled before (a takeover's), `first`: the index
        of the first new group (a takeover's groups keep theirs)."""
        S = model.stages
        try:
            layers = (await asyncio.to_thread(read_config, Path(model.path))).num_hidden_layers
            ranges = stage_ranges(layers, S, model.stage_layers)
        except (OSError, ValueError) as e:
            return [], f"cannot split {d.model} into {S} stages: {e}"
        chosen = await self.wait_for_groups(d.count, S, d.avoid)
        if not chosen:
            avoided = f"; {len(d.avoid)} backed off for it" if d.avoid else ""
            return [], (
                f"{d.model} needs {S} idle workers on distinct devices per instance "
                f"({describe(self.snapshot(self.clock()))}{avoided})"
            )
        problems = []
        if len(chosen) < d.count:
            problems.append(f"idle workers on distinct devices for {len(chosen)} of {d.count} instances of {S} stages")
        plan: dict[str, list[tuple[str, int, int]]] = {}
        for i, ws in enumerate(chosen, start=first):
            plan[f"{d.decision_id}.{i}"] = [(w, a, b) for w, (a, b) in zip(ws, ranges, strict=True)]
        workers = [w for stages in plan.values() for w, _, _ in stages]
        self.reserved.update(workers)
        try:
            if self.journal is not None:
                await self.journal.ordered(d, (*already, *workers))
            for gid, stages in plan.items():
                await self._placed(d, gid, stages, "loading")
            lg.info("loading_pipelined", groups={g: [list(x) for x in st] for g, st in plan.items()}, layers=layers)
            timeout = self.settings.request_timeout_s
            orders = [
                (
                    w,
                    LoadModel(
                        model.name,
                        str(model.path),
                        d.decision_id,
                        model.kv_cache_mb,
                        model.max_model_len,
                        group=gid,
                        stage_start=a,
                        stage_end=b,
                    ),
                )
                for gid, stages in plan.items()
                for w, a, b in stages
            ]
            results = await asyncio.gather(
                *(request(self.nc, self.subjects.load(w), msg, Ok, timeout) for w, msg in orders),
                return_exceptions=True,
            )
            started = []
            for (w, _), r in zip(orders, results, strict=True):
                if isinstance(r, Ok):
                    started.append(w)
                else:
                    problems.append(f"{w} did not start its stage: {_why(r, timeout)}")
            ready, failed = await self.wait_serving(d.model, started, stage=True)
            problems += failed
            self._name_failures(d, workers, problems)
            done = await self._settle_groups(d, plan, ready, started, problems)
        finally:
            self.reserved.difference_update(workers)
        return done, "; ".join(problems)

    async def finish_up_pipelined(
        self, d: ScaleDecision, model: ModelDeployment, given: Sequence[str], lg: Any
    ) -> tuple[list[str], str]:
        """A pipelined scale-up a dead loader had ordered: its stages load on without a loader,
        so follow them; an instance with a stage that failed is unloaded whole, and planned again
        on other idle workers."""
        groups = journaled_groups(d.decision_id, given, model.stages)
        self.reserved.update(given)
        try:
            ready, failed = await self.wait_serving(d.model, given, stage=True)
            self._name_failures(d, given, failed)
            now = self.clock()
            plan = {
                gid: [
                    (w, v.stage_start, v.stage_end) if (v := self.table.get(w, now)) is not None else (w, 0, 0)
                    for w in members
                ]
                for gid, members in groups.items()
            }
            holding = [w for w in given if (v := self.table.get(w, now)) is not None and v.takes(d.model)]
            problems = list(failed)
            done = await self._settle_groups(d, plan, ready, holding, problems)
        finally:
            self.reserved.difference_update(given)
        missing = d.count - len(done)
        if missing <= 0:
            return done, "; ".join(problems)
        if any(len(members) != model.stages for members in groups.values()):
            # The journal's groups no longer line up with the deployment's stages: new groups
            # appended to it would be read back under the wrong ids. The scaler decides again.
            problems.append(f"{d.model} has {model.stages} stages now, its journal {len(given)} workers")
            return done, "; ".join(problems)
        lg.warning("decision_replanned", ready=done, failed=failed)
        # The stages that just failed are not chosen again for the re-plan (the scaler would back
        # off from them anyway once the ack names them).
        avoid = sorted({*d.avoid, *self.failed_workers.get(d.decision_id, {})})
        # Every journaled worker stays in the journal, in its place: a loader taking over again
        # reads the groups back by position (`journaled_groups`), the new ones after them.
        more, error = await self.scale_up_pipelined(
            dataclasses.replace(d, count=missing, avoid=avoid), model, lg, already=given, first=len(groups)
        )
        return done + more, "; ".join(p for p in (*problems, error) if p)

    async def _settle_groups(
        self,
        d: ScaleDecision,
        plan: dict[str, list[tuple[str, int, int]]],
        ready: Sequence[str],
        started: Sequence[str],
        problems: list[str],
    ) -> list[str]:
        """The instances whose every stage serves (announced serving); the others are unloaded
        whole (a pipeline with a gap serves nobody) and announced failed."""
        done = []
        for gid, stages in plan.items():
            members = [w for w, _, _ in stages]
            if all(w in ready for w in members):
                done.append(gid)
                await self._placed(d, gid, stages, "serving")
            else:
                # Give its other stages back to the pool.
                await self._unload(d, [w for w in members if w in started], problems)
                await self._placed(d, gid, stages, "failed", "; ".join(problems))
        return done

    async def scale_down_pipelined(self, d: ScaleDecision, lg: Any) -> tuple[list[str], str]:
        """Remove `d.count` instances of a pipelined model, every stage of each; acks instance ids."""
        chosen = choose_instances_for_down(self.snapshot(self.clock()), d.model, d.count, self.reserved)
        if not chosen:
            return [], f"no instance of {d.model} to remove ({describe(self.snapshot(self.clock()))})"
        problems = []
        if len(chosen) < d.count:
            problems.append(f"only {len(chosen)} instance(s) of {d.model} to remove, {d.count} wanted")
        workers = [w for _, ws in chosen for w in ws]
        snap = self.snapshot(self.clock())
        # Where each stage was, for the placement event once it is gone.
        where = {w: (w, v.stage_start, v.stage_end) for w in workers if (v := snap.worker(w)) is not None}
        self.reserved.update(workers)
        try:
            lg.info("unloading_pipelined", instances={g: list(ws) for g, ws in chosen})
            failed = await self._unload(d, workers, problems)
        finally:
            self.reserved.difference_update(workers)
        done = [g for g, ws in chosen if not set(ws) & failed]
        for g in done:
            stages = sorted((where.get(w, (w, 0, 0)) for w in dict(chosen)[g]), key=lambda x: x[1])
            await self._placed(d, g, stages, "removed")
        return done, "; ".join(problems)

    async def _placed(
        self,
        d: ScaleDecision,
        group: str,
        stages: Sequence[tuple[str, int, int]],
        state: PlacementState,
        reason: str = "",
    ) -> None:
        """Publish where a pipelined instance is, as every decision is (`cascade tap`)."""
        placed = [PlacedStage(w, a, b) for w, a, b in stages]
        msg = InstancePlaced(d.decision_id, d.model, group, placed, state, reason, time.time())
        await self.nc.publish(self.subjects.placement(), encode(msg))

    async def _unload(self, d: ScaleDecision, workers: Sequence[str], problems: list[str]) -> set[str]:
        """UnloadModel to each of `workers` (they drain first); failures go into `problems`, and
        the workers that failed are returned."""
        timeout = self.settings.unload_timeout_s
        results = await asyncio.gather(
            *(request(self.nc, self.subjects.unload(w), UnloadModel(d.decision_id), Ok, timeout) for w in workers),
            return_exceptions=True,
        )
        failed = set()
        for w, r in zip(workers, results, strict=True):
            if not isinstance(r, Ok):
                failed.add(w)
                problems.append(f"{w} did not unload: {_why(r, timeout)}")
        return failed


def journaled_groups(decision_id: str, workers: Sequence[str], stages: int) -> dict[str, tuple[str, ...]]:
    """A pipelined decision's instances as its journal lists them: `stages` workers per instance,
    group after group, the i-th named `<decision id>.<i>` (what `scale_up_pipelined` writes). A
    short tail (the deployment's stages changed meanwhile) is an instance of its own, with a gap."""
    if stages < 1:
        raise ValueError("stages must be at least 1")
    return {f"{decision_id}.{i}": tuple(workers[k : k + stages]) for i, k in enumerate(range(0, len(workers), stages))}


def _why(r: object, timeout: float) -> str:
    if isinstance(r, RemoteError):
        return f"{r.code}: {r.message}"
    if isinstance(r, RequestTimeout):
        return f"no answer within {timeout:g}s"
    if isinstance(r, BaseException):
        return f"{type(r).__name__}: {r}"
    return "unexpected reply"


def _diskless(snap: MeshSnapshot, workers: Sequence[str]) -> bool:
    """Some target reads no model store (`--model-source network`)."""
    return any((w := snap.worker(t)) is not None and w.model_source == "network" for t in workers)
