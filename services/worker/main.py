"""Worker service: holds (part of) a model, runs requests with continuous
batching, publishes heartbeats and per-unit readiness.

Wiring: config → NATS → subscriptions and tasks; SIGTERM stops admitting,
lets running requests finish for a grace period, ends the rest with an error
event, and drains NATS. torch work runs in one dedicated executor thread so
the event loop only schedules.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from nats.aio.client import Client as NATS

from cascade.cliargs import add_common_arguments
from cascade.config import ConfigError, env_float, env_int, env_str, resolve_nats_url, resolve_prefix
from cascade.device_profile import StepPadder, load_profile
from cascade.logs import setup_logging
from cascade.messages import (
    BatchLimit,
    BatchReply,
    Cancel,
    GenerateBatch,
    Heartbeat,
    InstanceMetrics,
    LayerReady,
    LoadModel,
    Ok,
    Rejection,
    RemoteError,
    RouteStage,
    ServiceReady,
    ServiceStatus,
    SetBatchLimit,
    SnapshotRequest,
    StatusRequest,
    StepStat,
    TokenEvent,
    TokenEvents,
    TransferEvent,
    TransferOrder,
    UnloadModel,
    WorkerSnapshot,
    WorkerState,
    encode,
)
from cascade.models.config import read_config
from cascade.models.tokenizer import Tokenizer, load_tokenizer
from cascade.natsutil import TaskSet, connect, handler, stop_event
from cascade.stagewire import StageFrame
from cascade.subjects import Subjects, check_token
from services.worker.dataplane import (
    DataPlaneServer,
    LiveModelSource,
    ReceiveStats,
    Reception,
    TransferError,
    send_units_async,
)
from services.worker.engine import Engine, StepResult
from services.worker.gpu import gpu_inventory
from services.worker.localcache import DiskLoad, LocalCache, pace, unit_nbytes
from services.worker.model import LlamaModel, pick_device
from services.worker.runner import EngineRunner
from services.worker.stagelink import StageLink


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The service contract's flags; a worker reads no deployment, but takes --config like its peers.
    add_common_arguments(p)
    p.add_argument(
        "--worker-id",
        default=os.environ.get("CASCADE_WORKER_ID"),
        help="unique id (letters, digits, - and _); default: derived from host and pid",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=env_int("CASCADE_TORCH_THREADS", 1),
        help="torch threads for this worker (env CASCADE_TORCH_THREADS, default 1: workers share the cores)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=env_int("CASCADE_MAX_BATCH", 32),
        help="most sequences in the running batch (env CASCADE_MAX_BATCH, default 32)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=env_int("CASCADE_MAX_PREFILL_TOKENS", 2048),
        help="prompt tokens one step computes at most, across every prompt it starts or continues; longer "
        "prompts are prefilled in chunks, so decoding sequences never wait behind a whole long prompt. With "
        "an emulated device, in the tokens it prices (env CASCADE_MAX_PREFILL_TOKENS, default 2048)",
    )
    p.add_argument(
        "--kv-slots",
        type=int,
        default=env_int("CASCADE_KV_SLOTS", 0),
        help="sequences the KV cache is sized for: the most the scaler may raise the batch limit to at run time "
        "(env CASCADE_KV_SLOTS; default: --max-batch)",
    )
    p.add_argument(
        "--metrics-s",
        type=float,
        default=env_float("CASCADE_METRICS_S", 1.0),
        help="how often load metrics (InstanceMetrics) go to the scaler (env CASCADE_METRICS_S, default 1.0)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=env_int("CASCADE_MAX_WAITING", 256),
        help="admitted sequences waiting for a batch slot before new ones are refused (default 256)",
    )
    p.add_argument("--device", default=env_str("CASCADE_DEVICE", "auto"), help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--heartbeat-s",
        type=float,
        default=env_float("CASCADE_HEARTBEAT_S", 1.0),
        help="heartbeat interval in seconds (env CASCADE_HEARTBEAT_S, default 1.0)",
    )
    p.add_argument(
        "--device-profile",
        default=os.environ.get("CASCADE_DEVICE_PROFILE") or None,
        help="emulate an accelerator: pad every step to this profile's time (a name in docs/device-profiles "
        "or a path; env CASCADE_DEVICE_PROFILE). For scaling benchmarks on CPUs; off by default",
    )
    p.add_argument(
        "--load-mb-s",
        type=float,
        default=env_float("CASCADE_LOAD_MB_S", 0.0),
        help="cap disk loads at this bandwidth, to emulate an SSD (env CASCADE_LOAD_MB_S; 0 = uncapped)",
    )
    p.add_argument(
        "--local-cache-mb",
        type=float,
        default=env_float("CASCADE_LOCAL_CACHE_MB", 0.0),
        help="keep a host-memory copy of checkpoints this worker read from disk, up to this many MB, least "
        "recently used out first; a later disk load of one installs from it (env CASCADE_LOCAL_CACHE_MB; 0 = off)",
    )
    p.add_argument(
        "--local-cache-mb-s",
        type=float,
        default=env_float("CASCADE_LOCAL_CACHE_MB_S", 0.0),
        help="pace loads from the local cache at this bandwidth, to emulate the host-to-GPU copy "
        "(env CASCADE_LOCAL_CACHE_MB_S; 0 = unpaced)",
    )
    p.add_argument(
        "--stage-host",
        default=env_str("CASCADE_STAGE_HOST", "127.0.0.1"),
        help="address the stage link (activations of pipelined routes) listens on (default 127.0.0.1)",
    )
    p.add_argument(
        "--stage-port", type=int, default=env_int("CASCADE_STAGE_PORT", 0), help="stage link port (default: free)"
    )
    p.add_argument(
        "--data-host",
        default=os.environ.get("CASCADE_DATA_HOST"),
        help="address the parameter data plane listens on (env CASCADE_DATA_HOST; default: the stage host)",
    )
    p.add_argument(
        "--data-port",
        type=int,
        default=env_int("CASCADE_DATA_PORT", 0),
        help="data plane port (env CASCADE_DATA_PORT; default: free)",
    )
    p.add_argument(
        "--advertise-host",
        default=os.environ.get("CASCADE_ADVERTISE_HOST"),
        help="host name peers use to reach this worker (default: the listen address; set in containers)",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=env_float("CASCADE_DRAIN_TIMEOUT_S", 10.0),
        help="on SIGTERM, how long running requests may finish before they are ended with an error",
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = WorkerConfig.from_args(args)
    except (ConfigError, ValueError) as e:
        print(f"cascade worker: {e}")
        return 2
    setup_logging("worker", args.log_level)
    try:
        asyncio.run(WorkerService(cfg).main())
    except ConnectionError as e:
        structlog.get_logger().error("cannot_start", error=str(e))
        return 1
    return 0


class WorkerConfig:
    def __init__(
        self,
        nats_url: str,
        prefix: str,
        worker_id: str,
        threads: int = 1,
        max_batch: int = 32,
        max_waiting: int = 256,
        device: str = "auto",
        heartbeat_s: float = 1.0,
        drain_timeout_s: float = 10.0,
        stage_host: str = "127.0.0.1",
        stage_port: int = 0,
        advertise_host: str | None = None,
        load_mb_s: float = 0.0,
        data_host: str | None = None,
        data_port: int = 0,
        device_profile: str | None = None,
        kv_slots: int = 0,
        metrics_s: float = 1.0,
        local_cache_mb: float = 0.0,
        local_cache_mb_s: float = 0.0,
        max_prefill_tokens: int = 2048,
    ) -> None:
        if threads < 1 or max_batch < 1 or max_waiting < 0 or heartbeat_s <= 0:
            raise ConfigError("--threads and --max-batch must be >= 1, --heartbeat-s > 0")
        if kv_slots < 0 or metrics_s <= 0:
            raise ConfigError("--kv-slots must be >= 0 and --metrics-s > 0")
        if local_cache_mb < 0 or local_cache_mb_s < 0:
            raise ConfigError("--local-cache-mb and --local-cache-mb-s must be >= 0")
        if max_prefill_tokens < 1:
            raise ConfigError("--max-prefill-tokens must be >= 1")
        self.max_prefill_tokens = max_prefill_tokens
        self.local_cache_mb = local_cache_mb
        self.local_cache_mb_s = local_cache_mb_s
        self.kv_slots = max(kv_slots, max_batch)
        self.metrics_s = metrics_s
        self.nats_url = nats_url
        self.prefix = prefix
        self.worker_id = check_token(worker_id)
        self.threads = threads
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.device = device
        self.heartbeat_s = heartbeat_s
        self.drain_timeout_s = drain_timeout_s
        self.stage_host = stage_host
        self.stage_port = stage_port
        self.advertise_host = advertise_host
        self.load_mb_s = load_mb_s
        # Both links face the same peers, so by default the data plane listens where the stage link does.
        self.data_host = data_host or stage_host
        self.data_port = data_port
        self.device_profile = device_profile
        if device_profile:
            load_profile(device_profile)  # a bad name or file fails at start, with the reason

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> WorkerConfig:
        wid = a.worker_id or f"w-{socket.gethostname().split('.')[0]}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        wid = "".join(c if c.isalnum() or c in "-_" else "-" for c in wid)
        return cls(
            nats_url=resolve_nats_url(a.nats_url),
            prefix=resolve_prefix(a.prefix),
            worker_id=wid,
            threads=a.threads,
            max_batch=a.max_batch,
            max_waiting=a.max_waiting,
            device=a.device,
            heartbeat_s=a.heartbeat_s,
            drain_timeout_s=a.drain_timeout_s,
            stage_host=a.stage_host,
            stage_port=a.stage_port,
            advertise_host=a.advertise_host,
            load_mb_s=a.load_mb_s,
            data_host=a.data_host,
            data_port=a.data_port,
            device_profile=a.device_profile,
            kv_slots=a.kv_slots,
            metrics_s=a.metrics_s,
            local_cache_mb=a.local_cache_mb,
            local_cache_mb_s=a.local_cache_mb_s,
            max_prefill_tokens=a.max_prefill_tokens,
        )


@dataclass(eq=False)
class Inbound:
    """The transfer filling this worker's model (a "receive" or "disk" order); one at a time.

    Units reach the event loop through `queue` (the data plane's callbacks put them there, in
    order) and are installed one by one on the torch thread by `WorkerService._install`."""

    order: TransferOrder
    queue: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    reception: Reception | None = None
    task: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    source: str = "data-plane"  # a "disk" order says "disk" or "local-cache" once it knows
    superseded: bool = False
    failed: str | None = None
    # Set when a newer order replaces this one (a failed transfer keeps its units until then).
    replaced: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerService:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.prefix)
        self.log = structlog.get_logger().bind(service="worker", worker=cfg.worker_id)
        self.device = pick_device(cfg.device)
        # Asked once: NVML is slow to initialise, and the inventory does not change under us.
        self.gpus = gpu_inventory()
        self.state: WorkerState = "idle"
        self.model_name: str | None = None
        self.model: LlamaModel | None = None
        self.engine: Engine | None = None
        self.num_units = 0
        self.seq = 0  # readiness event sequence number
        self.metrics_seq = 0
        self.nc: NATS | None = None
        self.tasks = TaskSet(self.log)
        self.idle = asyncio.Event()
        self.idle.set()
        self.runner = EngineRunner(lambda: self.engine, self._deliver, self._maybe_idle, self.log)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.load_started = 0.0
        self.load_bytes = 0
        self.load_mb_s = 0.0
        # Where the last (or current) load came from: "disk", "local-cache" or "data-plane".
        self.load_source: str | None = None
        self.local_cache = LocalCache(int(cfg.local_cache_mb * 1e6), cfg.local_cache_mb_s)
        self._load_task: asyncio.Task[None] | None = None
        self.padder: StepPadder | None = None
        self.link = StageLink(
            self._on_stage_frame,
            self._on_peer_failed,
            host=cfg.stage_host,
            port=cfg.stage_port,
            advertise_host=cfg.advertise_host,
            logger=self.log,
        )
        self.dataplane = DataPlaneServer(cfg.data_host, cfg.data_port, advertise_host=cfg.advertise_host)
        self.inbound: Inbound | None = None
        self.sends: dict[str, asyncio.Task[None]] = {}
        self._live_source: LiveModelSource | None = None
        # Transfer orders and the start of a load must not interleave across their awaits.
        self._begin_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle
    async def main(self, stop: asyncio.Event | None = None) -> None:
        """Run until SIGTERM/SIGINT (or until `stop` is set, for in-process use)."""
        torch.set_num_threads(self.cfg.threads)
        stop = stop or stop_event()
        self.nc = nc = await connect(self.cfg.nats_url, name=f"cascade-worker-{self.cfg.worker_id}")
        s, w = self.subjects, self.cfg.worker_id
        try:
            await self.link.start()
            data_addr = await asyncio.to_thread(self.dataplane.start)
            await nc.subscribe(s.load(w), cb=handler(self.on_load, self.log))
            await nc.subscribe(s.transfer(w), cb=handler(self.on_transfer, self.log))
            await nc.subscribe(s.unload(w), cb=handler(self.on_unload, self.log))
            await nc.subscribe(s.generate(w), cb=handler(self.on_generate, self.log))
            await nc.subscribe(s.cancel(w), cb=handler(self.on_cancel, self.log))
            await nc.subscribe(s.batch_limit(w), cb=handler(self.on_batch_limit, self.log))
            await nc.subscribe(s.snapshot(w), cb=handler(self.on_snapshot, self.log))
            await nc.subscribe(s.status(), cb=handler(self.on_status, self.log))
            self.tasks.spawn(self.heartbeat_loop(), "heartbeat")
            self.tasks.spawn(self.metrics_loop(), "metrics")
            self.runner.start()
            self.tasks.spawn(self.runner.publish(), "engine-results")
            await nc.publish(s.service_ready(), encode(ServiceReady("worker", w, os.getpid())))
            await self.send_heartbeat()
            self.log.info("worker_ready", device=str(self.device), threads=self.cfg.threads, data_addr=data_addr)
            stop_wait = asyncio.ensure_future(stop.wait())
            failed_wait = asyncio.ensure_future(self.tasks.failed.wait())
            await asyncio.wait([stop_wait, failed_wait], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            failed_wait.cancel()
            await self.shutdown()
        finally:
            await self.tasks.cancel_all()
            await self.link.close()
            # Fails any reception still armed and joins the data-plane threads.
            await asyncio.to_thread(self.dataplane.close)
            if not nc.is_closed:
                await nc.drain()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.log.info("worker_stopped")

    async def shutdown(self) -> None:
        """Stop admitting; let running requests finish for a grace period; end the rest with an error."""
        self.state = "draining"
        await self.send_heartbeat()
        if self.engine is not None and self.engine.in_flight():
            self.log.info("draining", in_flight=self.engine.in_flight())
            try:
                await asyncio.wait_for(self.idle.wait(), self.cfg.drain_timeout_s)
            except TimeoutError:
                pass
        if self._load_task is not None:
            self._load_task.cancel()
        for task in list(self.sends.values()):
            task.cancel()
        if self.inbound is not None:
            await self._stop_inbound(self.inbound, "worker shutting down")
        await self.runner.stop()
        if self.engine is not None and self.engine.in_flight():
            # The engine thread has stopped: ending the sequences here races with nothing.
            events = self.engine.drain_all("worker shutting down")
            await self.publish_events(events, 0)

    # ------------------------------------------------------------------ heartbeats
    def heartbeat(self) -> Heartbeat:
        running, waiting = self.engine.load() if self.engine else (0, 0)
        return Heartbeat(
            worker_id=self.cfg.worker_id,
            state=self.state,
            model=self.model_name,
            units_ready=len(self.model.ready_units()) if self.model else 0,
            num_units=self.num_units,
            running=running,
            waiting=waiting,
            max_batch=self.engine.max_batch if self.engine else self.cfg.max_batch,
            tokens_per_s=round(self.engine.stats.tokens_per_s, 2) if self.engine else 0.0,
            ready_seq=self.seq,
            pid=os.getpid(),
            host=socket.gethostname(),
            loading_mb_s=round(self.load_mb_s, 1),
            ts=time.time(),
            stage_addr=self.link.addr or None,
            stage_running=len(self.engine.relayed) if self.engine else 0,
            driven_layers=self.engine.driven_layers() if self.engine else 0,
            driven=len(self.engine.driven) if self.engine else 0,
            prefill_budget=self.engine.prefill_budget() if self.engine else 0,
            data_addr=self._data_addr(),
        )

    def _data_addr(self) -> str | None:
        try:
            return self.dataplane.address
        except RuntimeError:  # not started yet
            return None

    async def send_heartbeat(self) -> None:
        assert self.nc is not None
        await self.nc.publish(self.subjects.heartbeat(self.cfg.worker_id), encode(self.heartbeat()))

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)  # a periodic timer, not synchronisation
            await self.send_heartbeat()

    def instance_metrics(self, interval_s: float) -> InstanceMetrics | None:
        """This interval's load and engine steps (None while no model is held); resets the interval."""
        eng, model = self.engine, self.model_name
        if eng is None or model is None:
            return None
        steps, prompt, generated = eng.stats.take_interval()
        running, waiting = eng.load()
        self.metrics_seq += 1
        return InstanceMetrics(
            worker_id=self.cfg.worker_id,
            model=model,
            seq=self.metrics_seq,
            ts=time.time(),
            interval_s=round(interval_s, 4),
            state=self.state,
            running=running,
            waiting=waiting,
            max_batch=eng.max_batch,
            tokens_per_s=round(generated / interval_s, 3) if interval_s > 0 else 0.0,
            prompt_tokens=prompt,
            generated_tokens=generated,
            steps=[StepStat(b, int(n), round(ms, 3), int(p)) for b, (n, ms, p) in sorted(steps.items())],
            kv_slots=eng.kv_slots,
        )

    async def metrics_loop(self) -> None:
        """InstanceMetrics every metrics interval while a model is held: the scaler's per-instance
        load, tokens/s and step latency by batch size."""
        assert self.nc is not None
        subject = self.subjects.metrics("worker", self.cfg.worker_id)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.metrics_s)  # a periodic timer, not synchronisation
            now = time.monotonic()
            m = self.instance_metrics(now - last)
            last = now
            if m is not None:
                await self.nc.publish(subject, encode(m))

    async def on_batch_limit(self, req: SetBatchLimit) -> BatchLimit:
        """The scaler's vertical action: a new batch limit for the engine, within its KV slots."""
        if not isinstance(req, SetBatchLimit):
            raise RemoteError("bad_request", f"expected set_batch_limit, got {type(req).__name__}")
        eng = self.engine
        if eng is None or self.model_name is None:
            raise RemoteError("no_model", f"worker {self.cfg.worker_id} holds no model")
        if req.max_batch < 0:
            raise RemoteError("bad_request", f"batch limit {req.max_batch} is negative")
        before = eng.max_batch
        now = eng.set_max_batch(req.max_batch or self.cfg.max_batch)
        self.runner.wake()  # a raised limit may admit waiting sequences at once
        self.log.info(
            "batch_limit_set", model=self.model_name, requested=req.max_batch, before=before, limit=now,
            kv_slots=eng.kv_slots, decision=req.decision_id, reason=req.reason,
        )  # fmt: skip
        return BatchLimit(self.cfg.worker_id, self.model_name, now, req.max_batch, eng.kv_slots)

    async def publish_ready(self, unit: int, reset: bool = False) -> None:
        assert self.nc is not None
        self.seq += 1
        ev = LayerReady(
            worker_id=self.cfg.worker_id,
            model=self.model_name or "",
            unit=unit,
            num_units=self.num_units,
            seq=self.seq,
            ts=time.time(),
            reset=reset,
        )
        await self.nc.publish(self.subjects.ready(self.cfg.worker_id), encode(ev))

    # ------------------------------------------------------------------ loading
    async def on_load(self, req: LoadModel) -> Ok:
        if self.state != "idle":
            raise RemoteError("busy", f"worker {self.cfg.worker_id} is {self.state} with {self.model_name}")
        path = Path(req.path)
        loop = asyncio.get_running_loop()
        try:
            tok = await loop.run_in_executor(self.executor, load_tokenizer, path)
            dl = await self._open_disk_load(path, req.model, None)
        except (OSError, ValueError) as e:
            raise RemoteError("load_failed", f"{req.model}: {e}") from None
        if self.state != "idle":
            self._close_disk_load(dl)
            raise RemoteError("busy", f"worker {self.cfg.worker_id} became {self.state}")
        cfg = dl.ckpt.config
        self.state = "loading"
        self.model_name = req.model
        self.num_units = cfg.num_units
        self.model = LlamaModel(cfg, self.device)
        # The engine exists from the first unit on: a loading instance serves as the first stage of
        # pipelined routes for the layers it already holds.
        self.engine = self._new_engine(tok)
        self._load_task = self.tasks.spawn(self.load_from_disk(req, dl), f"load-{req.model}")
        self.log.info(
            "load_started", model=req.model, path=str(path), decision=req.decision_id, source=dl.source,
            local_cache=dl.note,
        )  # fmt: skip
        return Ok(f"loading {req.model}")

    async def load_from_disk(self, req: LoadModel, dl: DiskLoad) -> None:
        """Load unit by unit, front to back, announcing each as it becomes usable."""
        loop = asyncio.get_running_loop()
        model = self.model
        assert model is not None
        self.load_started = time.monotonic()
        self.load_bytes = 0
        try:
            for unit in range(self.num_units):
                # The emulated disk's (or host link's) pace: a unit is usable only once it could have arrived.
                await pace(self.load_started, self.load_bytes + dl.unit_nbytes(unit), dl.mb_s)

                def load_one(u: int = unit) -> int:
                    model.load_unit(u, dl.unit_tensors(u), copy=True)
                    return dl.unit_nbytes(u)

                self.load_bytes += await loop.run_in_executor(self.executor, load_one)
                self.load_mb_s = self.load_bytes / 1e6 / max(time.monotonic() - self.load_started, 1e-6)
                await self.publish_ready(unit)
            if self.state == "loading":
                self.state = "serving"
            self.log.info(
                "model_ready", model=req.model, units=self.num_units, mb=round(self.load_bytes / 1e6, 1),
                seconds=round(time.monotonic() - self.load_started, 3), source=dl.source,
            )  # fmt: skip
        except asyncio.CancelledError:
            await self.drop_model()
            raise
        except Exception as e:
            self.log.error("load_failed", model=req.model, error=str(e))
            await self.drop_model()
        finally:
            self._close_disk_load(dl)
            await self.send_heartbeat()

    async def _open_disk_load(self, path: Path, model: str, units: list[int] | None) -> DiskLoad:
        """Open a disk load of `units` (None: all): from the local cache when it holds the checkpoint."""
        loop = asyncio.get_running_loop()
        dl = await loop.run_in_executor(
            self.executor, self.local_cache.open_load, path, model, units, self.cfg.load_mb_s
        )
        self.load_source = dl.source
        return dl

    def _close_disk_load(self, dl: DiskLoad) -> None:
        stored = dl.close()
        if stored is not None:
            self.log.info(
                "local_cache_stored", model=stored.model, mb=round(stored.nbytes / 1e6, 1),
                cache=self.local_cache.describe(),
            )  # fmt: skip

    async def drop_model(self) -> None:
        if self.inbound is not None:
            await self._stop_inbound(self.inbound, "model dropped")
            self.inbound = None
        for task in list(self.sends.values()):
            task.cancel()  # the receivers' loader re-plans from another holder
        self._live_source = None
        self.engine = None
        self.model = None
        had = self.model_name is not None
        if had:
            await self.publish_ready(-1, reset=True)
        self.model_name = None
        self.num_units = 0
        self.state = "idle"

    # ------------------------------------------------------------------ transfers
    async def on_transfer(self, order: TransferOrder) -> Ok:
        """A part in a transfer plan: "send" units of the model held here, or fill this worker's
        model by "receive" (data plane) or "disk" (its own read of the checkpoint)."""
        if order.role == "send":
            return self._start_send(order)
        async with self._begin_lock:
            return await self._start_inbound(order)

    def _start_send(self, order: TransferOrder) -> Ok:
        model = self.model
        if self.state != "serving" or model is None or self.model_name != order.model:
            raise RemoteError("not_holder", f"worker {self.cfg.worker_id} does not serve {order.model}")
        missing = [u for u in order.units if not model.has_unit(u)]
        if missing or not order.downstream:
            raise RemoteError("bad_order", f"send {order.transfer_id}: units {missing[:3]} not held or no downstream")
        if order.transfer_id in self.sends:
            raise RemoteError("bad_order", f"already sending {order.transfer_id}")
        if self._live_source is None:
            # One source per held model: it caches each unit's CRC across the chains it heads.
            self._live_source = LiveModelSource(order.model, model)
        task = self.tasks.spawn(self._send(order, self._live_source), f"send-{order.transfer_id}")
        self.sends[order.transfer_id] = task
        self.log.info(
            "send_started", transfer=order.transfer_id, to=order.downstream, units=len(order.units),
            rate_limit_mb_s=round(order.rate_limit_bps / 1e6, 1),
        )  # fmt: skip
        return Ok(f"sending {len(order.units)} units of {order.model}")

    async def _send(self, order: TransferOrder, source: LiveModelSource) -> None:
        try:
            stats = await send_units_async(source, order)
        except TransferError as e:
            self.log.warning("send_failed", transfer=order.transfer_id, error=str(e))
            await self.publish_transfer(order, "failed", reason=str(e))
        else:
            self.log.info(
                "send_done",
                transfer=order.transfer_id,
                mb=round(stats.nbytes / 1e6, 1),
                seconds=round(stats.seconds, 3),
            )
            await self.publish_transfer(order, "complete", nbytes=stats.nbytes, seconds=stats.seconds)
        finally:
            self.sends.pop(order.transfer_id, None)

    async def _start_inbound(self, order: TransferOrder) -> Ok:
        loop = asyncio.get_running_loop()
        tid = order.transfer_id
        if order.role == "disk" and not order.path:
            raise RemoteError("bad_order", f"disk order {tid} has no checkpoint path")
        fresh = self.model is None
        if fresh:
            if self.state != "idle":
                raise RemoteError("busy", f"worker {self.cfg.worker_id} is {self.state}")
            if not order.path:
                raise RemoteError("bad_order", f"{tid}: no path to read config.json and the tokenizer from")
            path = Path(order.path)
            try:
                cfg = await loop.run_in_executor(self.executor, read_config, path)
                tok = await loop.run_in_executor(self.executor, load_tokenizer, path)
            except (OSError, ValueError) as e:
                raise RemoteError("load_failed", f"{order.model}: {e}") from None
            if cfg.num_units != order.num_units:
                raise RemoteError("bad_order", f"{tid}: {order.num_units} units, {path} has {cfg.num_units}")
            if self.model is not None or self.state != "idle":
                raise RemoteError("busy", f"worker {self.cfg.worker_id} became {self.state}")
            self.state = "loading"
            self.model_name = order.model
            self.num_units = cfg.num_units
            self.model = LlamaModel(cfg, self.device)
            # As for a disk load: a loading instance serves as a first stage for what it holds.
            self.engine = self._new_engine(tok)
            self.load_started = time.monotonic()
            self.load_bytes = 0
        elif self.state != "loading" or self.model_name != order.model:
            # Only a load of the same model may be continued (a re-plan after a broken chain).
            raise RemoteError("busy", f"worker {self.cfg.worker_id} is {self.state} with {self.model_name}")
        if self.inbound is not None:
            # Let the old transfer finish installing the unit in hand, so `held` below is exact and
            # no unit is announced twice.
            await self._stop_inbound(self.inbound, f"superseded by {tid}")
        model = self.model
        assert model is not None
        held = set(model.ready_units())
        gap = sorted(set(range(order.num_units)) - held - set(order.units))
        if gap:
            # An order this worker cannot carry out leaves no half-loaded model waiting for nothing.
            self.inbound = None
            await self.drop_model()
            raise RemoteError("gap", f"{tid} leaves units {gap[:5]} unfilled")
        inb = Inbound(order)
        self.inbound = inb
        if order.role == "receive":
            self.load_source = inb.source
            q = inb.queue
            try:
                # Reserving (allocating and touching) the unit buffers blocks: off the loop. The
                # loader starts the source only after this answer, so faults stay out of the stream.
                inb.reception = await asyncio.to_thread(
                    self.dataplane.expect,
                    order,
                    lambda u, t: q.put_nowait(("unit", u, t)),
                    lambda why: q.put_nowait(("failed", why)),
                    on_complete=lambda st: q.put_nowait(("complete", st)),
                    on_forward_failed=lambda why: q.put_nowait(("forward_failed", why)),
                    loop=loop,
                    have=held,
                    device=self.device,
                    reserve_ahead=True,
                )
            except (TransferError, ValueError) as e:
                self.inbound = None
                await self.drop_model()
                raise RemoteError("transfer_failed", f"{tid}: {e}") from None
            inb.task = self.tasks.spawn(self._install(inb), f"install-{tid}")
        else:
            inb.task = self.tasks.spawn(self._read_disk(inb, held), f"disk-{tid}")
        self.log.info(
            "transfer_armed", transfer=tid, role=order.role, model=order.model, units=len(order.units),
            have=len(held), downstream=order.downstream,
            reserve_s=round(inb.reception.stats.reserve_s, 3) if inb.reception is not None else None,
        )  # fmt: skip
        return Ok(f"{order.role} {tid}: {len(order.units)} units of {order.model}")

    async def _stop_inbound(self, inb: Inbound, reason: str) -> None:
        inb.superseded = True
        inb.replaced.set()
        if inb.reception is not None:
            inb.reception.cancel(reason)
        inb.queue.put_nowait(("stop",))
        if inb.task is not None and inb.task is not asyncio.current_task():
            await asyncio.wait([inb.task])

    async def _install_unit(self, inb: Inbound, unit: int, tensors: dict[str, torch.Tensor], copy: bool) -> None:
        """Install one verified unit on the torch thread (between engine steps), then announce it."""
        model = self.model
        if model is None:
            raise TransferError("model dropped")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, model.load_unit, unit, tensors, copy)
        nbytes = unit_nbytes(tensors)
        inb.nbytes += nbytes
        self.load_bytes += nbytes
        self.load_mb_s = inb.nbytes / 1e6 / max(time.monotonic() - inb.started, 1e-6)
        await self.publish_ready(unit)

    async def _install(self, inb: Inbound) -> None:
        """Install units of a "receive" as the data plane verifies them, in order."""
        try:
            while True:
                item = await inb.queue.get()
                if inb.superseded:
                    return
                kind = item[0]
                if kind == "unit":
                    # The data plane's buffers become the weights: no copy when dtype and device match.
                    await self._install_unit(inb, item[1], item[2], copy=False)
                elif kind == "forward_failed":
                    await self.publish_transfer(inb.order, "forward_failed", reason=str(item[1]))
                elif kind == "failed":
                    await self._inbound_failed(inb, str(item[1]))
                    return
                elif kind == "complete":
                    stats: ReceiveStats = item[1]
                    await self._inbound_done(inb, stats.nbytes)
                    return
        except TransferError as e:
            await self._inbound_failed(inb, str(e))

    async def _read_disk(self, inb: Inbound, held: set[int]) -> None:
        """A "disk" order: read the units from the checkpoint at `order.path` (or the local cache's
        copy of it), front to back, paced like `load_from_disk`."""
        loop = asyncio.get_running_loop()
        order = inb.order
        units = [u for u in order.units if u not in held]
        try:
            dl = await self._open_disk_load(Path(order.path), order.model, units)
        except (OSError, ValueError) as e:
            await self._inbound_failed(inb, f"cannot open {order.path}: {e}")
            return
        inb.source = dl.source
        self.log.info(
            "disk_read_started", transfer=order.transfer_id, model=order.model, source=dl.source, units=len(units),
            local_cache=dl.note,
        )  # fmt: skip
        try:
            for unit in units:
                if inb.superseded:
                    return
                # The emulated disk's (or host link's) pace: a unit is usable only once it could have arrived.
                await pace(inb.started, inb.nbytes + dl.unit_nbytes(unit), dl.mb_s)
                tensors = await loop.run_in_executor(self.executor, dl.unit_tensors, unit)
                # Views of the mapping, or the cache's own copy: load_unit copies them into memory the model owns.
                await self._install_unit(inb, unit, tensors, copy=True)
            if not inb.superseded:
                await self._inbound_done(inb, inb.nbytes)
        except (TransferError, OSError, ValueError, RuntimeError) as e:
            if not inb.superseded:
                await self._inbound_failed(inb, f"{type(e).__name__}: {e}")
        finally:
            self._close_disk_load(dl)

    async def _inbound_done(self, inb: Inbound, nbytes: int) -> None:
        if self.inbound is inb:
            self.inbound = None
        seconds = time.monotonic() - inb.started
        model = self.model
        if model is None or not model.is_complete():
            have = 0 if model is None else len(model.ready_units())
            await self._inbound_failed(inb, f"transfer ended with {have} of {self.num_units} units")
            return
        if self.state == "loading":
            self.state = "serving"
        await self.send_heartbeat()
        await self.publish_transfer(inb.order, "complete", nbytes=nbytes, seconds=seconds)
        self.log.info(
            "model_ready", model=self.model_name, units=self.num_units, transfer=inb.order.transfer_id,
            role=inb.order.role, source=inb.source, mb=round(inb.nbytes / 1e6, 1), seconds=round(seconds, 3),
        )  # fmt: skip

    async def _inbound_failed(self, inb: Inbound, reason: str) -> None:
        """Report the failure; keep the verified units for a while in case the loader re-plans
        the rest to this worker, else drop the model (never serve a partial one as full)."""
        inb.failed = reason
        held = self._units_held()
        self.log.warning("transfer_failed", transfer=inb.order.transfer_id, reason=reason, units_held=held)
        await self.publish_transfer(inb.order, "failed", reason=reason)
        await self.send_heartbeat()
        try:
            await asyncio.wait_for(inb.replaced.wait(), inb.order.timeout_s)
        except TimeoutError:
            if self.inbound is inb:
                self.log.warning("transfer_abandoned", transfer=inb.order.transfer_id, units_held=held)
                self.inbound = None
                await self.drop_model()
                await self.send_heartbeat()

    def _units_held(self) -> int:
        """Units held front to back (transfers fill models in that order)."""
        n = 0
        while self.model is not None and n < self.num_units and self.model.has_unit(n):
            n += 1
        return n

    async def publish_transfer(
        self, order: TransferOrder, kind: str, *, reason: str = "", nbytes: int = 0, seconds: float = 0.0
    ) -> None:
        assert self.nc is not None
        ev = TransferEvent(
            worker_id=self.cfg.worker_id,
            transfer_id=order.transfer_id,
            model=order.model,
            role=order.role,
            kind=kind,  # type: ignore[arg-type]
            reason=reason,
            units_held=self._units_held() if self.model_name == order.model else 0,
            num_units=order.num_units,
            nbytes=nbytes,
            seconds=round(seconds, 4),
            ts=time.time(),
        )
        await self.nc.publish(self.subjects.transfer_event(self.cfg.worker_id), encode(ev))

    async def on_unload(self, req: UnloadModel) -> Ok:
        if self.state == "idle":
            return Ok("already idle")
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self.state = "draining"
        await self.send_heartbeat()
        await self.idle.wait()
        model = self.model_name
        await self.drop_model()
        await self.send_heartbeat()
        self.log.info("unloaded", model=model, decision=req.decision_id)
        return Ok(f"unloaded {model}")

    # ------------------------------------------------------------------ requests
    async def on_generate(self, batch: GenerateBatch) -> BatchReply:
        accepted: list[str] = []
        rejected: list[Rejection] = []
        eng = self.engine
        for r in batch.requests:
            why = self._reject_reason(r.model, len(r.prompt_ids), r.route, eng)
            if why is not None:
                rejected.append(Rejection(r.request_id, why[0], why[1]))
                continue
            assert eng is not None
            eng.submit(r.request_id, batch.gateway_id, r.prompt_ids, r.params, route=r.route, arrived_at=r.arrived_at)
            accepted.append(r.request_id)
        if accepted:
            self.idle.clear()
            self.runner.wake()
        return BatchReply(accepted=accepted, rejected=rejected)

    def _reject_reason(
        self, model: str, prompt_len: int, route: list[RouteStage], eng: Engine | None
    ) -> tuple[str, str] | None:
        if self.state == "draining":
            return "draining", f"worker {self.cfg.worker_id} is draining"
        if eng is None or self.model is None or self.state not in ("serving", "loading"):
            return "not_ready", f"worker {self.cfg.worker_id} is {self.state}"
        if model != self.model_name:
            return "wrong_model", f"worker {self.cfg.worker_id} serves {self.model_name}, not {model}"
        if len(route) > 1:
            first = route[0]
            if first.worker_id != self.cfg.worker_id or first.start != 0:
                return "invalid", f"route must start at layer 0 on {self.cfg.worker_id}"
            if not all(self.model.has_unit(u) for u in range(0, first.end + 1)):
                return "not_ready", f"worker {self.cfg.worker_id} does not hold layers [0, {first.end}) yet"
        elif self.state != "serving":
            return "not_ready", f"worker {self.cfg.worker_id} is {self.state}"
        if prompt_len < 1:
            return "invalid", "empty prompt"
        ctx = eng.cfg.max_position_embeddings
        if prompt_len >= ctx:
            return "too_long", f"prompt of {prompt_len} tokens does not fit the context of {ctx}"
        if eng.load()[1] >= self.cfg.max_waiting:
            return "overloaded", f"worker {self.cfg.worker_id} has {self.cfg.max_waiting} requests waiting"
        return None

    async def on_cancel(self, msg: Cancel) -> None:
        if self.engine is None:
            return
        for rid in msg.request_ids:
            self.engine.cancel(rid)
        self.runner.wake()

    async def _deliver(self, result: StepResult) -> None:
        for o in result.outbox:
            await self.link.send(o.to, o.frame, o.tensor)
        if result.events:
            await self.publish_events(result.events, result.batch_size)

    def _maybe_idle(self) -> None:
        eng = self.engine
        if eng is None or not eng.in_flight():
            self.idle.set()
        elif eng.has_work():
            self.runner.wake()  # work arrived as the engine thread was going to sleep

    def _new_engine(self, tok: Tokenizer) -> Engine:
        assert self.model is not None
        if self.cfg.device_profile:
            self.padder = StepPadder(load_profile(self.cfg.device_profile), self.model.cfg.num_hidden_layers)
        return Engine(
            self.model, tok, max_batch=self.cfg.max_batch, worker_id=self.cfg.worker_id, padder=self.padder,
            kv_slots=self.cfg.kv_slots, max_prefill_tokens=self.cfg.max_prefill_tokens,
            emulated_token_scale=env_float("CASCADE_EMULATED_TOKEN_SCALE", 1.0),
        )  # fmt: skip

    def _on_stage_frame(self, frame: StageFrame, tensor: torch.Tensor | None) -> None:
        if self.engine is None:
            self.log.warning("stage_frame_without_model", frame=frame.TYPE)  # type: ignore[union-attr]
            return
        self.engine.stage_frame(frame, tensor)
        self.idle.clear()
        self.runner.wake()

    def _on_peer_failed(self, worker_id: str, reason: str) -> None:
        if self.engine is not None:
            self.engine.peer_failed(worker_id, reason)
            self.runner.wake()

    async def publish_events(self, events: list[tuple[str, TokenEvent]], batch_size: int) -> None:
        assert self.nc is not None
        by_gw: dict[str, list[TokenEvent]] = defaultdict(list)
        for gw, ev in events:
            by_gw[gw].append(ev)
        for gw, evs in by_gw.items():
            await self.nc.publish(
                self.subjects.tokens(gw), encode(TokenEvents(self.cfg.worker_id, evs, batch_size=batch_size))
            )

    # ------------------------------------------------------------------ queries
    async def on_snapshot(self, _: SnapshotRequest) -> WorkerSnapshot:
        return WorkerSnapshot(
            worker_id=self.cfg.worker_id,
            state=self.state,
            model=self.model_name,
            ready_units=self.model.ready_units() if self.model else [],
            num_units=self.num_units,
            seq=self.seq,
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
            "load_source": self.load_source,
            "local_cache": self.local_cache.describe() if self.local_cache.enabled else None,
            "device": str(self.device),
            "gpus": self.gpus,
            "threads": self.cfg.threads,
            "stage_addr": self.link.addr,
            "stage_running": hb.stage_running,
            "stage_link": self.link.stats.summary(),
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
            "sending": sorted(self.sends),
        }
        if self.inbound is not None:
            o = self.inbound.order
            detail["inbound"] = {"transfer": o.transfer_id, "role": o.role, "units": len(o.units),
                                 "mb": round(self.inbound.nbytes / 1e6, 1), "failed": self.inbound.failed}  # fmt: skip
        if self.engine is not None:
            st = self.engine.stats
            detail.update(
                steps=st.steps,
                tokens=st.tokens,
                max_batch_seen=st.max_batch_seen,
                batch_hist={str(k): v for k, v in sorted(st.batch_hist.items())},
                finished=dict(st.finished),
                relayed_steps=st.relayed_steps,
            )
        return ServiceStatus(service="worker", instance=self.cfg.worker_id, pid=os.getpid(), detail=detail)
