"""The model a worker holds, and how it gets there and goes: a load from disk (or the worker's
own host-memory cache), the receiving, sending and forwarding parts of transfer plans on the data
plane, and the unload; each unit announced (`LayerReady`) as it becomes usable.

Threads: the event loop drives all of this. Disk reads and tokenizer files are read on an I/O
thread (no torch there); every unit is installed into the model on the engine thread
(`EngineRunner.call`), the only thread that writes model state. `ready` is the loop's own record
of the units installed, so the loop never reads the model's tables across threads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nats.aio.client import Client as NATS

from cascade.messages import (
    LayerReady,
    LoadModel,
    Ok,
    RemoteError,
    TransferEvent,
    TransferOrder,
    UnloadModel,
    WorkerState,
    encode,
)
from cascade.modelfiles import ModelFiles, WithModelFiles, pack_dir, split_files, unpack, write_files
from cascade.models.config import ModelConfig, read_config
from cascade.models.tokenizer import Tokenizer, load_tokenizer
from cascade.natsutil import TaskSet
from cascade.stages import StageError, stage_units
from cascade.subjects import Subjects
from services.worker.dataplane import (
    DataPlaneServer,
    LiveModelSource,
    ReceiveStats,
    Reception,
    TransferError,
    send_units_async,
)
from services.worker.engine import Engine
from services.worker.localcache import DiskLoad, LocalCache, pace, unit_nbytes
from services.worker.model import LlamaModel
from services.worker.runner import EngineRunner
from services.worker.settings import WorkerSettings
from services.worker.sharing import MemoryLedger, MemoryRefused


def _install_from(model: LlamaModel, dl: DiskLoad, unit: int) -> None:
    """On the engine thread: the unit's tensors (views of the checkpoint, or the local cache's
    copy) copied into memory the model owns."""
    model.load_unit(unit, dl.unit_tensors(unit), copy=True)


@dataclass(eq=False)
class Inbound:
    """The transfer filling this worker's model (a "receive" or "disk" order); one at a time.

    Units reach the event loop through `queue` (the data plane's callbacks put them there, in
    order) and are installed one by one on the engine thread by `ModelSlot._install`."""

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


class ModelSlot:
    def __init__(
        self,
        settings: WorkerSettings,
        nc: NATS,
        subjects: Subjects,
        tasks: TaskSet,
        runner: EngineRunner,
        dataplane: DataPlaneServer,
        device: torch.device,
        idle: asyncio.Event,
        beat: Callable[[], Awaitable[None]],
        make_engine: Callable[[LlamaModel, Tokenizer, LoadModel | TransferOrder], Engine],
        log: Any,
        ledger: MemoryLedger | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.subjects = subjects
        self.tasks = tasks
        self.runner = runner
        self.dataplane = dataplane
        self.device = device
        self.idle = idle
        self._beat = beat
        self._new_engine = make_engine
        self.log = log
        # The memory this instance holds (weights, KV) against the worker's --memory-mb, shared
        # with the other instances on a shared worker.
        self.ledger = ledger or MemoryLedger(int(settings.memory_mb * 1e6))
        self.state: WorkerState = "idle"
        self.model_name: str | None = None
        self.model: LlamaModel | None = None
        self.engine: Engine | None = None
        self.num_units = 0
        self.ready: set[int] = set()  # units installed (the loop's record)
        # A stage of a pipeline-parallel instance: its group id and decoder layers [start, end);
        # `units` is what this worker loads (every unit of the model for a whole instance).
        self.group = ""
        self.stage: tuple[int, int] = (0, 0)
        self.units: tuple[int, ...] = ()
        self.seq = 0  # readiness event sequence number
        # Disk reads, config and tokenizer files: blocking, but no torch.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="io")
        self.load_started = 0.0
        self.load_bytes = 0
        self.load_mb_s = 0.0
        # Where the last (or current) load came from: "disk", "local-cache" or "data-plane".
        self.load_source: str | None = None
        self.local_cache = LocalCache(int(settings.local_cache_mb * 1e6), settings.local_cache_mb_s)
        self._load_task: asyncio.Task[None] | None = None
        self.inbound: Inbound | None = None
        self.sends: dict[str, asyncio.Task[None]] = {}
        self._live_source: LiveModelSource | WithModelFiles | None = None
        # The held model's small files (config, tokenizer, ...): a send puts them in unit 0, so a
        # receiver that cannot see the model store builds the model from them.
        self.model_files: ModelFiles | None = None
        # Transfer orders and the start of a load must not interleave across their awaits.
        self._begin_lock = asyncio.Lock()

    def _make_engine(self, tok: Tokenizer, order: LoadModel | TransferOrder) -> Engine:
        """The engine for the model being loaded; `order` carries the deployment's KV settings."""
        assert self.model is not None
        return self._new_engine(self.model, tok, order)

    def whole(self) -> bool:
        """This worker holds (or loads) every unit of its model: not one stage of an instance."""
        return self.stage == (0, 0)

    def holds_front(self, end_unit: int) -> bool:
        """Units 0..end_unit are all installed (what a first stage through them needs)."""
        return all(u in self.ready for u in range(end_unit + 1))

    async def stop(self) -> None:
        """Worker shutting down: no load or transfer goes on."""
        if self._load_task is not None:
            self._load_task.cancel()
        for task in list(self.sends.values()):
            task.cancel()
        if self.inbound is not None:
            await self._stop_inbound(self.inbound, "worker shutting down")
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def publish_ready(self, unit: int, reset: bool = False) -> None:
        """Tell the mesh unit `unit` is usable here (or, with `reset`, that the model is gone)."""
        if reset:
            self.ready.clear()
        else:
            self.ready.add(unit)
        self.seq += 1
        ev = LayerReady(
            worker_id=self.settings.worker_id,
            model=self.model_name or "",
            unit=unit,
            num_units=self.num_units,
            seq=self.seq,
            ts=time.time(),
            reset=reset,
        )
        await self.nc.publish(self.subjects.ready(self.settings.worker_id), encode(ev))

    # ------------------------------------------------------------------ loading
    async def on_load(self, req: LoadModel) -> Ok:
        if self.state != "idle":
            raise RemoteError("busy", f"worker {self.settings.worker_id} is {self.state} with {self.model_name}")
        path = Path(req.path)
        self._check_disk_allowed(path)
        loop = asyncio.get_running_loop()
        try:
            tok = await loop.run_in_executor(self.executor, load_tokenizer, path)
            files = await loop.run_in_executor(self.executor, pack_dir, path)
            layers = (await loop.run_in_executor(self.executor, read_config, path)).num_hidden_layers
            # A stage loads only its layers' units (and the embedding or head at either end).
            units = stage_units(req.stage_start, req.stage_end, layers) if req.stage_end else tuple(range(layers + 2))
            dl = await self._open_disk_load(path, req.model, list(units) if req.stage_end else None)
        except (OSError, ValueError, StageError) as e:
            raise RemoteError("load_failed", f"{req.model}: {e}") from None
        if self.state != "idle":
            self._close_disk_load(dl)
            raise RemoteError("busy", f"worker {self.settings.worker_id} became {self.state}")
        try:
            self.ledger.reserve(self.settings.worker_id, weights=sum(dl.unit_nbytes(u) for u in units))
        except MemoryRefused as e:
            self._close_disk_load(dl)
            raise RemoteError("no_memory", f"{req.model}: {e}") from None
        cfg = dl.ckpt.config
        self.state = "loading"
        self.model_name = req.model
        self.model_files = files
        self.num_units = cfg.num_units
        self.units = units
        if req.stage_end:
            self.group, self.stage = req.group, (req.stage_start, req.stage_end)
        self.model = LlamaModel(cfg, self.device)
        # The engine exists from the first unit on: a loading instance serves as the first stage of
        # pipelined routes for the layers it already holds.
        try:
            self.engine = self._make_engine(tok, req)
        except MemoryRefused as e:
            self._close_disk_load(dl)
            await self.drop_model()
            raise RemoteError("no_memory", f"{req.model}: {e}") from None
        self._load_task = self.tasks.spawn(self.load_from_disk(req, dl), f"load-{req.model}")
        self.log.info(
            "load_started", model=req.model, path=str(path), decision=req.decision_id, source=dl.source,
            local_cache=dl.note,
        )  # fmt: skip
        await self._announce_loading()
        return Ok(f"loading {req.model}")

    async def load_from_disk(self, req: LoadModel, dl: DiskLoad) -> None:
        """Load unit by unit, front to back, announcing each as it becomes usable."""
        loop = asyncio.get_running_loop()
        model = self.model
        assert model is not None
        self.load_started = time.monotonic()
        self.load_bytes = 0
        try:
            for unit in self.units:
                # The emulated disk's (or host link's) pace: a unit is usable only once it could have arrived.
                await pace(self.load_started, self.load_bytes + dl.unit_nbytes(unit), dl.mb_s)

                # Pages in off the engine thread; the copy into the model's own memory on it.
                await loop.run_in_executor(self.executor, dl.prefetch, unit)
                await self.runner.call(_install_from, model, dl, unit)
                self.load_bytes += dl.unit_nbytes(unit)
                self.load_mb_s = self.load_bytes / 1e6 / max(time.monotonic() - self.load_started, 1e-6)
                await self.publish_ready(unit)
            if self.state == "loading":
                self.state = "serving"
            self.log.info(
                "model_ready", model=req.model, units=len(self.units), group=self.group, stage=list(self.stage),
                mb=round(self.load_bytes / 1e6, 1),
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
            await self._beat()

    def _check_disk_allowed(self, path: Path) -> None:
        """With --model-source network, any read of a model store is an error naming the path."""
        if self.settings.model_source == "network":
            raise RemoteError(
                "load_failed",
                f"worker {self.settings.worker_id} has --model-source network: it does not read the model store "
                f"at {path}; send the model over the data plane (host cache or a live peer)",
            )

    async def _open_disk_load(self, path: Path, model: str, units: list[int] | None) -> DiskLoad:
        """Open a disk load of `units` (None: all): from the local cache when it holds the checkpoint."""
        loop = asyncio.get_running_loop()
        dl = await loop.run_in_executor(
            self.executor, self.local_cache.open_load, path, model, units, self.settings.load_mb_s
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
        self.model_files = None
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.model = None
        had = self.model_name is not None
        if had:
            await self.publish_ready(-1, reset=True)
        self.model_name = None
        self.num_units = 0
        self.ready.clear()
        self.group, self.stage, self.units = "", (0, 0), ()
        self.ledger.release(self.settings.worker_id)
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
            raise RemoteError("not_holder", f"worker {self.settings.worker_id} does not serve {order.model}")
        missing = [u for u in order.units if u not in self.ready]
        if missing or not order.downstream:
            raise RemoteError("bad_order", f"send {order.transfer_id}: units {missing[:3]} not held or no downstream")
        if order.transfer_id in self.sends:
            raise RemoteError("bad_order", f"already sending {order.transfer_id}")
        if self._live_source is None:
            # One source per held model: it caches each unit's CRC across the chains it heads.
            live = LiveModelSource(order.model, model)
            self._live_source = live if self.model_files is None else WithModelFiles(live, self.model_files)
        task = self.tasks.spawn(self._send(order, self._live_source), f"send-{order.transfer_id}")
        self.sends[order.transfer_id] = task
        self.log.info(
            "send_started", transfer=order.transfer_id, to=order.downstream, units=len(order.units),
            rate_limit_mb_s=round(order.rate_limit_bps / 1e6, 1),
        )  # fmt: skip
        return Ok(f"sending {len(order.units)} units of {order.model}")

    async def _send(self, order: TransferOrder, source: LiveModelSource | WithModelFiles) -> None:
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
        if order.role == "disk":
            self._check_disk_allowed(Path(order.path))
        # A model whose files are still on their way (they come with unit 0) is being loaded too.
        fresh = self.model is None and not (self.state == "loading" and self.model_name == order.model)
        if fresh:
            if self.state != "idle":
                raise RemoteError("busy", f"worker {self.settings.worker_id} is {self.state}")
            path = Path(order.path) if order.path else None
            built: tuple[ModelConfig, Tokenizer, ModelFiles] | None = None
            if order.role == "disk" or (path is not None and await self._sees_model_store(path)):
                assert path is not None
                try:
                    built = await loop.run_in_executor(self.executor, _read_model_files, path)
                except (OSError, ValueError) as e:
                    raise RemoteError("load_failed", f"{order.model}: {e}") from None
                if built[0].num_units != order.num_units:
                    raise RemoteError("bad_order", f"{tid}: {order.num_units} units, {path} has {built[0].num_units}")
            if self.model is not None or self.state != "idle":
                raise RemoteError("busy", f"worker {self.settings.worker_id} became {self.state}")
            try:
                self.ledger.reserve(self.settings.worker_id, weights=sum(order.unit_nbytes))
            except MemoryRefused as e:
                raise RemoteError("no_memory", f"{order.model}: {e}") from None
            self.state = "loading"
            self.model_name = order.model
            self.num_units = order.num_units
            self.load_started = time.monotonic()
            self.load_bytes = 0
            if built is not None:
                try:
                    self._build(order, *built)
                except MemoryRefused as e:
                    await self.drop_model()
                    raise RemoteError("no_memory", f"{order.model}: {e}") from None
            else:
                self.log.info(
                    "model_files_expected", model=order.model, transfer=tid, model_source=self.settings.model_source
                )
        elif self.state != "loading" or self.model_name != order.model:
            # Only a load of the same model may be continued (a re-plan after a broken chain).
            raise RemoteError("busy", f"worker {self.settings.worker_id} is {self.state} with {self.model_name}")
        elif self.model is None and order.role == "disk":
            # A disk re-plan of a load whose files never came: read them where the order says.
            try:
                built = await loop.run_in_executor(self.executor, _read_model_files, Path(order.path))
            except (OSError, ValueError) as e:
                raise RemoteError("load_failed", f"{order.model}: {e}") from None
            self._build(order, *built)
        if self.inbound is not None:
            # Let the old transfer finish installing the unit in hand, so `held` below is exact and
            # no unit is announced twice.
            await self._stop_inbound(self.inbound, f"superseded by {tid}")
        held = set(self.ready)
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
        await self._announce_loading()
        return Ok(f"{order.role} {tid}: {len(order.units)} units of {order.model}")

    async def _announce_loading(self) -> None:
        """A heartbeat now, not at the next tick of the periodic one: the mesh counts this worker
        as an instance of its model from the order on. A scaler whose loader died right after
        sending the order drops the decision and decides again only if the gap is still there; it
        must see this load to know it is not (tests/test_control_restart.py), and a restarted
        loader can be up in half a second, before the next periodic beat."""
        try:
            await self._beat()
        except Exception as e:  # the broker away: the periodic beat tells it later
            self.log.warning("heartbeat_failed", error=repr(e))

    async def _stop_inbound(self, inb: Inbound, reason: str) -> None:
        inb.superseded = True
        inb.replaced.set()
        if inb.reception is not None:
            inb.reception.cancel(reason)
        inb.queue.put_nowait(("stop",))
        if inb.task is not None and inb.task is not asyncio.current_task():
            await asyncio.wait([inb.task])

    async def _install_unit(self, inb: Inbound, unit: int, tensors: dict[str, torch.Tensor], copy: bool) -> None:
        """Install one verified unit on the engine thread (between two steps), then announce it."""
        model = self.model
        if model is None:
            raise TransferError("model dropped")
        await self.runner.call(model.load_unit, unit, tensors, copy)
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
                    tensors = await self._take_files(inb, item[1], item[2])
                    # The data plane's buffers become the weights: no copy when dtype and device match.
                    await self._install_unit(inb, item[1], tensors, copy=False)
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

    async def _sees_model_store(self, path: Path) -> bool:
        """Whether this worker reads config and tokenizer at `path` itself (else they come over the
        data plane with unit 0): never with --model-source network, nor where the path is not visible."""
        if self.settings.model_source == "network":
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, (path / "config.json").is_file)

    def _build(self, order: TransferOrder, cfg: ModelConfig, tok: Tokenizer, files: ModelFiles) -> None:
        """The (empty) model and its engine, once config and tokenizer are known."""
        self.model_files = files
        self.model = LlamaModel(cfg, self.device)
        # As for a disk load: a loading instance serves as a first stage for what it holds.
        self.engine = self._make_engine(tok, order)

    async def _take_files(self, inb: Inbound, unit: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unit 0's tensors without the model files it carries; builds the model from those files
        when this worker could not read them itself (they are written to its files dir first)."""
        tensors, blob = split_files(tensors)
        if self.model is not None:
            return tensors
        order = inb.order
        if unit != 0 or blob is None:
            raise TransferError(
                f"{order.model}: unit {unit} arrived without the model files, and {order.path or 'no path'} is not "
                "readable here"
            )
        loop = asyncio.get_running_loop()
        dest_root = self.settings.model_files_dir
        try:
            built = await loop.run_in_executor(
                self.executor, _receive_model_files, blob.numpy().tobytes(), dest_root, order.model
            )
        except (OSError, ValueError) as e:
            raise TransferError(f"{order.model}: model files from the data plane: {e}") from None
        cfg, tok, files, dest = built
        if cfg.num_units != order.num_units:
            raise TransferError(
                f"{order.model}: {order.num_units} units ordered, the received config has {cfg.num_units}"
            )
        if inb.superseded or self.state != "loading" or self.model_name != order.model:
            raise TransferError("model dropped")
        try:
            self._build(order, cfg, tok, files)
        except MemoryRefused as e:
            raise TransferError(f"{order.model}: {e}") from None
        self.log.info(
            "model_files_received",
            model=order.model,
            files=len(files.names),
            kb=round(files.nbytes / 1e3, 1),
            dir=str(dest),
        )
        return tensors

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
                await loop.run_in_executor(self.executor, dl.prefetch, unit)
                tensors = await self.runner.call(dl.unit_tensors, unit)
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
        if model is None or len(self.ready) < self.num_units:
            have = len(self.ready)
            await self._inbound_failed(inb, f"transfer ended with {have} of {self.num_units} units")
            return
        if self.state == "loading":
            self.state = "serving"
        await self._beat()
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
        await self._beat()
        try:
            await asyncio.wait_for(inb.replaced.wait(), inb.order.timeout_s)
        except TimeoutError:
            if self.inbound is inb:
                self.log.warning("transfer_abandoned", transfer=inb.order.transfer_id, units_held=held)
                self.inbound = None
                await self.drop_model()
                await self._beat()

    def _units_held(self) -> int:
        """Units held front to back (transfers fill models in that order)."""
        n = 0
        while n < self.num_units and n in self.ready:
            n += 1
        return n

    async def publish_transfer(
        self, order: TransferOrder, kind: str, *, reason: str = "", nbytes: int = 0, seconds: float = 0.0
    ) -> None:
        ev = TransferEvent(
            worker_id=self.settings.worker_id,
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
        await self.nc.publish(self.subjects.transfer_event(self.settings.worker_id), encode(ev))

    async def on_unload(self, req: UnloadModel) -> Ok:
        if self.state == "idle":
            return Ok("already idle")
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self.state = "draining"
        await self._beat()
        await self.idle.wait()
        model = self.model_name
        await self.drop_model()
        await self._beat()
        self.log.info("unloaded", model=model, decision=req.decision_id)
        return Ok(f"unloaded {model}")


def _read_model_files(path: Path) -> tuple[ModelConfig, Tokenizer, ModelFiles]:
    """Config, tokenizer and the packed small files of the checkpoint at `path` (blocking)."""
    return read_config(path), load_tokenizer(path), pack_dir(path)


def _receive_model_files(blob: bytes, root: Path, model: str) -> tuple[ModelConfig, Tokenizer, ModelFiles, Path]:
    """Check and write the files received with unit 0 under `root`, then read the model from
    there as from a checkpoint folder (blocking). One folder per set of files, named by digest."""
    files = unpack(blob)
    packed = ModelFiles(blob, tuple(files))
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model)
    dest = write_files(files, root / f"{safe}-{packed.digest[:16]}")
    return read_config(dest), load_tokenizer(dest), packed, dest
