"""The gateway's engine room: admission, batching, dispatch to workers, retries,
and the token stream back, over NATS. The HTTP side (app.py) only validates,
calls `prepare` / `admit` / `next_event` / `release`, and formats.

A request's life: `admit` queues it in its model's `Batcher`; the batcher picks
an instance through the router (`pick`) and `dispatch`es a batch as one
`GenerateBatch`; the worker's `TokenEvents` reach the request through the
`StreamHub`. When the worker turns a request away, does not answer, or dies
before the first token, the request goes back to the front of the queue (a
bounded number of times). Once tokens have reached the client, a lost worker
(dead, or its stream ended by an error) means *migration* (Dynamo's
`--migration-limit`): the request goes back to the front of the queue with the
tokens streamed so far appended to its prompt, and the next instance recomputes
them and carries on where the client's stream stopped, a seeded one on the same
random stream; the client sees one unbroken stream. Past `migration_limit`
moves, or with no instance to take it, the client gets an explicit error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import time
import typing
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cascade import natsutil
from cascade.advertise import advertised_host, check_reachable
from cascade.config import ConfigError, Deployment, ModelDeployment, cascade_home
from cascade.deployfeed import DeploymentFeed
from cascade.inline import subscribe_inline
from cascade.meshfiles import fetch_model_files
from cascade.messages import (
    BatchReply,
    Cancel,
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    MessageError,
    RemoteError,
    SamplingParams,
    ScaleAck,
    ScaleDecision,
    ServiceStatus,
    StatusRequest,
    TokenEvent,
    TokenEvents,
    TransferEvent,
    TransferPlanned,
    decode,
    encode,
)
from cascade.models.chat_template import ChatTemplateError, NoChatTemplate
from cascade.subjects import Subjects
from cascade.tokenlink import (
    RequestLinks,
    decode_events,
    link_server_factory,
    local_socket_address,
    local_socket_name,
)
from cascade.workerfeed import WorkerFeed, nats_snapshot_fetcher
from services.gateway.batcher import Batcher, QueueFull
from services.gateway.catalog import ModelCatalog, ModelInfo
from services.gateway.dashboard import DashboardHub
from services.gateway.loadreport import LoadReport
from services.gateway.meshwatch import Frame, MeshWatch
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_api import ApiError, GenerationSpec
from services.gateway.registry import Registry
from services.gateway.router import (
    PartialRoute,
    Route,
    choose_route,
    consolidations,
    models_without_instance,
    pipelines,
    serves_fully,
)
from services.gateway.settings import GatewaySettings
from services.gateway.streams import Failure, Phase, RequestState, StreamHub
from services.gateway.tools import Parser, infer_parser

# Texts longer than this are tokenised in a thread, so one huge prompt does not stall every stream.
_THREAD_TOKENISE_CHARS = 32 * 1024
# Back-off after an "overloaded" rejection: base * 2^n, capped.
_OVERLOAD_BACKOFF_S = 0.02
_OVERLOAD_BACKOFF_MAX_S = 1.0
# Rejections that say the instance cannot take work now, while another may: send the request
# elsewhere and keep the instance out of routing until its next heartbeat.
_RETRYABLE = frozenset({"draining", "wrong_model", "not_ready"})
# A model whose files could not be read is read again this often (they may appear after start).
_CATALOG_RETRY_S = 5.0
_FILES_TIMEOUT_S = 5.0  # per piece of a model's files from a loader
T = TypeVar("T")


class GatewayCore:
    def __init__(
        self,
        settings: GatewaySettings,
        deployment: Deployment,
        nc: NATS,
        logger: Any = None,
        tasks: natsutil.TaskSet | None = None,
    ) -> None:
        self.settings = settings
        self.id = settings.gateway_id
        self.nc = nc
        self.subjects = Subjects(settings.prefix)
        self.log = logger or structlog.get_logger().bind(service="gateway", gateway_id=self.id)
        self.catalog = ModelCatalog(deployment, fetch=self._fetch_files)
        self.deployments = DeploymentFeed()
        self.tasks = tasks or natsutil.TaskSet(self.log)
        self.hub = StreamHub(on_stray=self._cancel_on)
        self.registry = Registry(settings.heartbeat_s)
        self.feed = WorkerFeed(
            self.registry.table,
            fetch_snapshot=nats_snapshot_fetcher(nc, self.subjects, self.id, settings.snapshot_timeout_s),
            on_heartbeat=self._heartbeat_seen,
            on_change=self._mesh_changed,
            on_dead=self._worker_dead,
            logger=self.log,
        )
        self.batchers: dict[str, Batcher] = {name: self._new_batcher(name) for name in self.catalog.names()}
        self.metrics = GatewayMetrics(
            queue_depth=self.queue_depths,
            in_flight=self.in_flight_by_model,
            instances=self.instances_by_model,
            workers=self.registry.table.views,
        )
        self.watch = MeshWatch(self.metrics)
        self.dashboard = DashboardHub(self.watch, self.registry.table.views, self.queue_depths)
        self.load = LoadReport(self.id)
        self._report_now = asyncio.Event()
        self.url = ""
        self.accepting = True
        self._subs: list[Subscription] = []
        self._started = False
        # Cancel publishes are awaited at close (not cancelled like other tasks): the handlers that
        # aiohttp cancels at the end of the shutdown grace send them just before the engine closes.
        self._cancels: set[asyncio.Task[None]] = set()
        self._tool_parsers: dict[str, Parser] = {}
        self._consolidate_pending = False
        # The direct token listener (cascade/tokenlink.py): its advertised "host:port" and the key
        # a link presents, both sent in every GenerateBatch; empty while off or not started.
        self.token_addr = ""
        self.token_local = ""  # its Unix socket, "@name" (cascade/tokenlink.py); empty: none
        self.token_key = secrets.token_hex(16)
        self.token_link_stats: dict[str, int] = {}
        self._token_server: asyncio.Server | None = None
        self._token_local_server: asyncio.Server | None = None
        self._token_links: set[asyncio.Transport] = set()
        # Workers' request links (batches straight to the worker's loop): with the listener, unless off.
        self.request_links: RequestLinks | None = None

    def _heartbeat_seen(self, hb: Heartbeat) -> None:
        self.registry.heartbeat_seen(hb, self.hub.inflight(hb.worker_id))
        # The picture changed (an instance finished loading, one freed room): partial routes may move.
        self._consolidate_soon()

    async def _fetch_files(self, dep: ModelDeployment) -> Path:
        """A model's config and tokenizer from a loader, when this gateway cannot see its folder."""
        dest = cascade_home() / "gateway-files" / self.id
        folder = await fetch_model_files(self.nc, self.subjects, dep.name, dest, _FILES_TIMEOUT_S)
        self.log.info("model_files_from_mesh", model=dep.name, folder=str(folder))
        return folder

    def _new_batcher(self, model: str) -> Batcher:
        s = self.settings
        return Batcher(
            model,
            max_batch_size=s.max_batch_size,
            wait_s=s.batch_wait_timeout_s,
            max_queue=s.max_queue,
            queue_timeout_s=s.queue_timeout_s,
            owner=self,
        )

    # ---- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        for name, err in (await self.catalog.refresh()).items():
            self.log.warning("model_unavailable", model=name, error=err)
        self._started = True
        # Handled in the read loop's turn: per token, no task of the subscription's own in between.
        self._subs.append(await subscribe_inline(self.nc, self.subjects.tokens(self.id), self._on_tokens_msg, self.log))
        if self.settings.direct_tokens:
            await self._listen_tokens()
        self._subs += await self.feed.subscribe(self.nc, self.subjects)
        self._subs.append(
            await self.nc.subscribe(self.subjects.status(), cb=natsutil.handler(self._on_status, self.log))
        )
        for name, b in self.batchers.items():
            self.tasks.spawn(b.run(), name=f"batcher-{name}")
        # After the batchers run: a model deployed from here on gets its own batcher started.
        self._subs.append(await self.nc.subscribe(self.subjects.deployment_changed(), cb=self._on_deployment_msg))
        # The rest of the mesh, for /metrics and the dashboard.
        w, s = self.watch, self.subjects
        self._subs += [
            await self.nc.subscribe(s.scale_decision(), cb=self._watcher(ScaleDecision, w.on_decision)),
            await self.nc.subscribe(s.scale_ack(), cb=self._watcher(ScaleAck, w.on_ack)),
            await self.nc.subscribe(s.transfer_plan(), cb=self._watcher(TransferPlanned, w.on_plan)),
            await self.nc.subscribe(s.transfer_event_all(), cb=self._watcher(TransferEvent, w.on_transfer_event)),
        ]
        self.tasks.spawn(self.dashboard.run(), name="dashboard")
        # Models deployed at run time before this gateway (re)started: the scaler knows them.
        dep, source = await self.deployments.ask(self.nc, self.subjects, self.id)
        if dep is None:
            self.log.info("deployment_from_config", models=self.catalog.names(), why=source)
        else:
            self.log.info("deployment_from_scaler", models=dep.names(), scaler=source)
            await self.apply_deployment(dep)
        self.tasks.spawn(self.feed.run_reaper(), name="reaper")
        self.tasks.spawn(self._report_loop(), name="load-report")
        self.tasks.spawn(self._catalog_loop(), name="catalog")
        # The subscriptions must be in place at the server before a worker is told our id.
        await self.nc.flush()

    def begin_shutdown(self) -> None:
        """Stop admitting. Queued requests that no instance can take fail now rather than be
        cut off when the grace period ends; running ones may finish within it, and what still runs
        when it ends fails then (`_end_of_grace`)."""
        self.accepting = False
        for name, b in self.batchers.items():
            if self.pick(name, frozenset()) is None:
                for req in b.take_all():
                    self.hub.finish(req, Failure(503, "the gateway is shutting down", "shutting_down", 1))
        self.tasks.spawn(self._end_of_grace(), name="shutdown-grace")

    async def _end_of_grace(self) -> None:
        """Fail every request still open when the shutdown grace ends: its stream gets an error
        event and ends, and its worker is told to stop. Left to aiohttp, a handler still waiting for
        tokens is cancelled only after a second grace period (it waits the grace once for the
        handler, then again for the cancelled connection), and its client gets a cut connection."""
        await asyncio.sleep(self.settings.shutdown_grace_s)  # the grace period itself (a timer)
        why = Failure(503, "the gateway shut down before this request finished", "shutting_down", 1)
        for b in self.batchers.values():
            b.take_all()  # no dispatch from here on; the queued are open in the hub, failed below
        left = self.hub.open_requests()
        if left:
            self.log.warning("shutdown_grace_over", grace_s=self.settings.shutdown_grace_s, failed=len(left))
        for req in left:
            self._give_up(req, why)  # a worker running it is told to stop

    async def _listen_tokens(self) -> None:
        """Open the direct token listener on the gateway's host, advertised by the same rule as the
        workers' listeners, and checked to reach it (cascade/advertise.py)."""
        s = self.settings
        if s.direct_requests:
            self.request_links = RequestLinks()
        factory = link_server_factory(
            self.token_key, self._on_link_payload, self._on_link_error, self.token_link_stats, self._token_links,
            self.request_links,
        )  # fmt: skip
        server = await asyncio.get_running_loop().create_server(factory, s.host, s.token_port)
        self._token_server = server
        port = int(server.sockets[0].getsockname()[1])
        host = advertised_host(s.host, s.advertise_host)
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        await asyncio.to_thread(check_reachable, addr, "token listener", f"{s.host}:{port}")
        self.token_addr = addr
        local = local_socket_name(self.id) if s.local_tokens else None
        path = local_socket_address(local) if local else None
        if local and path:
            try:
                self._token_local_server = await asyncio.get_running_loop().create_unix_server(factory, path)
                self.token_local = local
            except OSError as e:  # the TCP listener carries every link then
                self.log.warning("token_local_listener_failed", error=repr(e))
        self.log.info("token_listener", addr=addr, local=self.token_local or None)

    async def close(self) -> None:
        """Idempotent; safe after a partial start."""
        self.accepting = False
        server, self._token_server = self._token_server, None
        local, self._token_local_server = self._token_local_server, None
        self.token_addr = self.token_local = ""
        for srv in (server, local):
            if srv is not None:
                srv.close()
        for t in list(self._token_links):
            t.abort()  # workers' next writes fail: they go back to NATS (tokenlinks.py)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as e:  # a closed connection refuses; nothing left to undo then
                self.log.debug("unsubscribe_failed", error=str(e))
        self._subs.clear()
        if self._cancels:
            await asyncio.wait(list(self._cancels), timeout=self.settings.dispatch_timeout_s)
        await self.tasks.cancel_all()
        await self.feed.close()
        for req in self.hub.open_requests():
            self.hub.finish(req, Failure(503, "the gateway is shutting down", "shutting_down", 1))

    # ---- requests (called by the HTTP handlers) ----------------------------
    def tool_parser(self, info: ModelInfo) -> Parser:
        """How `info`'s model writes tool calls: the --tool-call-parser setting, else what its chat
        template teaches (rendered once with a tool, per model)."""
        if self.settings.tool_call_parser != "auto":
            return typing.cast(Parser, self.settings.tool_call_parser)
        parser = self._tool_parsers.get(info.name)
        if parser is None:
            probe = [{"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}]
            try:
                rendered = info.tokenizer.render_chat([{"role": "user", "content": "x"}], tools=probe)
            except (NoChatTemplate, ChatTemplateError):
                rendered = ""
            parser = self._tool_parsers[info.name] = infer_parser(rendered)
        return parser

    async def prepare(self, info: ModelInfo, spec: GenerationSpec) -> tuple[list[int], int]:
        """Tokenise and check the length: (prompt ids, max_tokens). 400 when it cannot fit."""
        tok = info.tokenizer
        if spec.prompt_ids is not None:
            ids = spec.prompt_ids
            bad = next((i for i in ids if i >= info.vocab_size), None)
            if bad is not None:
                raise ApiError(
                    400, f"token id {bad} is outside the vocabulary of {info.name} ({info.vocab_size})", param="prompt"
                )
        elif spec.prompt is not None:
            # The tokenizer's own special-token rules: BOS for Llama/Mistral, none for Qwen/SmolLM.
            if len(spec.prompt) > _THREAD_TOKENISE_CHARS:
                ids = await asyncio.to_thread(tok.encode, spec.prompt)
            else:
                ids = tok.encode(spec.prompt)
        else:
            messages = spec.messages or []
            # The tools go into the template as transformers' apply_chat_template(tools=...) takes
            # them (with tool_choice none too, as vLLM renders them by default).
            tools = spec.tools.functions if spec.tools is not None else None
            try:
                if len(orjson.dumps(messages)) > _THREAD_TOKENISE_CHARS:
                    ids = await asyncio.to_thread(tok.encode_chat, messages, tools=tools)
                else:
                    ids = tok.encode_chat(messages, tools=tools)
            except NoChatTemplate:
                raise ApiError(
                    400,
                    f"the model `{info.name}` has no chat template, so it cannot take chat messages; "
                    "send a prompt to /v1/completions instead",
                    param="messages",
                    code="chat_template_missing",
                ) from None
            except ChatTemplateError as e:
                raise ApiError(400, f"model `{info.name}`: {e}", param="messages", code="chat_template_error") from None
        ctx = info.context_len
        limit = self.registry.max_model_len(info.name)
        if limit and len(ids) >= limit:
            # The instances' own --max-model-len (at most the context, capped by their KV budget):
            # refused here, before any work, as vLLM does, rather than by every worker in turn.
            raise ApiError(
                400,
                f"this model's maximum context length is {limit} tokens (max_model_len); the prompt has "
                f"{len(ids)} tokens, and at least one must be left to generate",
                param="prompt" if spec.kind == "completion" else "messages",
                code="context_length_exceeded",
            )
        if spec.max_tokens is not None:
            max_tokens = spec.max_tokens
        elif "max_new_tokens" in info.defaults:  # the model's generation_config.json
            max_tokens = max(1, min(int(info.defaults["max_new_tokens"]), ctx - len(ids)))
        elif spec.kind == "chat":
            max_tokens = max(ctx - len(ids), 1)  # OpenAI chat: up to the rest of the context
        else:
            max_tokens = 16  # OpenAI's completions default
        if len(ids) + max_tokens > ctx:
            # 400 invalid_request_error, as vLLM and OpenAI answer: the request asks for too much.
            raise ApiError(
                400,
                f"this model's maximum context length is {ctx} tokens; the prompt has {len(ids)} tokens "
                f"and max_tokens is {max_tokens}",
                param="prompt" if spec.kind == "completion" else "messages",
                code="context_length_exceeded",
            )
        return ids, max_tokens

    def admit(
        self, request_id: str, info: ModelInfo, prompt_ids: list[int], spec: GenerationSpec, max_tokens: int
    ) -> RequestState:
        """Queue a request; 429 when its model's queue is full, 503 while shutting down."""
        if not self.accepting:
            raise ApiError(503, "the gateway is shutting down", code="shutting_down", retry_after_s=1)
        params = sampling_params(spec, max_tokens, info.defaults)
        req = RequestState(request_id=request_id, model=info.name, prompt_ids=prompt_ids, params=params)
        self.load.arrival(info.name, len(prompt_ids), time.time())
        self.hub.open(req)
        try:
            # A request alone on a quiet gateway is dispatched here, in its handler's turn.
            self.batchers[info.name].submit(req, at_once=True)
        except QueueFull as e:
            req.advance(Phase.FAILED)
            self.hub.close(req)
            self.load.failed(info.name)
            self.metrics.failures.inc(model=info.name, worker="", cause="queue_full", mid_stream="false")
            raise ApiError(
                429, f"{e}; retry later", code="queue_full", retry_after_s=self.settings.retry_after_s
            ) from None
        return req

    async def next_event(self, req: RequestState) -> TokenEvent | Failure:
        """The request's next event. A worker that goes silent for request_timeout_s gets a 504;
        while queued, the queue timeout rules instead (the batcher answers it)."""
        timeout = self.settings.request_timeout_s
        while True:
            if not req.events.empty():
                return req.events.get_nowait()  # already here (several per message): no wait
            # One future per wait and one timer per request (EventQueue), not a timer per event.
            if await req.events.wait(timeout):
                continue
            if req.waiting and self.batchers[req.model].is_queued(req):
                continue
            failure = Failure(
                504, f"no output from worker {req.worker_id or '?'} for {timeout:g}s; request abandoned", "timeout"
            )
            self._give_up(req, failure)
            return failure

    def release(self, req: RequestState) -> None:
        """The handler is done with `req` (answered, failed, or its client left): forget it,
        and stop its worker if it is still generating."""
        worker = req.worker_id
        req.events.close()
        if not req.ended:
            req.advance(Phase.CANCELLED)
        b = self.batchers.get(req.model)
        if b is not None:
            b.discard(req)
        self.hub.close(req)
        if worker is not None:
            self.log.info("request_cancelled", request_id=req.request_id, worker_id=worker)
            self._cancel_on(worker, [req.request_id])

    def _give_up(self, req: RequestState, failure: Failure) -> None:
        worker = req.worker_id
        self.hub.finish(req, failure)
        if worker is not None:
            self._cancel_on(worker, [req.request_id])

    # ---- routing and dispatch ----------------------------------------------
    # ---- the batchers' Dispatcher --------------------------------------------
    def pick(self, model: str, avoid: frozenset[str]) -> Route | None:
        if not self.nc.is_connected:
            # The broker is away: requests wait in the queue (bounded by its timeout, then a 503
            # with Retry-After) rather than spend their retries on dispatches that cannot go.
            return None
        dep = self.catalog.deployment.get(model)
        live = dep is None or dep.scaling == "live"
        views = self.registry.views(*self.hub.routing_loads())
        return choose_route(views, model, avoid, live)

    def _wake_queued(self, model: str) -> None:
        """Requests of `model` held in its queue may find room now (and partial routes a whole
        instance: `_consolidate`)."""
        b = self.batchers.get(model)
        if b is not None and b.depth:
            b.wake()
        self._consolidate_soon()

    def _watcher(self, kind: type[T], on: Callable[[T], Frame | None]) -> Callable[[Msg], Awaitable[None]]:
        async def cb(msg: Msg) -> None:
            try:
                m = decode(msg.data, kind)
            except MessageError as e:
                self.log.warning("bad_message", subject=msg.subject, error=str(e))
                return
            self.dashboard.publish(on(m))

        return cb

    def _mesh_changed(self) -> None:
        self._wake_all()
        self.dashboard.changed()

    def _wake_all(self) -> None:
        for b in self.batchers.values():
            b.wake()

    def broker_back(self) -> None:
        """The broker connection is back: what waited for it may go, and the streams that lost
        events while it was away are found (see `_check_silent`)."""
        self._wake_all()
        self.tasks.spawn(self._check_silent(), name="broker-back-check")

    async def _check_silent(self) -> None:
        """Events published while the broker was away are gone; when a request's final event was
        among them, nothing more comes and the request would wait out request_timeout_s for a 504.
        For a few grace periods after the broker came back (a worker's buffered events may still
        trickle in first), a bound request its worker has not been heard for during a whole
        grace period is treated as cut off: it resumes elsewhere from what its client has
        (migration), exactly as when its worker dies."""
        grace = max(2.0, 3 * self.settings.heartbeat_s)
        for _ in range(3):
            await asyncio.sleep(grace)  # the grace period itself (a timer, not synchronisation)
            cutoff = time.monotonic() - grace
            for req in list(self.hub.open_requests()):
                worker = req.worker_id
                if worker is None or not req.phase.bound or req.heard_at >= cutoff:
                    continue
                why = f"no events from worker {worker} for {grace:g}s after the broker came back"
                self.log.warning("silent_after_broker_loss", request_id=req.request_id, worker_id=worker)
                if req.produced:
                    self._migrate(req, worker, "events_lost", why)
                else:
                    self._cancel_on(worker, [req.request_id])
                    self._retry(req, worker, why)

    def dispatch(self, route: Route, batch: list[RequestState]) -> None:
        # Bind before any await: the router's next pick must already count these. A pipelined
        # route is bound to its first stage: that worker drives it and sends its tokens.
        worker = route.worker_id
        relays = tuple(s.worker_id for s in route.stages[1:])
        layers = max((s.end for s in route.stages), default=0)
        shares = tuple((s.end - s.start) / layers for s in route.stages[1:]) if layers else ()
        now = time.monotonic()
        for r in batch:
            r.advance(Phase.PREFILL, worker)
            r.heard_at = now
            r.attempts += 1
            if not r.streamed:
                r.dispatched_at = now
            r.dispatches += 1
            r.consolidate_to = None
            r.relays = relays
            r.relay_shares = shares
            r.resumed = len(r.streamed)
            r.choice_resumed = {c: len(ids) for c, ids in r.choice_streamed.items()}
        msg = self._batch_message(route, batch)
        # On the worker's request link when it has one: written now, in this turn (cascade/tokenlink.py),
        # before the bookkeeping below, which the request need not wait for.
        links = self.request_links
        sent = links.send(worker, encode(msg)) if links is not None and links.has(worker) else None
        model = batch[0].model
        self.metrics.batches.inc(model=model)
        self.metrics.batch_size.observe(len(batch), model=model)
        self.metrics.routed.inc(len(batch), model=model, route="pipelined" if route.stages else "full")
        if route.stages:
            # The split depth: decoder layers the first (loading) instance runs before handing on.
            depth = str(route.stages[0].end - route.stages[0].start)
            self.metrics.partial_routes.inc(len(batch), model=model, worker=worker, depth=depth)
        self.tasks.spawn(self._send_batch(route, batch, msg, sent), name=f"dispatch-{worker}")

    def _batch_message(self, route: Route, batch: list[RequestState]) -> GenerateBatch:
        stages = list(route.stages)
        return GenerateBatch(
            token_addr=self.token_addr,
            token_key=self.token_key if self.token_addr else "",
            token_local=self.token_local if self.token_addr else "",
            gateway_id=self.id,
            requests=[
                GenerateRequest(r.request_id, r.model, prompt, params, stages, r.arrived_at, attempt=r.dispatches)
                for r in batch
                for prompt, params in _resumed_inputs(r, pipelined=bool(stages))
            ],
        )

    async def _send_batch(
        self, route: Route, batch: list[RequestState], msg: GenerateBatch, sent: asyncio.Future[bytes] | None
    ) -> None:
        worker = route.worker_id
        stages = list(route.stages)
        self.log.debug(
            "dispatch",
            worker_id=worker,
            size=len(batch),
            model=batch[0].model,
            requests=[r.request_id for r in batch],
            route=[f"{s.worker_id}[{s.start},{s.end})" for s in stages] or None,
            path="request_link" if sent is not None else "nats",
        )
        try:
            if sent is not None:
                reply = await self._link_reply(sent, worker)
            else:
                reply = await natsutil.request(
                    self.nc, self.subjects.generate(worker), msg, BatchReply, self.settings.dispatch_timeout_s
                )
        except (natsutil.RequestTimeout, RemoteError, MessageError, ConnectionError) as e:
            if isinstance(e, natsutil.NoResponders):
                # Its process is gone (its subscription went with it): keep it out of routing
                # rather than spend every retry on it before its heartbeats are missed.
                self.registry.suspend(worker)
            self._batch_lost(worker, batch, str(e))
            return
        except Exception as e:  # nats-py's own errors (connection closed, draining, ...)
            self.log.warning("dispatch_failed", worker_id=worker, error=repr(e))
            self._batch_lost(worker, batch, repr(e))
            return
        accepted = set(reply.accepted)
        rejected = {r.request_id: r for r in reply.rejected}
        for r in batch:
            if r.request_id in accepted:
                if r.ended:
                    # The client left while the batch was on its way; the Cancel sent then may
                    # have reached the worker before the batch did.
                    self._cancel_on(worker, [r.request_id])
                continue
            if r.worker_id != worker:
                continue  # moved on already (client left, worker declared dead)
            rej = rejected.get(r.request_id)
            if rej is None:
                self._retry(r, worker, "the worker neither accepted nor rejected it")
            elif rej.code == "overloaded":
                # Not the request's fault: wait a little, do not spend its retry budget.
                r.attempts -= 1
                r.overloads += 1
                delay = min(_OVERLOAD_BACKOFF_S * 2 ** (r.overloads - 1), _OVERLOAD_BACKOFF_MAX_S)
                self._retry(r, worker, "overloaded", delay_s=delay)
            elif rej.code in _RETRYABLE:
                self.registry.suspend(worker)
                self._retry(r, worker, f"{rej.code}: {rej.message}")
            elif rej.code == "too_long":
                self.hub.finish(r, Failure(400, rej.message, "context_length_exceeded"))
            elif rej.code == "invalid":
                self.hub.finish(r, Failure(400, f"the worker rejected the request: {rej.message}", "invalid_value"))
            else:
                self._retry(r, worker, f"{rej.code}: {rej.message}")

    async def _link_reply(self, sent: asyncio.Future[bytes], worker: str) -> BatchReply:
        """The reply to a batch sent on `worker`'s request link, with NATS's errors: a timeout is
        a RequestTimeout, a link lost first a ConnectionError (RequestLinkLost)."""
        try:
            # A timeout cancels `sent`, which takes it out of the links' table (a late reply is dropped).
            data = await asyncio.wait_for(sent, self.settings.dispatch_timeout_s)
        except TimeoutError:
            raise natsutil.RequestTimeout(
                f"no reply on {worker}'s request link within {self.settings.dispatch_timeout_s:.1f}s"
            ) from None
        return natsutil.parse_reply(data, BatchReply, f"{worker}'s request link")

    def _batch_lost(self, worker: str, batch: list[RequestState], why: str) -> None:
        lost = [r for r in batch if r.worker_id == worker and r.phase is Phase.PREFILL]
        if not lost:
            return
        self.log.warning("batch_lost", worker_id=worker, size=len(lost), error=why)
        # It may have been admitted after all, with the reply lost: stop it there before retrying.
        self._cancel_on(worker, [r.request_id for r in lost])
        for r in lost:
            self._retry(r, worker, why)

    def _retry(self, req: RequestState, worker: str, why: str, delay_s: float = 0.0) -> None:
        if req.phase is not Phase.PREFILL or req.worker_id != worker:
            return  # ended, or moved on already
        if req.attempts >= self.settings.max_attempts:
            self.hub.finish(
                req,
                Failure(
                    503,
                    f"no instance could serve the request after {req.attempts} attempts (last: {why})",
                    "no_instance",
                    self.settings.retry_after_s,
                ),
            )
            return
        reason = why.split(":", 1)[0] if delay_s == 0 else "overloaded"
        self.metrics.retries.inc(model=req.model, reason=reason[:40])
        self.log.info("retry", request_id=req.request_id, worker_id=worker, reason=why, attempt=req.attempts)
        req.avoid.add(worker)
        req.advance(Phase.MIGRATING if req.streamed else Phase.QUEUED)
        self.batchers[req.model].requeue(req, delay_s=delay_s, fresh_deadline=delay_s == 0)

    def expired(self, req: RequestState) -> None:
        self.hub.finish(
            req,
            Failure(
                503,
                f"no instance of {req.model} could take the request within {self.settings.queue_timeout_s:g}s",
                "no_instance",
                self.settings.retry_after_s,
            ),
        )

    def _worker_dead(self, worker: str) -> None:
        self.registry.forget(worker)
        self.metrics.dead_workers.inc()
        for req in self.hub.on_worker(worker):
            if req.produced:
                self._migrate(req, worker, "worker_lost", f"worker {worker} stopped responding during generation")
            else:
                self._retry(req, worker, f"worker {worker} stopped heart-beating")
        # Routes that relay through it lose their stream too; their driver may not have noticed yet.
        for req in [r for r in self.hub.open_requests() if worker in r.relays and r.phase.bound]:
            assert req.worker_id is not None
            if req.produced:
                self._migrate(req, req.worker_id, "worker_lost", f"stage worker {worker} stopped responding")
            else:
                self._retry(req, req.worker_id, f"stage worker {worker} stopped heart-beating")

    def _out_of_step(self, req: RequestState, worker: str, index: int, expected: int) -> None:
        """An event that does not continue the request's stream: a repeat is dropped; one that
        runs ahead means events were lost (the broker restarted between them), and the
        request resumes elsewhere from what the client has, as if its worker were lost."""
        if index < expected:
            return
        why = f"token events {expected}..{index - 1} from worker {worker} were lost"
        self.log.warning("events_lost", request_id=req.request_id, worker_id=worker, expected=expected, got=index)
        if req.produced:
            self._migrate(req, worker, "events_lost", why)
        else:
            self._cancel_on(worker, [req.request_id])
            self._retry(req, worker, why)

    def _migrate(self, req: RequestState, worker: str, reason: str, why: str, to: str | None = None) -> None:
        """`req` lost its worker after tokens reached the client: send it elsewhere with the
        tokens so far, or fail it explicitly when the limit is reached.

        With `to`, it is a consolidation (`_consolidate`): its partial route was cancelled on
        purpose and that cancel is through, and it goes to the whole instance `to`; no failure, so
        migration_limit is not spent on it and its route's workers stay eligible."""
        if not req.phase.bound or req.worker_id != worker:
            return  # ended, or moved on already
        limit = self.settings.migration_limit
        if to is None and req.migrations >= limit:
            self.metrics.migration_failures.inc(model=req.model, reason="limit")
            detail = f"; migrated {req.migrations} time(s), the limit is {limit}" if limit else ""
            self.hub.finish(req, Failure(503, f"{why}{detail}", "worker_died", self.settings.retry_after_s))
            self._cancel_on(worker, [req.request_id])
            return
        if to is None:
            req.migrations += 1
        else:
            req.consolidations += 1
        req.attempts = 0  # a fresh retry budget for finding the next instance
        self.metrics.migrations.inc(model=req.model, reason=reason)
        self.log.info(
            "migrate",
            request_id=req.request_id,
            worker_id=worker,
            reason=why,
            migration=req.migrations,
            streamed=len(req.streamed),
            to=to,
        )
        if to is None:
            self._cancel_on(worker, [req.request_id])  # it may still be alive, only cut off from us
            req.avoid.add(worker)
            req.avoid.update(req.relays)
        if req.params.n > 1:
            self._end_spent_choices(req)
            if req.ended:
                return
            req.advance(Phase.MIGRATING)
            self.batchers[req.model].requeue(req)
            return
        remaining = req.params.max_tokens - len(req.streamed)
        if remaining <= 0:
            # Everything it may produce is out already; only the final event was lost. It ends
            # here, from where it was bound (a migrating request cannot be done).
            self.hub.finish(
                req,
                TokenEvent(
                    req.request_id,
                    [],
                    "",
                    "length",
                    prompt_tokens=len(req.prompt_ids),
                    completion_tokens=len(req.streamed),
                ),
            )
            return
        req.advance(Phase.MIGRATING)
        if to is not None:
            # Straight there: the decision weighed its room, and through the batcher the router
            # could give it another partial route.
            self.dispatch(Route(to), [req])
            return
        self.batchers[req.model].requeue(req)

    # ---- consolidation: partial routes onto one whole instance ---------------------------------
    def _consolidate_soon(self) -> None:
        """Look for partial routes to consolidate once this loop turn is over (many calls, one look)."""
        if self._consolidate_pending or self.settings.consolidate_min_tokens <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a core driven without a loop (synchronous tests): nothing would run the look
        self._consolidate_pending = True
        loop.call_soon(self._consolidate)

    def _consolidate(self) -> None:
        """Requests decoding on partial routes move onto one whole instance where
        `router.consolidations` finds room: their route is cancelled first, and once its worker
        confirms (the "cancelled" final event, `on_tokens`), `_migrate(to=...)` re-dispatches with
        the tokens streamed so far. Waiting for that event keeps the cancel from reaching a new
        dispatch of the same request on the same worker (the route's head, loaded since)."""
        self._consolidate_pending = False
        min_tokens = self.settings.consolidate_min_tokens
        partials: dict[str, list[PartialRoute]] = {}
        pending: dict[str, tuple[int, int]] = {}
        open_requests = {r.request_id: r for r in self.hub.open_requests()}
        for r in open_requests.values():
            if r.consolidate_to is not None:
                n, tokens = pending.get(r.consolidate_to, (0, 0))
                pending[r.consolidate_to] = (n + 1, tokens + len(r.prompt_ids) + len(r.streamed))
                continue
            if r.phase is not Phase.DECODE or not r.relays or r.params.n > 1 or r.consolidations or r.worker_id is None:
                continue
            remaining = r.params.max_tokens - len(r.streamed)
            if remaining < min_tokens:
                continue
            p = PartialRoute(r.request_id, (r.worker_id, *r.relays), len(r.prompt_ids) + len(r.streamed), remaining)
            partials.setdefault(r.model, []).append(p)
        if not partials:
            return
        views = self.registry.views(*self.hub.routing_loads())
        for model, parts in partials.items():
            for rid, target in consolidations(views, model, parts, min_tokens, pending):
                req = open_requests[rid]
                assert req.worker_id is not None  # a partial of DECODE phase: bound
                req.consolidate_to = target
                self.log.info(
                    "consolidate",
                    request_id=rid,
                    worker_id=req.worker_id,
                    relays=list(req.relays),
                    to=target,
                    streamed=len(req.streamed),
                )
                self._cancel_on(req.worker_id, [rid])

    def _end_spent_choices(self, req: RequestState) -> None:
        """Choices of a moving n > 1 request that streamed all their max_tokens and lost only
        their final event end here; the others go on elsewhere, each from its own tokens."""
        for c in range(req.params.n):
            got = len(req.choice_streamed.get(c, []))
            if c in req.choices_done or got < req.params.max_tokens:
                continue
            ev = TokenEvent(
                req.request_id, [], "", "length", prompt_tokens=len(req.prompt_ids), completion_tokens=got, choice=c
            )
            req.choices_done.add(c)
            if len(req.choices_done) == req.params.n:
                self.hub.finish(req, ev)
                return
            req.events.put_nowait(ev)

    def _cancel_on(self, worker: str, request_ids: list[str]) -> None:
        task = self.tasks.spawn(self._publish_cancel(worker, request_ids), name=f"cancel-{worker}")
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _publish_cancel(self, worker: str, request_ids: list[str]) -> None:
        try:
            await self.nc.publish(self.subjects.cancel(worker), encode(Cancel(request_ids)))
        except Exception as e:  # best effort: the worker ends them anyway at max_tokens
            self.log.warning("cancel_failed", worker_id=worker, error=repr(e))

    # ---- token stream ------------------------------------------------------
    def _decode_events(self, data: bytes, link_of: str | None = None, **source: str) -> TokenEvents | None:
        """The step's events from either path's bytes (the tokens subject; a direct link of worker
        `link_of`, whose frames may also be rows), or None with a warning naming where the bad
        payload came from."""
        try:
            return decode(data, TokenEvents) if link_of is None else decode_events(data, link_of)
        except MessageError as e:
            self.log.warning("bad_message", error=str(e), **source)
            return None

    def _on_tokens_msg(self, msg: Msg) -> None:
        events = self._decode_events(msg.data, subject=msg.subject)
        if events is not None:
            self.on_tokens(events)

    def _on_link_payload(self, worker_id: str, payload: bytes) -> None:
        """A frame of a direct token link: the same bytes and the same handling as a message on
        the tokens subject (or the same events as rows), from the worker that said hello on it only."""
        events = self._decode_events(payload, worker_id, source="token_link", worker_id=worker_id)
        if events is None:
            return
        if events.worker_id != worker_id:
            self.log.warning("token_link_wrong_worker", worker_id=worker_id, events_from=events.worker_id)
            return
        try:
            self.on_tokens(events)
        except Exception:  # as the NATS path's handler (cascade/inline.py): logged, the link kept
            self.log.exception("token_events_failed", worker_id=worker_id)

    def _on_link_error(self, worker_id: str, why: str) -> None:
        self.log.warning("token_link_dropped", worker_id=worker_id or None, error=why)

    def on_tokens(self, msg: TokenEvents) -> None:
        now = time.monotonic()
        for req, ev in self.hub.match(msg):
            req.heard_at = now
            if req.params.n > 1:
                self._on_choice_event(req, msg.worker_id, ev)
                continue
            expected = len(req.streamed) - req.resumed
            if ev.index >= 0 and ev.index != expected:
                self._out_of_step(req, msg.worker_id, ev.index, expected)
                continue
            broken = ev.finish_reason in ("cancelled", "error")
            if ev.token_ids and not broken:
                if not req.served_by and not req.streamed:
                    # Its prompt is through prefill there (a migrated request's was counted once).
                    self.metrics.prompt_tokens.inc(len(req.prompt_ids), model=req.model, worker=msg.worker_id)
                req.served_by = msg.worker_id
                self.metrics.generation_tokens.inc(len(ev.token_ids), model=req.model, worker=msg.worker_id)
                self.dashboard.stats.generated(req.model, len(ev.token_ids))
            if ev.token_ids:
                self.load.generated(req.model, len(ev.token_ids))
                if not broken:
                    req.streamed.extend(ev.token_ids)
            if (ev.token_ids or ev.text) and req.phase is Phase.PREFILL and not broken:
                req.advance(Phase.DECODE)
                # Its prompt is done there: requests held for that instance's prefill backlog may go.
                self._wake_queued(req.model)
            if ev.finish_reason is None:
                req.events.put_nowait(ev)
            elif broken and not req.produced:
                # Nothing reached the client yet, so another instance can start it afresh (a
                # pipelined route fails this way when its tail instance goes away).
                why = ev.error or ("the worker cancelled it" if ev.finish_reason == "cancelled" else "no detail")
                self._retry(req, msg.worker_id, f"{ev.finish_reason} before any token: {why}")
            elif broken:
                # Its stream broke after tokens reached the client (a stage of its route died, the
                # worker stopped): the tokens in this last event are dropped and recomputed.
                why = ev.error or "the worker cancelled it"
                reason = "worker_cancelled" if ev.finish_reason == "cancelled" else "worker_error"
                target, req.consolidate_to = req.consolidate_to, None
                if req.phase is Phase.PREFILL:
                    self._retry(req, msg.worker_id, f"{ev.finish_reason} before any token: {why}")
                elif target is not None and ev.finish_reason == "cancelled":
                    # The cancel `_consolidate` sent is through: on to the whole instance.
                    why = f"off partial route {'/'.join((msg.worker_id, *req.relays))} onto {target}"
                    self._migrate(req, msg.worker_id, "consolidate", why, to=target)
                else:
                    self._migrate(req, msg.worker_id, reason, f"worker {msg.worker_id}: {why}")
            else:
                if req.resumed:
                    # The worker counts from where it resumed; the client's usage counts it all.
                    ev = dataclasses.replace(
                        ev,
                        prompt_tokens=len(req.prompt_ids),
                        completion_tokens=ev.completion_tokens + req.resumed,
                    )
                self.hub.finish(req, ev)
                # A slot freed up on that worker: requests held in the queue for room may go now.
                self._wake_queued(req.model)

    def _on_choice_event(self, req: RequestState, worker: str, ev: TokenEvent) -> None:
        """An event of one of a request's n > 1 choices. Each choice's events are in step on
        their own; the request ends with its last choice. Migrated after its first token, each
        unfinished choice resumes from its own tokens (the worker counts from there)."""
        streamed = req.choice_streamed.setdefault(ev.choice, [])
        resumed = req.choice_resumed.get(ev.choice, 0)
        expected = len(streamed) - resumed
        if ev.index >= 0 and ev.index != expected:
            if ev.index < expected:
                return
            why = f"token events of choice {ev.choice} from worker {worker} were lost"
            self.log.warning("events_lost", request_id=req.request_id, worker_id=worker, choice=ev.choice)
            if req.produced:
                self._migrate(req, worker, "events_lost", why)
            else:
                self._cancel_on(worker, [req.request_id])
                self._retry(req, worker, why)
            return
        broken = ev.finish_reason in ("cancelled", "error")
        if broken:
            why = ev.error or "the worker cancelled it"
            if req.produced:
                self._migrate(req, worker, "worker_error", f"worker {worker}: {why}")
            else:
                self._retry(req, worker, f"{ev.finish_reason} before any token: {why}")
            return
        if ev.token_ids:
            self.load.generated(req.model, len(ev.token_ids))
            streamed.extend(ev.token_ids)
            req.streamed.extend(ev.token_ids)
        if ev.finish_reason is not None and resumed:
            # The worker counts from where this choice resumed; the client's usage counts it all.
            ev = dataclasses.replace(
                ev, prompt_tokens=len(req.prompt_ids), completion_tokens=ev.completion_tokens + resumed
            )
        if req.phase is Phase.PREFILL:
            # Whatever reaches the client now (a token, or a choice that ended at once) makes it produced.
            req.advance(Phase.DECODE)
            self._wake_queued(req.model)
        if ev.finish_reason is None:
            req.events.put_nowait(ev)
            return
        req.choices_done.add(ev.choice)
        if len(req.choices_done) < req.params.n:
            req.events.put_nowait(ev)
            return
        self.hub.finish(req, ev)
        self._wake_queued(req.model)

    async def _on_deployment_msg(self, msg: Msg) -> None:
        try:
            dep, _ = self.deployments.changed(msg.data)
        except (MessageError, ConfigError) as e:
            self.log.warning("bad_deployment_message", error=str(e))
            return
        await self.apply_deployment(dep)

    async def apply_deployment(self, dep: Deployment) -> None:
        """A model deployed at run time gets a batcher and its files read (off the loop); requests
        for it are served from the moment an instance is up."""
        to_read = self.catalog.update(dep)
        for name in dep.names():
            if name not in self.batchers:
                self.batchers[name] = b = self._new_batcher(name)
                if self._started:
                    self.tasks.spawn(b.run(), name=f"batcher-{name}")
        self.log.info("deployment_changed", models=dep.names(), reading=to_read)
        for name, err in (await self.catalog.refresh(to_read)).items():
            self.log.warning("model_unavailable", model=name, error=err)
        for name in to_read:
            self._wake_queued(name)

    async def _catalog_loop(self) -> None:
        while True:
            await asyncio.sleep(_CATALOG_RETRY_S)  # a periodic retry, not synchronisation
            missing = list(self.catalog.unavailable())
            if not missing:
                continue
            errors = await self.catalog.refresh(missing)
            for name in missing:
                if name not in errors:
                    self.log.info("model_available", model=name)
                    self._wake_queued(name)

    # ---- load reports ------------------------------------------------------
    def load_gauges(self) -> dict[str, tuple[int, int]]:
        """(running on a worker, waiting in the queue) per model."""
        running = Tally(r.model for r in self.hub.open_requests() if r.phase.bound)
        return {name: (running.get(name, 0), b.depth) for name, b in self.batchers.items()}

    def holding(self, model: str) -> None:
        """Requests began to wait for room: the scaler hears of it now rather than on the next
        report, which at a burst's onset is most of the time a scale-up takes."""
        self._report_now.set()

    async def _report_loop(self) -> None:
        subject = self.subjects.metrics("gateway", self.id)
        interval = self.settings.metrics_interval_s
        last = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_now.wait(), max(0.0, last + interval - time.monotonic()))
            # An early report closes a shorter interval; a quarter interval at least, so that a
            # queue that fills and drains over and over costs the broker four reports per interval.
            early_ok = last + interval / 4 - time.monotonic()
            if early_ok > 0:
                await asyncio.sleep(early_ok)
            self._report_now.clear()
            now = time.monotonic()
            for m in self.load.take(time.time(), now - last, self.load_gauges()):
                await self.nc.publish(subject, encode(m))
            last = now

    # ---- views -------------------------------------------------------------
    def queue_depths(self) -> dict[str, int]:
        return {name: b.depth for name, b in self.batchers.items()}

    def in_flight_by_model(self) -> dict[str, int]:
        counts = Tally(r.model for r in self.hub.open_requests())
        return {name: counts.get(name, 0) for name in self.batchers}

    def instances_by_model(self) -> dict[str, int]:
        views = self.registry.views()
        return {name: sum(serves_fully(v, name) for v in views) + len(pipelines(views, name)) for name in self.batchers}

    def health(self) -> tuple[bool, dict[str, Any]]:
        missing = models_without_instance(self.registry.views(), self.catalog.required())
        if not self._started:
            return False, {"status": "unavailable", "reason": "the gateway is starting"}
        if not self.accepting:
            return False, {"status": "unavailable", "reason": "the gateway is shutting down"}
        if not self.nc.is_connected:
            return False, {"status": "unavailable", "reason": "the broker is unreachable; reconnecting"}
        # Why the scaler's last try for a model failed, per worker, until one succeeds: the back-off
        # is visible where probes and operators look.
        failures = {"scale_failures": dict(self.watch.last_failure)} if self.watch.last_failure else {}
        if missing:
            return False, {
                "status": "unavailable",
                "reason": "no instance serves " + ", ".join(missing) + " fully",
                "models_without_instance": missing,
                **failures,
            }
        return True, {"status": "ok", "instances": self.instances_by_model(), **failures}

    def status(self) -> dict[str, Any]:
        inflight = self.hub.inflight_by_worker()
        return {
            "url": self.url,
            "accepting": self.accepting,
            "queue_depth": self.queue_depths(),
            "in_flight": self.in_flight_by_model(),
            "instances": [
                {**w, "gateway_in_flight": inflight.get(w["worker_id"], 0)} for w in self.registry.describe()
            ],
            # The direct token listener ("" when off) and what its links carried (frames, refused, bad).
            "token_addr": self.token_addr,
            "token_local": self.token_local,
            "token_links": {**self.token_link_stats, "open": len(self._token_links)},
            "request_links": (
                {"workers": rl.workers(), "sent": rl.sent, "answered": rl.answered}
                if (rl := self.request_links) is not None
                else None
            ),
        }

    async def _on_status(self, req: StatusRequest) -> ServiceStatus:
        return ServiceStatus(service="gateway", instance=self.id, pid=os.getpid(), detail=self.status())


def _resumed_inputs(req: RequestState, pipelined: bool = False) -> list[tuple[list[int], SamplingParams]]:
    """The prompts and params a (re)dispatch sends: one, or for an n > 1 request that migrated,
    or that goes through a pipelined route, one per unfinished choice (n = 1, its `choice`, its
    own tokens ending its prompt). Those choices do not share a prefill: the fork into choices
    needs the whole prompt's KV on one instance, which a migrated request has lost and a route
    splits across stages."""
    if req.params.n == 1 or not (req.streamed or pipelined):
        return [_resumed_input(req)]
    out = []
    for c in range(req.params.n):
        if c in req.choices_done:
            continue
        ids = req.choice_streamed.get(c, [])
        params = dataclasses.replace(
            req.params, n=1, choice=c, max_tokens=req.params.max_tokens - len(ids), resumed=len(ids),
            prompt_logprobs=None,
        )  # fmt: skip
        out.append((req.prompt_ids + ids, params))
    return out


def _resumed_input(req: RequestState) -> tuple[list[int], SamplingParams]:
    """The prompt and params a (re)dispatch sends: after a migration, the tokens streamed so far
    end the prompt and max_tokens counts what is left."""
    if not req.streamed:
        return req.prompt_ids, req.params
    n = len(req.streamed)
    # The client has the prompt's logprobs already (they came with the first event).
    params = dataclasses.replace(req.params, max_tokens=req.params.max_tokens - n, resumed=n, prompt_logprobs=None)
    return req.prompt_ids + req.streamed, params


def sampling_params(spec: GenerationSpec, max_tokens: int, defaults: Mapping[str, Any]) -> SamplingParams:
    """What the request leaves out comes from the model's generation_config.json (`defaults`, as
    vLLM's "generation config: auto" takes it), then from OpenAI's defaults."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=spec.temperature if spec.temperature is not None else float(defaults.get("temperature", 1.0)),
        top_p=spec.top_p if spec.top_p is not None else float(defaults.get("top_p", 1.0)),
        seed=spec.seed,
        stop=spec.stop,
        ignore_eos=spec.ignore_eos,
        n=spec.n,
        keep_special=list(spec.keep_special),
        grammar=spec.grammar or "",
        logprobs=spec.logprobs,
        prompt_logprobs=spec.worker_prompt_logprobs,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        repetition_penalty=_given(spec.repetition_penalty, defaults, "repetition_penalty", 1.0),
        top_k=int(_given(spec.top_k, defaults, "top_k", 0)),
        min_p=_given(spec.min_p, defaults, "min_p", 0.0),
    )


def _given(value: float | None, defaults: Mapping[str, Any], name: str, neutral: float) -> float:
    """The request's value, else the model's generation_config.json default, else neutral."""
    if value is not None:
        return value
    return float(defaults.get(name, neutral))
