"""The scaler service: a thin NATS adapter around the pure cores.

In: heartbeats (who runs what, the idle pool), load metrics (`ModelMetrics` from gateways,
`InstanceMetrics` from workers), ScaleAck (a decision was carried out), ScaleRequest (an operator's
replica target), DeployRequest (the admin API: a model's policy and knobs), ServiceReady from a
loader. Out: ScaleDecision, SetBatchLimit to workers (the two-stage policy's vertical action), and
a status answer.

Every tick, per model: its signals (`control.Controls`, one `SignalWindow` each) go through its
policy; the policy's target and reason go to `policy.ScalerCore`, which decides what to publish
(one decision in flight per model, bounded by the idle pool, loans between models when the pool is
empty). This module only moves messages and keeps time.
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

from cascade.cliargs import add_common_arguments, positive_float, service_start
from cascade.config import ConfigError, Deployment, env_float, env_str
from cascade.messages import (
    BatchLimit,
    DeployReply,
    DeployRequest,
    Heartbeat,
    InstanceMetrics,
    MessageError,
    ModelMetrics,
    Ok,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    ScaleRequest,
    ServiceReady,
    ServiceStatus,
    SetBatchLimit,
    StatusRequest,
    decode,
    encode,
)
from cascade.natsutil import RequestTimeout, TaskSet, connect, gather_status, handler, request, stop_event
from cascade.subjects import Subjects
from services.scaler.control import Controls, UnknownModel
from services.scaler.policies import KnobError
from services.scaler.policy import DEFAULT_ACK_TIMEOUT_S, ModelBounds, Pool, ScalerCore, Settings, TargetError
from services.scaler.state import COUNTED_STATES, WorkerTable


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
    g.add_argument(
        "--window-s",
        type=positive_float,
        default=env_float("CASCADE_SCALER_WINDOW_S", 30.0),
        help="window of latency percentiles and step samples (env CASCADE_SCALER_WINDOW_S, default 30)",
    )
    g.add_argument(
        "--rate-window-s",
        type=positive_float,
        default=env_float("CASCADE_SCALER_RATE_WINDOW_S", 10.0),
        help="window of arrival and token rates (env CASCADE_SCALER_RATE_WINDOW_S, default 10)",
    )
    g.add_argument(
        "--stale-s",
        type=positive_float,
        default=env_float("CASCADE_SCALER_STALE_S", 5.0),
        help="a gateway's or worker's load figures count for this long after its last report (default 5)",
    )


def run(args: argparse.Namespace) -> int:
    return asyncio.run(main(args))


async def main(args: argparse.Namespace) -> int:
    started = service_start("scaler", args, args.scaler_id)
    if started is None:
        return 2
    log, deployment, subjects = started
    try:
        scaler = Scaler(args, deployment, subjects, log)
    except ConfigError as e:  # a policy or knob the deployment names that cannot be used
        log.error("bad_config", error=str(e))
        return 2
    stop = stop_event()
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
        # Namespaces built by hand (tests) may predate the window flags: their defaults apply.
        self.controls = Controls(
            deployment,
            window_s=float(getattr(args, "window_s", 30.0)),
            rate_window_s=float(getattr(args, "rate_window_s", 10.0)),
            stale_s=float(getattr(args, "stale_s", 5.0)),
        )
        managed = [m for m, c in self.controls.models.items() if c.policy.name != "manual"]
        self.core = ScalerCore(bounds_of(deployment), settings, self.clock(), id_prefix=args.scaler_id, adopt=managed)
        self.wall: Callable[[], float] = time.time
        self.workers = WorkerTable(args.heartbeat_s)
        self._vertical_seq = 0
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
        self.controls.worker_left(hb.worker_id, hb.model if hb.state in COUNTED_STATES else None)

    async def on_metrics(self, msg: Msg) -> None:
        try:
            m: Any = decode(msg.data)
        except MessageError as e:
            self.log.debug("bad_metrics", subject=msg.subject, error=str(e))
            return
        if isinstance(m, ModelMetrics | InstanceMetrics):
            self.controls.fold(m)
        if isinstance(m, ModelMetrics) and m.waiting > 0:
            # A gateway holds requests: look now rather than at the next tick (the gateway reports
            # early when its queue starts to hold, so a burst's onset reaches the policy at once).
            self.wake.set()

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
        policy = self.controls.get(req.model).policy.name
        note = "" if policy == "manual" else f"; policy {policy} manages it and may change it"
        return Ok(f"{req.model}: target {req.replicas} replicas (was {previous}); {current} running now{note}")

    async def on_deploy(self, req: DeployRequest) -> DeployReply:
        """The admin API: a model's policy and knobs, changed at run time (or just read)."""
        if not isinstance(req, DeployRequest):
            raise RemoteError("bad_request", f"expected deploy_request, got {type(req).__name__}")
        try:
            before = self.controls.get(req.model).policy.name
            r = self.controls.configure(req.model, self.wall(), req.policy, req.knobs, req.replace_knobs)
        except UnknownModel:
            known = ", ".join(sorted(self.controls.models))
            raise RemoteError("unknown_model", f"{req.model!r} is not in the deployment (models: {known})") from None
        except KnobError as e:
            raise RemoteError("bad_policy", str(e)) from None
        c = r.control
        if r.changed:
            self.log.info(
                "policy_set", model=req.model, policy=c.policy.name, previous=before, knobs=c.knobs_set,
                batch_limit=c.batch_limit,
            )  # fmt: skip
            for w in r.restore:
                self.tasks.spawn(self.send_limit(w, req.model, 0, "", f"policy {c.policy.name}"), f"limit-{w}")
            self.wake.set()
        b = self.core.bounds[req.model]
        return DeployReply(
            model=req.model,
            policy=c.policy.name,
            knobs=dict(c.knobs_set),
            effective=c.policy.effective_knobs(c.knobs),
            min_replicas=b.min_replicas,
            max_replicas=b.max_replicas,
            target_replicas=self.core.targets[req.model],
            changed=r.changed,
            batch_limit=c.batch_limit or 0,
        )

    async def send_limit(self, worker: str, model: str, limit: int, decision_id: str, reason: str) -> None:
        """SetBatchLimit to one worker. A failure is only logged: the next ticks see the worker's
        limit in its metrics and send again."""
        assert self.nc is not None
        lg = self.log.bind(worker=worker, model=model, decision_id=decision_id)
        try:
            r = await request(
                self.nc,
                self.subjects.batch_limit(worker),
                SetBatchLimit(limit, decision_id, reason),
                BatchLimit,
                timeout=self.args.tick_s + 2.0,
            )
        except (RemoteError, RequestTimeout, MessageError) as e:
            lg.warning("batch_limit_failed", limit=limit, error=str(e))
            return
        except Exception as e:  # nats-py's own errors (connection closing, draining): never fatal here
            lg.warning("batch_limit_failed", limit=limit, error=repr(e))
            return
        lg.info("batch_limit_set", requested=limit, limit=r.max_batch, kv_slots=r.kv_slots)

    async def on_status(self, _: StatusRequest) -> ServiceStatus:
        now = self.clock()
        detail = self.core.status()
        detail["instances"] = {m: len(ws) for m, ws in self.workers.instances(now).items()}
        detail["workers"] = self.workers.summary(now)
        detail["idle_pool"] = len(self.workers.idle(now))
        detail["policies"] = self.controls.describe()
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
        now, wall = self.clock(), self.wall()
        for w in self.workers.prune(now):
            self.log.warning("worker_lost", worker=w)
            self.controls.worker_left(w)
        instances = self.workers.instances(now)
        idle = self.workers.idle(now)
        loading = self.workers.loading(now)
        self.core.adopt(now, instances)
        needs: dict[str, int] = {}
        limits: list[tuple[str, str, int]] = []
        for model in sorted(self.controls.models):
            needs_of, orders = self.evaluate(model, now, wall, instances, loading.get(model, 0), len(idle))
            if needs_of is not None:
                needs[model] = needs_of
            limits += [(model, w, lim) for w, lim in orders]
        for model, w, lim in limits:
            c = self.controls.get(model)
            self.tasks.spawn(self.send_limit(w, model, lim, c.limit_decision, c.limit_reason), f"limit-{w}")
        result = self.core.tick(now, instances, Pool(idle, needs))
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

    def evaluate(
        self,
        model: str,
        now: float,
        wall: float,
        instances: dict[str, frozenset[str]],
        loading: int,
        idle: int,
    ) -> tuple[int | None, list[tuple[str, int]]]:
        """Run one model's policy: its target (and reason) into the core, a new batch limit noted;
        returns the model's need and the batch-limit orders for its instances."""
        current = self.core.current(model, instances, now)
        loading = min(loading, current)
        in_flight = model in self.core.in_flight
        ev = self.controls.evaluate(
            model, wall, serving=current - loading, loading=loading, idle_pool=idle, in_flight=in_flight
        )
        d = ev.decision
        c = self.controls.get(model)
        # Until the warm-up ends the instance counts are not the whole mesh yet: the policy runs
        # (its timers and fits go on) but its targets wait.
        ready = self.core.ready(now)
        wants = d is not None and d.target_replicas != current
        if ready and wants and not in_flight and d is not None:
            b = self.core.bounds[model]
            target = max(b.min_replicas, min(b.max_replicas, d.target_replicas))
            if target != self.core.targets[model]:
                previous = self.core.set_target(model, target, reason=d.reason, figures=d.figures)
                self.log.info(
                    "policy_target", model=model, target=target, previous=previous, current=current, reason=d.reason
                )
        elif ready and not wants and c.policy.name != "manual":
            self.core.follow(model, current)
        if ev.limit_changed:
            self._vertical_seq += 1
            c.limit_decision = f"{self.args.scaler_id}-v{self._vertical_seq}"
            self.log.info(
                "batch_limit_decision", model=model, decision_id=c.limit_decision, limit=c.batch_limit,
                reason=c.limit_reason, figures=d.figures if d is not None else {},
            )  # fmt: skip
        return ev.need, self.controls.limit_orders(ev.signals, wall)

    async def serve(self, stop: asyncio.Event) -> int:
        s = self.subjects
        self.nc = await connect(self.args.nats_url, f"scaler-{self.args.scaler_id}", connect_timeout_s=30.0)
        try:
            subs: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = [
                (s.heartbeat_all(), self.on_heartbeat),
                (s.scale_ack(), self.on_ack),
                (s.scale_request(), handler(self.on_scale_request, self.log)),
                (s.scale_deploy(), handler(self.on_deploy, self.log)),
                (s.metrics_all(), self.on_metrics),
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
                ticked = self.clock()
                reason = await self.tick()
                if reason != held:
                    held = reason
                    if reason:
                        self.log.info("holding_back", reason=reason)
                await _wait_any(stop, self.wake, self.tasks.failed, timeout=self.args.tick_s)
                # Woken early (a queue, an ack): at most four looks per tick, however chatty the mesh.
                spacing = ticked + self.args.tick_s / 4 - self.clock()
                if spacing > 0:
                    await _wait_any(stop, self.tasks.failed, timeout=spacing)
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
