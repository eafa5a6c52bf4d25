"""The loader service: carries out ScaleDecisions and acks each one.

    up:   pick idle workers (assign.choose_for_up) → LoadModel to each (request/reply) → wait
          until each one's heartbeats say every unit is ready and it serves → ScaleAck
    down: pick instances (assign.choose_for_down) → UnloadModel to each (the worker drains its
          requests first, then answers) → ScaleAck

An ack is ok only if the whole decision was carried out; otherwise it says why (no idle worker,
a load that failed, a deadline) and still lists the workers that did change, so the scaler's
count stays right and it retries only the rest.

Where the bytes come from: in this first cut every target reads the checkpoint from disk itself
(`LoadModel`). The transfer planner (`planner.py`: chain multicast from live holders or the
host cache) slots in at `Loader.start_loads`: plan with the same `MeshSnapshot` the assignment
used and send `TransferOrder`s instead; choosing targets, waiting for readiness and the ack stay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.cliargs import add_common_arguments, deployment_from_args, positive_float
from cascade.config import ConfigError, Deployment, ModelDeployment, env_float, env_str
from cascade.logs import setup_logging
from cascade.meshview import connect_bounded
from cascade.messages import (
    Heartbeat,
    LoadModel,
    MessageError,
    Ok,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    ServiceReady,
    ServiceStatus,
    StatusRequest,
    UnloadModel,
    decode,
    encode,
)
from cascade.natsutil import RequestTimeout, TaskSet, handler, request, stop_event
from cascade.subjects import Subjects, check_token
from services.loader.assign import Assignment, WorkerTable, choose_for_down, choose_for_up, describe, fully_serving


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


def run(args: argparse.Namespace) -> int:
    return asyncio.run(main(args))


async def main(args: argparse.Namespace) -> int:
    log = setup_logging("loader", args.log_level)
    try:
        check_token(args.loader_id)
        deployment = deployment_from_args(args)
        subjects = Subjects(args.prefix)
    except (ConfigError, ValueError) as e:
        log.error("bad_config", error=str(e))
        return 2
    log = log.bind(instance=args.loader_id, prefix=args.prefix)
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
        self.counters = {"acks_ok": 0, "acks_failed": 0}
        self.tasks = TaskSet(log)
        self.nc: NATS | None = None

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
        self.reserved.update(chosen.workers)
        try:
            lg.info("loading", workers=list(chosen.workers), path=str(model.path))
            started, failed = await self.start_loads(d, model, chosen.workers)
            ready, failed_later = await self.wait_serving(d.model, started)
        finally:
            self.reserved.difference_update(chosen.workers)
        return ready, "; ".join(problems + failed + failed_later)

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
        detail: dict[str, Any] = {
            "workers": states,
            "active": sorted(self.active),
            "reserved": len(self.reserved),
            **self.counters,
        }
        return ServiceStatus("loader", self.args.loader_id, os.getpid(), detail)

    async def serve(self, stop: asyncio.Event) -> int:
        s = self.subjects
        self.nc = await connect_bounded(self.args.nats_url, f"loader-{self.args.loader_id}", timeout_s=30.0)
        try:
            subs: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = [
                (s.heartbeat_all(), self.on_heartbeat),
                (s.scale_decision(), self.on_decision),
                (s.status(), handler(self.on_status, self.log)),
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
