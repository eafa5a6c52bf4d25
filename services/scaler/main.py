"""The scaler service: the NATS adapter around the pure core (core.py).

In: the workers' heartbeats and readiness (the shared worker table), load metrics (`ModelMetrics`
from gateways, `InstanceMetrics` from workers), ScaleAck (a decision was carried out),
ScaleRequest (an operator's replica target), DeployRequest (the admin API), ServiceReady from a
loader. Out: ScaleDecision, SetBatchLimit to workers (the two-stage policy's vertical action),
SetQuota to instances on shared workers (co-scaling, quotas.py), and status answers.

What arrives between ticks is queued; each tick hands it to `core.tick` with the worker table's
picture of the mesh and carries out the effects that come back. A tick runs every `--tick-s`, and
sooner (at most four per tick) when something needs a look now: an ack, a gateway holding
requests (it reports early when its queue starts to hold, so a burst's onset reaches the policy
at once), an operator's request, a loader that started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from nats.aio.msg import Msg

from cascade.cliargs import HEARTBEAT_S, Opt, add_common_arguments, add_options, positive_float, service_start
from cascade.config import ConfigError, Deployment, entry_json, model_from_entry, write_json_atomic
from cascade.messages import (
    ActiveDecisions,
    ActiveDecisionsRequest,
    ApplyPlan,
    BatchLimit,
    DeploymentChanged,
    DeploymentReply,
    DeploymentRequest,
    DeployReply,
    DeployRequest,
    InstanceMetrics,
    MessageError,
    ModelMetrics,
    Ok,
    PlanApplied,
    QuotaSet,
    RemoteError,
    ScaleAck,
    ScaleDecision,
    ScaleRequest,
    ServiceReady,
    ServiceStatus,
    SetBatchLimit,
    SetQuota,
    StatusRequest,
    decode,
    encode,
)
from cascade.natsutil import RequestTimeout, TaskSet, gather_status, request
from cascade.service import Runtime, run_process
from cascade.workerfeed import WorkerFeed, nats_snapshot_fetcher
from cascade.workers import WorkerTable
from services.scaler import core
from services.scaler.backoff import DEFAULT_BASE_S as DEFAULT_BACKOFF_S
from services.scaler.controls import UnknownModel
from services.scaler.policies import KnobError
from services.scaler.replicas import DEFAULT_ACK_TIMEOUT_S, Settings, TargetError

SNAPSHOT_TIMEOUT_S = 2.0
R = TypeVar("R")  # the answer a worker order expects


# The scaler's flags in --help order; each one's default is read from its variable when that is set.
OPTIONS = (
    Opt(
        "--scaler-id",
        f"scaler-{os.getpid()}",
        "instance id, used in decision ids",
        env="CASCADE_SCALER_ID",
        shown="scaler-<pid>",
    ),
    Opt("--tick-s", 1.0, "seconds between looks at the mesh", env="CASCADE_SCALER_TICK_S", type=positive_float),
    Opt(
        "--ack-timeout-s",
        DEFAULT_ACK_TIMEOUT_S,
        "give up on a decision's ack after this long and retry later",
        env="CASCADE_SCALER_ACK_TIMEOUT_S",
        type=positive_float,
    ),
    HEARTBEAT_S,
    Opt(
        "--window-s",
        30.0,
        "window of latency percentiles and step samples",
        env="CASCADE_SCALER_WINDOW_S",
        type=positive_float,
    ),
    Opt(
        "--rate-window-s",
        10.0,
        "window of arrival and token rates",
        env="CASCADE_SCALER_RATE_WINDOW_S",
        type=positive_float,
    ),
    Opt(
        "--backoff-s",
        DEFAULT_BACKOFF_S,
        "a worker that failed to load a model is avoided for it this long, doubling per failure (up to 300 s)",
        env="CASCADE_SCALER_BACKOFF_S",
        type=positive_float,
    ),
    Opt(
        "--stale-s",
        5.0,
        "a gateway's or worker's load figures count for this long after its last report",
        env="CASCADE_SCALER_STALE_S",
        type=positive_float,
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_options(parser.add_argument_group("scaler"), *OPTIONS)


def run(args: argparse.Namespace) -> int:
    started = service_start("scaler", args, args.scaler_id)
    if started is None:
        return 2
    log, deployment, _ = started
    try:
        scaler = Scaler.from_args(args, deployment, log)
    except ConfigError as e:  # a policy or knob the deployment names that cannot be used
        log.error("bad_config", error=str(e))
        return 2
    return run_process(lambda: scaler, args.nats_url, args.prefix, log)


class Scaler:
    service = "scaler"

    def __init__(
        self,
        deployment: Deployment,
        scaler_id: str = "scaler",
        *,
        tick_s: float = 1.0,
        heartbeat_s: float = 1.0,
        ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
        window_s: float = 30.0,
        rate_window_s: float = 10.0,
        stale_s: float = 5.0,
        backoff_s: float = DEFAULT_BACKOFF_S,
        log: Any = None,
        deployment_file: Path | None = None,
    ) -> None:
        self.scaler_id = scaler_id
        self.deployment_file = deployment_file
        self.tick_s = tick_s
        self.log = log or structlog.get_logger().bind(service="scaler", instance=scaler_id)
        self.clock: Callable[[], float] = time.monotonic
        self.wall: Callable[[], float] = time.time
        # Warm-up lasts a little over one heartbeat round: by then every live worker was heard.
        settings = Settings(ack_timeout_s=ack_timeout_s, warmup_s=1.5 * heartbeat_s)
        # Decision ids are `<scaler id>-<this start>-<n>`: a restarted scaler (same id, counting from 1
        # again) must not repeat an id a loader has seen, or the loader would drop it as a redelivery.
        self.state = core.new_state(
            deployment,
            settings,
            self.now(),
            scaler_id,
            window_s=window_s,
            rate_window_s=rate_window_s,
            stale_s=stale_s,
            id_prefix=f"{scaler_id}-{uuid.uuid4().hex[:6]}",
            backoff_s=backoff_s,
        )
        self.table = WorkerTable(heartbeat_s)
        self.wake = asyncio.Event()
        # Set with `wake` by what changes the mesh's capacity (a scale ack, a worker lost): those
        # are few, so they are not held to the rate bound the chatty inputs are (see `loop`).
        self.urgent = asyncio.Event()
        # What arrived since the last tick.
        self._metrics: list[ModelMetrics | InstanceMetrics] = []
        self._acks: list[ScaleAck] = []
        self._lost: list[str] = []
        self._loader_up: str | None = None
        self._resumed: list[ScaleDecision] = []
        self.tasks: TaskSet | None = None
        self._rt: Runtime | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, deployment: Deployment, log: Any = None) -> Scaler:
        return cls(
            deployment,
            args.scaler_id,
            tick_s=args.tick_s,
            heartbeat_s=args.heartbeat_s,
            ack_timeout_s=args.ack_timeout_s,
            window_s=args.window_s,
            rate_window_s=args.rate_window_s,
            stale_s=args.stale_s,
            backoff_s=args.backoff_s,
            log=log,
            deployment_file=Path(args.config) if getattr(args, "config", None) else None,
        )

    @property
    def instance(self) -> str:
        return self.scaler_id

    def now(self) -> core.Now:
        return core.Now(self.clock(), self.wall())

    def mesh(self) -> core.Mesh:
        now = self.clock()
        views = self.table.views(now)
        return core.Mesh(
            instances=self.table.instances(now),
            idle=self.table.idle(now),
            loading=self.table.loading(now),
            holding={v.worker_id: v.counted_model for v in views},
            shared=tuple(
                core.SharedSlot(v.worker_id, v.shared_device, v.model, v.instance, v.quota)
                for v in views
                if v.shared_device and v.model and v.state == "serving"
            ),
        )

    # ---- wiring ------------------------------------------------------------
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        self.tasks = rt.tasks
        s = rt.subjects
        feed = WorkerFeed(
            self.table,
            fetch_snapshot=nats_snapshot_fetcher(rt.nc, s, self.scaler_id, SNAPSHOT_TIMEOUT_S),
            on_dead=self._worker_lost,
            clock=self.clock,
            logger=self.log,
        )
        rt.stack.push_async_callback(feed.close)
        await feed.subscribe(rt.nc, s)
        await rt.subscribe(s.scale_ack(), self.on_ack)
        await rt.subscribe(s.metrics_all(), self.on_metrics)
        await rt.subscribe(s.service_ready(), self.on_service_ready)
        await rt.serve(s.scale_request(), self.on_scale_request)
        await rt.serve(s.scale_deploy(), self.on_deploy)
        await rt.serve(s.scale_apply(), self.on_apply)
        await rt.serve(s.deployment_get(), self.on_deployment_get)
        await rt.serve(s.status(), self.on_status)
        rt.tasks.spawn(self.loop(feed), "tick")
        rt.tasks.spawn(self.probe_loader(), "probe-loader")
        self.log.info("ready", models=sorted(self.state.book.targets), tick_s=self.tick_s)

    def _worker_lost(self, worker_id: str) -> None:
        # Tick now, not at the next interval: the lost capacity's replacement starts up to a whole
        # tick sooner (bench/results/chaos.md measures recovery from a worker's death).
        self._lost.append(worker_id)
        self.wake.set()
        self.urgent.set()

    async def loop(self, feed: WorkerFeed) -> None:
        while True:
            self.wake.clear()
            self.urgent.clear()
            ticked = self.clock()
            feed.reap()
            await self.tick()
            await _wait_any(self.wake, timeout=self.tick_s)
            # Woken early by a queue: at most four looks per tick, however chatty the mesh. An ack
            # or a lost worker cuts that short: under load the gateways' reports kept the scaler
            # at the bound, and a worker fault's replacement waited up to a quarter tick at each
            # of its two steps (the loss, then the failed ack) in bench chaos.
            spacing = ticked + self.tick_s / 4 - self.clock()
            if spacing > 0 and not self.urgent.is_set():
                await _wait_any(self.urgent, timeout=spacing)

    async def tick(self) -> None:
        inputs = core.Inputs(
            mesh=self.mesh(),
            metrics=self._metrics,
            acks=self._acks,
            workers_lost=self._lost,
            loader_up=self._loader_up,
            resumed=self._resumed,
        )
        self._metrics, self._acks, self._lost, self._loader_up, self._resumed = [], [], [], None, []
        self.state, effects = core.tick(self.state, inputs, self.now())
        await self.carry_out(effects)

    async def carry_out(self, effects: list[core.Effect]) -> None:
        assert self._rt is not None and self.tasks is not None
        rt = self._rt
        for e in effects:
            if isinstance(e, core.Publish):
                await rt.nc.publish(rt.subjects.scale_decision(), encode(e.decision))
            elif isinstance(e, core.SetLimit):
                self.tasks.spawn(self.send_limit(e), f"limit-{e.worker}")
            elif isinstance(e, core.SetQuota):
                self.tasks.spawn(self.send_quota(e), f"quota-{e.worker}")
            elif isinstance(e, core.Announce):
                await self.announce(e)
            else:
                (self.log.warning if e.level == "warning" else self.log.info)(e.event, **e.fields)

    async def announce(self, e: core.Announce) -> None:
        """Every service learns the new deployment from this message; the file keeps it for restarts."""
        assert self._rt is not None
        models = [entry_json(m) for m in e.deployment.models]
        await self._rt.nc.publish(
            self._rt.subjects.deployment_changed(), encode(DeploymentChanged(models, list(e.added)))
        )
        # Only the file `cascade up` writes for its children (JSON) is ours to rewrite; a user's TOML
        # is theirs, and the change then lasts until the mesh restarts.
        if self.deployment_file is not None and self.deployment_file.suffix == ".json":
            try:
                write_json_atomic(self.deployment_file, e.deployment.to_json())
            except OSError as err:
                self.log.warning("deployment_not_saved", path=str(self.deployment_file), error=str(err))

    async def send_limit(self, e: core.SetLimit) -> None:
        """SetBatchLimit to one worker. A failure is only logged: the next ticks see the worker's
        limit in its metrics and send again."""
        assert self._rt is not None
        msg = SetBatchLimit(e.limit, e.decision_id, e.reason)
        r = await self._order(
            e, self._rt.subjects.batch_limit(e.worker), msg, BatchLimit, "batch_limit_failed", {"limit": e.limit}
        )
        if r is not None:
            self._lg(e).info("batch_limit_set", requested=e.limit, limit=r.max_batch, kv_slots=r.kv_slots)

    async def send_quota(self, e: core.SetQuota) -> None:
        """SetQuota to one instance on a shared worker. A failure is only logged: heartbeats go on
        showing the old quota, and a later tick decides again."""
        assert self._rt is not None
        msg = SetQuota(e.quota, e.decision_id, e.reason)
        r = await self._order(e, self._rt.subjects.quota(e.worker), msg, QuotaSet, "quota_failed", {"quota": e.quota})
        if r is not None:
            self._lg(e).info(
                "quota_set", requested=e.quota, quota=r.quota, share=r.share, device=r.device, quotas=r.quotas
            )

    def _lg(self, e: core.SetLimit | core.SetQuota) -> Any:
        return self.log.bind(worker=e.worker, model=e.model, decision_id=e.decision_id)

    async def _order(
        self,
        e: core.SetLimit | core.SetQuota,
        subject: str,
        msg: Any,
        reply: type[R],
        failed: str,
        asked: dict[str, Any],
    ) -> R | None:
        """Send one worker order and return its answer; a failure is logged as `failed` with what
        was asked and gives None, never an exception: a later tick decides again."""
        assert self._rt is not None
        try:
            return await request(self._rt.nc, subject, msg, reply, timeout=self.tick_s + 2.0)
        except (RemoteError, RequestTimeout, MessageError) as err:
            self._lg(e).warning(failed, **asked, error=str(err))
        except Exception as err:  # nats-py's own errors (connection closing, draining): never fatal here
            self._lg(e).warning(failed, **asked, error=repr(err))
        return None

    # ---- inputs ------------------------------------------------------------
    async def on_metrics(self, msg: Msg) -> None:
        try:
            m: Any = decode(msg.data)
        except MessageError as e:
            self.log.debug("bad_metrics", subject=msg.subject, error=str(e))
            return
        if isinstance(m, ModelMetrics | InstanceMetrics):
            self._metrics.append(m)
        if isinstance(m, ModelMetrics) and m.waiting > 0:
            # A gateway holds requests: look now rather than at the next tick.
            self.wake.set()

    async def on_ack(self, msg: Msg) -> None:
        try:
            ack = decode(msg.data, ScaleAck)
        except MessageError as e:
            self.log.warning("bad_ack", error=str(e))
            return
        self._acks.append(ack)
        self.wake.set()
        self.urgent.set()

    async def on_service_ready(self, msg: Msg) -> None:
        try:
            ready = decode(msg.data, ServiceReady)
        except MessageError:
            return
        if ready.service == "loader" and self.tasks is not None:
            self.tasks.spawn(self.learn_loader(ready.instance), f"loader-{ready.instance}")

    async def learn_loader(self, loader: str) -> None:
        """A loader is there: ask which decisions it carries out, then tell the next tick (which
        drops what this scaler had in flight and takes those over). A loader that does not answer
        has none we could take over."""
        assert self._rt is not None
        decisions: list[ScaleDecision] = []
        try:
            got = await request(
                self._rt.nc,
                self._rt.subjects.loader_decisions(),
                ActiveDecisionsRequest(self.scaler_id),
                ActiveDecisions,
                timeout=SNAPSHOT_TIMEOUT_S,
            )
            decisions = list(got.decisions)
        except (RemoteError, RequestTimeout, MessageError) as e:
            self.log.warning("loader_decisions_unknown", loader=loader, error=str(e))
        # Set together, with no await in between: the tick sees both or neither.
        self._loader_up = loader
        self._resumed = decisions
        self.wake.set()

    async def probe_loader(self) -> None:
        """A loader that started before us announced itself already: ask who is there."""
        assert self._rt is not None
        st = await gather_status(self._rt.nc, self._rt.subjects, window_s=0.5, requester=self.scaler_id)
        loaders = [s for s in st.services if s.service == "loader"]
        if loaders and not self.state.book.loader_known:
            await self.learn_loader(loaders[0].instance)

    # ---- requests ----------------------------------------------------------
    async def on_scale_request(self, req: ScaleRequest) -> Ok:
        if not isinstance(req, ScaleRequest):
            raise RemoteError("bad_request", f"expected scale_request, got {type(req).__name__}")
        try:
            reply, effects = core.set_target(self.state, req, self.mesh(), self.now())
        except TargetError as e:
            self.log.info("scale_request_refused", model=req.model, replicas=req.replicas, error=str(e))
            raise RemoteError(e.code, str(e)) from None
        await self.carry_out(effects)
        self.wake.set()
        return reply

    async def on_deploy(self, req: DeployRequest) -> DeployReply:
        if not isinstance(req, DeployRequest):
            raise RemoteError("bad_request", f"expected deploy_request, got {type(req).__name__}")
        try:
            if req.add is not None:
                try:
                    dep = model_from_entry(req.add)
                except ConfigError as e:
                    raise RemoteError("bad_model", str(e)) from None
                if dep.name != req.model:
                    raise RemoteError("bad_model", f"the entry names {dep.name!r}, the request {req.model!r}")
                reply, effects = core.add_model(self.state, dep, self.now())
            else:
                reply, effects = core.configure(self.state, req, self.now())
        except core.ModelExists as e:
            raise RemoteError("model_exists", str(e)) from None
        except UnknownModel:
            known = ", ".join(sorted(self.state.controls.models))
            raise RemoteError("unknown_model", f"{req.model!r} is not in the deployment (models: {known})") from None
        except KnobError as e:
            raise RemoteError("bad_policy", str(e)) from None
        await self.carry_out(effects)
        if reply.changed:
            self.wake.set()
        return reply

    async def on_apply(self, req: ApplyPlan) -> PlanApplied:
        if not isinstance(req, ApplyPlan):
            raise RemoteError("bad_request", f"expected apply_plan, got {type(req).__name__}")
        try:
            reply, effects = core.apply_plan(self.state, req, self.mesh(), self.now())
        except UnknownModel as e:
            known = ", ".join(sorted(self.state.controls.models))
            raise RemoteError(
                "unknown_model",
                f"the plan names {e.args[0]!r}, which is not deployed (models: {known}); "
                "deploy it first (`cascade deploy NAME --model PATH`)",
            ) from None
        except TargetError as e:
            self.log.info("plan_refused", plan=req.plan, error=str(e))
            raise RemoteError(e.code, str(e)) from None
        await self.carry_out(effects)
        if reply.changed:
            self.wake.set()
        return reply

    async def on_deployment_get(self, req: DeploymentRequest) -> DeploymentReply:
        """A gateway or loader (re)starting: the deployment now, models added at run time included."""
        if not isinstance(req, DeploymentRequest):
            raise RemoteError("bad_request", f"expected deployment_request, got {type(req).__name__}")
        dep = self.state.controls.deployment
        return DeploymentReply([entry_json(m) for m in dep.models], self.scaler_id)

    async def on_status(self, _: StatusRequest) -> ServiceStatus:
        detail = core.status(self.state, self.mesh(), self.now())
        detail["workers"] = self.table.states(self.clock())
        return ServiceStatus("scaler", self.scaler_id, os.getpid(), detail)


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    """Until one of `events` is set or `timeout` passes.

    The helper waits are cancelled, not awaited: awaiting them here once swallowed a cancel of the
    calling task that landed in that await (the loop then ran on while ServiceHost waited for it
    to end: a test hung until CI's limit)."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
