"""Data-plane wire format: how parameter bytes travel between processes over a byte stream.

One connection carries one transfer, one way (upstream → downstream):

    connection header   magic "CSCD", version, transfer id, token, model, the unit indices to follow
    ← reply             one status byte (+ reason), sent by the receiver before any unit is streamed
    per unit            frame kind "UNIT", unit index, tensor count, unit nbytes;
                        per tensor: name, dtype (safetensors code), shape, nbytes;
                        then the tensors' raw bytes back to back, in header order, no padding;
                        then the CRC-32 (zlib's polynomial) of the unit header and those bytes
    or an abort         frame kind "ABRT" with a reason: the sender gave up; nothing after it

The receiver knows from the connection header how many units follow, so a stream that ends early
is detected as truncated; a unit whose bytes do not match its CRC is never declared complete.
A forwarder re-sends unit frames verbatim (header, the same bytes it received, trailer), so every
hop verifies the checksum the source computed. It sends them from its own buffer on a thread of its
own (`Forwarder`), so receiving never waits on the next hop; between two TCP sockets on Linux it can
instead forward unit bodies in the kernel (`TeeRelay`: splice and tee, one copy per hop into its own
buffer).

The framing itself is pure (no sockets): reading goes through a `recv_into`-shaped callable so the
same code serves a socket, a file or a test buffer. Below it sits what every *sender* shares — the
loader's host cache and a worker both head chains, and services never import each other — the
`Transport` interface with its TCP implementation, the kernel relay a forwarder uses, a rate
limiter, unit sources and `send_units`.
No torch here: the gateway may import this module cheaply.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import functools
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

# The same CRC-32 as zlib's (so the wire format is unchanged), from zlib-ng: folded with
# PCLMULQDQ/VPCLMULQDQ it runs at ~13 GB/s on the dev VM against 3.6 GB/s for the system zlib,
# and a profile of a 3-hop chain had zlib's crc32 as a third of all CPU time. Releases the GIL.
from zlib_ng.zlib_ng import crc32

from cascade.advertise import advertised_host, split_host_port

if TYPE_CHECKING:
    from cascade.models.checkpoint import Checkpoint

MAGIC = b"CSCD"
VERSION = 1
KIND_UNIT = b"UNIT"
KIND_ABORT = b"ABRT"
# Sent where the first unit would go: the rest of the transfer comes over the same-host link the
# receiver offered (cascade.shmhop), not this stream.
KIND_SHM = b"SHMU"
STATUS_OK = 0
STATUS_REFUSED = 1

# Sized so one chunk in flight per hop costs well under a millisecond at loopback speeds while
# keeping per-call Python overhead (a syscall, a crc32 call) small against the bytes moved.
DEFAULT_CHUNK = 1 << 20
# The longest a paced send may run ahead of its rate, as budget banked before it starts.
MAX_BURST_S = 0.01
# Offsets of tensors inside a receiver's unit buffer: aligned so `torch.frombuffer` views of any
# dtype are aligned (and a later device copy can use the fast path).
ALIGN = 64

_CONN = struct.Struct("<4sHHHHI")  # magic, version, len(transfer_id), len(token), len(model), unit count
_UNIT = struct.Struct("<4sIIQ")  # kind, unit index, tensor count, unit nbytes
_TENSOR = struct.Struct("<HBBQ")  # len(name), len(dtype), ndim, nbytes
_CRC = struct.Struct("<I")
_STATUS = struct.Struct("<BH")  # status, len(reason)
_ABORT = struct.Struct("<4sIIQ")  # same size as _UNIT so a frame kind can be read first

# Bounds that stop a corrupt or hostile header from making a receiver allocate absurd memory.
MAX_STR = 4096
MAX_UNITS = 1 << 20
MAX_TENSORS_PER_UNIT = 4096
MAX_NDIM = 16

# Element sizes of the safetensors dtype codes, so a header whose shape disagrees with its byte
# count is refused before any buffer is sized from it.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

RecvInto = Callable[[memoryview], int]


class FramingError(ValueError):
    """A stream that does not follow the format: bad magic, truncated, or a checksum mismatch."""


class TransferError(RuntimeError):
    """A transfer that did not complete; the message says why (refused, peer gone, corrupt...)."""


class TruncatedStream(FramingError):
    """The stream ended before a frame was complete."""


class ChecksumMismatch(FramingError):
    """A unit's bytes do not match the CRC its sender computed."""


class TransferAborted(FramingError):
    """The sender aborted the transfer (the reason is the message)."""


class SwitchToShm(FramingError):
    """The sender moves the rest of the transfer to the same-host link the receiver offered."""


# --------------------------------------------------------------------------- reading helpers


def recv_exact_into(recv_into: RecvInto, view: memoryview) -> None:
    """Fill `view` completely, or raise TruncatedStream."""
    pos, n = 0, len(view)
    while pos < n:
        got = recv_into(view[pos:])
        if got <= 0:
            raise TruncatedStream(f"stream ended after {pos} of {n} bytes")
        pos += got


def recv_exact(recv_into: RecvInto, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact_into(recv_into, memoryview(buf))
    return bytes(buf)


def _str(recv_into: RecvInto, n: int, what: str) -> str:
    if n > MAX_STR:
        raise FramingError(f"{what} of {n} bytes is not plausible")
    try:
        return recv_exact(recv_into, n).decode()
    except UnicodeDecodeError:
        raise FramingError(f"{what} is not UTF-8") from None


# --------------------------------------------------------------------------- connection header


@dataclass(frozen=True, slots=True)
class ConnHeader:
    transfer_id: str
    token: str
    model: str
    units: tuple[int, ...]

    def encode(self) -> bytes:
        tid, tok, mod = self.transfer_id.encode(), self.token.encode(), self.model.encode()
        for s, what in ((tid, "transfer id"), (tok, "token"), (mod, "model")):
            if len(s) > MAX_STR:
                raise FramingError(f"{what} is too long")
        fixed = _CONN.pack(MAGIC, VERSION, len(tid), len(tok), len(mod), len(self.units))
        return fixed + tid + tok + mod + struct.pack(f"<{len(self.units)}I", *self.units)


def read_conn_header(recv_into: RecvInto) -> ConnHeader:
    magic, version, ltid, ltok, lmod, count = _CONN.unpack(recv_exact(recv_into, _CONN.size))
    if magic != MAGIC:
        raise FramingError(f"not a Cascade data-plane stream (magic {magic!r})")
    if version != VERSION:
        raise FramingError(f"data-plane version {version} is not {VERSION}")
    if count > MAX_UNITS:
        raise FramingError(f"{count} units is not plausible")
    tid = _str(recv_into, ltid, "transfer id")
    tok = _str(recv_into, ltok, "token")
    mod = _str(recv_into, lmod, "model")
    units = struct.unpack(f"<{count}I", recv_exact(recv_into, 4 * count))
    return ConnHeader(tid, tok, mod, tuple(units))


def encode_status(ok: bool, reason: str = "") -> bytes:
    r = reason.encode()[:MAX_STR]
    return _STATUS.pack(STATUS_OK if ok else STATUS_REFUSED, len(r)) + r


def read_status(recv_into: RecvInto) -> tuple[bool, str]:
    status, n = _STATUS.unpack(recv_exact(recv_into, _STATUS.size))
    reason = _str(recv_into, n, "reason")
    return status == STATUS_OK, reason


# --------------------------------------------------------------------------- units


@dataclass(frozen=True, slots=True)
class TensorMeta:
    name: str
    dtype: str  # safetensors code: F32, F16, BF16, ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class UnitHeader:
    unit: int
    tensors: tuple[TensorMeta, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def encode(self) -> bytes:
        parts = [_UNIT.pack(KIND_UNIT, self.unit, len(self.tensors), self.nbytes)]
        for t in self.tensors:
            name, dtype = t.name.encode(), t.dtype.encode()
            if len(name) > MAX_STR or len(dtype) > 255 or len(t.shape) > MAX_NDIM:
                raise FramingError(f"tensor {t.name!r}: name, dtype or rank too large to frame")
            parts.append(_TENSOR.pack(len(name), len(dtype), len(t.shape), t.nbytes))
            parts.append(name + dtype + struct.pack(f"<{len(t.shape)}Q", *t.shape))
        return b"".join(parts)

    def layout(self) -> tuple[list[int], int]:
        """Offsets of each tensor in a receiver's unit buffer (aligned to ALIGN), and its total size."""
        offsets, off = [], 0
        for t in self.tensors:
            off += -off % ALIGN
            offsets.append(off)
            off += t.nbytes
        return offsets, off


def encode_switch() -> bytes:
    return _UNIT.pack(KIND_SHM, 0, 0, 0)


def encode_abort(reason: str) -> bytes:
    r = reason.encode()[:MAX_STR]
    return _ABORT.pack(KIND_ABORT, 0, 0, len(r)) + r


def read_unit_header(recv_into: RecvInto, expect: int | None = None) -> tuple[UnitHeader, bytes]:
    """Read the next unit frame header; returns it and its exact bytes (a forwarder re-sends them).

    Raises TransferAborted when the sender aborted instead, FramingError when the unit is not
    `expect` (units arrive in the order the connection header announced)."""
    raw = [recv_exact(recv_into, _UNIT.size)]
    kind, unit, count, nbytes = _UNIT.unpack(raw[0])
    if kind == KIND_ABORT:
        raise TransferAborted(_str(recv_into, nbytes, "abort reason") or "aborted by sender")
    if kind == KIND_SHM:
        raise SwitchToShm("the sender switched to the same-host link")
    if kind != KIND_UNIT:
        raise FramingError(f"expected a unit frame, got {kind!r}")
    if expect is not None and unit != expect:
        raise FramingError(f"expected unit {expect}, got unit {unit}")
    if count > MAX_TENSORS_PER_UNIT:
        raise FramingError(f"unit {unit}: {count} tensors is not plausible")
    tensors = []
    for _ in range(count):
        fixed = recv_exact(recv_into, _TENSOR.size)
        lname, ldtype, ndim, tbytes = _TENSOR.unpack(fixed)
        if lname > MAX_STR or ndim > MAX_NDIM:
            raise FramingError(f"unit {unit}: tensor header is not plausible")
        rest = recv_exact(recv_into, lname + ldtype + 8 * ndim)
        raw += [fixed, rest]
        try:
            name = rest[:lname].decode()
            dtype = rest[lname : lname + ldtype].decode()
        except UnicodeDecodeError:
            raise FramingError(f"unit {unit}: tensor name is not UTF-8") from None
        shape = struct.unpack(f"<{ndim}Q", rest[lname + ldtype :])
        size = DTYPE_SIZES.get(dtype)
        if size is None:
            raise FramingError(f"unit {unit}: tensor {name} has unknown dtype {dtype!r}")
        if math.prod(shape) * size != tbytes:
            raise FramingError(f"unit {unit}: tensor {name} shape {shape} does not fit {tbytes} bytes")
        tensors.append(TensorMeta(name, dtype, tuple(shape), tbytes))
    header = UnitHeader(unit, tuple(tensors))
    if header.nbytes != nbytes:
        raise FramingError(f"unit {unit}: tensor sizes add up to {header.nbytes}, header says {nbytes}")
    return header, b"".join(raw)


def encode_crc(crc: int) -> bytes:
    return _CRC.pack(crc & 0xFFFFFFFF)


CRC_SIZE = _CRC.size


def read_crc(recv_into: RecvInto) -> tuple[int, bytes]:
    raw = recv_exact(recv_into, _CRC.size)
    return int(_CRC.unpack(raw)[0]), raw


def recv_unit_body(
    recv_into: RecvInto,
    header: UnitHeader,
    header_bytes: bytes,
    buf: memoryview,
    on_chunk: Callable[[memoryview], None] | None = None,
    chunk: int = DEFAULT_CHUNK,
    checksum: bool = True,
) -> int:
    """Receive a unit's tensor bytes into `buf` at `header.layout()` offsets; returns the unit's
    CRC-32 (over `header_bytes`, as read by `read_unit_header`, then the tensor bytes).

    `on_chunk` sees every received slice of `buf` as soon as it is in (a forwarder sends it on from
    the same memory, so no second copy); the CRC is computed incrementally over the same slices,
    unless `checksum` is False (then 0 is returned: the caller computes it from `on_chunk`)."""
    offsets, total = header.layout()
    if len(buf) < total:
        raise ValueError(f"unit {header.unit}: buffer of {len(buf)} bytes, need {total}")
    crc = crc32(header_bytes) if checksum else 0
    for t, off in zip(header.tensors, offsets, strict=True):
        pos, end = off, off + t.nbytes
        while pos < end:
            got = recv_into(buf[pos : min(end, pos + chunk)])
            if got <= 0:
                raise TruncatedStream(f"unit {header.unit}: stream ended inside tensor {t.name}")
            piece = buf[pos : pos + got]
            if on_chunk is not None:
                on_chunk(piece)
            if checksum:
                crc = crc32(piece, crc)
            pos += got
    return crc


def verify_crc(header: UnitHeader, computed: int, received: int) -> None:
    if computed != received:
        raise ChecksumMismatch(f"unit {header.unit}: checksum {computed:08x} != sender's {received:08x}")


# --------------------------------------------------------------------------- writing


def iter_unit_frames(
    unit: int,
    tensors: Sequence[tuple[TensorMeta, memoryview]],
    chunk: int = DEFAULT_CHUNK,
    crc: int | None = None,
    on_crc: Callable[[int], None] | None = None,
) -> Iterator[bytes | memoryview]:
    """The pieces to send for one unit: header, the raw bytes in chunks (views, not copies), CRC.

    A known `crc` (from an earlier send of the same immutable bytes) saves a pass over the data;
    otherwise it is computed on the way and handed to `on_crc` at the end."""
    header = UnitHeader(unit, tuple(m for m, _ in tensors))
    head = header.encode()
    yield head
    running = crc32(head)
    for meta, data in tensors:
        if len(data) != meta.nbytes:
            raise ValueError(f"tensor {meta.name}: {len(data)} bytes, header says {meta.nbytes}")
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            if crc is None:
                running = crc32(piece, running)
            yield piece
    if crc is None:
        crc = running
        if on_crc is not None:
            on_crc(crc)
    yield encode_crc(crc)


def unit_frame_crc(unit: int, tensors: Sequence[tuple[TensorMeta, memoryview]]) -> int:
    """The CRC `iter_unit_frames` would send for this unit (to fill a source's cache ahead)."""
    crc = crc32(UnitHeader(unit, tuple(m for m, _ in tensors)).encode())
    for _, data in tensors:
        crc = crc32(data, crc)
    return crc


# --------------------------------------------------------------------------- transport


class Channel(Protocol):
    """A reliable, ordered byte stream between two processes (one direction used per transfer)."""

    def recv_into(self, buf: memoryview, /) -> int: ...
    def sendall(self, data: bytes | memoryview, /) -> None: ...
    def settimeout(self, seconds: float | None, /) -> None: ...
    def shutdown(self) -> None:
        """Wake any thread blocked on this channel (it sees end-of-stream or an error)."""

    def close(self) -> None: ...


class Listener(Protocol):
    address: str

    def accept(self) -> Channel: ...
    def close(self) -> None: ...


class Transport(Protocol):
    def listen(self, host: str, port: int, advertise_host: str | None = None) -> Listener: ...
    def connect(self, addr: str, timeout_s: float) -> Channel: ...


class _TcpChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.recv_into: RecvInto = sock.recv_into
        self.sendall = sock.sendall
        self.settimeout = sock.settimeout
        self._lowat = 1  # the socket's SO_RCVLOWAT as last set
        self._batch = 0

    def batch_reads(self, cap: int) -> None:
        """Wake the reader once a whole read's bytes are in, not per arriving packet.

        Each `recv_into` sets SO_RCVLOWAT to the size it asks for (at most `cap`), so a 1 MiB
        read is one wake-up and one copy instead of one per 64 KB segment; on loopback that cut a
        receiver's CPU by 10-40 % and its wake-ups by two thirds. Safe only while every read asks
        for no more than the stream is bound to deliver (the framing always asks for exactly the
        rest of the frame in hand), else it would wait for the peer to close. `cap` 0 turns it
        off."""
        self._batch = cap
        if cap > 0:
            self.recv_into = self._recv_batched
        else:
            self.recv_into = self._sock.recv_into
            self._set_lowat(1)

    def _set_lowat(self, n: int) -> None:
        if n != self._lowat:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self._lowat = n

    def _recv_batched(self, buf: memoryview, /) -> int:
        self._set_lowat(max(1, min(len(buf), self._batch)))
        return self._sock.recv_into(buf)

    def fileno(self) -> int:
        return self._sock.fileno()

    def timeout(self) -> float | None:
        return self._sock.gettimeout()

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


class _TcpListener:
    def __init__(self, sock: socket.socket, address: str) -> None:
        self._sock = sock
        self.address = address

    def accept(self) -> Channel:
        conn, _ = self._sock.accept()
        return _TcpChannel(conn)

    def close(self) -> None:
        # shutdown() wakes a thread blocked in accept() on Linux; close() alone would not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class TcpTransport:
    """Plain TCP (loopback on one machine). Kernel socket buffers are left to autotuning: setting
    SO_SNDBUF/SO_RCVBUF by hand turns autotuning off and measured no faster on loopback."""

    def listen(self, host: str, port: int, advertise_host: str | None = None) -> Listener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        bound = sock.getsockname()[1]
        return _TcpListener(sock, f"{advertised_host(host, advertise_host)}:{bound}")

    def connect(self, addr: str, timeout_s: float) -> Channel:
        sock = socket.create_connection(split_host_port(addr), timeout=timeout_s)
        return _TcpChannel(sock)


# --------------------------------------------------------------------------- forwarding in the kernel


def _libc_tee() -> Callable[[int, int, int, int], int] | None:
    """tee(2), which Python's os module lacks (it has splice): ctypes releases the GIL around it."""
    if not hasattr(os, "splice"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t
    return fn


_TEE = _libc_tee()
# Pipes as large as an unprivileged process may make them (/proc/sys/fs/pipe-max-size, 1 MiB by
# default): one round of the relay moves at most a pipe's worth.
RELAY_PIPE_BYTES = 1 << 20


def _pipe(size: int) -> tuple[int, int, int]:
    r, w = os.pipe()
    got = size
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        got = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)  # a lower limit here: keep what the system gave
    return r, w, got


def _wait(fd: int, event: int, timeout_s: float | None, what: str) -> None:
    poller = select.poll()
    poller.register(fd, event)
    if not poller.poll(None if timeout_s is None else timeout_s * 1000):
        raise TimeoutError(f"{what}: timed out")


class TeeRelay:
    """Receive from `up` into the caller's memory and forward the same bytes to `down`, with one
    copy in all: the payload goes socket → pipe A (splice: page references, no copy), A → pipe B
    (tee: references again), B → `down` (splice: the outgoing socket takes the pages), and only
    A → the caller's buffer is a copy. A receive-then-send forwarder copies twice (socket → buffer,
    buffer → socket) and each of those copies cost as much CPU as a whole hop's CRC on this VM.

    `recv_into` has the `RecvInto` shape, so `recv_unit_body` takes it in place of `up.recv_into`
    and the CRC is still computed over exactly the bytes in the caller's buffer. It never reads
    past what it is asked for, so frame headers and trailers can be read from `up` directly in
    between. If `down` fails, `on_lost` is told once and the relay goes on as a plain receiver.
    Linux only (`available()`); elsewhere, or for channels without a file descriptor, the caller
    receives and sends as before."""

    def __init__(
        self,
        up: _TcpChannel,
        down: _TcpChannel,
        on_lost: Callable[[str], None],
        egress: RateLimiter | None = None,
        pipe_bytes: int = RELAY_PIPE_BYTES,
    ) -> None:
        self._up, self._down = up, down
        self._on_lost = on_lost
        self._egress = egress
        self._fds: list[int] = []
        ar, aw, asz = _pipe(pipe_bytes)
        self._fds += [ar, aw]
        br, bw, bsz = _pipe(pipe_bytes)
        self._fds += [br, bw]
        self._a, self._aw, self._b, self._bw = ar, aw, br, bw
        self._step = min(asz, bsz)
        self.forwarding = True
        self.spliced = 0  # payload bytes that went downstream without passing through user space

    @staticmethod
    def available() -> bool:
        return _TEE is not None

    @staticmethod
    def between(
        up: Channel, down: Channel, on_lost: Callable[[str], None], egress: RateLimiter | None = None
    ) -> TeeRelay | None:
        """A relay for these two channels, or None when they are not kernel sockets here."""
        if not TeeRelay.available() or not isinstance(up, _TcpChannel) or not isinstance(down, _TcpChannel):
            return None
        return TeeRelay(up, down, on_lost, egress)

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _lose(self, reason: str) -> None:
        self.forwarding = False
        self._on_lost(reason)

    def recv_into(self, view: memoryview, /) -> int:
        if not self.forwarding:
            return self._up.recv_into(view)
        want = min(len(view), self._step)
        up = self._up.fileno()
        while True:
            try:
                got = os.splice(up, self._aw, want, flags=os.SPLICE_F_MOVE)
                break
            except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                _wait(up, select.POLLIN, self._up.timeout(), "receiving")
        if got == 0:
            return 0  # end of stream: the caller reports it truncated
        self._forward(got)
        pos = 0
        while pos < got:  # the bytes are in pipe A already: this does not wait on the network
            n = os.readv(self._a, [view[pos:got]])
            if n <= 0:
                raise OSError(errno.EIO, "relay pipe ended early")
            pos += n
        return got

    def _forward(self, n: int) -> None:
        assert _TEE is not None
        if self._egress is not None:
            self._egress.acquire(n)
        teed = 0
        while teed < n:  # B is empty and as large as A, so this is one call in practice
            k = _TEE(self._a, self._bw, n - teed, 0)
            if k <= 0:
                err = ctypes.get_errno()
                raise OSError(err, f"tee: {os.strerror(err)}")
            teed += k
        down, left = self._down.fileno(), n
        try:
            while left:
                try:
                    left -= os.splice(self._b, down, left, flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE)
                except BlockingIOError:
                    _wait(down, select.POLLOUT, self._down.timeout(), "forwarding")
        except OSError as e:
            # B holds the bytes `down` did not take: drop that pipe with them (nothing reads it).
            for fd in (self._b, self._bw):
                with contextlib.suppress(OSError):
                    os.close(fd)
                self._fds.remove(fd)
            self._lose(f"{type(e).__name__}: {e}")
            return
        self.spliced += n


# --------------------------------------------------------------------------- forwarding from user space


class Forwarder:
    """Sends what a forwarding receiver hands it to the next hop, in order, on its own thread.

    Why a thread: a receiver that sends each chunk downstream before it reads the next one ties
    every hop of a chain to the slowest moment of the hop after it; on a shared machine a hop that
    is descheduled for a few milliseconds stalls every hop upstream of it, and the chain runs at
    the pace of its worst-scheduled member (bench/results/multicast.md). Here the receiving thread
    hands a view of what it just received (`send`, no copy) and goes straight back to its socket;
    the unit buffer holds the whole unit anyway, so it *is* the queue, and no hop waits on the
    next one except through this thread.

    A piece must keep its bytes unchanged until it is sent: `drain()` waits until everything
    handed so far is out (a receiver that reuses a staging buffer drains before overwriting it).
    A piece that is a view keeps its buffer alive until sent. When the channel fails, `on_lost` is
    told once (on this thread), queued pieces are dropped and later ones ignored; `close()` sends
    what is queued and stops the thread, `abort()` drops it."""

    def __init__(
        self,
        chan: Channel,
        on_lost: Callable[[str], None],
        egress: RateLimiter | None = None,
        pace_chunk: int = DEFAULT_CHUNK,
        name: str = "dataplane-forward",
    ) -> None:
        self._chan = chan
        self._on_lost = on_lost
        self._egress = egress
        self._pace_chunk = max(1, pace_chunk)
        self._cv = threading.Condition()
        # Each piece with the time it was handed over: an emulated NIC (`RateLimiter(queue=True)`)
        # puts it on the line from then, however late this thread gets to it.
        self._queue: collections.deque[tuple[bytes | memoryview, float]] = collections.deque()
        self._in_flight = 0  # pieces handed to the thread and not yet sent
        self._closing = False
        self._lost = False
        self.sent = 0  # bytes sent (written by the thread only)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        return self._lost

    def send(self, piece: bytes | memoryview) -> None:
        """Queue `piece` (not copied) to go out after everything queued before it."""
        with self._cv:
            if self._lost or self._closing:
                return
            self._queue.append((piece, time.monotonic()))
            self._in_flight += 1
            self._cv.notify_all()

    def drain(self) -> None:
        """Until every piece queued so far is sent, or the channel was lost."""
        with self._cv:
            while self._in_flight and not self._lost:
                self._cv.wait()

    def close(self) -> None:
        """Send what is queued, then stop the thread (idempotent)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def abort(self) -> None:
        """Drop what is queued and stop (the caller shuts the channel down to unblock a send)."""
        with self._cv:
            self._queue.clear()
            self._in_flight = 0
            self._closing = True
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            try:
                for piece, ready_at in batch:
                    self._send(piece, ready_at)
            except OSError as e:
                with self._cv:
                    self._lost = True
                    self._queue.clear()
                    self._in_flight = 0
                    self._cv.notify_all()
                self._on_lost(f"{type(e).__name__}: {e}")
                return
            with self._cv:
                self._in_flight = max(0, self._in_flight - len(batch))
                self._cv.notify_all()

    def _send(self, piece: bytes | memoryview, ready_at: float) -> None:
        if self._egress is None:
            self._chan.sendall(piece)
        else:
            # Paced in chunks, as a NIC would put them on the wire, not in one burst and a pause.
            view = memoryview(piece)
            for i in range(0, len(view), self._pace_chunk):
                part = view[i : i + self._pace_chunk]
                self._egress.acquire(len(part), ready_at=ready_at)
                self._chan.sendall(part)
        self.sent += len(piece)


# --------------------------------------------------------------------------- rate limiting


class RateLimiter:
    """A token bucket shared by every send that draws on it (thread-safe).

    One per serving source, so a transfer does not starve its requests; the benchmark also shares
    one across a process's sends to emulate a NIC's egress bandwidth.

    Kept as a wire clock: `_wire` is when the line is done with every byte granted so far; a send
    may run `burst` bytes ahead of it (the bucket's depth), so a pacer that sleeps per chunk does
    not lose line time to its own sleep granularity.

    `queue=True` makes it an emulated NIC with a transmit queue (the benchmark's link): bytes the
    caller says were ready earlier (`acquire(..., ready_at=)`) are placed on the line from that
    time, not from when the sending thread got round to them. A real NIC keeps sending what is
    queued while the process that queued it is descheduled; a pacing thread sharing busy cores is
    often late by more than a chunk, and a plain bucket (capped at `burst`) throws that line time
    away, so every extra pacer in a chain lost more of it. No byte is granted before a real line
    of this rate, started when the byte was ready, would have delivered it (less the `burst`
    run-ahead), so the emulated link is never faster than the NIC it stands for. A rate limit that
    protects a serving source's requests wants the plain bucket (`queue=False`): after a stall it
    must not burst to catch up.

    `stalled_s` adds up the time the sending thread was behind its line while it had bytes ready
    (known from `ready_at`): with `queue=False` the line sat idle and that time is lost; with
    `queue=True` it is made up by sending what is queued at once."""

    def __init__(
        self,
        bytes_per_s: float,
        burst: int = DEFAULT_CHUNK,
        *,
        queue: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(bytes_per_s)
        self.burst = float(max(burst, 1))
        self.queue = queue
        self._ahead = self.burst / self.rate
        self._clock, self._sleep = clock, sleep
        self._wire = clock()
        self._last = self._wire  # when `acquire` last ran: a stall is counted once, not per piece
        self.stalled_s = 0.0
        self._lock = threading.Lock()

    def acquire(self, n: int, cancel: threading.Event | None = None, ready_at: float | None = None) -> bool:
        """Take `n` bytes of budget, pacing the caller; False if `cancel` was set while waiting.

        `ready_at`: when these bytes were ready to go (the clock's time base); only a `queue`
        limiter places them on the line from then, others only count `stalled_s` with it."""
        with self._lock:
            now = self._clock()
            start = now
            if ready_at is not None:
                behind = now - max(self._wire, ready_at, self._last)
                if behind > 0:
                    self.stalled_s += behind
                if self.queue:
                    start = min(now, ready_at)
            self._last = now
            self._wire = max(self._wire, start) + n / self.rate
            wait = self._wire - self._ahead - now
        if wait <= 0:
            return True
        if cancel is None:
            self._sleep(wait)  # pacing, not synchronisation: the wait is the rate limit itself
            return True
        return not cancel.wait(wait)


# --------------------------------------------------------------------------- unit sources


class UnitSource(Protocol):
    """Where a sender reads units from: raw bytes per tensor, in the unit's tensor order."""

    model: str
    # CRC of each unit once computed: weights are immutable while held, so a source that heads
    # several chains (or re-plans) checksums each unit once. Bytes changed under it would be
    # caught by every receiver, never accepted.
    crcs: dict[int, int]

    def unit(self, unit: int) -> list[tuple[TensorMeta, memoryview]]: ...


class CheckpointSource:
    """Units of a checkpoint on disk or in the page cache (mmap: nothing is read until sent)."""

    def __init__(self, ckpt: Checkpoint, model: str) -> None:
        self.ckpt = ckpt
        self.model = model
        self.crcs: dict[int, int] = {}

    def unit(self, unit: int) -> list[tuple[TensorMeta, memoryview]]:
        out = []
        from cascade.models.config import unit_tensor_names  # torch-free, but keep the import local

        for name in unit_tensor_names(self.ckpt.config, unit):
            e = self.ckpt.index[name].entries[name]
            raw = self.ckpt.raw(name)
            out.append((TensorMeta(name, e["dtype"], tuple(e["shape"]), len(raw)), raw))
        return out


# --------------------------------------------------------------------------- sending


@dataclass(frozen=True, slots=True)
class SendStats:
    nbytes: int
    seconds: float


def send_units(
    source: UnitSource,
    addr: str,
    transfer_id: str,
    token: str,
    units: Sequence[int],
    *,
    rate_limit_bps: float = 0.0,
    limiter: RateLimiter | None = None,
    cancel: threading.Event | None = None,
    chunk: int = DEFAULT_CHUNK,
    transport: Transport | None = None,
    timeout_s: float = 30.0,
    on_unit_sent: Callable[[int], None] | None = None,
    shm: bool = True,
    host_id: str | None = None,
) -> SendStats:
    """Stream `units` of `source` to the receiver at `addr` (blocking: run it in a thread).

    `rate_limit_bps` (or a shared `limiter`) paces the send, for a source that also serves
    requests. Raises TransferError when the receiver refuses, goes away, or `cancel` is set.

    When the receiver offers a same-host link (cascade.shmhop) and this process is on its host
    (`host_id`, default this machine's hostname, as the workers' and loader's --host-id default),
    the units go through shared memory instead, unless `shm` is False or the send is paced (a
    paced send stands for a link to another host, or protects a serving source's requests)."""
    transport = transport or TcpTransport()
    if limiter is None and rate_limit_bps > 0:
        # At most MAX_BURST_S of the rate up front: a whole chunk at a low rate (an emulated slow
        # link, a small model) let every unit go at once, and the pace was never held.
        limiter = RateLimiter(rate_limit_bps, burst=min(chunk, max(int(rate_limit_bps * MAX_BURST_S), 1)))
    t0 = time.monotonic()
    sent = 0
    try:
        chan = transport.connect(addr, timeout_s)
    except OSError as e:
        raise TransferError(f"cannot connect to {addr}: {e}") from None
    try:
        chan.settimeout(timeout_s)
        chan.sendall(ConnHeader(transfer_id, token, source.model, tuple(units)).encode())
        ok, reason = read_status(chan.recv_into)
        if not ok:
            raise TransferError(f"{addr} refused transfer {transfer_id}: {reason}")
        if shm and limiter is None and reason:
            from cascade import shmhop  # it builds on this module

            link = shmhop.accept_offer(reason, shmhop.host_key(host_id), transfer_id, timeout_s)
            if link is not None:
                try:
                    chan.sendall(encode_switch())
                    return _send_units_shm(source, link, units, cancel, on_unit_sent, t0)
                finally:
                    link.close()
        # A source's bytes are all there from the start: an emulated NIC may catch up from here.
        ready_at = time.monotonic()
        for u in units:
            if cancel is not None and cancel.is_set():
                chan.sendall(encode_abort("cancelled by sender"))
                raise TransferError("cancelled")
            frames = iter_unit_frames(
                u, source.unit(u), chunk, crc=source.crcs.get(u), on_crc=functools.partial(source.crcs.__setitem__, u)
            )
            for piece in frames:
                if limiter is not None and not limiter.acquire(len(piece), cancel, ready_at=ready_at):
                    raise TransferError("cancelled")
                chan.sendall(piece)
                sent += len(piece)
            if on_unit_sent is not None:
                on_unit_sent(u)
    except (OSError, FramingError) as e:
        raise TransferError(f"sending to {addr} failed after {sent} bytes: {e}") from None
    finally:
        chan.close()
    return SendStats(sent, time.monotonic() - t0)


def _send_units_shm(
    source: UnitSource,
    link: object,
    units: Sequence[int],
    cancel: threading.Event | None,
    on_unit_sent: Callable[[int], None] | None,
    t0: float,
) -> SendStats:
    from cascade import shmhop

    assert isinstance(link, shmhop.ShmLink)
    sent = 0
    for u in units:
        if cancel is not None and cancel.is_set():
            link.send_abort("cancelled by sender")
            raise TransferError("cancelled")
        source.crcs[u], nbytes = shmhop.send_unit_shared(link, u, source.unit(u), source.crcs.get(u))
        sent += nbytes
        if on_unit_sent is not None:
            on_unit_sent(u)
    # Done when every message is queued, as a TCP send is when its bytes are in the socket buffer:
    # a region's fd in flight keeps its memory alive until the receiver has mapped it.
    return SendStats(sent, time.monotonic() - t0)
