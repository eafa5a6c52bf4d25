"""The scaler service: a thin NATS adapter around `policy.ScalerCore`.

In: heartbeats (who runs what), ScaleAck (a decision was carried out), ScaleRequest (an
operator's replica target), ServiceReady from a loader. Out: ScaleDecision on every tick where a
model is off its target, and a status answer. All decisions come from the core; this module only
moves messages and keeps time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.cliargs import add_common_arguments, deployment_from_args, positive_float
from cascade.config import ConfigError, Deployment, env_float, env_str
from cascade.logs import setup_logging
from cascade.meshview import connect_bounded, gather_status
from cascade.messages import (
    Heartbeat,
    MessageError,
    Ok,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    ScaleRequest,
    ServiceReady,
    ServiceStatus,
    StatusRequest,
    decode,
    encode,
)
from cascade.natsutil import TaskSet, handler, stop_event
from cascade.subjects import Subjects, check_token
from services.scaler.policy import DEFAULT_ACK_TIMEOUT_S, ModelBounds, ScalerCore, Settings, TargetError
from services.scaler.state import WorkerTable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("scaler")
    g.add_argument(
        "--scaler-id",
        default=env_str("CASCADE_SCALER_ID", f"scaler-{os.getpid()}"),
        help="instance id, used in decision ids (env CASCADE_SCALER_ID; default scaler-<pid>)",
    )
    g.add_argument(
        "--tick-s",
        type=positive_float,
        default=env_float("CASCADE_SCALER_TICK_S", 1.0),
        help="seconds between looks at the mesh (env CASCADE_SCALER_TICK_S, default 1.0)",
    )
    g.add_argument(
        "--ack-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_SCALER_ACK_TIMEOUT_S", DEFAULT_ACK_TIMEOUT_S),
        help="give up on a decision's ack after this long and retry later "
        f"(env CASCADE_SCALER_ACK_TIMEOUT_S, default {DEFAULT_ACK_TIMEOUT_S:g})",
    )
    g.add_argument(
        "--heartbeat-s",
        type=positive_float,
        default=env_float("CASCADE_HEARTBEAT_S", 1.0),
        help="workers' heartbeat interval; 3 missed = dead (env CASCADE_HEARTBEAT_S, default 1.0)",
    )


def run(args: argparse.Namespace) -> int:
    return asyncio.run(main(args))


async def main(args: argparse.Namespace) -> int:
    log = setup_logging("scaler", args.log_level)
    try:
        check_token(args.scaler_id)
        deployment = deployment_from_args(args)
        subjects = Subjects(args.prefix)
    except (ConfigError, ValueError) as e:
        log.error("bad_config", error=str(e))
        return 2
    log = log.bind(instance=args.scaler_id, prefix=args.prefix)
    stop = stop_event()
    scaler = Scaler(args, deployment, subjects, log)
    try:
        return await scaler.serve(stop)
    except ConnectionError as e:
        log.error("start_failed", error=str(e))
        return 1


def bounds_of(deployment: Deployment) -> dict[str, ModelBounds]:
    return {m.name: ModelBounds(m.min_replicas, m.max_replicas) for m in deployment.models}


class Scaler:
    def __init__(self, args: argparse.Namespace, deployment: Deployment, subjects: Subjects, log: Any) -> None:
        self.args = args
        self.subjects = subjects
        self.log = log
        self.clock: Callable[[], float] = time.monotonic
        # Warm-up lasts a little over one heartbeat round: by then every live worker was heard.
        settings = Settings(ack_timeout_s=args.ack_timeout_s, warmup_s=1.5 * args.heartbeat_s)
        self.core = ScalerCore(bounds_of(deployment), settings, self.clock(), id_prefix=args.scaler_id)
        self.workers = WorkerTable(args.heartbeat_s)
        self.wake = asyncio.Event()
        self.tasks = TaskSet(log)
        self.nc: NATS | None = None

    # ---- handlers ----------------------------------------------------------
    async def on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except MessageError as e:
            self.log.debug("bad_heartbeat", subject=msg.subject, error=str(e))
            return
        if self.workers.observe(hb, self.clock()):
            self.log.info("worker_seen", worker=hb.worker_id, state=hb.state, model=hb.model)

    async def on_ack(self, msg: Msg) -> None:
        try:
            ack = decode(msg.data, ScaleAck)
        except MessageError as e:
            self.log.warning("bad_ack", error=str(e))
            return
        d = self.core.on_ack(ack.decision_id, ack.ok, ack.workers, self.clock())
        if d is None:
            return  # another scaler's decision, or one from before a restart
        lg = self.log.bind(decision_id=ack.decision_id, model=ack.model)
        if ack.ok:
            lg.info("scale_done", action=d.action, workers=ack.workers)
        else:
            lg.warning(
                "scale_failed",
                action=d.action,
                workers=ack.workers,
                error=ack.error,
                retry_in_s=round((self.core.retry_at(d.model) or self.clock()) - self.clock(), 1),
            )
        self.wake.set()

    async def on_scale_request(self, req: ScaleRequest) -> Ok:
        if not isinstance(req, ScaleRequest):
            raise RemoteError("bad_request", f"expected scale_request, got {type(req).__name__}")
        try:
            previous = self.core.set_target(req.model, req.replicas)
        except TargetError as e:
            self.log.info("scale_request_refused", model=req.model, replicas=req.replicas, error=str(e))
            raise RemoteError(e.code, str(e)) from None
        current = self.core.current(req.model, self.workers.instances(self.clock()), self.clock())
        self.log.info("target_set", model=req.model, replicas=req.replicas, previous=previous)
        self.wake.set()
        return Ok(f"{req.model}: target {req.replicas} replicas (was {previous}); {current} running now")

    async def on_status(self, _: StatusRequest) -> ServiceStatus:
        now = self.clock()
        detail = self.core.status()
        detail["instances"] = {m: len(ws) for m, ws in self.workers.instances(now).items()}
        detail["workers"] = self.workers.summary(now)
        return ServiceStatus("scaler", self.args.scaler_id, os.getpid(), detail)

    async def on_service_ready(self, msg: Msg) -> None:
        try:
            ready = decode(msg.data, ServiceReady)
        except MessageError:
            return
        if ready.service == "loader":
            self._loader_up(ready.instance)

    def _loader_up(self, instance: str) -> None:
        dropped = self.core.loader_ready()
        self.log.info("loader_seen", loader=instance, dropped=[f.decision.decision_id for f in dropped])
        self.wake.set()

    async def probe_loader(self) -> None:
        """A loader that started before us announced itself already: ask who is there."""
        assert self.nc is not None
        st = await gather_status(self.nc, self.subjects, window_s=0.5, requester=self.args.scaler_id)
        loaders = [s for s in st.services if s.service == "loader"]
        if loaders and not self.core.loader_known:
            self._loader_up(loaders[0].instance)

    # ---- the loop ----------------------------------------------------------
    async def tick(self) -> str | None:
        """One look at the mesh; returns why no decision could be made, if that is the case."""
        assert self.nc is not None
        now = self.clock()
        for w in self.workers.prune(now):
            self.log.warning("worker_lost", worker=w)
        result = self.core.tick(now, self.workers.instances(now))
        for f in result.expired:
            self.log.warning(
                "scale_ack_timeout",
                decision_id=f.decision.decision_id,
                model=f.decision.model,
                waited_s=round(now - f.sent_at, 1),
                retry_in_s=round((self.core.retry_at(f.decision.model) or now) - now, 1),
            )
        for d in result.decisions:
            msg = ScaleDecision(
                decision_id=d.decision_id,
                model=d.model,
                action=d.action,
                count=d.count,
                target_replicas=d.target_replicas,
                reason=d.reason,
                figures=d.figures,
                ts=time.time(),
            )
            await self.nc.publish(self.subjects.scale_decision(), encode(msg))
            self.log.info(
                "scale_decision",
                decision_id=d.decision_id,
                model=d.model,
                action=d.action,
                count=d.count,
                target=d.target_replicas,
                reason=d.reason,
            )
        return result.held_back

    async def serve(self, stop: asyncio.Event) -> int:
        s = self.subjects
        self.nc = await connect_bounded(self.args.nats_url, f"scaler-{self.args.scaler_id}", timeout_s=30.0)
        try:
            subs: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = [
                (s.heartbeat_all(), self.on_heartbeat),
                (s.scale_ack(), self.on_ack),
                (s.scale_request(), handler(self.on_scale_request, self.log)),
                (s.status(), handler(self.on_status, self.log)),
                (s.service_ready(), self.on_service_ready),
            ]
            for subject, cb in subs:
                await self.nc.subscribe(subject, cb=cb)
            await self.nc.flush()
            await self.nc.publish(s.service_ready(), encode(ServiceReady("scaler", self.args.scaler_id, os.getpid())))
            self.log.info("ready", models=sorted(self.core.targets), tick_s=self.args.tick_s)
            self.tasks.spawn(self.probe_loader(), "probe-loader")
            held: str | None = None
            while not stop.is_set() and not self.tasks.failed.is_set():
                self.wake.clear()
                reason = await self.tick()
                if reason != held:
                    held = reason
                    if reason:
                        self.log.info("holding_back", reason=reason)
                await _wait_any(stop, self.wake, self.tasks.failed, timeout=self.args.tick_s)
            return 1 if self.tasks.failed.is_set() else 0
        finally:
            self.log.info("stopping")
            await self.tasks.cancel_all()
            with contextlib.suppress(Exception):
                await self.nc.drain()


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
