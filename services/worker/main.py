"""Worker service: holds (part of) a model (loading.py), runs requests with continuous batching
on its engine thread (engine.py, runner.py), publishes heartbeats, load metrics and per-unit
readiness. This module wires it to NATS and the stage link.

SIGTERM (the service host's one shutdown path): stop admitting, let running requests finish for
a grace period, end the rest with an error event, stop the engine thread, drain NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import structlog
import torch
from nats.aio.client import Client as NATS

from cascade.advertise import check_reachable
from cascade.config import ConfigError
from cascade.device_profile import StepPadder, load_profile
from cascade.logs import setup_logging
from cascade.messages import (
    BatchLimit,
    BatchReply,
    Cancel,
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    InstanceMetrics,
    LoadModel,
    QuotaSet,
    Rejection,
    RemoteError,
    RouteStage,
    ServiceStatus,
    SetBatchLimit,
    SetQuota,
    SnapshotRequest,
    StatusRequest,
    StepStat,
    TokenEvent,
    TokenEvents,
    TransferOrder,
    WorkerSnapshot,
    encode,
)
from cascade.models.config import unit_shapes
from cascade.models.tokenizer import Tokenizer
from cascade.natsutil import connect
from cascade.service import Runtime, run_process
from cascade.stages import stage_units
from cascade.stagewire import StageFrame
from services.worker.dataplane import DataPlaneServer
from services.worker.engine import Engine, StepResult
from services.worker.gpu import gpu_inventory
from services.worker.kvblocks import default_budget_bytes
from services.worker.loading import ModelSlot
from services.worker.model import LlamaModel, pick_device
from services.worker.requestlinks import RequestLinks
from services.worker.runner import EngineRunner, EngineThread
from services.worker.settings import WorkerSettings
from services.worker.settings import add_arguments as add_arguments
from services.worker.sharing import MemoryLedger, MemoryRefused, QuotaError
from services.worker.stagelink import StageLink
from services.worker.tokenlinks import TokenLinks


def measured_kv_budget(model: LlamaModel, units: Collection[int] | None = None) -> int:
    """The default KV budget, measured now (a load is starting): the device's free memory, less
    the weights still to arrive (of `units`, a stage's, when given), with
    kvblocks.default_budget_bytes' margin."""
    cfg = model.cfg
    elem = torch.empty((), dtype=model.dtype).element_size()
    weights = sum(
        math.prod(shape) * elem
        for u in (range(cfg.num_units) if units is None else units)
        if not model.has_unit(u)
        for shape in unit_shapes(cfg, u).values()
    )
    dev = model.device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
    else:
        free = host_available_bytes()
    return default_budget_bytes(int(free), weights, dev.type)


def host_available_bytes() -> int:
    """The kernel's estimate of memory available without swapping (MemAvailable), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


async def direct_connection(settings: WorkerSettings, log: Any) -> NATS:
    """The engine thread's own connection, for token events (services/worker/runner.py)."""
    return await connect(settings.nats_url, f"cascade-worker-{settings.worker_id}-tokens", logger=log)


def run(args: argparse.Namespace) -> int:
    try:
        settings = WorkerSettings.from_args(args)
    except (ConfigError, ValueError) as e:
        print(f"cascade worker: {e}")
        return 2
    log = setup_logging("worker", args.log_level).bind(worker=settings.worker_id)
    if settings.slots > 1:
        return run_process(lambda: SharedWorker(settings, log), settings.nats_url, settings.prefix, log)
    return run_process(lambda: WorkerService(settings, log), settings.nats_url, settings.prefix, log)


@dataclass
class SharedDevice:
    """What the instances on one shared worker have in common: the engine thread that steps them
    by quota and the memory ledger they hold their weights and KV in."""

    device_id: str
    thread: EngineThread
    ledger: MemoryLedger
    slots: int = 1


class SharedWorker:
    """A worker shared by `--slots` instances (Dilu): each a `WorkerService` of its own to the mesh
    (its own id, heartbeats, stage link and data plane, so routing, loading and scaling treat it as
    any worker), all on one engine thread (steps by quota) and one memory ledger."""

    service = "worker"

    def __init__(self, settings: WorkerSettings, log: Any = None) -> None:
        self.settings = settings
        self.log = log or structlog.get_logger().bind(service="worker", worker=settings.worker_id)
        self.device = SharedDevice(
            settings.worker_id,
            EngineThread(
                self.log, settings.threads, partial(direct_connection, settings, self.log), settings.engine_cpus
            ),
            MemoryLedger(int(settings.memory_mb * 1e6)),
            settings.slots,
        )
        self.slots: list[WorkerService] = []
        for k in range(settings.slots):
            wid = settings.worker_id if k == 0 else f"{settings.worker_id}-{k + 1}"
            own = replace(
                settings,
                worker_id=wid,
                # Fixed ports (containers) are given one per slot, in order; 0 stays "any free port".
                stage_port=settings.stage_port + k if settings.stage_port else 0,
                data_port=settings.data_port + k if settings.data_port else 0,
            )
            self.slots.append(WorkerService(own, self.log.bind(worker=wid), shared=self.device))

    @property
    def instance(self) -> str:
        return self.settings.worker_id

    async def start(self, rt: Runtime) -> None:
        for slot in self.slots:
            await slot.start(rt)
        self.log.info("shared_worker_ready", instances=[w.settings.worker_id for w in self.slots])


class WorkerService:
    service = "worker"

    def __init__(self, settings: WorkerSettings, log: Any = None, shared: SharedDevice | None = None) -> None:
        self.settings = settings
        self.log = log or structlog.get_logger().bind(service="worker", worker=settings.worker_id)
        self.shared = shared
        self.device = pick_device(settings.device)
        # Asked once: NVML is slow to initialise, and the inventory does not change under us.
        self.gpus = gpu_inventory()
        self.metrics_seq = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.padder: StepPadder | None = None
        self.link = StageLink(
            self._on_stage_frame,
            self._on_peer_failed,
            host=settings.stage_host,
            port=settings.stage_port,
            advertise_host=settings.advertise_host,
            logger=self.log,
        )
        self.dataplane = DataPlaneServer(
            settings.data_listen_host, settings.data_port, advertise_host=settings.advertise_host, host_id=settings.host
        )
        self._rt: Runtime | None = None
        self._slot: ModelSlot | None = None
        self._runner: EngineRunner | None = None
        # Batches straight from the gateways that ask for it (requestlinks.py), beside the NATS subject.
        self.request_links = RequestLinks(settings.worker_id, self.on_generate, self.log)

    @property
    def instance(self) -> str:
        return self.settings.worker_id

    @property
    def started(self) -> bool:
        return self._slot is not None

    @property
    def rt(self) -> Runtime:
        assert self._rt is not None, "the worker is not started"
        return self._rt

    @property
    def slot(self) -> ModelSlot:
        assert self._slot is not None, "the worker is not started"
        return self._slot

    @property
    def runner(self) -> EngineRunner:
        assert self._runner is not None, "the worker is not started"
        return self._runner

    # ------------------------------------------------------------------ lifecycle
    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        s, w = rt.subjects, self.settings.worker_id
        self._runner = EngineRunner(
            lambda: self._slot.engine if self._slot else None, self._deliver, self._maybe_idle, self.log,
            threads=self.settings.threads, shared=self.shared.thread if self.shared else None, name=w,
            direct_messages=self._token_messages, connect=partial(direct_connection, self.settings, self.log),
            cpus=self.settings.engine_cpus,
            token_links=TokenLinks(w, self._encode_events, self.log),
        )  # fmt: skip
        self._slot = ModelSlot(
            self.settings, rt.nc, s, rt.tasks, self._runner, self.dataplane, self.device, self.idle,
            self.send_heartbeat, self._new_engine, self.log, self.shared.ledger if self.shared else None,
        )  # fmt: skip
        await self.link.start()
        rt.stack.push_async_callback(self.link.close)
        data_addr = await asyncio.to_thread(self.dataplane.start)
        # Fails any reception still armed and joins the data-plane threads.
        rt.stack.push_async_callback(asyncio.to_thread, self.dataplane.close)
        # Peers use the advertised addresses: one that does not reach us fails here, not at the first transfer.
        st = self.settings
        for what, addr, listen in (
            ("stage link", self.link.addr, f"{st.stage_host}:{self.link.addr.rpartition(':')[2]}"),
            ("data plane", data_addr, f"{st.data_listen_host}:{data_addr.rpartition(':')[2]}"),
        ):
            await asyncio.to_thread(check_reachable, addr, what, listen, st.address_check_s)
        self.runner.start()
        rt.tasks.spawn(self.runner.publish(), "engine-results")
        await rt.serve(s.load(w), self.slot.on_load)
        await rt.serve(s.transfer(w), self.slot.on_transfer)
        await rt.serve(s.unload(w), self.slot.on_unload)
        # In the read loop's turn: the engine thread is woken a loop turn sooner (cascade/inline.py).
        await rt.serve_now(s.generate(w), self.on_generate)
        await rt.serve(s.cancel(w), self.on_cancel)
        await rt.serve(s.batch_limit(w), self.on_batch_limit)
        await rt.serve(s.quota(w), self.on_quota)
        await rt.serve(s.snapshot(w), self.on_snapshot)
        await rt.serve(s.status(), self.on_status)
        rt.tasks.spawn(self.heartbeat_loop(), "heartbeat")
        rt.tasks.spawn(self.metrics_loop(), "metrics")
        rt.stack.push_async_callback(self.request_links.close)
        # On the way out, first of all: drain the requests (before the tasks and NATS go).
        rt.stack.push_async_callback(self.shutdown)
        await self.send_heartbeat()
        self.log.info(
            "worker_ready",
            device=str(self.device),
            threads=self.settings.threads,
            cpus=sorted(self.settings.engine_cpus) or "any",
            data_addr=data_addr,
        )

    async def shutdown(self) -> None:
        """Stop admitting; let running requests finish for a grace period; end the rest with an error."""
        slot = self.slot
        slot.state = "draining"
        await self.send_heartbeat()
        if not self.idle.is_set():
            self.log.info("draining")
            try:
                await asyncio.wait_for(self.idle.wait(), self.settings.drain_timeout_s)
            except TimeoutError:
                pass
        await slot.stop()
        await self.runner.stop()
        if slot.engine is not None and slot.engine.in_flight():
            # The engine thread has stopped: ending the sequences here races with nothing.
            events = slot.engine.drain_all("worker shutting down")
            await self.publish_events(events, 0)
        self.log.info("worker_stopped")

    # ------------------------------------------------------------------ heartbeats
    def heartbeat(self) -> Heartbeat:
        slot, eng = self.slot, self.slot.engine
        running, waiting = eng.load() if eng else (0, 0)
        f = eng.figures if eng else None
        return Heartbeat(
            worker_id=self.settings.worker_id,
            state=slot.state,
            model=slot.model_name,
            units_ready=len(slot.ready),
            num_units=slot.num_units,
            running=running,
            waiting=waiting,
            max_batch=f.max_batch if f else self.settings.max_batch,
            # Read now, not the figure of the last step: an engine gone quiet reports 0.
            tokens_per_s=round(eng.stats.rate(time.monotonic()), 2) if eng else 0.0,
            ready_seq=slot.seq,
            pid=os.getpid(),
            host=self.settings.host,
            loading_mb_s=round(slot.load_mb_s, 1),
            ts=time.time(),
            stage_addr=self.link.addr or None,
            stage_running=f.relayed if f else 0,
            driven_layers=f.driven_layers if f else 0,
            driven=f.driven if f else 0,
            prefill_budget=eng.prefill_budget() if eng else 0,
            prefill_queued=f.prefill_queued if f else 0,
            data_addr=self._data_addr(),
            kv_cache_usage=round(f.kv_cache_usage, 4) if f else 0.0,
            max_model_len=f.max_model_len if f else 0,
            num_preemptions=f.num_preemptions if f else 0,
            model_source=self.settings.model_source,
            group=slot.group,
            stage_start=slot.stage[0],
            stage_end=slot.stage[1],
            shared_device=self.shared.device_id if self.shared else "",
            quota=self.runner.quota() if self.shared else 0.0,
        )

    def _data_addr(self) -> str | None:
        try:
            return self.dataplane.address
        except RuntimeError:  # not started yet
            return None

    async def send_heartbeat(self) -> None:
        await self.rt.nc.publish(self.rt.subjects.heartbeat(self.settings.worker_id), encode(self.heartbeat()))

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)  # a periodic timer, not synchronisation
            await self.send_heartbeat()

    def instance_metrics(self, interval_s: float) -> InstanceMetrics | None:
        """This interval's load and engine steps (None while no model is held); resets the interval."""
        eng, model = self.slot.engine, self.slot.model_name
        if eng is None or model is None:
            return None
        steps, prompt, generated = eng.stats.take_interval()
        running, waiting = eng.load()
        self.metrics_seq += 1
        return InstanceMetrics(
            worker_id=self.settings.worker_id,
            model=model,
            seq=self.metrics_seq,
            ts=time.time(),
            interval_s=round(interval_s, 4),
            state=self.slot.state,
            running=running,
            waiting=waiting,
            max_batch=eng.figures.max_batch,
            tokens_per_s=round(generated / interval_s, 3) if interval_s > 0 else 0.0,
            prompt_tokens=prompt,
            generated_tokens=generated,
            steps=[StepStat(b, int(n), round(ms, 3), int(p)) for b, (n, ms, p) in sorted(steps.items())],
            kv_slots=eng.kv_slots,
            kv_cache_usage=round(eng.figures.kv_cache_usage, 4),
            num_free_blocks=eng.figures.kv_blocks_free,
            num_preemptions=eng.figures.num_preemptions,
            prefix_cache_queries=eng.figures.prefix_cache_queries,
            prefix_cache_hits=eng.figures.prefix_cache_hits,
        )

    async def metrics_loop(self) -> None:
        """InstanceMetrics every metrics interval while a model is held: the scaler's per-instance
        load, tokens/s and step latency by batch size."""
        subject = self.rt.subjects.metrics("worker", self.settings.worker_id)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.metrics_s)  # a periodic timer, not synchronisation
            now = time.monotonic()
            m = self.instance_metrics(now - last)
            last = now
            if m is not None:
                await self.rt.nc.publish(subject, encode(m))

    async def on_batch_limit(self, req: SetBatchLimit) -> BatchLimit:
        """The scaler's vertical action: a new batch limit for the engine, within its KV slots."""
        if not isinstance(req, SetBatchLimit):
            raise RemoteError("bad_request", f"expected set_batch_limit, got {type(req).__name__}")
        eng = self.slot.engine
        if eng is None or self.slot.model_name is None:
            raise RemoteError("no_model", f"worker {self.settings.worker_id} holds no model")
        if req.max_batch < 0:
            raise RemoteError("bad_request", f"batch limit {req.max_batch} is negative")
        before = eng.figures.max_batch
        # On the engine thread, between two steps; a raised limit may admit waiting sequences at once.
        now = await self.runner.call(eng.set_max_batch, req.max_batch or self.settings.max_batch)
        self.log.info(
            "batch_limit_set", model=self.slot.model_name, requested=req.max_batch, before=before, limit=now,
            kv_slots=eng.kv_slots, decision=req.decision_id, reason=req.reason,
        )  # fmt: skip
        return BatchLimit(self.settings.worker_id, self.slot.model_name, now, req.max_batch, eng.kv_slots)

    # ------------------------------------------------------------------ requests
    async def on_quota(self, req: SetQuota) -> QuotaSet:
        """This instance's compute quota on a shared worker, applied on the engine thread between
        two steps; answered and published (`quota_set`) with the value applied."""
        try:
            applied, quotas = await self.runner.set_quota(req.quota)
        except QuotaError as e:
            raise RemoteError("bad_quota", str(e)) from None
        msg = QuotaSet(
            worker_id=self.settings.worker_id,
            device=self.shared.device_id if self.shared else self.settings.worker_id,
            quota=applied,
            share=round(applied / sum(quotas.values()), 4),
            quotas=quotas,
            decision_id=req.decision_id,
            reason=req.reason,
            ts=time.time(),
        )
        await self.rt.nc.publish(self.rt.subjects.quota_set(self.settings.worker_id), encode(msg))
        self.log.info("quota_set", quota=applied, share=msg.share, quotas=quotas, decision=req.decision_id)
        await self.send_heartbeat()
        return msg

    def on_generate(self, batch: GenerateBatch) -> BatchReply:
        """Run on the loop as a batch is read: in nats-py's read loop (`Runtime.serve_now`) or in a
        request link's `data_received` (requestlinks.py). It must not await or block."""
        if self.runner.token_links is not None:
            self.runner.token_links.learn(batch.gateway_id, batch.token_addr, batch.token_key, batch.token_local)
        self.request_links.learn(batch.gateway_id, batch.token_addr, batch.token_key, batch.token_local)
        accepted: list[str] = []
        rejected: list[Rejection] = []
        eng = self.slot.engine
        # An n > 1 request that migrated, or that takes a pipelined route, comes as one entry per
        # (unfinished) choice, all under its id: they are taken or turned away together.
        groups: dict[str, list[GenerateRequest]] = {}
        for r in batch.requests:
            groups.setdefault(r.request_id, []).append(r)
        for rid, group in groups.items():
            why = next((w for r in group if (w := self._refusal(r, eng)) is not None), None)
            if why is not None:
                rejected.append(Rejection(rid, why[0], why[1]))
                continue
            assert eng is not None
            for r in group:
                eng.submit(
                    r.request_id,
                    batch.gateway_id,
                    r.prompt_ids,
                    r.params,
                    route=r.route,
                    arrived_at=r.arrived_at,
                    attempt=r.attempt,
                )
            accepted.append(rid)
        if accepted:
            self.idle.clear()
            self.runner.wake()
        return BatchReply(accepted=accepted, rejected=rejected)

    def _refusal(self, r: GenerateRequest, eng: Engine | None) -> tuple[str, str] | None:
        why = self._reject_reason(r.model, len(r.prompt_ids), r.route, eng)
        if why is None and len(r.route) > 1 and r.params.n > 1:
            # n choices fork off one prefill's KV, which a route splits across stages: the gateway
            # sends a route one entry per choice instead.
            return "invalid", "n > 1 on a pipelined route comes as one entry per choice"
        return why

    def _reject_reason(
        self, model: str, prompt_len: int, route: list[RouteStage], eng: Engine | None
    ) -> tuple[str, str] | None:
        if self.slot.state == "draining":
            return "draining", f"worker {self.settings.worker_id} is draining"
        if eng is None or self.slot.model is None or self.slot.state not in ("serving", "loading"):
            return "not_ready", f"worker {self.settings.worker_id} is {self.slot.state}"
        if model != self.slot.model_name:
            return "wrong_model", f"worker {self.settings.worker_id} serves {self.slot.model_name}, not {model}"
        if len(route) > 1:
            first = route[0]
            if first.worker_id != self.settings.worker_id or first.start != 0:
                return "invalid", f"route must start at layer 0 on {self.settings.worker_id}"
            if not self.slot.holds_front(first.end):
                return "not_ready", f"worker {self.settings.worker_id} does not hold layers [0, {first.end}) yet"
        elif self.slot.state != "serving":
            return "not_ready", f"worker {self.settings.worker_id} is {self.slot.state}"
        elif not self.slot.whole():
            a, b = self.slot.stage
            return "invalid", (
                f"worker {self.settings.worker_id} is stage [{a}, {b}) of pipelined instance {self.slot.group}: "
                "it serves routes only (prompt_logprobs and n > 1 need a whole instance of the model)"
            )
        if prompt_len < 1:
            return "invalid", "empty prompt"
        # One token at least must fit after the prompt.
        ctx = eng.max_model_len
        if prompt_len >= ctx:
            return "too_long", f"prompt of {prompt_len} tokens does not fit max_model_len {ctx}"
        if eng.load()[1] >= self.settings.max_waiting:
            return "overloaded", f"worker {self.settings.worker_id} has {self.settings.max_waiting} requests waiting"
        return None

    async def on_cancel(self, msg: Cancel) -> None:
        if self.slot.engine is None:
            return
        for rid in msg.request_ids:
            self.slot.engine.cancel(rid)
        self.runner.wake()

    async def _deliver(self, result: StepResult) -> None:
        for o in result.outbox:
            await self.link.send(o.to, o.frame, o.tensor)
        if result.events:
            await self.publish_events(result.events, result.batch_size)

    def _maybe_idle(self, in_flight: int) -> None:
        """The engine thread ran out of work holding `in_flight` sequences (counted there)."""
        if in_flight == 0:
            self.idle.set()

    def _new_engine(self, model: LlamaModel, tok: Tokenizer, order: LoadModel | TransferOrder) -> Engine:
        """The engine for a model being loaded. Its KV budget and longest sequence are the
        deployment's for that model when the loader's order carries them, else this worker's flags
        (--kv-cache-mb, --max-model-len, or their env); a budget of 0 is measured now."""
        s = self.settings
        if s.device_profile:
            self.padder = StepPadder(load_profile(s.device_profile), model.cfg.num_hidden_layers)
        kv_mb = s.kv_cache_mb if order.kv_cache_mb is None else order.kv_cache_mb
        max_len = s.max_model_len if order.max_model_len is None else order.max_model_len
        measured = kv_mb <= 0
        units = (
            stage_units(order.stage_start, order.stage_end, model.cfg.num_hidden_layers)
            if (isinstance(order, LoadModel) and order.stage_end)
            else None
        )
        kv_bytes = measured_kv_budget(model, units) if measured else int(kv_mb * 1e6)
        ledger = self.slot.ledger
        share = ledger.fair_share(s.worker_id, self.shared.slots if self.shared else 1)
        if share is not None and measured:
            # A measured budget takes its share of what is left of --memory-mb, not of the whole
            # host: the other instances on this worker hold, or will need, the rest.
            if share <= 0:
                raise MemoryRefused(f"{s.worker_id}: no memory left for a KV cache under --memory-mb")
            kv_bytes = min(kv_bytes, share)
        ledger.reserve(s.worker_id, kv=kv_bytes)
        eng = Engine(
            model, tok, max_batch=s.max_batch, worker_id=s.worker_id, padder=self.padder, kv_slots=s.kv_capacity,
            max_prefill_tokens=s.max_prefill_tokens, emulated_token_scale=s.emulated_token_scale,
            kv_cache_bytes=kv_bytes, block_size=s.kv_block_size, prefix_caching=s.prefix_caching,
            max_model_len=max_len, logprobs_mode="processed" if s.logprobs_mode == "processed" else "raw",
            kv_layers=order.stage_end - order.stage_start if isinstance(order, LoadModel) else 0,
        )  # fmt: skip
        eng.warm_grammar()
        self.log.info(
            "kv_cache", mb=round(kv_bytes / 1e6, 1), measured=measured, blocks=eng.blocks.total,
            block_size=s.kv_block_size, max_model_len=eng.max_model_len, prefix_caching=s.prefix_caching,
            kv_cache_mb_from="deployment" if order.kv_cache_mb is not None else "worker",
            max_model_len_from="deployment" if order.max_model_len is not None else "worker",
        )  # fmt: skip
        return eng

    def _on_stage_frame(self, frame: StageFrame, tensor: torch.Tensor | None) -> None:
        if self.slot.engine is None:
            self.log.warning("stage_frame_without_model", frame=frame.TYPE)  # type: ignore[union-attr]
            return
        self.slot.engine.stage_frame(frame, tensor)
        self.idle.clear()
        self.runner.wake()

    def _on_peer_failed(self, worker_id: str, reason: str) -> None:
        if self.slot.engine is not None:
            self.slot.engine.peer_failed(worker_id, reason)
            self.runner.wake()

    async def publish_events(self, events: list[tuple[str, TokenEvent]], batch_size: int) -> None:
        """One message per gateway with all of a step's events for it, on the service's connection."""
        for subject, payload in self._messages(events, batch_size):
            await self.rt.nc.publish(subject, payload)

    def _messages(self, events: list[tuple[str, TokenEvent]], batch_size: int) -> list[tuple[str, bytes]]:
        by_gw: dict[str, list[TokenEvent]] = defaultdict(list)
        for gw, ev in events:
            by_gw[gw].append(ev)
        subjects = self.rt.subjects
        return [(subjects.tokens(gw), self._encode_events(evs, batch_size)) for gw, evs in by_gw.items()]

    def _encode_events(self, events: list[TokenEvent], batch_size: int) -> bytes:
        """One gateway's events of a step, as its tokens subject and its direct link (tokenlinks.py)
        both carry them."""
        return encode(TokenEvents(self.settings.worker_id, events, batch_size=batch_size))

    def _token_messages(self, result: StepResult) -> list[tuple[str, bytes]]:
        """On the engine thread: the step's events, encoded once per gateway, for it to publish on
        its own connection (runner.py)."""
        return self._messages(result.events, result.batch_size)

    # ------------------------------------------------------------------ queries
    async def on_snapshot(self, _: SnapshotRequest) -> WorkerSnapshot:
        return WorkerSnapshot(
            worker_id=self.settings.worker_id,
            state=self.slot.state,
            model=self.slot.model_name,
            ready_units=sorted(self.slot.ready),
            num_units=self.slot.num_units,
            seq=self.slot.seq,
        )

    async def on_status(self, _: StatusRequest) -> ServiceStatus:
        hb = self.heartbeat()
        detail: dict[str, Any] = {
            "state": hb.state,
            "model": hb.model,
            "units_ready": hb.units_ready,
            "num_units": hb.num_units,
            "running": hb.running,
            "waiting": hb.waiting,
            "max_batch": hb.max_batch,
            "tokens_per_s": hb.tokens_per_s,
            "loading_mb_s": hb.loading_mb_s,
            "load_source": self.slot.load_source,
            "local_cache": self.slot.local_cache.describe() if self.slot.local_cache.enabled else None,
            "device": str(self.device),
            "gpus": self.gpus,
            "threads": self.settings.threads,
            "stage_addr": self.link.addr,
            "stage_running": hb.stage_running,
            "stage_link": self.link.stats.summary(),
            "token_links": self.runner.token_links.summary() if self.runner.token_links else None,
            "request_links": self.request_links.summary(),
            # The engine thread's time inside this instance's steps, and their count, since start
            # (bench serve takes the steps' own speed out of the mesh's added latency with them).
            "engine_busy_s": round(self.runner.busy_s, 6),
            "engine_steps": self.runner.steps,
            # Time between two back-to-back steps and how many (the engine thread's own cost per
            # step: events sent, the next lane picked).
            "engine_gap_s": round(self.runner.gap_s, 6),
            "engine_gaps": self.runner.gaps,
            "emulated_device": None
            if self.padder is None
            else {
                **self.padder.profile.describe(),
                "steps": self.runner.steps,
                "padded_s": round(self.runner.padded_s, 3),
                "overrun_steps": self.runner.overrun_steps,
                "overrun_s": round(self.runner.overrun_s, 3),
            },
            "data_addr": hb.data_addr,
            "data_refused": self.dataplane.refused,
            "sending": sorted(self.slot.sends),
            # A stage of a pipelined instance: its id and decoder layers ("", 0, 0: whole).
            "group": hb.group,
            "stage_start": hb.stage_start,
            "stage_end": hb.stage_end,
            # Sharing: the worker (process) it shares, its quota, and that worker's memory ledger.
            "shared_device": hb.shared_device,
            "quota": hb.quota,
            "memory": self.slot.ledger.describe(),
        }
        inb = self.slot.inbound
        if inb is not None:
            o = inb.order
            detail["inbound"] = {"transfer": o.transfer_id, "role": o.role, "units": len(o.units),
                                 "mb": round(inb.nbytes / 1e6, 1), "failed": inb.failed}  # fmt: skip
        if self.slot.engine is not None:
            st = self.slot.engine.stats
            detail.update(
                steps=st.steps,
                tokens=st.tokens,
                max_batch_seen=st.max_batch_seen,
                batch_hist={str(k): v for k, v in sorted(st.batch_hist.items())},
                finished=dict(st.finished),
                relayed_steps=st.relayed_steps,
                # Prompt tokens computed (n choices share one prefill; a prefix-cache hit is not one).
                prefill_tokens=st.prefilled,
            )
            f = self.slot.engine.figures
            # Named as vLLM's metrics (vllm:kv_cache_usage_perc, ...), so dashboards read alike.
            detail["kv_cache"] = {
                "kv_cache_usage_perc": round(f.kv_cache_usage, 4),
                "num_free_blocks": f.kv_blocks_free,
                "num_blocks": f.kv_blocks_total,
                "block_size": self.slot.engine.geometry.block_size,
                "mb": round(f.kv_blocks_total * self.slot.engine.geometry.bytes_per_block / 1e6, 1),
                "num_preemptions_total": f.num_preemptions,
                "prefix_cache_queries": f.prefix_cache_queries,
                "prefix_cache_hits": f.prefix_cache_hits,
                "prefix_cache_hit_rate": round(f.prefix_cache_hit_rate, 4),
                "max_model_len": f.max_model_len,
            }
        return ServiceStatus(service="worker", instance=self.settings.worker_id, pid=os.getpid(), detail=detail)
