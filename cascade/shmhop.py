"""Same-host hops of the data plane through shared memory: one memcpy per hop, no socket copies.

Over loopback TCP a forwarding hop costs two kernel copies (the receive into its unit buffer, the
send out of it) plus the TCP stack, and on a 2-core machine a 3-hop chain costs 3-4x the CPU of one
receiver (bench/results/multicast.notes.md). When the next hop is on the same host, this module
lets it read the bytes straight out of the sender's memory instead, as NCCL's shared-memory
transport does inside a node:

  * every byte a sender can share lives in a `SharedMap`: an mmap of an anonymous memfd (no name
    in /dev/shm or anywhere: nothing to unlink, the kernel frees it with the last fd and mapping,
    whatever way the processes end). A forwarding receiver's unit buffers are `SharedMap`s, so are
    a host cache's "copy" buffer (`services/loader/hostcache.py`); a checkpoint's file mapping is
    registered with its file's fd (`register_file`). `find(view)` says which region a sender's
    bytes are in;
  * the hop is a `SOCK_SEQPACKET` Unix socket in the abstract namespace (per network namespace;
    no file to clean up either) carrying small messages: per unit its frame header bytes (exactly
    those a TCP stream carries, so the CRC covers the same bytes) and where each tensor is
    (fd passed with SCM_RIGHTS, offset); then progress (payload bytes of the unit that are in, so
    far); then the source's CRC. The receiver maps the region read-only, copies into its own
    buffer chunk by chunk as progress comes, computes the CRC over its own copy (never over the
    sender's memory, which it does not own), and only then hands the unit on;
  * a forwarder fed over such a link passes each message on to its same-host next hop as it
    arrives (`ShmLink.start_reader(tee=...)`), fds included: every hop of a same-host chain copies
    from the source's memory at once, none waits on the hop before it;
  * how a hop is set up, on the data plane's existing TCP connection: the receiver checks the
    token as always, then answers OK with an offer (`offer()`: its host key, its Unix socket's
    name, a one-time nonce). A sender on the same host (`host_key()` equal: the same --host-id,
    boot and network namespace) that can and wants to (not paced: an emulated link stands for
    another host) connects to that socket, says the transfer id and nonce, and sends a `KIND_SHM`
    frame on the TCP connection where the first unit would go; the receiver then reads units from
    the Unix socket. Any other sender ignores the offer and streams over TCP as before, and so does
    a sender whose Unix connect fails.

Failure: an upstream process that dies closes its socket (end of stream: truncated, the receiver
fails cleanly); one that hangs hits the receive timeout; a mapping of an upstream's memory lives
only while one unit is copied. Nothing is written to the file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import mmap
import os
import queue
import secrets
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cascade.framing import (
    DEFAULT_CHUNK,
    ChecksumMismatch,
    FramingError,
    TensorMeta,
    TransferAborted,
    TruncatedStream,
    UnitHeader,
    crc32,
    read_unit_header,
)

OFFER = "shm1"
MEMFD_NAME = "cascade-unit"  # shows up as /memfd:cascade-unit in /proc/<pid>/maps and fd links

_MSG = struct.Struct("<4sIQ")  # kind, unit, value (payload bytes for UNIT, progress, crc)
_HELLO = b"HELO"
_UNIT = b"UNIT"
_PROG = b"PROG"
_CRC = b"CRC "
_ABRT = b"ABRT"
_WHERE = struct.Struct("<iQ")  # per tensor: index of its fd in the message (-1: no bytes), offset
MAX_MSG = 1 << 20
MAX_FDS = 64


def available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and hasattr(mmap, "MAP_POPULATE")


# --------------------------------------------------------------------------- shared regions


class SharedMap(mmap.mmap):
    """A read-write mapping of a fresh anonymous memfd of `nbytes` (`SharedMap.create`).

    Buffers made from it (`np.frombuffer`) keep it alive; its fd is closed when it is collected,
    and the memory goes when the last mapping of it (here or in a receiver) goes."""

    fd: int

    @classmethod
    def create(cls, nbytes: int) -> SharedMap:
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            m = cls(fd, max(nbytes, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        m.fd = fd
        weakref.finalize(m, os.close, fd)
        _register(m, fd, 0)
        return m


@dataclass(slots=True)
class _Region:
    addr: int
    nbytes: int
    fd: int
    fd_offset: int  # where `addr` is in the fd's file
    owner: weakref.ref[mmap.mmap]


# By registration, not by address: a region that died and one mapped at its address since must
# not unregister each other.
_regions: dict[int, _Region] = {}
_regions_lock = threading.Lock()
_next_key = itertools.count()


def _addr(buf: memoryview) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _register(owner: mmap.mmap, fd: int, fd_offset: int) -> None:
    arr = np.frombuffer(owner, dtype=np.uint8)
    addr = int(arr.ctypes.data)
    key = next(_next_key)
    with _regions_lock:
        _regions[key] = _Region(addr, len(arr), fd, fd_offset, weakref.ref(owner))
    weakref.finalize(owner, _unregister, key)


def _unregister(key: int) -> None:
    with _regions_lock:
        _regions.pop(key, None)


def register_file(mapping: mmap.mmap, path: str | os.PathLike[str]) -> bool:
    """Share a read-only mapping of the whole file at `path` (a checkpoint, a host cache in "mmap"
    mode) with same-host receivers, by an fd of that file. False (nothing registered) when the file
    at `path` is no longer the one mapped (same size and identity are checked at open); a changed
    file after that is caught by the receivers' CRC, never accepted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    if os.fstat(fd).st_size != len(mapping):
        os.close(fd)
        return False
    weakref.finalize(mapping, os.close, fd)
    _register(mapping, fd, 0)
    return True


def find(view: memoryview) -> tuple[int, int] | None:
    """(fd, offset in it) of the bytes of `view` when they lie in one registered region, else None."""
    if len(view) == 0:
        return None
    addr = _addr(view)
    with _regions_lock:
        for r in _regions.values():
            owner = r.owner()
            # A closed mapping's addresses may hold other memory by now: never match it.
            if owner is not None and not owner.closed and r.addr <= addr and addr + len(view) <= r.addr + r.nbytes:
                return r.fd, r.fd_offset + (addr - r.addr)
    return None


def shared_array(nbytes: int, touch: bool = True) -> np.ndarray:
    """A uint8 array of `nbytes` in a fresh `SharedMap`, pages touched unless `touch` is False (as
    the data plane's reserved buffers are: faults stay out of the transfer)."""
    arr = np.frombuffer(SharedMap.create(nbytes), dtype=np.uint8)[:nbytes]
    if touch:
        arr.fill(0)
    return arr


# --------------------------------------------------------------------------- who is on this host


@dataclass(frozen=True, slots=True)
class Offer:
    host_key: str
    name: bytes  # the abstract socket's name, without the leading NUL
    nonce: str

    def encode(self) -> str:
        return f"{OFFER} {self.host_key} {self.name.hex()} {self.nonce}"

    @staticmethod
    def parse(reason: str) -> Offer | None:
        parts = reason.split()
        if len(parts) != 4 or parts[0] != OFFER:
            return None
        try:
            return Offer(parts[1], bytes.fromhex(parts[2]), parts[3])
        except ValueError:
            return None


_default_host_id: str | None = None


def set_default_host_id(host_id: str | None) -> None:
    """The host id this process's sends use when they name none (a worker's data plane sets its
    --host-id here, so its chain-head sends compare the same key its receptions offer)."""
    global _default_host_id
    _default_host_id = host_id or None


def host_key(host_id: str | None = None) -> str:
    """Who may share memory with whom: the same configured host id (--host-id, default the
    hostname; the benchmark emulates hosts on one machine with distinct ones, and those must stay
    apart), the same boot of the same kernel, the same network namespace (where the abstract
    socket lives)."""
    parts = [host_id or _default_host_id or socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/net").st_ino))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- the link


class ShmLink:
    """One end of a same-host hop (a connected SOCK_SEQPACKET Unix socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # A message read ahead while taking every queued progress update (the unit's CRC).
        self._pending: tuple[bytes, int, int, bytes, list[int]] | None = None
        self._timeout: float | None = None
        self._reader: threading.Thread | None = None
        self._tee: Callable[[bytes, list[int]], None] | None = None
        self._q: queue.SimpleQueue[tuple[bytes, list[int], int] | BaseException] = queue.SimpleQueue()

    def settimeout(self, seconds: float | None) -> None:
        self._timeout = seconds
        self.sock.settimeout(seconds)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._reader is not None:
            self.shutdown()
            self._reader.join(5.0)
            while True:  # what was read and never taken: its fds are ours to close
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple):
                    _close(item[1])
        self.sock.close()

    def start_reader(self, tee: Callable[[bytes, list[int]], None] | None = None) -> None:
        """Read messages on a thread of its own from now on; `tee` sees each one (bytes and
        fds, which it must not close) the moment it arrives, before this hop copies anything: a
        same-host forwarder passes it on as is, so its next hop learns where each unit is and how
        far it is in as soon as this hop does, not once this hop has copied it."""
        self._tee = tee
        self._reader = threading.Thread(target=self._read_loop, name="dataplane-shm-read", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        while True:
            try:
                msg, fds, mflags, _ = socket.recv_fds(self.sock, MAX_MSG, MAX_FDS)
            except OSError as e:
                self._q.put(e)
                return
            if self._tee is not None and msg and not mflags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                self._tee(msg, fds)
            self._q.put((msg, fds, mflags))
            if not msg:
                return

    def send_raw(self, msg: bytes, fds: Sequence[int]) -> None:
        if fds:
            socket.send_fds(self.sock, [msg], list(fds))
        else:
            self.sock.sendall(msg)

    # ---- sending ----------------------------------------------------------------------------
    def _send(self, kind: bytes, unit: int, value: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        msg = _MSG.pack(kind, unit, value) + payload
        if fds:
            socket.send_fds(self.sock, [msg], list(fds))
        else:
            self.sock.sendall(msg)

    def send_unit(self, unit: int, raw_header: bytes, where: Sequence[tuple[int, int] | None]) -> None:
        """Announce `unit`: its frame header bytes and, per tensor, (fd, offset) of its bytes."""
        fds: list[int] = []
        table = []
        for w in where:
            if w is None:
                table.append(_WHERE.pack(-1, 0))
                continue
            fd, off = w
            if fd not in fds:
                fds.append(fd)
            table.append(_WHERE.pack(fds.index(fd), off))
        if len(fds) > MAX_FDS:
            raise FramingError(f"unit {unit}: {len(fds)} regions")
        self._send(_UNIT, unit, len(raw_header), raw_header + b"".join(table), fds)

    def send_progress(self, unit: int, nbytes: int) -> None:
        self._send(_PROG, unit, nbytes)

    def send_crc(self, unit: int, crc: int) -> None:
        self._send(_CRC, unit, crc & 0xFFFFFFFF)

    def send_abort(self, reason: str) -> None:
        self._send(_ABRT, 0, 0, reason.encode()[:4096])

    # ---- receiving --------------------------------------------------------------------------
    def _recv(self, block: bool = True) -> tuple[bytes, int, int, bytes, list[int]] | None:
        if self._pending is not None:
            got, self._pending = self._pending, None
            return got
        if self._reader is not None:
            try:
                item = self._q.get(block, self._timeout)
            except queue.Empty:
                if block:
                    raise TimeoutError("timed out") from None
                return None
            if isinstance(item, BaseException):
                raise item
            msg, fds, mflags = item
        else:
            try:
                flags = 0 if block else socket.MSG_DONTWAIT
                msg, fds, mflags, _ = socket.recv_fds(self.sock, MAX_MSG, MAX_FDS, flags)
            except BlockingIOError:
                return None
        if not msg:
            for fd in fds:
                os.close(fd)
            raise TruncatedStream("the same-host upstream closed its link")
        if mflags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(msg) < _MSG.size:
            for fd in fds:
                os.close(fd)
            raise FramingError("malformed same-host message")
        kind, unit, value = _MSG.unpack_from(msg)
        if kind == _ABRT:
            for fd in fds:
                os.close(fd)
            raise TransferAborted(msg[_MSG.size :].decode(errors="replace") or "aborted by sender")
        return kind, unit, value, msg[_MSG.size :], fds

    def recv_unit(self, expect: int) -> tuple[UnitHeader, bytes, _Mapped]:
        got = self._recv()
        assert got is not None
        kind, unit, value, payload, fds = got
        try:
            if kind != _UNIT or unit != expect:
                raise FramingError(f"expected unit {expect} on the same-host link, got {kind!r} {unit}")
            raw = payload[:value]
            pos = 0

            def recv_into(view: memoryview) -> int:
                nonlocal pos
                n = min(len(view), len(raw) - pos)
                view[:n] = raw[pos : pos + n]
                pos += n
                return n

            header, raw_header = read_unit_header(recv_into, expect=expect)
            if raw_header != raw:
                raise FramingError(f"unit {unit}: header has trailing bytes")
            table = payload[value:]
            if len(table) != _WHERE.size * len(header.tensors):
                raise FramingError(f"unit {unit}: region table does not match the header")
            where = [_WHERE.unpack_from(table, i * _WHERE.size) for i in range(len(header.tensors))]
            mapped = _Mapped(header, where, fds)
            fds = []  # owned by `mapped` now
        finally:
            for fd in fds:
                os.close(fd)
        return header, raw_header, mapped

    def recv_body(
        self,
        header: UnitHeader,
        raw_header: bytes,
        src: _Mapped,
        buf: memoryview,
        on_chunk: Callable[[memoryview], None] | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> int:
        """Copy the unit's tensors from the sender's memory into `buf` at `header.layout()` offsets
        as the sender says they are in; returns the CRC over the header bytes and this copy.
        `on_chunk` sees each piece of `buf` once copied."""
        offsets, total = header.layout()
        if len(buf) < total:
            raise ValueError(f"unit {header.unit}: buffer of {len(buf)} bytes, need {total}")
        payload = header.nbytes
        dst = np.frombuffer(buf, dtype=np.uint8)
        crc = crc32(raw_header)
        avail = 0
        done = 0  # payload bytes copied, in tensor order
        ti, tpos = 0, 0  # tensor and position in it
        while done < payload:
            if done == avail:
                avail = self._progress(header.unit, avail, payload, block=True)
                while True:  # take every update already queued: copy as far as the sender is
                    more = self._progress(header.unit, avail, payload, block=False)
                    if more == avail:
                        break
                    avail = more
            while done < avail:
                meta = header.tensors[ti]
                if tpos == meta.nbytes:
                    ti, tpos = ti + 1, 0
                    continue
                n = min(chunk, meta.nbytes - tpos, avail - done)
                out = dst[offsets[ti] + tpos : offsets[ti] + tpos + n]
                np.copyto(out, src.view(ti)[tpos : tpos + n])  # one memcpy; numpy lets go of the GIL
                piece = buf[offsets[ti] + tpos : offsets[ti] + tpos + n]
                crc = crc32(piece, crc)
                if on_chunk is not None:
                    on_chunk(piece)
                tpos += n
                done += n
        return crc

    def _progress(self, unit: int, avail: int, payload: int, block: bool) -> int:
        got = self._recv(block)
        if got is None:
            return avail
        kind, u, value, _, fds = got
        if not block and kind != _PROG:
            self._pending = got  # for whoever reads next
            return avail
        for fd in fds:
            os.close(fd)
        if kind != _PROG or u != unit or not avail <= value <= payload:
            raise FramingError(f"unit {unit}: bad progress message {kind!r} {u} {value}")
        return value

    def recv_crc(self, unit: int) -> int:
        got = self._recv()
        assert got is not None
        kind, u, value, _, fds = got
        for fd in fds:
            os.close(fd)
        if kind == _PROG and u == unit:
            return self.recv_crc(unit)  # a repeated final progress update
        if kind != _CRC or u != unit:
            raise FramingError(f"unit {unit}: expected its CRC, got {kind!r} {u}")
        return value


class _Mapped:
    """A unit's tensors in the sender's memory, mapped read-only for as long as it is copied."""

    def __init__(self, header: UnitHeader, where: list[tuple[int, int]], fds: list[int]) -> None:
        self._fds = fds
        self._maps: list[mmap.mmap] = []
        self._views: list[np.ndarray] = []
        try:
            for meta, (idx, off) in zip(header.tensors, where, strict=True):
                if meta.nbytes == 0:
                    self._views.append(np.empty(0, dtype=np.uint8))
                    continue
                if not 0 <= idx < len(fds):
                    raise FramingError(f"unit {header.unit}: tensor {meta.name} names no region")
                size = os.fstat(fds[idx]).st_size
                if off + meta.nbytes > size:
                    raise FramingError(f"unit {header.unit}: tensor {meta.name} lies outside its region")
                base = off - off % mmap.ALLOCATIONGRANULARITY
                # MAP_POPULATE: the sender's pages are in memory already; mapping them all in one
                # call costs far less than a fault per page inside the copy.
                m = mmap.mmap(
                    fds[idx], off + meta.nbytes - base, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ, offset=base
                )
                self._maps.append(m)
                arr = np.frombuffer(m, dtype=np.uint8)
                self._views.append(arr[off - base : off - base + meta.nbytes])
        except BaseException:
            self.close()
            raise

    def view(self, i: int) -> np.ndarray:
        return self._views[i]

    def close(self) -> None:
        self._views.clear()
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------------- setting a hop up


class ShmListener:
    """The receiving side's abstract Unix socket; `accept()` yields (transfer id, nonce, link)."""

    def __init__(self) -> None:
        self.name = b"cascade-dp-" + secrets.token_hex(8).encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.bind(b"\0" + self.name)
        self._sock.listen(64)

    def accept(self) -> socket.socket:
        conn, _ = self._sock.accept()
        return conn

    @staticmethod
    def hello(conn: socket.socket, hello_timeout_s: float) -> tuple[str, str, ShmLink] | None:
        """The upstream's hello on an accepted link; None (closed) if it did not say one."""
        conn.settimeout(hello_timeout_s)
        try:
            msg = conn.recv(4096)
            kind, _, n = _MSG.unpack_from(msg) if len(msg) >= _MSG.size else (b"", 0, 0)
            if kind != _HELLO or len(msg) < _MSG.size + n:
                raise FramingError("no hello")
            tid = msg[_MSG.size : _MSG.size + n].decode()
            nonce = msg[_MSG.size + n :].decode()
        except (OSError, FramingError, UnicodeDecodeError, struct.error):
            conn.close()
            return None
        return tid, nonce, ShmLink(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def nonce() -> str:
    return secrets.token_hex(16)


def nonce_ok(got: str, want: str) -> bool:
    return hmac.compare_digest(got.encode(), want.encode())


def connect(offer: Offer, transfer_id: str, timeout_s: float) -> ShmLink:
    """Connect to a receiver's offer and say which transfer this is (OSError if it cannot)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout_s)
        sock.connect(b"\0" + offer.name)
        tid = transfer_id.encode()
        sock.sendall(_MSG.pack(_HELLO, 0, len(tid)) + tid + offer.nonce.encode())
    except BaseException:
        sock.close()
        raise
    return ShmLink(sock)


def accept_offer(reason: str, my_host_key: str, transfer_id: str, timeout_s: float) -> ShmLink | None:
    """A link to the receiver that answered with `reason`, when it offered one and is on this host."""
    offer = Offer.parse(reason)
    if offer is None or offer.host_key != my_host_key or not available():
        return None
    try:
        return connect(offer, transfer_id, timeout_s)
    except OSError:
        return None  # another network namespace, a receiver gone: TCP it is


# --------------------------------------------------------------------------- the source side


def send_unit_shared(
    link: ShmLink, unit: int, tensors: Sequence[tuple[TensorMeta, memoryview]], crc: int | None
) -> tuple[int, int]:
    """Send one unit of a source whose bytes are all there: where they are, all of it at once,
    then its CRC (computed meanwhile unless known); returns the CRC and the bytes a TCP stream
    would have carried for the unit (its frame), for the caller's count.

    Bytes outside any shared region (a live worker's own tensors) are first copied into a fresh
    `SharedMap` the receiver maps; it lives as long as the receiver holds it."""
    header = UnitHeader(unit, tuple(m for m, _ in tensors))
    raw = header.encode()
    where: list[tuple[int, int] | None] = [find(v) if m.nbytes else None for m, v in tensors]
    missing = [i for i, w in enumerate(where) if w is None and tensors[i][0].nbytes]
    stage: SharedMap | None = None
    if missing:
        stage = SharedMap.create(sum(tensors[i][0].nbytes for i in missing))
        arr = np.frombuffer(stage, dtype=np.uint8)
        off = 0
        for i in missing:
            n = tensors[i][0].nbytes
            arr[off : off + n] = np.frombuffer(tensors[i][1], dtype=np.uint8)
            where[i] = (stage.fd, off)
            off += n
        del arr
    link.send_unit(unit, raw, where)
    link.send_progress(unit, header.nbytes)
    if crc is None:
        crc = crc32(raw)
        for _, v in tensors:
            crc = crc32(v, crc)
    link.send_crc(unit, crc)
    return crc, len(raw) + header.nbytes + 4


def verify(header: UnitHeader, computed: int, received: int) -> None:
    if computed != received:
        raise ChecksumMismatch(f"unit {header.unit}: checksum {computed:08x} != sender's {received:08x}")
