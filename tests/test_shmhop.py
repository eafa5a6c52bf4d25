"""Same-host hops through shared memory (cascade.shmhop) with real sockets, memfds and bytes:
what goes through, what is refused, what happens when an upstream dies or lies, and that no
shared memory outlives a transfer."""

from __future__ import annotations

import gc
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import shmhop
from cascade.config import GenerateSpec
from cascade.framing import (
    ConnHeader,
    RateLimiter,
    UnitHeader,
    encode_switch,
    read_status,
    unit_frame_crc,
)
from cascade.messages import TransferOrder
from cascade.modelfiles import FILES_TENSOR
from cascade.models.checkpoint import Checkpoint
from services.loader.hostcache import HostCache
from services.worker.dataplane import (
    CheckpointSource,
    DataPlaneServer,
    TensorSource,
    send_units,
    tensor_bytes,
)
from tests.inproc import model_dir_fixture

MODEL = "tiny"
SPEC = GenerateSpec(layers=3, hidden=128, heads=4, kv_heads=2, vocab=320)
TIMEOUT_S = 30.0

pytestmark = pytest.mark.skipif(not shmhop.available(), reason="needs memfd and SCM_RIGHTS (Linux)")


model_dir = model_dir_fixture(SPEC, "models", MODEL)


@pytest.fixture(scope="module")
def ckpt(model_dir: Path) -> Iterator[Checkpoint]:
    c = Checkpoint(model_dir)
    yield c
    c.close()


def _memfd_fds() -> int:
    """Open fds of this process that are our shared-memory regions (after collecting garbage:
    the finalizers of unreachable regions close them)."""
    gc.collect()
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with_target = os.path.join("/proc/self/fd", fd)
        try:
            if shmhop.MEMFD_NAME in os.readlink(with_target):
                n += 1
        except OSError:
            pass
    return n


def _memfd_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if shmhop.MEMFD_NAME in line)


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _settled(want_fds: int, want_maps: int) -> tuple[int, int]:
    """fds and mappings of our regions once garbage is collected (finalizers close them)."""
    gc.collect()
    return _memfd_fds() - want_fds, _memfd_maps() - want_maps


class Recorder:
    def __init__(self) -> None:
        self.units: list[int] = []
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        self.failed: list[str] = []
        self.done = threading.Event()

    def ready(self, unit: int, tensors: dict[str, torch.Tensor]) -> None:
        self.units.append(unit)
        self.tensors[unit] = tensors

    def fail(self, reason: str) -> None:
        self.failed.append(reason)
        self.done.set()

    def complete(self, _stats: object) -> None:
        self.done.set()


def _order(tid: str, n: int, downstream: str | None = None, timeout_s: float = 10.0) -> TransferOrder:
    return TransferOrder(tid, "k", MODEL, "receive", list(range(n)), n, downstream=downstream, timeout_s=timeout_s)


def _same_bytes(rec: Recorder, ckpt: Checkpoint) -> None:
    assert rec.units == list(range(ckpt.config.num_units)) and not rec.failed
    for u in rec.units:
        for name, t in rec.tensors[u].items():
            assert bytes(tensor_bytes(t)) == bytes(ckpt.raw(name))


def _chain_of_two(ckpt: Checkpoint, model_dir: Path, source: str) -> None:
    n = ckpt.config.num_units
    cache = HostCache(mode="copy" if source == "host-cache-copy" else "mmap")
    maps0 = _memfd_maps()
    try:
        with DataPlaneServer() as a, DataPlaneServer() as b:
            ra, rb = Recorder(), Recorder()
            wb = b.expect(_order("s1", n), rb.ready, rb.fail, on_complete=rb.complete)
            wa = a.expect(_order("s1", n, downstream=b.address), ra.ready, ra.fail, on_complete=ra.complete)
            if source.startswith("host-cache"):
                cache.load(MODEL, model_dir)
                with cache.lease(MODEL) as src:
                    send_units(src, a.address, "s1", "k", list(range(n)))
            elif source == "checkpoint":
                # Not registered as shared: the sender stages each unit in a memfd first.
                send_units(CheckpointSource(ckpt, MODEL), a.address, "s1", "k", list(range(n)))
            else:
                units = {u: dict(ckpt.unit_tensors(u)) for u in range(n)}
                send_units(TensorSource(MODEL, units), a.address, "s1", "k", list(range(n)))
            assert ra.done.wait(TIMEOUT_S) and rb.done.wait(TIMEOUT_S)
            assert (wa.stats.receive_path, wa.stats.forward_path) == ("shm", "shm")
            assert (wb.stats.receive_path, wb.stats.forward_path) == ("shm", None)
            for rec in (ra, rb):
                if source.startswith("host-cache"):
                    # The model's files ride with unit 0: drop them before comparing weights.
                    rec.tensors[0].pop(FILES_TENSOR, None)
                _same_bytes(rec, ckpt)
            assert _memfd_maps() > maps0, "the received tensors live in shared memory"
    finally:
        cache.close()


@pytest.mark.parametrize("source", ["host-cache-copy", "host-cache-mmap", "checkpoint", "tensors"])
def test_a_same_host_chain_moves_identical_bytes_and_leaks_no_shared_memory(
    ckpt: Checkpoint, model_dir: Path, source: str
) -> None:
    """Source → A → B: both hops read through shared memory (A copies from the source's memory, B
    from A's unit buffers), every byte is the checkpoint's, and once the tensors are dropped no
    region, fd or mapping is left and nothing appeared in /dev/shm."""
    fds0, maps0, shm0 = _memfd_fds(), _memfd_maps(), _dev_shm()
    _chain_of_two(ckpt, model_dir, source)
    assert _settled(fds0, maps0) == (0, 0)
    assert _dev_shm() == shm0


def test_a_paced_send_or_another_host_id_stays_on_tcp(ckpt: Checkpoint) -> None:
    """An emulated link (a paced send, or a hop with an egress limiter) stands for another host,
    and so does another --host-id on this machine: those keep TCP."""
    n = ckpt.config.num_units
    src = CheckpointSource(ckpt, MODEL)
    with DataPlaneServer(host_id="h1") as a, DataPlaneServer(host_id="h2") as b:
        ra, rb = Recorder(), Recorder()
        wb = b.expect(_order("p1", n), rb.ready, rb.fail, on_complete=rb.complete)
        wa = a.expect(_order("p1", n, downstream=b.address), ra.ready, ra.fail, on_complete=ra.complete)
        send_units(src, a.address, "p1", "k", list(range(n)), limiter=RateLimiter(1e12), host_id="h1")
        assert ra.done.wait(TIMEOUT_S) and rb.done.wait(TIMEOUT_S)
        assert (wa.stats.receive_path, wa.stats.forward_path, wb.stats.receive_path) == ("tcp", "copy", "tcp")
        _same_bytes(ra, ckpt)
        _same_bytes(rb, ckpt)
    with DataPlaneServer(egress=RateLimiter(1e12)) as c:
        rc = Recorder()
        wc = c.expect(_order("p2", n), rc.ready, rc.fail, on_complete=rc.complete)
        send_units(src, c.address, "p2", "k", list(range(n)))
        assert rc.done.wait(TIMEOUT_S) and wc.stats.receive_path == "tcp"
        _same_bytes(rc, ckpt)


def _handshake(addr: str, tid: str, token: str, units: tuple[int, ...]) -> tuple[socket.socket, bool, str]:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    s.sendall(ConnHeader(tid, token, MODEL, units).encode())
    ok, reason = read_status(s.recv_into)
    return s, ok, reason


def test_no_offer_without_the_token_and_no_link_without_the_nonce(ckpt: Checkpoint) -> None:
    """A wrong token is refused with no offer at all; a link that presents a wrong nonce (or none)
    is refused and changes nothing; the real sender then gets every byte through shared memory."""
    n = ckpt.config.num_units
    with DataPlaneServer() as srv:
        rec = Recorder()
        r = srv.expect(_order("t1", n), rec.ready, rec.fail, on_complete=rec.complete)
        s, ok, reason = _handshake(srv.address, "t1", "wrong", tuple(range(n)))
        s.close()
        assert not ok and reason == "bad token" and shmhop.Offer.parse(reason) is None
        assert srv._shm_listener is not None
        # A stranger on this host guessing at the socket: a nonce of its own.
        fake = shmhop.Offer(shmhop.host_key(), srv._shm_listener.name, shmhop.nonce())
        stranger = shmhop.connect(fake, "t1", TIMEOUT_S)
        stranger.settimeout(TIMEOUT_S)
        assert stranger.sock.recv(1) == b"", "the receiver closes a link it refused"
        stranger.close()
        assert srv.refused == 2 and rec.units == [] and not rec.failed

        send_units(CheckpointSource(ckpt, MODEL), srv.address, "t1", "k", list(range(n)))
        assert rec.done.wait(TIMEOUT_S) and r.stats.receive_path == "shm"
        _same_bytes(rec, ckpt)


def _fake_upstream(addr: str, ckpt: Checkpoint, tid: str, n: int) -> tuple[socket.socket, shmhop.ShmLink]:
    s, ok, reason = _handshake(addr, tid, "k", tuple(range(n)))
    assert ok
    link = shmhop.accept_offer(reason, shmhop.host_key(), tid, TIMEOUT_S)
    assert link is not None, f"no same-host offer in {reason!r}"
    s.sendall(encode_switch())
    return s, link


def _unit0(ckpt: Checkpoint) -> tuple[list[tuple[object, memoryview]], UnitHeader, shmhop.SharedMap]:
    pieces = CheckpointSource(ckpt, MODEL).unit(0)
    header = UnitHeader(0, tuple(m for m, _ in pieces))
    region = shmhop.SharedMap.create(header.nbytes)
    arr = np.frombuffer(region, dtype=np.uint8)
    off = 0
    for m, v in pieces:
        arr[off : off + m.nbytes] = np.frombuffer(v, dtype=np.uint8)
        off += m.nbytes
    del arr
    return pieces, header, region  # type: ignore[return-value]


@pytest.mark.parametrize("how", ["dies", "hangs", "lies"])
def test_an_upstream_that_dies_hangs_or_lies_mid_unit_fails_the_receiver_cleanly(ckpt: Checkpoint, how: str) -> None:
    """Half of unit 0 is announced, then the upstream closes its link (its process died), goes
    quiet (the receive timeout), or claims the whole unit with bytes that do not match its CRC:
    the receiver fails with the reason, reports no unit, and keeps no mapping or fd of the
    upstream's memory (nor of its own buffers, once the reception is gone)."""
    fds0, maps0, shm0 = _memfd_fds(), _memfd_maps(), _dev_shm()
    _upstream_fails(ckpt, how)
    assert _settled(fds0, maps0) == (0, 0)
    assert _dev_shm() == shm0


def _upstream_fails(ckpt: Checkpoint, how: str) -> None:
    n = ckpt.config.num_units
    with DataPlaneServer() as srv:
        rec = Recorder()
        srv.expect(_order(f"d-{how}", n, timeout_s=1.0 if how == "hangs" else TIMEOUT_S), rec.ready, rec.fail)
        s, link = _fake_upstream(srv.address, ckpt, f"d-{how}", n)
        pieces, header, region = _unit0(ckpt)
        off, where = 0, []
        for m, _ in pieces:
            where.append((region.fd, off))
            off += m.nbytes  # type: ignore[attr-defined]
        link.send_unit(0, header.encode(), where)
        if how == "lies":
            crc = unit_frame_crc(0, pieces)  # type: ignore[arg-type]
            region[5] ^= 0x10  # a byte changed after the CRC was computed
            link.send_progress(0, header.nbytes)
            link.send_crc(0, crc)
        else:
            link.send_progress(0, header.nbytes // 2)
        if how == "dies":
            link.close()
            s.close()
        assert rec.done.wait(TIMEOUT_S)
        want = {"dies": "Truncated", "hangs": "timed out", "lies": "checksum"}[how]
        assert rec.units == [] and len(rec.failed) == 1 and want in rec.failed[0], rec.failed
        link.close()
        s.close()


def test_a_switch_without_an_offer_is_refused(ckpt: Checkpoint) -> None:
    """A receiver that offered no same-host link (shm off) fails a sender that switches anyway."""
    n = ckpt.config.num_units
    with DataPlaneServer(shm=False) as srv:
        rec = Recorder()
        srv.expect(_order("ns", n), rec.ready, rec.fail)
        s, ok, reason = _handshake(srv.address, "ns", "k", tuple(range(n)))
        assert ok and reason == ""
        s.sendall(encode_switch())
        assert rec.done.wait(TIMEOUT_S)
        s.close()
        assert rec.units == [] and "not offered" in rec.failed[0]


def _chain_of_three(ckpt: Checkpoint, source_over_tcp: bool) -> list[tuple[str, str | None]]:
    n = ckpt.config.num_units
    with DataPlaneServer() as a, DataPlaneServer() as b, DataPlaneServer() as c:
        recs = [Recorder() for _ in range(3)]
        ws = []
        for srv, rec, nxt in ((c, recs[2], None), (b, recs[1], c.address), (a, recs[0], b.address)):
            ws.append(srv.expect(_order("c3", n, downstream=nxt), rec.ready, rec.fail, on_complete=rec.complete))
        send_units(CheckpointSource(ckpt, MODEL), a.address, "c3", "k", list(range(n)), shm=not source_over_tcp)
        for rec in recs:
            assert rec.done.wait(TIMEOUT_S)
            _same_bytes(rec, ckpt)
        return [(w.stats.receive_path, w.stats.forward_path) for w in reversed(ws)]


@pytest.mark.parametrize("source_over_tcp", [False, True], ids=["shm-source", "tcp-source"])
def test_a_three_hop_same_host_chain_passes_each_hop_on(ckpt: Checkpoint, source_over_tcp: bool) -> None:
    """A → B → C on one host. Fed over shared memory, B passes A's messages on and C passes on
    B's (every hop copies from the source's memory); fed over TCP, A points B at its own buffers
    and B passes that on to C. Every hop holds the checkpoint's bytes; no region is left."""
    fds0, maps0, shm0 = _memfd_fds(), _memfd_maps(), _dev_shm()
    paths = _chain_of_three(ckpt, source_over_tcp)
    first = "tcp" if source_over_tcp else "shm"
    assert paths == [(first, "shm"), ("shm", "shm"), ("shm", None)]
    assert _settled(fds0, maps0) == (0, 0)
    assert _dev_shm() == shm0
