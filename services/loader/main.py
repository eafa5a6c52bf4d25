"""The loader service: carries out ScaleDecisions and acks each one.

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

The loader also keeps the O(1) host cache (hostcache.py): at most one host copy per model, filled
after a scale-up had to read the checkpoint from disk, used as a chain head only when no worker
holds the model, released by its keep-alive policy or on demand (`HostCacheRequest`).

When the loader cannot read a model's checkpoint itself (no unit sizes to plan with), it falls
back to the simple path: `LoadModel` to each target, which reads the checkpoint on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import threading
import time
import typing
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.cliargs import add_common_arguments, positive_float, service_start
from cascade.config import LOADING_MODES, Deployment, ModelDeployment, env_float, env_str
from cascade.framing import TransferError, send_units
from cascade.messages import (
    Heartbeat,
    HostCacheRequest,
    LayerReady,
    LoadModel,
    MessageError,
    Ok,
    PlannedChain,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    ServiceReady,
    ServiceStatus,
    StatusRequest,
    TransferEvent,
    TransferOrder,
    TransferPlanned,
    UnloadModel,
    decode,
    encode,
)
from cascade.models.checkpoint import Checkpoint
from cascade.natsutil import RequestTimeout, TaskSet, connect, handler, request, stop_event
from cascade.subjects import Subjects
from services.loader.assign import Assignment, WorkerTable, choose_for_down, choose_for_up, describe, fully_serving
from services.loader.hostcache import DEFAULT_KEEP_ALIVE_COLD_S, DEFAULT_KEEP_ALIVE_S, CacheMode, HostCache
from services.loader.planner import (
    DEFAULT_SERVING_RATE_LIMIT_BPS,
    Chain,
    LoadingMode,
    MeshSnapshot,
    PlanError,
    PlanRequest,
    TransferPlan,
    plan_orders,
    plan_transfer,
    replan,
)
from services.loader.transfers import TransferSession, chain_members

# Modes a decision may ask for: the deployment's three, and "star" (the source sends to every
# target itself) for benchmarks that compare it with the chain.
PLAN_MODES = (*LOADING_MODES, "star")
HISTORY_ROWS = 24  # finished transfers `cascade status` still shows
MAX_PLANS_PER_TARGET = 3  # re-plans a decision may make, per target, before its survivors fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("loader")
    g.add_argument(
        "--loader-id",
        default=env_str("CASCADE_LOADER_ID", f"loader-{os.getpid()}"),
        help="instance id (env CASCADE_LOADER_ID; default loader-<pid>)",
    )
    g.add_argument(
        "--heartbeat-s",
        type=positive_float,
        default=env_float("CASCADE_HEARTBEAT_S", 1.0),
        help="workers' heartbeat interval; 3 missed = dead (env CASCADE_HEARTBEAT_S, default 1.0)",
    )
    g.add_argument(
        "--idle-wait-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_IDLE_WAIT_S", 10.0),
        help="how long a scale-up waits for enough idle workers (workers may still be starting; default 10)",
    )
    g.add_argument(
        "--load-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_LOAD_TIMEOUT_S", 300.0),
        help="deadline for chosen workers to serve the model fully (default 300)",
    )
    g.add_argument(
        "--unload-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_UNLOAD_TIMEOUT_S", 120.0),
        help="deadline for a worker to drain and free its model (default 120)",
    )
    g.add_argument(
        "--request-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_REQUEST_TIMEOUT_S", 10.0),
        help="deadline for a worker to answer LoadModel (default 10)",
    )
    g.add_argument(
        "--transfer-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_TRANSFER_TIMEOUT_S", 30.0),
        help="a receiver that sees no connection or no bytes for this long reports its transfer failed; "
        "a target that lost its chain keeps its verified units this long for a re-plan (default 30)",
    )
    g.add_argument(
        "--send-mb-s",
        type=float,
        default=env_float("CASCADE_LOADER_SEND_MB_S", 0.0),
        help="cap every parameter send at this many MB/s (a bandwidth budget, or an emulated link; 0 = none)",
    )
    g.add_argument(
        "--serving-send-mb-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_SERVING_SEND_MB_S", DEFAULT_SERVING_RATE_LIMIT_BPS / 1e6),
        help="what a holder that serves requests may give a transfer, MB/s, so its requests keep going "
        f"(default {DEFAULT_SERVING_RATE_LIMIT_BPS / 1e6:g})",
    )
    g.add_argument(
        "--host-cache",
        choices=("mmap", "copy", "off"),
        default=env_str("CASCADE_LOADER_HOST_CACHE", "mmap"),
        help="the one host copy per model: the checkpoint's pages held in memory (mmap), an anonymous "
        "copy (copy), or none (off); env CASCADE_LOADER_HOST_CACHE, default mmap",
    )
    g.add_argument(
        "--host-cache-keep-alive-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_HOST_CACHE_KEEP_ALIVE_S", DEFAULT_KEEP_ALIVE_S),
        help=f"drop a cached model idle this long while workers hold it (default {DEFAULT_KEEP_ALIVE_S:g})",
    )
    g.add_argument(
        "--host-cache-keep-alive-cold-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_HOST_CACHE_KEEP_ALIVE_COLD_S", DEFAULT_KEEP_ALIVE_COLD_S),
        help=f"drop a cached model nobody else holds after this long idle (default {DEFAULT_KEEP_ALIVE_COLD_S:g})",
    )


def run(args: argparse.Namespace) -> int:
    return asyncio.run(main(args))


async def main(args: argparse.Namespace) -> int:
    started = service_start("loader", args, args.loader_id)
    if started is None:
        return 2
    log, deployment, subjects = started
    stop = stop_event()
    loader = Loader(args, deployment, subjects, log)
    try:
        return await loader.serve(stop)
    except ConnectionError as e:
        log.error("start_failed", error=str(e))
        return 1


class Loader:
    def __init__(self, args: argparse.Namespace, deployment: Deployment, subjects: Subjects, log: Any) -> None:
        self.args = args
        self.deployment = deployment
        self.subjects = subjects
        self.log = log
        self.clock: Callable[[], float] = time.monotonic
        self.table = WorkerTable(args.heartbeat_s)
        # Notified on every heartbeat and every pulse: waits re-check the mesh when it may have changed.
        self.changed = asyncio.Condition()
        self.reserved: set[str] = set()
        self.active: dict[str, ScaleDecision] = {}
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self.counters = {"acks_ok": 0, "acks_failed": 0, "plans": 0, "replans": 0}
        self.tasks = TaskSet(log)
        self.nc: NATS | None = None
        # Namespaces built by hand (tests) may predate the transfer flags: their defaults apply.
        self.transfer_timeout_s = float(getattr(args, "transfer_timeout_s", 30.0))
        self.send_cap_bps = float(getattr(args, "send_mb_s", 0.0)) * 1e6
        self.serving_bps = float(getattr(args, "serving_send_mb_s", DEFAULT_SERVING_RATE_LIMIT_BPS / 1e6)) * 1e6
        cache_mode = typing.cast(CacheMode | Literal["off"], getattr(args, "host_cache", "mmap"))
        self.cache: HostCache | None = None if cache_mode == "off" else HostCache(mode=cache_mode)
        self._filling: set[str] = set()
        self.sessions: dict[str, TransferSession] = {}
        self.history: list[dict[str, object]] = []
        self._layouts: dict[Path, tuple[tuple[float, ...], tuple[int, ...]]] = {}
        self._plan_seq = 0

    # ---- mesh view ---------------------------------------------------------
    async def on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except MessageError as e:
            self.log.debug("bad_heartbeat", subject=msg.subject, error=str(e))
            return
        if self.table.observe(hb, self.clock()):
            self.log.info("worker_seen", worker=hb.worker_id, state=hb.state, model=hb.model)
        async with self.changed:
            self.changed.notify_all()

    async def pulse(self) -> None:
        """Let time pass visibly: a worker that stops heart-beating is noticed by no message."""
        while True:
            await asyncio.sleep(self.args.heartbeat_s)  # a periodic timer, not synchronisation
            for w in self.table.prune(self.clock()):
                self.log.warning("worker_lost", worker=w)
            if self.cache is not None:
                holders: dict[str, int] = {}
                for v in self.table.snapshot(self.clock()).workers:
                    if v.model is not None and fully_serving(v, v.model):
                        holders[v.model] = holders.get(v.model, 0) + 1
                for model, why in self.cache.sweep(
                    holders,
                    getattr(self.args, "host_cache_keep_alive_s", DEFAULT_KEEP_ALIVE_S),
                    getattr(self.args, "host_cache_keep_alive_cold_s", DEFAULT_KEEP_ALIVE_COLD_S),
                ):
                    self.log.info("host_cache_released", cached=model, why=why)
            async with self.changed:
                self.changed.notify_all()

    async def _wait_change(self, deadline: float) -> None:
        """Under `self.changed`: wait for the next notification or the deadline."""
        remaining = deadline - self.clock()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

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
        self.active[d.decision_id] = d
        self.tasks.spawn(self.carry_out(d), f"decision-{d.decision_id}")

    async def carry_out(self, d: ScaleDecision) -> None:
        lg = self.log.bind(decision_id=d.decision_id, model=d.model, action=d.action, count=d.count)
        lg.info("decision_received", target=d.target_replicas, reason=d.reason)
        workers: list[str] = []
        try:
            if d.count < 1:
                error = f"count {d.count} is not a number of workers"
            elif d.action == "up":
                workers, error = await self.scale_up(d, lg)
            else:
                workers, error = await self.scale_down(d, lg)
        except Exception as e:  # the ack must go out whatever happened, or the scaler waits it out
            lg.exception("decision_failed")
            error = f"internal error in the loader: {type(e).__name__}: {e}"
        finally:
            self.active.pop(d.decision_id, None)
        ack = ScaleAck(d.decision_id, d.model, ok=not error, workers=workers, error=error, ts=time.time())
        assert self.nc is not None
        await self.nc.publish(self.subjects.scale_ack(), encode(ack))
        if ack.ok:
            self.counters["acks_ok"] += 1
            lg.info("decision_done", workers=workers)
        else:
            self.counters["acks_failed"] += 1
            lg.warning("decision_failed", workers=workers, error=error)

    async def scale_up(self, d: ScaleDecision, lg: Any) -> tuple[list[str], str]:
        model = self.deployment.get(d.model)
        if model is None:
            return [], f"model {d.model} is not in the loader's deployment"
        chosen = await self.wait_for_idle(d.count)
        if not chosen.workers:
            return [], f"no idle worker for {d.model} (wanted {d.count}; {describe(self.table.snapshot(self.clock()))})"
        problems = []
        if chosen.shortfall:
            problems.append(f"only {len(chosen.workers)} idle worker(s) of {d.count} wanted")
        mode = d.loading or model.loading
        if mode not in PLAN_MODES:
            return [], f"loading mode {mode!r} is not one of {', '.join(PLAN_MODES)}"
        self.reserved.update(chosen.workers)
        try:
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
        return ready, "; ".join(problems + failed + failed_later)

    # ---- planned transfers ---------------------------------------------------------------------
    async def unit_sizes(self, model: ModelDeployment) -> tuple[int, ...] | str:
        """Bytes of each unit of the model's checkpoint (read from the safetensors headers, cached
        while the files do not change), or why they cannot be read."""

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
        snap = self.table.snapshot(now)
        cached = self.cache.models() if self.cache is not None else frozenset()
        return MeshSnapshot(tuple(w for w in snap.workers if w.worker_id not in exclude), cached)

    def _plan_id(self, d: ScaleDecision) -> str:
        self._plan_seq += 1
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
            serving_rate_limit_bps=self.serving_bps,
        )
        try:
            plan = plan_transfer(self.mesh_snapshot(now), req, self._plan_id(d))
        except PlanError as e:
            return [], [f"cannot plan loading {model.name}: {e}"]
        session = TransferSession(
            d.decision_id, model.name, mode, sizes, started=now, grace_s=2 * self.args.heartbeat_s
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
            # The next scale-up of this model must not wait on the disk: keep the one host copy.
            self.fill_host_cache(model, lg)
        lg.info(
            "transfer_done", plans=len(session.plans), ready=session.ready(), failed=session.failures(),
            seconds=round(self.clock() - now, 3),
        )  # fmt: skip
        return session.ready(), session.failures()

    async def publish_plan(self, d: ScaleDecision, plan: TransferPlan, replaces: str = "") -> None:
        assert self.nc is not None
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
        assert self.nc is not None
        nc, s = self.nc, self.subjects
        orders = plan_orders(plan, timeout_s=self.transfer_timeout_s, rate_cap_bps=self.send_cap_bps)
        inbound = [(w, o) for w, os_ in orders.items() for o in os_ if o.role != "send"]
        # A receiver reserves (allocates and touches) its buffers before it answers: allow for it.
        reserve_s = sum(plan.unit_nbytes) / 100e6
        timeout = self.args.request_timeout_s + reserve_s
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
        worker_sends = [(w, o) for w, o in sends if w != "host-cache"]
        results = await asyncio.gather(
            *(request(nc, s.transfer(w), o, Ok, self.args.request_timeout_s) for w, o in worker_sends),
            return_exceptions=True,
        )
        for (w, o), r in zip(worker_sends, results, strict=True):
            if not isinstance(r, Ok):
                session.refused(w, self._why(w, r, f"the send order of {o.transfer_id}", self.args.request_timeout_s))
        for _, o in sends:
            if _ == "host-cache":
                self.tasks.spawn(self.send_from_cache(o, lg), f"cache-send-{o.transfer_id}")
        async with self.changed:
            self.changed.notify_all()

    @staticmethod
    def _why(worker: str, r: object, what: str, timeout: float) -> str:
        if isinstance(r, RemoteError):
            return f"{worker} refused {what} ({r.code}: {r.message})"
        if isinstance(r, RequestTimeout):
            return f"{worker} did not answer {what} within {timeout:g}s"
        return f"{worker}: {type(r).__name__}: {r}"

    async def send_from_cache(self, order: TransferOrder, lg: Any) -> None:
        """The host cache heads a chain: stream from its copy on a thread (sockets block)."""
        cache = self.cache
        assert cache is not None and order.downstream is not None
        downstream = order.downstream
        cancel = threading.Event()

        def go() -> int:
            with cache.lease(order.model) as src:
                return send_units(
                    src, downstream, order.transfer_id, order.token, order.units,
                    rate_limit_bps=order.rate_limit_bps, cancel=cancel, timeout_s=order.timeout_s,
                ).nbytes  # fmt: skip

        try:
            nbytes = await asyncio.to_thread(go)
            lg.info("cache_send_done", transfer=order.transfer_id, mb=round(nbytes / 1e6, 1))
        except (TransferError, KeyError) as e:
            # The targets that lost the stream report it; their reports decide the re-plan.
            lg.warning("cache_send_failed", transfer=order.transfer_id, error=str(e))
        finally:
            cancel.set()

    async def follow(self, session: TransferSession, lg: Any) -> None:
        """Until every target serves or failed: watch them, and re-plan each chain that breaks."""
        deadline = session.started + self.args.load_timeout_s
        while True:
            async with self.changed:
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
                            w, f"{w} not serving {session.model} after {self.args.load_timeout_s:g}s "
                            f"({t.units}/{session.num_units} units)",
                        )  # fmt: skip
                    return
                if not breaks:
                    await self._wait_change(deadline)
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
                serving_rate_limit_bps=self.serving_bps,
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

    def fill_host_cache(self, model: ModelDeployment, lg: Any) -> None:
        if self.cache is None or self.cache.has(model.name) or model.name in self._filling:
            return
        self._filling.add(model.name)
        self.tasks.spawn(self._fill(model, lg), f"cache-fill-{model.name}")

    async def _fill(self, model: ModelDeployment, lg: Any) -> None:
        assert self.cache is not None
        t0 = self.clock()
        try:
            entry = await asyncio.to_thread(self.cache.load, model.name, Path(model.path))
            lg.info(
                "host_cache_filled", cached=model.name, mb=round(entry.nbytes / 1e6, 1), mode=entry.mode,
                locked=entry.locked, seconds=round(self.clock() - t0, 3),
            )  # fmt: skip
        except (OSError, ValueError) as e:
            lg.warning("host_cache_fill_failed", cached=model.name, error=str(e))
        finally:
            self._filling.discard(model.name)

    async def on_host_cache(self, req: HostCacheRequest) -> Ok:
        if self.cache is None:
            raise RemoteError("disabled", f"loader {self.args.loader_id} runs without a host cache (--host-cache off)")
        model = self.deployment.get(req.model)
        if req.action == "release":
            if not self.cache.has(req.model):
                return Ok(f"{req.model} is not in the host cache")
            if not self.cache.release(req.model):
                raise RemoteError("in_use", f"{req.model} is heading a transfer; try again when it is done")
            self.log.info("host_cache_released", cached=req.model, why="on demand")
            return Ok(f"released {req.model} from the host cache")
        if model is None:
            raise RemoteError("unknown_model", f"{req.model} is not in the loader's deployment")
        try:
            entry = await asyncio.to_thread(self.cache.load, model.name, Path(model.path))
        except (OSError, ValueError) as e:
            raise RemoteError("load_failed", f"{req.model}: {e}") from None
        return Ok(f"{req.model} in the host cache: {entry.nbytes / 1e6:.1f} MB ({entry.mode})")

    # ---- events --------------------------------------------------------------------------------
    async def on_ready(self, msg: Msg) -> None:
        try:
            ev = decode(msg.data, LayerReady)
        except MessageError as e:
            self.log.debug("bad_ready", subject=msg.subject, error=str(e))
            return
        if not self.sessions:
            return
        now = self.clock()
        for session in self.sessions.values():
            if ev.reset:
                session.reset(ev.worker_id)
            elif ev.model == session.model:
                session.unit_ready(ev.worker_id, ev.unit, now)
        async with self.changed:
            self.changed.notify_all()

    async def on_transfer_event(self, msg: Msg) -> None:
        try:
            ev = decode(msg.data, TransferEvent)
        except MessageError as e:
            self.log.debug("bad_transfer_event", subject=msg.subject, error=str(e))
            return
        if ev.kind == "failed":
            self.log.warning("transfer_failed", worker=ev.worker_id, transfer=ev.transfer_id, reason=ev.reason)
        for session in self.sessions.values():
            session.transfer_event(ev)
        async with self.changed:
            self.changed.notify_all()

    async def wait_for_idle(self, count: int) -> Assignment:
        """Enough idle workers, or as many as appear before the idle-wait deadline."""
        deadline = self.clock() + self.args.idle_wait_s
        async with self.changed:
            while True:
                chosen = choose_for_up(self.table.snapshot(self.clock()), count, self.reserved)
                if chosen.shortfall == 0 or self.clock() >= deadline:
                    return chosen
                await self._wait_change(deadline)

    async def start_loads(
        self, d: ScaleDecision, model: ModelDeployment, workers: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        """Tell each target to load; returns (started, failures in words).

        The transfer planner's seam: here the plan would decide sources and chains and send
        TransferOrders; today every target reads the checkpoint from disk."""
        assert self.nc is not None
        nc = self.nc
        msg = LoadModel(model.name, str(model.path), d.decision_id)
        timeout = self.args.request_timeout_s
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

    async def wait_serving(self, model: str, workers: Sequence[str]) -> tuple[list[str], list[str]]:
        """Wait until each worker serves `model` with every unit ready; returns (ready, failures)."""
        start = self.clock()
        deadline = start + self.args.load_timeout_s
        # A heartbeat in flight when the worker said Ok may still show it idle; after two
        # intervals an idle worker has really given the load up.
        grace = 2 * self.args.heartbeat_s
        pending = set(workers)
        seen_loading: set[str] = set()
        ready: list[str] = []
        failed: list[str] = []
        async with self.changed:
            while pending:
                now = self.clock()
                for w in sorted(pending):
                    v = self.table.get(w, now)
                    if v is None:
                        failed.append(f"{w} stopped heart-beating while loading {model}")
                    elif fully_serving(v, model):
                        ready.append(w)
                    elif v.model == model and v.state in ("loading", "serving"):
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
                        failed.append(f"{w} not serving {model} after {self.args.load_timeout_s:g}s ({units})")
                    break
                await self._wait_change(deadline)
        return ready, failed

    async def scale_down(self, d: ScaleDecision, lg: Any) -> tuple[list[str], str]:
        assert self.nc is not None
        nc = self.nc
        chosen = choose_for_down(self.table.snapshot(self.clock()), d.model, d.count, self.reserved)
        if not chosen.workers:
            return [], f"no instance of {d.model} to remove ({describe(self.table.snapshot(self.clock()))})"
        problems = []
        if chosen.shortfall:
            problems.append(f"only {len(chosen.workers)} instance(s) of {d.model} to remove, {d.count} wanted")
        self.reserved.update(chosen.workers)
        try:
            lg.info("unloading", workers=list(chosen.workers))
            timeout = self.args.unload_timeout_s
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

    # ---- status and wiring -------------------------------------------------
    async def on_status(self, _: StatusRequest) -> ServiceStatus:
        snap = self.table.snapshot(self.clock())
        states: dict[str, int] = {}
        for w in snap.workers:
            states[w.state] = states.get(w.state, 0) + 1
        now = self.clock()
        live = [row for sess in self.sessions.values() for row in sess.rows(now)]
        detail: dict[str, Any] = {
            "workers": states,
            "active": sorted(self.active),
            "reserved": len(self.reserved),
            **self.counters,
            # Transfers in flight, then the most recent finished ones (newest last).
            "transfers": live + self.history[-(HISTORY_ROWS - len(live)) :] if len(live) < HISTORY_ROWS else live,
            "host_cache": self.cache.status() if self.cache is not None else None,
            "host_cache_bytes": self.cache.nbytes() if self.cache is not None else 0,
        }
        return ServiceStatus("loader", self.args.loader_id, os.getpid(), detail)

    async def serve(self, stop: asyncio.Event) -> int:
        s = self.subjects
        self.nc = await connect(self.args.nats_url, f"loader-{self.args.loader_id}", connect_timeout_s=30.0)
        try:
            subs: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = [
                (s.heartbeat_all(), self.on_heartbeat),
                (s.ready_all(), self.on_ready),
                (s.transfer_event_all(), self.on_transfer_event),
                (s.scale_decision(), self.on_decision),
                (s.status(), handler(self.on_status, self.log)),
                (s.host_cache(), handler(self.on_host_cache, self.log)),
            ]
            for subject, cb in subs:
                await self.nc.subscribe(subject, cb=cb)
            await self.nc.flush()
            self.tasks.spawn(self.pulse(), "pulse")
            # Ready only once subscribed: the scaler holds decisions until a loader says this.
            await self.nc.publish(s.service_ready(), encode(ServiceReady("loader", self.args.loader_id, os.getpid())))
            self.log.info("ready", models=self.deployment.names())
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.tasks.failed.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            return 1 if self.tasks.failed.is_set() else 0
        finally:
            self.log.info("stopping", active=sorted(self.active))
            await self.tasks.cancel_all()
            with contextlib.suppress(Exception):
                await self.nc.drain()
            if self.cache is not None:
                self.cache.close()
