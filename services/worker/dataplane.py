"""The worker's parameter data plane: receive, verify and forward model units over direct TCP.

Each worker runs one `DataPlaneServer` (its address goes into the heartbeat's `data_addr`). The
loader tells the worker, over NATS, which transfer to expect (`cascade.messages.TransferOrder`:
transfer id, token, units, downstream hop); `DataPlaneServer.expect` arms that. A connection for
an unknown transfer or with a wrong token is refused before a byte of payload is read, so nothing
is written. An accepted connection is received unit by unit (front to back) into one buffer per
unit; every chunk goes on to the downstream hop as soon as it is in, sent from the same memory
by a forwarding thread (`cascade.framing.Forwarder`) while the receiving thread is already back at
the socket (or, with `relay=True`, spliced in the kernel by `cascade.framing.TeeRelay`); a
unit is handed to `on_unit_ready` only after its CRC matched. A source streams units with
`send_units` (cascade.framing, shared with the loader's host cache) from a `Checkpoint` (disk, or
the host cache's mmap) or, with `TensorSource`, a live worker's tensors.

Threads, not asyncio streams: each connection is served by a dedicated thread doing blocking
`recv_into` on memoryviews, which releases the GIL, and results reach the event loop via
`loop.call_soon_threadsafe`. Measured on the 2-core dev VM, one 512 MB loopback stream into a
preallocated buffer: 2.1-2.3 GB/s with a blocking thread, 1.1-1.3 GB/s with asyncio
`StreamReader.read` (an extra copy per chunk and loop overhead per read).

Per chunk a forwarding receiver does one wake-up (SO_RCVLOWAT at the read's size:
`_TcpChannel.batch_reads`), one kernel copy into the unit buffer, the CRC on this same thread
while the bytes are still in cache, and hands a view of them to the forwarding thread, which sends
it (the kernel's second copy) with no wait on the receiving side: the unit buffer, which holds the
whole unit anyway, is the queue between them, so a slow or descheduled next hop never holds up this
one or the hops before it. bench/results/multicast.notes.md has the profile behind this.

The socket work sits behind `cascade.framing.Transport` (listen/connect → byte `Channel`s) so an NCCL or
CUDA-IPC transport can replace TCP without touching the framing, ordering and auth logic.

Same-host hops skip the sockets' copies (`cascade.shmhop`): after the token check the server
offers a same-host link, and an upstream on this host (same --host-id, boot and network
namespace; not paced) switches to it; then this hop copies each unit straight out of the
upstream's shared memory (one memcpy, CRC over its own copy) and passes every message of that
link on to a same-host next hop as it arrives, so that hop copies from the same memory at once.
A hop fed over TCP tells a same-host next hop where its own unit buffers are and how far they are
filled (`_ShmForwarder`), so that hop copies out of them. CPU unit buffers are anonymous memfds
for that (`shmhop.shared_array`). A hop keeps TCP towards any peer that is not same-host or
cannot connect the link, and on the benchmark's emulated links (an egress limiter stands for
another host).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch

from cascade import shmhop
from cascade.framing import (
    DEFAULT_CHUNK,
    Channel,
    CheckpointSource,
    ConnHeader,
    Forwarder,
    FramingError,
    Listener,
    RateLimiter,
    SendStats,
    SwitchToShm,
    TcpTransport,
    TeeRelay,
    TensorMeta,
    TransferError,
    Transport,
    TruncatedStream,
    UnitHeader,
    UnitSource,
    crc32,
    encode_crc,
    encode_status,
    encode_switch,
    read_conn_header,
    read_crc,
    read_status,
    read_unit_header,
    recv_unit_body,
    send_units,
    verify_crc,
)
from cascade.messages import TransferOrder
from cascade.models.checkpoint import DTYPE_NAMES, DTYPES
from cascade.models.config import unit_tensor_names
from services.worker.model import LlamaModel, layer_unit_tensors

# The sending half is shared with the loader's host cache, so it lives in the common package;
# re-exported so the worker needs one import.
__all__ = [
    "Channel",
    "CheckpointSource",
    "DataPlaneServer",
    "Listener",
    "LiveModelSource",
    "RateLimiter",
    "ReceiveStats",
    "Reception",
    "SendStats",
    "TcpTransport",
    "TensorSource",
    "TransferError",
    "Transport",
    "UnitSource",
    "load_units_local",
    "model_unit_tensors",
    "send_units",
    "send_units_async",
    "tensor_bytes",
    "unit_crc",
]

log = structlog.get_logger()

UnitTensors = dict[str, torch.Tensor]
OnUnitReady = Callable[[int, UnitTensors], None]
OnFailed = Callable[[str], None]

# Room for the per-tensor alignment padding of a unit's layout on top of its payload bytes
# (ALIGN - 1 bytes per tensor at most; units hold a handful of tensors).
_LAYOUT_SLACK = 64 * 64


def _fresh(nbytes: int) -> np.ndarray:
    """A unit buffer. Allocated by torch, not numpy: numpy asks for transparent huge pages on
    large arrays, and where the kernel compacts memory for them on the first fault (THP defrag
    "madvise", this VM's setting) first touch ran 2-5x slower (0.5-1.4 vs 2.1-3.4 GB/s, 2 GB in
    47 MB pieces in a fresh process). The array keeps the tensor, and so the memory, alive."""
    return torch.empty(max(nbytes, 1), dtype=torch.uint8).numpy()[:nbytes]


def _touched(nbytes: int, shared: bool = False) -> np.ndarray:
    if shared:
        return shmhop.shared_array(nbytes)
    buf = _fresh(nbytes)
    buf.fill(0)  # the write faults every page in now, not inside the socket copy
    return buf


# How long a freshly accepted connection may take to present its header: a stray client (a port
# scanner, a wrong service) must not hold an accept thread for long.
HEADER_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- live sources


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor without a copy (a copy only if it is not contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        # A device-resident source stages through host memory here. A CUDA IPC / NCCL transport
        # would send from device memory directly; untested on this CPU-only machine.
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


class TensorSource:
    """Units of a live worker's model: `units[u]` maps tensor name → tensor (as `on_unit_ready`
    delivered them, or as the worker loaded them)."""

    def __init__(self, model: str, units: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        self.model = model
        self.units = units
        self.crcs: dict[int, int] = {}

    def unit(self, unit: int) -> list[tuple[TensorMeta, memoryview]]:
        out = []
        for name, t in self.units[unit].items():
            raw = tensor_bytes(t)
            out.append((TensorMeta(name, DTYPE_NAMES[t.dtype], tuple(t.shape), len(raw)), raw))
        return out


_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_unit_tensors(model: LlamaModel, unit: int) -> dict[str, torch.Tensor]:
    """One unit of a live `LlamaModel` by checkpoint tensor name (the model keeps its weights
    unfused, in checkpoint layout and order, so this is a lookup, not a conversion)."""
    cfg = model.cfg
    if 1 <= unit <= cfg.num_hidden_layers:
        w = model.layers.get(unit - 1)
        if w is None:
            raise KeyError(f"unit {unit} is not held")
        return layer_unit_tensors(cfg, unit - 1, w)
    held = [model.embed] if unit == 0 else [model.norm, model.lm_head]
    if any(t is None for t in held):
        raise KeyError(f"unit {unit} is not held")
    return {n: t for n, t in zip(unit_tensor_names(cfg, unit), held, strict=True) if t is not None}


class LiveModelSource:
    """A serving worker's model as a chain head: units are read from the very tensors the model
    computes with (immutable while held; the engine thread only reads them too).

    When the compute dtype differs from the checkpoint's (a bfloat16 checkpoint computed in float32
    on a CPU), each tensor is cast back on the way out to the dtype it arrived in, so receivers get
    the checkpoint's dtype and size; float upcasts round-trip exactly."""

    def __init__(self, name: str, model: LlamaModel) -> None:
        self.model = name
        self._llama = model
        self._wire = _WIRE_DTYPES.get(model.cfg.torch_dtype, model.dtype)
        self.crcs: dict[int, int] = {}

    def unit(self, unit: int) -> list[tuple[TensorMeta, memoryview]]:
        out = []
        for name, t in model_unit_tensors(self._llama, unit).items():
            wire = self._llama.source_dtypes.get(name, self._wire)
            if t.dtype != wire and t.is_floating_point():
                t = t.to(wire)
            raw = tensor_bytes(t)
            out.append((TensorMeta(name, DTYPE_NAMES[t.dtype], tuple(t.shape), len(raw)), raw))
        return out


async def send_units_async(source: UnitSource, order: TransferOrder, **kw: Any) -> SendStats:
    """`send_units` for a "send" order, on its own thread; cancelling the task stops the send."""
    if order.downstream is None:
        raise TransferError(f"send order {order.transfer_id} has no downstream")
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(
            send_units,
            source,
            order.downstream,
            order.transfer_id,
            order.token,
            order.units,
            rate_limit_bps=order.rate_limit_bps,
            cancel=cancel,
            timeout_s=order.timeout_s,
            **kw,
        )
    finally:
        cancel.set()


# --------------------------------------------------------------------------- receiving


def _unit_tensors(header: UnitHeader, buf: np.ndarray, offsets: list[int]) -> UnitTensors:
    out: UnitTensors = {}
    for meta, off in zip(header.tensors, offsets, strict=True):
        dtype = DTYPES[meta.dtype]
        if meta.nbytes == 0:
            out[meta.name] = torch.empty(meta.shape, dtype=dtype)
            continue
        count = meta.nbytes // dtype.itemsize
        # A view of the unit buffer (which the tensor keeps alive): no copy after the socket's.
        out[meta.name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=off).view(meta.shape)
    return out


class _DeviceStager:
    """Receiving for tensors that live on a CUDA device: the socket writes into pinned host memory,
    which is then copied to one device buffer per unit, and tensors are views of that.

    UNTESTED here (this machine has no GPU); the tests exercise the CPU path only. On one host a
    CUDA-IPC transport, or NCCL between hosts, would write device memory directly instead."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None

    def buffer(self, nbytes: int) -> np.ndarray:
        if self._pinned is None or self._pinned.numel() < nbytes:
            self._pinned = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return self._pinned[:nbytes].numpy()

    def to_device(self, header: UnitHeader, offsets: list[int], total: int) -> UnitTensors:
        assert self._pinned is not None
        dev = torch.empty(total, dtype=torch.uint8, device=self.device)
        # Synchronous copy: the pinned buffer is reused by the next unit.
        dev.copy_(self._pinned[:total])
        out: UnitTensors = {}
        for meta, off in zip(header.tensors, offsets, strict=True):
            dtype = DTYPES[meta.dtype]
            out[meta.name] = dev[off : off + meta.nbytes].view(dtype).view(meta.shape)
        return out


@dataclass(slots=True)
class ReceiveStats:
    transfer_id: str
    nbytes: int = 0
    units_ready: list[int] = field(default_factory=list)
    t_armed: float = 0.0
    t_connected: float | None = None
    t_first_unit: float | None = None
    t_done: float | None = None
    reserve_s: float = 0.0
    reserve_ahead_s: float = 0.0  # reserving the later units on a thread, while the stream ran
    forwarded: bool = False
    forward_error: str | None = None
    # How unit bodies went downstream: "relay" (spliced in the kernel, see cascade.framing.TeeRelay),
    # "copy" (received into the buffer, then sent from it) or "shm" (a same-host next hop copied
    # them out of the buffer, cascade.shmhop); None when there was no downstream.
    forward_path: str | None = None
    relayed: int = 0  # payload bytes the relay spliced downstream
    # How the units came in: "tcp", or "shm" (copied from a same-host upstream's memory).
    receive_path: str = "tcp"


class Reception:
    """One expected incoming transfer. Callbacks run on `loop` (via call_soon_threadsafe) when one
    was given or running at `expect()`, else on the data-plane thread itself."""

    def __init__(
        self,
        order: TransferOrder,
        on_unit_ready: OnUnitReady,
        on_failed: OnFailed,
        on_complete: Callable[[ReceiveStats], None] | None,
        on_forward_failed: OnFailed | None,
        loop: asyncio.AbstractEventLoop | None,
        have: Collection[int],
        device: torch.device | None,
        forget: Callable[[Reception], None],
        shared: bool = False,
    ) -> None:
        self.order = order
        # Unit buffers in shared memory (cascade.shmhop), so a same-host next hop copies straight
        # out of them; only for CPU tensors on a server that offers same-host links.
        self.shared = shared and (device is None or device.type == "cpu")
        # The same-host link the upstream may switch to: the nonce it must present (set when the
        # offer goes out) and the link once it did.
        self.shm_nonce: str | None = None
        self._shm_link: shmhop.ShmLink | None = None
        self._shm_arrived = threading.Event()
        self._forget = forget
        self.stats = ReceiveStats(order.transfer_id, t_armed=time.monotonic())
        self.error: str | None = None
        self.done = threading.Event()
        self._on_unit_ready = on_unit_ready
        self._on_failed = on_failed
        self._on_complete = on_complete
        self._on_forward_failed = on_forward_failed
        self._loop = loop
        self._have = frozenset(have)
        self._device = device
        self._lock = threading.Lock()
        self._finished = False
        self._connected = False
        self._channels: list[Channel | shmhop.ShmLink] = []
        self._reserved: dict[int, np.ndarray] = {}
        # Units a background thread is still reserving (reserve-ahead); signalled per unit.
        self._reserving: set[int] = set()
        self._reserved_cv = threading.Condition(self._lock)
        self._future: asyncio.Future[ReceiveStats] | None = loop.create_future() if loop is not None else None
        self._timer: threading.Timer | None = None

    # ---- callbacks ------------------------------------------------------------------------
    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            fn(*args)
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            log.warning("dataplane_loop_closed", transfer=self.order.transfer_id)

    def _settle(self) -> None:
        fut = self._future
        if fut is None or fut.done():
            return
        if self.error is None:
            fut.set_result(self.stats)
        else:
            fut.set_exception(TransferError(self.error))
            # Reported already (transfer_failed, on_failed): a reception nobody awaits any more (its
            # transfer re-planned) must not be logged again as "exception was never retrieved".
            # Whoever awaits `wait()` still gets the error.
            fut.exception()

    def fail(self, reason: str) -> None:
        """End the reception with `reason` (once; later calls and late units are ignored)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self.error = reason
            channels = list(self._channels)
            self._reserved.clear()
            self._reserving.clear()
            self._reserved_cv.notify_all()
        if self._timer is not None:
            self._timer.cancel()
        for ch in channels:
            ch.shutdown()
        self._forget(self)
        log.info("transfer_failed", transfer=self.order.transfer_id, reason=reason)
        self._post(self._on_failed, reason)
        self._post(self._settle)
        self.done.set()

    def cancel(self, reason: str = "cancelled") -> None:
        self.fail(reason)

    def _abandon(self) -> None:
        """Never armed: stop reserving and free the buffers, with no callbacks."""
        with self._lock:
            self._finished = True
            self._reserved.clear()
            self._reserving.clear()
            self._reserved_cv.notify_all()

    async def wait(self) -> ReceiveStats:
        """Until complete (raises TransferError on failure). Needs the loop given at `expect()`."""
        if self._future is None:
            raise RuntimeError("this reception was armed without an event loop; use done.wait()")
        return await self._future

    def _reserve(self, ahead: bool = False) -> float:
        """Allocate and touch one buffer per announced unit; returns the seconds it took.

        `ahead`: reserve only the first unit now and the rest on a thread, in stream order, so the
        stream can start at once and the first units are usable before the last is even reserved;
        the receiving thread waits for a unit's buffer only if the stream overtakes the reserver."""
        t0 = time.monotonic()
        todo = [(u, n) for u, n in zip(self.order.units, self.order.unit_nbytes, strict=False) if u not in self._have]
        now, later = (todo[:1], todo[1:]) if ahead else (todo, [])
        for u, nbytes in now:
            self._reserved[u] = _touched(nbytes + _LAYOUT_SLACK, self.shared)
        if later:
            self._reserving = {u for u, _ in later}
            threading.Thread(target=self._reserve_rest, args=(later,), name="dataplane-reserve", daemon=True).start()
        return time.monotonic() - t0

    def _reserve_rest(self, units: list[tuple[int, int]]) -> None:
        t0 = time.monotonic()
        try:
            for u, nbytes in units:
                with self._lock:
                    if self._finished:
                        return
                buf = _touched(nbytes + _LAYOUT_SLACK, self.shared)
                with self._reserved_cv:
                    if self._finished:
                        return
                    self._reserved[u] = buf
                    self._reserving.discard(u)
                    self._reserved_cv.notify_all()
            self.stats.reserve_ahead_s = time.monotonic() - t0
        finally:
            with self._reserved_cv:
                self._reserving.clear()
                self._reserved_cv.notify_all()

    def _buffer(self, unit: int, total: int) -> np.ndarray:
        with self._reserved_cv:
            while unit in self._reserving and not self._finished:
                self._reserved_cv.wait()
            buf = self._reserved.pop(unit, None)
        if buf is None or len(buf) < total:
            # Not reserved (no sizes in the order, or a unit whose tensors pad out more than the
            # slack): allocate now, leaving the faults to the socket copy.
            return shmhop.shared_array(total) if self.shared else _fresh(total)
        return buf

    # ---- the data-plane thread side ---------------------------------------------------------
    def _claim(self, chan: Channel) -> bool:
        with self._lock:
            if self._finished or self._connected:
                return False
            self._connected = True
            self._channels.append(chan)
        if self._timer is not None:
            self._timer.cancel()
        self.stats.t_connected = time.monotonic()
        return True

    def _attach_shm(self, nonce: str, link: shmhop.ShmLink) -> bool:
        """The upstream's same-host link, if it carries the nonce of our offer (else refused)."""
        with self._lock:
            want = self.shm_nonce
            if self._finished or want is None or self._shm_link is not None or not shmhop.nonce_ok(nonce, want):
                return False
            self._shm_link = link
            self._channels.append(link)
        self._shm_arrived.set()
        return True

    def _wait_shm(self, timeout_s: float) -> shmhop.ShmLink:
        if not self._shm_arrived.wait(timeout_s) or self._shm_link is None:
            raise TransferError("the upstream switched to a same-host link that never connected")
        return self._shm_link

    def _track(self, chan: Channel | shmhop.ShmLink) -> bool:
        with self._lock:
            if self._finished:
                return False
            self._channels.append(chan)
            return True

    def _unit_ready(self, unit: int, tensors: UnitTensors) -> bool:
        with self._lock:
            if self._finished:
                return False
        if self.stats.t_first_unit is None:
            self.stats.t_first_unit = time.monotonic()
        self.stats.units_ready.append(unit)
        if unit not in self._have:
            self._post(self._on_unit_ready, unit, tensors)
        return True

    def _complete(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self.stats.t_done = time.monotonic()
        self._forget(self)
        if self._on_complete is not None:
            self._post(self._on_complete, self.stats)
        self._post(self._settle)
        self.done.set()

    def _forward_failed(self, reason: str) -> None:
        self.stats.forward_error = reason
        log.info("forward_failed", transfer=self.order.transfer_id, reason=reason)
        if self._on_forward_failed is not None:
            self._post(self._on_forward_failed, reason)


class DataPlaneServer:
    """A worker's data-plane endpoint: accepts chain connections for the transfers it expects."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        transport: Transport | None = None,
        chunk: int = DEFAULT_CHUNK,
        egress: RateLimiter | None = None,
        relay: bool = False,
        shm: bool = True,
        host_id: str | None = None,
    ) -> None:
        self._host, self._port, self._advertise = host, port, advertise_host
        # Same-host hops through shared memory (cascade.shmhop): offered to upstreams, and used
        # towards downstreams that offer it, when they are on this host (`host_id`: the worker's
        # --host-id, default the hostname). Not with an emulated egress link (it stands for
        # another host) nor the kernel relay (which is there to measure TCP forwarding).
        self._shm = shm and egress is None and not relay and shmhop.available()
        if host_id is not None:
            shmhop.set_default_host_id(host_id)  # this process's chain-head sends compare the same
        self._host_key = shmhop.host_key(host_id)
        self._shm_listener: shmhop.ShmListener | None = None
        # Forward unit bodies in the kernel (`TeeRelay`) where the transport allows. Off by
        # default: on loopback on the 2-core dev VM it saved the send copy but spent as much CPU
        # on page-sized splices and made 3-hop chains slower (bench/results/multicast.md, the
        # chain-relay rows); with a NIC per host it is the path that keeps payload out of user
        # space on the way out, and the benchmark is how to decide.
        self._relay = relay
        self._transport = transport or TcpTransport()
        self._chunk = chunk
        # Only the benchmark sets this (emulating a NIC's egress on forwarded bytes).
        self._egress = egress
        self._listener: Listener | None = None
        self._expected: dict[str, Reception] = {}
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._open: set[Channel] = set()
        self._closing = threading.Event()
        self.refused = 0  # connections refused (bad token, unknown transfer, bad header)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> str:
        """Bind and start accepting; returns the data address to publish as `data_addr`."""
        if self._listener is None:
            self._listener = self._transport.listen(self._host, self._port, self._advertise)
            self._spawn(self._accept_loop, "dataplane-accept")
            if self._shm:
                try:
                    self._shm_listener = shmhop.ShmListener()
                except OSError as e:
                    log.warning("dataplane_shm_unavailable", error=str(e))
                    self._shm = False
                else:
                    self._spawn(self._accept_shm_loop, "dataplane-accept-shm")
        return self._listener.address

    @property
    def address(self) -> str:
        if self._listener is None:
            raise RuntimeError("DataPlaneServer not started")
        return self._listener.address

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, fail every reception still running, and join the threads. Idempotent."""
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        if self._shm_listener is not None:
            self._shm_listener.close()
        with self._lock:
            pending = list(self._expected.values())
            self._expected.clear()
            chans = list(self._open)
        for r in pending:
            r.fail("data plane closed")
        for ch in chans:
            ch.shutdown()
        deadline = time.monotonic() + timeout_s
        for t in list(self._threads):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> DataPlaneServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- arming -------------------------------------------------------------------------------
    def expect(
        self,
        order: TransferOrder,
        on_unit_ready: OnUnitReady,
        on_failed: OnFailed,
        *,
        on_complete: Callable[[ReceiveStats], None] | None = None,
        on_forward_failed: OnFailed | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        have: Collection[int] = (),
        device: torch.device | None = None,
        reserve: bool = True,
        reserve_ahead: bool = False,
    ) -> Reception:
        """Arm a "receive" order: accept its one connection, report each verified unit in order.

        `have`: units this worker already holds (a re-plan may resend them): received and
        forwarded, not reported again. `device`: where tensors should live (default CPU).
        `reserve`: when the order carries `unit_nbytes`, allocate and touch every unit's buffer
        before returning (blocking: call it from a thread; the worker answers the order after
        it, and the loader starts the source only once every receiver answered). Fresh memory
        costs more to fault in than to copy into, so this keeps faults out of the transfer.
        `reserve_ahead`: reserve only the first unit before returning and the rest on a thread
        while the stream runs (what a worker does: its first layers are usable that much sooner,
        and the whole load costs about max(reserve, transfer) instead of their sum).
        `on_failed` fires once, for a broken stream, a bad unit, or no connection within
        `order.timeout_s`; nothing is reported after it. `on_forward_failed` says the downstream
        hop went away: this worker keeps receiving for itself, the loader re-plans the rest."""
        if order.role != "receive":
            raise ValueError(f"expect() takes a receive order, got {order.role!r}")
        if loop is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
        r = Reception(
            order, on_unit_ready, on_failed, on_complete, on_forward_failed, loop, have, device, self._forget, self._shm
        )
        if reserve and order.unit_nbytes and (device is None or device.type == "cpu"):
            r.stats.reserve_s = r._reserve(ahead=reserve_ahead)
        with self._lock:
            refused: Exception | None = None
            if self._closing.is_set():
                refused = TransferError("data plane closed")
            elif order.transfer_id in self._expected:
                refused = ValueError(f"transfer {order.transfer_id} is already expected")
            else:
                self._expected[order.transfer_id] = r
        if refused is not None:
            r._abandon()
            raise refused
        r._timer = threading.Timer(
            order.timeout_s, r.fail, args=(f"no connection for transfer {order.transfer_id} within {order.timeout_s}s",)
        )
        r._timer.daemon = True
        r._timer.start()
        return r

    def _forget(self, r: Reception) -> None:
        with self._lock:
            if self._expected.get(r.order.transfer_id) is r:
                del self._expected[r.order.transfer_id]

    # ---- threads ------------------------------------------------------------------------------
    def _spawn(self, fn: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=self._run, args=(fn, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _run(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("dataplane_thread_failed")
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                chan = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                raise
            with self._lock:
                self._open.add(chan)
            self._spawn(self._serve, "dataplane-conn", chan)

    def _accept_shm_loop(self) -> None:
        assert self._shm_listener is not None
        while not self._closing.is_set():
            try:
                conn = self._shm_listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                raise
            # The hello on a thread of its own: a silent stranger must not hold up the next link.
            self._spawn(self._hello_shm, "dataplane-shm-hello", conn)

    def _hello_shm(self, conn: socket.socket) -> None:
        got = shmhop.ShmListener.hello(conn, HEADER_TIMEOUT_S)
        if got is not None:
            tid, nonce, link = got
            with self._lock:
                r = self._expected.get(tid)
            # The nonce went out only on the upstream's TCP connection, after its token was checked.
            if r is None or not r._attach_shm(nonce, link):
                self.refused += 1
                log.warning("dataplane_shm_refused", transfer=tid)
                link.close()

    def _refuse(self, chan: Channel, reason: str) -> None:
        self.refused += 1
        # The peer hears why first: a log sink that fails (a closed stream) must not turn a refusal
        # into a silently dropped connection.
        with contextlib.suppress(OSError):
            chan.sendall(encode_status(False, reason))
        log.warning("dataplane_refused", reason=reason)

    def _serve(self, chan: Channel) -> None:
        try:
            chan.settimeout(HEADER_TIMEOUT_S)
            try:
                hdr = read_conn_header(chan.recv_into)
            except TruncatedStream as e:
                if str(e).startswith("stream ended after 0 "):
                    return  # closed before a byte: a reachability check at start (cascade.advertise)
                self._refuse(chan, f"bad connection header: {e}")
                return
            except (FramingError, OSError) as e:
                self._refuse(chan, f"bad connection header: {e}")
                return
            with self._lock:
                r = self._expected.get(hdr.transfer_id)
            if r is None:
                self._refuse(chan, f"no transfer {hdr.transfer_id!r} expected here")
                return
            # Constant-time compare: the token is the only thing between a stranger and our memory.
            if not hmac.compare_digest(hdr.token.encode(), r.order.token.encode()):
                self._refuse(chan, "bad token")
                return
            if hdr.model != r.order.model or list(hdr.units) != list(r.order.units):
                self._refuse(chan, "model or units differ from the order")
                return
            if not r._claim(chan):
                self._refuse(chan, "transfer already connected or finished")
                return
            self._receive(chan, hdr, r)
        finally:
            with self._lock:
                self._open.discard(chan)
            chan.close()

    def _receive(self, chan: Channel, hdr: ConnHeader, r: Reception) -> None:
        order = r.order
        down: Channel | None = None
        down_shm: shmhop.ShmLink | None = None
        if order.downstream:
            try:
                down = self._transport.connect(order.downstream, order.timeout_s)
                if not r._track(down):
                    down.close()
                    return
                down.settimeout(order.timeout_s)
                down.sendall(hdr.encode())
                ok, reason = read_status(down.recv_into)
                if not ok:
                    raise TransferError(f"downstream {order.downstream} refused: {reason}")
                r.stats.forwarded = True
                if self._shm and r.shared and reason:
                    # A same-host next hop copies straight out of our (shared) unit buffers.
                    down_shm = shmhop.accept_offer(reason, self._host_key, order.transfer_id, order.timeout_s)
                    if down_shm is not None:
                        if not r._track(down_shm):
                            down_shm.close()
                            return
                        down.sendall(encode_switch())
            except (OSError, FramingError, TransferError) as e:
                r._forward_failed(f"downstream {order.downstream}: {e}")
                if down is not None:
                    down.close()
                if down_shm is not None:
                    down_shm.close()
                down = down_shm = None
        try:
            offer = ""
            if self._shm and r.shared and self._shm_listener is not None:
                r.shm_nonce = shmhop.nonce()
                offer = shmhop.Offer(self._host_key, self._shm_listener.name, r.shm_nonce).encode()
            chan.sendall(encode_status(True, offer))
            chan.settimeout(order.timeout_s)
            self._receive_units(chan, hdr, r, down, down_shm)
        except (OSError, FramingError, TransferError) as e:
            r.fail(f"transfer {order.transfer_id}: {type(e).__name__}: {e}")
        finally:
            if down is not None:
                down.close()
            if down_shm is not None:
                down_shm.close()
            if r._shm_link is not None:
                r._shm_link.close()

    def _receive_units(
        self,
        chan: Channel,
        hdr: ConnHeader,
        r: Reception,
        down: Channel | None,
        down_shm: shmhop.ShmLink | None = None,
    ) -> None:
        stager = _DeviceStager(r._device) if r._device is not None and r._device.type == "cuda" else None
        egress = self._egress
        dead = False
        stopping = False  # this reception failed: the downstream is being cut on purpose

        def lost(reason: str) -> None:
            nonlocal dead
            dead = True
            if not stopping and r.error is None:
                r._forward_failed(f"downstream {r.order.downstream} lost: {reason}")

        if down_shm is not None:
            down = None  # the TCP connection only carried the handshake and the switch
        # Unit bodies go downstream in the kernel when both ends are sockets and `relay` is on;
        # then frame headers and CRC trailers, a few bytes each, must go inline, in order with them.
        relay = TeeRelay.between(chan, down, lost, egress) if down is not None and self._relay else None
        # Otherwise every piece goes downstream from the buffer it was received into, on the
        # forwarding thread, while this thread is already back at the socket for the next one.
        fwd = Forwarder(down, lost, egress, self._chunk) if down is not None and relay is None else None
        # To a same-host next hop only where the bytes are and how far: it copies them itself.
        sfwd = _ShmForwarder(down_shm, lost) if down_shm is not None else None
        if down is not None:
            r.stats.forward_path = "relay" if relay is not None else "copy"
        elif sfwd is not None:
            r.stats.forward_path = "shm"
        batch_reads = getattr(chan, "batch_reads", None)
        if relay is None and callable(batch_reads):
            # One wake-up per chunk, not per packet (the relay splices whatever is there instead).
            batch_reads(self._chunk)

        def forward(data: bytes | memoryview) -> None:
            if down is None or dead:
                return
            if fwd is not None:
                fwd.send(data)
                return
            try:
                if egress is not None:
                    egress.acquire(len(data))
                down.sendall(data)
            except OSError as e:
                lost(str(e))

        up: shmhop.ShmLink | None = None
        complete = False
        try:
            for u in hdr.units:
                if up is None:
                    try:
                        uh, raw_header = read_unit_header(chan.recv_into, expect=u)
                    except SwitchToShm:
                        if r.shm_nonce is None:
                            raise FramingError("the sender switched to a same-host link that was not offered") from None
                        up = r._wait_shm(r.order.timeout_s)
                        up.settimeout(r.order.timeout_s)
                        # Same host on both sides: every message goes on to the next hop as it
                        # arrives, so the next hop copies from where we copy from (the source's
                        # memory, or the first hop's that received over TCP), at once, not from
                        # our copy: no hop of a same-host chain waits on the hop before it. Each
                        # still checks the source's CRC over its own copy.
                        up.start_reader(tee=sfwd.relay if sfwd is not None else None)
                        r.stats.receive_path = "shm"
                if up is not None:
                    uh, raw_header, src = up.recv_unit(u)
                if stager is not None and fwd is not None:
                    # The staging buffer is reused per unit: the last unit's bytes must be out.
                    fwd.drain()
                forward(raw_header)
                offsets, total = uh.layout()
                # One buffer per unit, reserved at expect() when the order gave sizes; tensors
                # become views of it.
                buf = stager.buffer(total) if stager is not None else r._buffer(u, total)
                on_chunk: Callable[[memoryview], None] | None = None if down is None else forward
                if sfwd is not None and up is None:
                    sfwd.unit(u, raw_header, buf, offsets, uh)
                    on_chunk = functools.partial(sfwd.progress, u)
                if up is not None:
                    try:
                        crc = up.recv_body(uh, raw_header, src, buf.data, on_chunk=on_chunk, chunk=self._chunk)
                    finally:
                        src.close()  # the upstream's memory is mapped only while one unit is copied
                    sent_crc = up.recv_crc(u)
                    raw_crc = encode_crc(sent_crc)
                else:
                    # Through the relay a body is on its way downstream by the time it is in `buf`.
                    relayed = relay is not None and not dead
                    # The CRC runs on this thread, on each piece just after the kernel wrote it
                    # (still in cache): a CRC thread a chunk behind read it back from memory and
                    # cost a thread wake-up per chunk, as much CPU as the checksum itself on 2
                    # shared cores.
                    crc = recv_unit_body(
                        relay.recv_into if relay is not None and relayed else chan.recv_into,
                        uh,
                        raw_header,
                        buf.data,
                        on_chunk=None if relayed else on_chunk,
                        chunk=self._chunk,
                    )
                    sent_crc, raw_crc = read_crc(chan.recv_into)
                # Forward the sender's CRC as is: the next hop checks the source's checksum.
                forward(raw_crc)
                if sfwd is not None and up is None:
                    sfwd.crc(u, sent_crc)
                verify_crc(uh, crc, sent_crc)
                r.stats.nbytes += uh.nbytes
                if stager is not None:
                    tensors = stager.to_device(uh, offsets, total)
                else:
                    tensors = _unit_tensors(uh, buf, offsets)
                if not r._unit_ready(u, tensors):
                    return
            complete = True
        finally:
            if complete:
                r._complete()
            else:
                # What came in before the failure still goes on (as it would have, sent chunk by
                # chunk), so the next hop reaches its own verdict on the same bytes (a bad
                # checksum, a truncated stream) rather than a cut of ours.
                stopping = True
            if fwd is not None:
                fwd.close()  # the rest goes downstream before the caller closes the channel
            if sfwd is not None:
                sfwd.close()
            if relay is not None:
                r.stats.relayed = relay.spliced
                relay.close()


class _ShmForwarder:
    """Tells a same-host next hop where each unit is in our shared buffers and how much of it is
    in, on a thread of its own (as `Forwarder` does for TCP): a slow or descheduled next hop never
    holds up this one. Progress updates are cumulative, so a queued one is replaced by the next
    rather than queued behind it: the queue stays a few messages per unit however far behind the
    next hop is."""

    def __init__(self, link: shmhop.ShmLink, on_lost: Callable[[str], None]) -> None:
        self._link = link
        self._on_lost = on_lost
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[str, int, Any]] = collections.deque()
        self._closing = False
        self._lost = False
        self._done: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="dataplane-forward-shm", daemon=True)
        self._thread.start()

    def _put(self, kind: str, unit: int, value: Any) -> None:
        with self._cv:
            if self._lost or self._closing:
                _close_fds(_fds_of(kind, value))
                return
            if kind == "prog" and self._queue and self._queue[-1][0] == "prog" and self._queue[-1][1] == unit:
                self._queue[-1] = (kind, unit, value)
            else:
                self._queue.append((kind, unit, value))
            self._cv.notify_all()

    def unit(self, unit: int, raw_header: bytes, buf: np.ndarray, offsets: list[int], header: UnitHeader) -> None:
        where: list[tuple[int, int] | None] = []
        for meta, off in zip(header.tensors, offsets, strict=True):
            w = shmhop.find(buf.data[off : off + meta.nbytes]) if meta.nbytes else None
            if meta.nbytes and w is None:
                raise TransferError(f"unit {unit}: buffer is not shared memory")
            where.append(w)
        self._done[unit] = 0
        self._put("unit", unit, (raw_header, where, []))

    def relay(self, msg: bytes, fds: list[int]) -> None:
        """Pass one message of our same-host upstream on as is (called on its reading thread the
        moment it arrives); its fds are dup-ed: the upstream link's are closed once this hop has
        copied the unit, maybe before this thread sends them."""
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except OSError:
            _close_fds(dups)
            raise
        self._put("raw", 0, (msg, dups))

    def progress(self, unit: int, piece: memoryview) -> None:
        self._done[unit] += len(piece)
        self._put("prog", unit, self._done[unit])

    def crc(self, unit: int, crc: int) -> None:
        self._put("crc", unit, crc)

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                kind, unit, value = self._queue.popleft()
            try:
                if kind in ("unit", "raw"):
                    try:
                        if kind == "unit":
                            self._link.send_unit(unit, value[0], value[1])
                        else:
                            self._link.send_raw(value[0], value[1])
                    finally:
                        _close_fds(_fds_of(kind, value))  # in flight now (or lost): the kernel holds its own
                elif kind == "prog":
                    self._link.send_progress(unit, value)
                else:
                    self._link.send_crc(unit, value)
            except OSError as e:
                with self._cv:
                    self._lost = True
                    for k, _, v in self._queue:
                        _close_fds(_fds_of(k, v))
                    self._queue.clear()
                self._on_lost(f"{type(e).__name__}: {e}")
                return


def _fds_of(kind: str, value: Any) -> list[int]:
    """The dup-ed fds a queued message owns (closed once sent or dropped)."""
    if kind == "unit":
        return list(value[2])
    if kind == "raw":
        return list(value[1])
    return []


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------- disk / local


def load_units_local(
    source: UnitSource,
    units: Sequence[int],
    on_unit_ready: OnUnitReady,
    *,
    cancel: threading.Event | None = None,
    device: torch.device | None = None,
) -> int:
    """The "disk" role: copy `units` from a local source (a checkpoint mmap) into fresh unit
    buffers, reporting each in order; blocking, run it in a thread. Returns the bytes copied.

    Same buffers and layout as a network receive, so disk and multicast are compared like with
    like. No checksum: safetensors carries none, and the bytes never crossed a wire."""
    total_bytes = 0
    for u in units:
        if cancel is not None and cancel.is_set():
            raise TransferError("cancelled")
        pieces = source.unit(u)
        uh = UnitHeader(u, tuple(m for m, _ in pieces))
        offsets, total = uh.layout()
        buf = _fresh(total)
        for (meta, data), off in zip(pieces, offsets, strict=True):
            if meta.nbytes:
                buf[off : off + meta.nbytes] = np.frombuffer(data, dtype=np.uint8)
        total_bytes += uh.nbytes
        tensors = _unit_tensors(uh, buf, offsets)
        if device is not None and device.type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        on_unit_ready(u, tensors)
    return total_bytes


def unit_crc(tensors: Mapping[str, torch.Tensor]) -> int:
    """CRC-32 of a unit's tensor bytes in order (what a sender would frame; for checks and tests)."""
    crc = 0
    for t in tensors.values():
        crc = crc32(tensor_bytes(t), crc)
    return crc
