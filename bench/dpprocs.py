"""Data-plane endpoints in their own processes, for the multicast benchmark and the data-plane
tests: each child runs a `DataPlaneServer` (or a disk reader) and reports what happens to the
parent over a pipe, with CLOCK_MONOTONIC timestamps (system-wide on Linux, so comparable across
processes). Not part of any service.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade.messages import TransferOrder, decode, encode

Event = tuple[Any, ...]


def unit_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in order."""
    from services.worker.dataplane import tensor_bytes

    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _child(conn: mpc.Connection, chunk: int, egress_bps: float, relay: bool, egress_queue: bool) -> None:
    # Imported here so the parent (and `--help`) does not pay for torch before it needs to.
    from cascade.models.checkpoint import Checkpoint
    from services.worker.dataplane import (
        CheckpointSource,
        DataPlaneServer,
        RateLimiter,
        ReceiveStats,
        load_units_local,
    )

    send_lock = threading.Lock()

    def emit(*ev: Any) -> None:
        with send_lock:
            conn.send(ev)

    egress = RateLimiter(egress_bps, queue=egress_queue) if egress_bps > 0 else None
    server = DataPlaneServer(chunk=chunk, egress=egress, relay=relay)
    emit("addr", server.start())
    held: dict[int, dict[str, torch.Tensor]] = {}
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                return
            if cmd[0] == "drop":
                held.clear()
                continue
            if cmd[0] == "cpu":
                # This process's CPU seconds so far (every thread, user and system): what a
                # transfer costs the machine, whatever else shares its cores. With it, how long the
                # emulated link sat idle while this process had bytes queued for it.
                emit("cpu", time.process_time(), egress.stalled_s if egress is not None else 0.0)
                continue
            if cmd[0] == "expect":
                order = decode(cmd[1], TransferOrder)
                have, digest = set(cmd[2]), bool(cmd[3])
                tid = order.transfer_id

                def ready(u: int, t: dict[str, torch.Tensor], tid: str = tid, digest: bool = digest) -> None:
                    held[u] = t
                    emit("ready", tid, u, time.monotonic(), unit_digest(t) if digest else "")

                def complete(st: ReceiveStats, tid: str = tid) -> None:
                    emit("complete", tid, time.monotonic(), st.nbytes, st.t_connected, st.receive_path)

                def failed(reason: str, tid: str = tid) -> None:
                    emit("failed", tid, reason, time.monotonic())

                def forward_failed(reason: str, tid: str = tid) -> None:
                    emit("forward_failed", tid, reason, time.monotonic())

                rec = server.expect(
                    order, ready, failed, on_complete=complete, on_forward_failed=forward_failed, have=have
                )
                emit("armed", tid, rec.stats.reserve_s)
                continue
            if cmd[0] == "disk":
                tid, path, model, units, digest = cmd[1], cmd[2], cmd[3], cmd[4], bool(cmd[5])
                t0 = time.monotonic()
                ckpt = Checkpoint(Path(path))
                try:

                    def ready_local(u: int, t: dict[str, torch.Tensor], tid: str = tid, digest: bool = digest) -> None:
                        held[u] = t
                        emit("ready", tid, u, time.monotonic(), unit_digest(t) if digest else "")

                    n = load_units_local(CheckpointSource(ckpt, model), units, ready_local)
                    emit("complete", tid, time.monotonic(), n, t0)
                finally:
                    # The reported tensors are copies in fresh buffers, not views of the mapping.
                    ckpt.close()
                continue
            raise ValueError(f"unknown command {cmd[0]!r}")
    finally:
        server.close()


@dataclass
class ReceiverProc:
    """One receiving endpoint in a child process (spawned: a clean interpreter, like a worker)."""

    name: str
    chunk: int = 1 << 20
    egress_bps: float = 0.0
    relay: bool = False  # forward unit bodies in the kernel (DataPlaneServer's `relay`)
    # The emulated link (egress_bps) as a NIC with a transmit queue (RateLimiter's `queue`), or a
    # plain token bucket that loses the line time its pacing thread is late by.
    egress_queue: bool = False
    last_reserve_s: float = 0.0  # how long the last expect() took to reserve its unit buffers

    def start(self, ctx: Any = None) -> None:
        ctx = ctx or mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, self.chunk, self.egress_bps, self.relay, self.egress_queue)
        self.proc = ctx.Process(target=_child, args=args, name=self.name, daemon=True)
        self.proc.start()
        child.close()
        self.addr = ""

    def wait_started(self, timeout_s: float = 60.0) -> str:
        ev = self.next(timeout_s)
        if ev[0] != "addr":
            raise RuntimeError(f"{self.name}: expected its address, got {ev}")
        self.addr = str(ev[1])
        return self.addr

    def next(self, timeout_s: float) -> Event:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"{self.name}: nothing within {timeout_s}s (alive={self.proc.is_alive()})")
        return tuple(self.conn.recv())

    def expect(self, order: TransferOrder, have: Iterable[int] = (), digest: bool = False) -> None:
        self.conn.send(("expect", encode(order), list(have), digest))
        ev = self.next(600.0)
        if ev[:2] != ("armed", order.transfer_id):
            raise RuntimeError(f"{self.name}: expected armed, got {ev}")
        self.last_reserve_s = float(ev[2])

    def load_disk(self, transfer_id: str, path: str, model: str, units: list[int], digest: bool = False) -> None:
        self.conn.send(("disk", transfer_id, path, model, units, digest))

    def drop(self) -> None:
        self.conn.send(("drop",))

    def cpu_seconds(self, timeout_s: float = 60.0) -> float:
        """The child's CPU time so far (call between runs: no other event may be pending)."""
        return self.counters(timeout_s)[0]

    def counters(self, timeout_s: float = 60.0) -> tuple[float, float]:
        """The child's CPU time so far, and how long its emulated link sat idle while it had bytes
        queued (0 without a link); call between runs: no other event may be pending."""
        self.conn.send(("cpu",))
        ev = self.next(timeout_s)
        if ev[0] != "cpu":
            raise RuntimeError(f"{self.name}: expected its CPU time, got {ev}")
        return float(ev[1]), float(ev[2])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop; a child that does not exit in time is terminated (then killed)."""
        if not hasattr(self, "proc"):
            return
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def stop_all(procs: list[ReceiverProc], timeout_s: float = 10.0) -> None:
    """Ask every child to stop first, then wait: their interpreters exit in parallel."""
    for p in procs:
        if hasattr(p, "proc") and p.proc.is_alive():
            try:
                p.conn.send(("stop",))
            except OSError:
                pass
    for p in procs:
        if hasattr(p, "proc"):
            p.proc.join(timeout_s)
    for p in procs:
        p.stop(timeout_s)


def start_all(procs: list[ReceiverProc], timeout_s: float = 60.0) -> None:
    ctx = mp.get_context("spawn")
    try:
        for p in procs:
            p.start(ctx)
        for p in procs:
            p.wait_started(timeout_s)
    except BaseException:
        stop_all(procs)
        raise


def collect(
    procs: list[ReceiverProc], until: Callable[[list[tuple[str, Event]]], bool], timeout_s: float
) -> list[tuple[str, Event]]:
    """Gather events (receiver name, event) from every child until `until(events)` or the deadline."""
    events: list[tuple[str, Event]] = []
    by_conn = {p.conn: p for p in procs}
    deadline = time.monotonic() + timeout_s
    while not until(events):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"waited {timeout_s}s; got {len(events)} events: {events[-5:]}")
        for c in mpc.wait(list(by_conn), left):
            conn = c if isinstance(c, mpc.Connection) else None
            if conn is None:
                continue
            try:
                ev = tuple(conn.recv())
            except EOFError:
                # A child that died: drop it from the wait set; callers see the missing events.
                del by_conn[conn]
                continue
            events.append((by_conn[conn].name, ev))
    return events


# --------------------------------------------------------------------------- machine limits


def _raw_sink(conn: mpc.Connection, fresh: bool, ring_bytes: int) -> None:
    """Receive one TCP stream as fast as the socket allows: into a touched ring buffer (the
    socket's own limit) or into one fresh buffer of the whole size (what a receiver that
    allocates per transfer also pays: first-touch page faults)."""
    import socket

    import numpy as np

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    conn.send(("addr", f"127.0.0.1:{ls.getsockname()[1]}"))
    total = int(conn.recv())
    ring = None if fresh else np.ones(ring_bytes, dtype=np.uint8)
    conn.send(("ready",))  # the ring is touched: the timed stream starts after this
    c, _ = ls.accept()
    t0 = time.monotonic()
    buf = np.empty(total, dtype=np.uint8) if fresh else ring
    assert buf is not None
    view = buf.data
    pos, n = 0, len(view)
    got_total = 0
    while got_total < total:
        if pos == n:
            pos = 0
        got = c.recv_into(view[pos : min(n, pos + (1 << 20))])
        if not got:
            break
        pos += got
        got_total += got
    conn.send(("done", got_total, t0, time.monotonic()))
    c.close()
    ls.close()


def raw_loopback(
    data: memoryview, fresh: bool, ring_bytes: int = 64 << 20, timeout_s: float = 600.0, streams: int = 1
) -> float:
    """Seconds to push `data` through `streams` loopback TCP streams at once (one sending thread
    here and one receiving process each), from the first send to the last byte received. With
    several streams this is the machine's own cost of moving that many copies over loopback on
    shared cores: a floor for what a chain of as many hops can take."""
    import socket
    import threading

    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(streams):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_raw_sink, args=(child, fresh, ring_bytes), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    try:
        addrs = []
        for parent in pipes:
            if not parent.poll(60):
                raise TimeoutError("raw sink did not start")
            addrs.append(parent.recv()[1])
            parent.send(len(data))
        for parent in pipes:
            if not parent.poll(60):
                raise TimeoutError("raw sink did not get ready")
            parent.recv()
        socks = []
        for addr in addrs:
            host, port = addr.rsplit(":", 1)
            s = socket.create_connection((host, int(port)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)

        def push(s: socket.socket) -> None:
            with s:
                for i in range(0, len(data), 1 << 20):
                    s.sendall(data[i : i + (1 << 20)])

        senders = [threading.Thread(target=push, args=(s,)) for s in socks]
        t0 = time.monotonic()
        for th in senders:
            th.start()
        for th in senders:
            th.join(timeout_s)
        t_end = t0
        for parent in pipes:
            if not parent.poll(timeout_s):
                raise TimeoutError("raw sink did not finish")
            _, got, _, t = parent.recv()
            if got != len(data):
                raise RuntimeError(f"raw sink got {got} of {len(data)} bytes")
            t_end = max(t_end, t)
        return float(t_end - t0)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for parent in pipes:
            parent.close()


def crc_mb_s(data: memoryview) -> dict[str, float]:
    """The checksum's own speed here, whole-buffer, for the data plane's CRC-32 (zlib-ng) and the
    system zlib's (what it replaced): the receivers' third cost beside the two copies."""
    import zlib

    from cascade.framing import crc32

    out = {}
    for name, fn in (("zlib-ng", crc32), ("zlib", zlib.crc32)):
        t0 = time.monotonic()
        for i in range(0, len(data), 1 << 20):  # in chunks, as a receiver does
            fn(data[i : i + (1 << 20)])
        out[name] = len(data) / 1e6 / (time.monotonic() - t0)
    return out
