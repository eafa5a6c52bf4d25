"""The parameter data plane with real sockets and real bytes: receivers in separate processes
where a process boundary matters (chain, kill), threads in this process elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench.dpprocs import ReceiverProc, collect, start_all, stop_all, unit_digest
from cascade.config import GenerateSpec
from cascade.framing import (
    ConnHeader,
    TeeRelay,
    encode_status,
    iter_unit_frames,
    read_conn_header,
    read_crc,
    read_status,
    read_unit_header,
    recv_unit_body,
)
from cascade.messages import TransferOrder
from cascade.modelfiles import FILES_TENSOR, unpack
from cascade.models.checkpoint import Checkpoint
from cascade.workers import WorkerView
from services.loader.hostcache import HostCache, keep_alive_decision
from services.loader.planner import MeshSnapshot, PlanRequest, plan_orders, plan_transfer, replan
from services.worker.dataplane import (
    CheckpointSource,
    DataPlaneServer,
    RateLimiter,
    TensorSource,
    TransferError,
    send_units,
    send_units_async,
    tensor_bytes,
)
from tests.inproc import model_dir_fixture
from tests.waiting import wait_until

MODEL = "tiny"
SPEC = GenerateSpec(layers=4, hidden=128, heads=4, kv_heads=2, vocab=320)
EVENT_TIMEOUT_S = 30.0


model_dir = model_dir_fixture(SPEC, "models", MODEL)


@pytest.fixture(scope="module")
def ckpt(model_dir: Path) -> Iterator[Checkpoint]:
    c = Checkpoint(model_dir)
    yield c
    c.close()


@pytest.fixture(scope="module")
def source_digests(ckpt: Checkpoint) -> list[str]:
    return [unit_digest(ckpt.unit_tensors(u)) for u in range(ckpt.config.num_units)]


def _procs(n: int, relay: bool = False) -> Iterator[list[ReceiverProc]]:
    procs = [ReceiverProc(f"t{i + 1}", relay=relay) for i in range(n)]
    start_all(procs)
    try:
        yield procs
    finally:
        stop_all(procs)


# Both ways of forwarding (send from the buffer, or the kernel relay) through every chain test:
# same bytes at every hop, and a hop that loses its downstream keeps receiving either way.
@pytest.fixture(params=[False, True], ids=["copy", "relay"])
def three(request: pytest.FixtureRequest) -> Iterator[list[ReceiverProc]]:
    yield from _procs(3, relay=request.param)


def _snapshot(procs: list[ReceiverProc], holder_load: int = 0, cached: bool = False) -> MeshSnapshot:
    n = SPEC.layers + 2
    workers = [WorkerView("src", "serving", MODEL, n, n, running=holder_load, data_addr="unused:1")]
    workers += [WorkerView(p.name, "idle", None, 0, 0, data_addr=p.addr) for p in procs]
    return MeshSnapshot(tuple(workers), frozenset({MODEL}) if cached else frozenset())


def _by_receiver(events: list[tuple[str, tuple[object, ...]]], kind: str) -> dict[str, list[tuple[object, ...]]]:
    out: dict[str, list[tuple[object, ...]]] = {}
    for name, ev in events:
        if ev[0] == kind:
            out.setdefault(name, []).append(ev)
    return out


def test_chain_to_three_processes(three: list[ReceiverProc], ckpt: Checkpoint, source_digests: list[str]) -> None:
    n = ckpt.config.num_units
    sizes = tuple(ckpt.unit_nbytes(u) for u in range(n))
    plan = plan_transfer(_snapshot(three), PlanRequest(MODEL, ("t1", "t2", "t3"), "multicast", sizes), "p1")
    orders = plan_orders(plan)
    for p in three:
        p.expect(orders[p.name][0], digest=True)
    (send,) = orders["src"]
    assert send.downstream == three[0].addr
    stats = send_units(CheckpointSource(ckpt, MODEL), send.downstream, send.transfer_id, send.token, send.units)
    assert stats.nbytes > ckpt.total_nbytes()

    events = collect(three, lambda evs: len(_by_receiver(evs, "complete")) == 3, EVENT_TIMEOUT_S)
    assert not _by_receiver(events, "failed") and not _by_receiver(events, "forward_failed")
    ready = _by_receiver(events, "ready")
    for p in three:
        assert [ev[2] for ev in ready[p.name]] == list(range(n)), "units must arrive in order"
        assert [ev[4] for ev in ready[p.name]] == source_digests, f"{p.name}: bytes differ from the source"

    # A live worker's tensors as the source (what a serving holder sends), and disk, same bytes.
    for p in three:
        p.drop()
    live = TensorSource(MODEL, {u: ckpt.unit_tensors(u) for u in range(n)})
    order = TransferOrder("live-1", "tok-live", MODEL, "receive", list(range(n)), n)
    three[0].expect(order, digest=True)
    send_units(live, three[0].addr, "live-1", "tok-live", order.units)
    three[1].load_disk("disk-1", str(ckpt.dir), MODEL, list(range(n)), digest=True)
    events = collect(three[:2], lambda evs: len(_by_receiver(evs, "complete")) == 2, EVENT_TIMEOUT_S)
    ready = _by_receiver(events, "ready")
    assert [ev[4] for ev in ready["t1"]] == source_digests
    assert [ev[4] for ev in ready["t2"]] == source_digests


def test_kill_middle_then_replan(three: list[ReceiverProc], ckpt: Checkpoint, source_digests: list[str]) -> None:
    n = ckpt.config.num_units
    sizes = tuple(ckpt.unit_nbytes(u) for u in range(n))
    # The only holder serves requests: the plan rate-limits its send, which keeps the chain busy
    # long enough to lose a member mid-transfer.
    req = PlanRequest(MODEL, ("t1", "t2", "t3"), "multicast", sizes, serving_rate_limit_bps=8e6)
    plan = plan_transfer(_snapshot(three, holder_load=2), req, "p1")
    assert plan.chains[0].source.serving and plan.chains[0].source.rate_limit_bps == 8e6
    orders = plan_orders(plan)
    for p in three:
        p.expect(orders[p.name][0], digest=True)
    (send,) = orders["src"]

    t1, t2, t3 = three
    killed = threading.Event()
    result: list[object] = []

    def gate(unit: int) -> None:
        # Deterministic "mid-transfer": after unit 1 the source waits until the middle one is dead.
        if unit == 1:
            killed.wait(EVENT_TIMEOUT_S)

    def sender() -> None:
        try:
            result.append(
                send_units(
                    CheckpointSource(ckpt, MODEL),
                    t1.addr,
                    send.transfer_id,
                    send.token,
                    send.units,
                    rate_limit_bps=send.rate_limit_bps,
                    on_unit_sent=gate,
                )
            )
        except TransferError as e:
            result.append(e)

    th = threading.Thread(target=sender)
    th.start()
    try:
        events = collect(three, lambda evs: any(nm == "t2" and ev[:3] == ("ready", "p1-0", 1) for nm, ev in evs), 30)
        t2.proc.kill()  # a crash, not a shutdown: no goodbye on the socket
        t2.proc.join(EVENT_TIMEOUT_S)
    finally:
        killed.set()
    alive = [t1, t3]
    events += collect(
        alive,
        lambda evs: bool(_by_receiver(evs, "failed").get("t3")) and bool(_by_receiver(evs, "complete").get("t1")),
        EVENT_TIMEOUT_S,
    )
    th.join(EVENT_TIMEOUT_S)
    assert len(result) == 1 and not isinstance(result[0], TransferError), "the source finished sending to t1"
    assert _by_receiver(events, "forward_failed").get("t1"), "t1 noticed it lost its downstream"
    ready = _by_receiver(events, "ready")
    assert [ev[4] for ev in ready["t1"]] == source_digests
    got3 = [ev[4] for ev in ready.get("t3", [])]
    assert got3 == source_digests[: len(got3)] and len(got3) < n, "t3 holds only verified units, in order"

    # The loader re-plans: the host cache now holds the model and beats the serving holder.
    cache = HostCache(mode="mmap", lock_pages=False)
    try:
        cache.load(MODEL, ckpt.dir)
        after = MeshSnapshot(
            tuple(w for w in _snapshot(three, holder_load=2, cached=True).workers if w.worker_id != "t2"),
            frozenset({MODEL}),
        )
        new = replan(plan, "t2", after, {"t3": len(got3)}, "p2")
        assert new is not None
        (chain,) = new.chains
        assert chain.source.kind == "host-cache" and [h.worker_id for h in chain.targets] == ["t3"]
        assert chain.units == tuple(range(len(got3), n))
        orders2 = plan_orders(new)
        t3.expect(orders2["t3"][0], digest=True)
        (send2,) = orders2["host-cache"]
        with cache.lease(MODEL) as src:
            send_units(src, t3.addr, send2.transfer_id, send2.token, send2.units)
        events2 = collect([t3], lambda evs: bool(_by_receiver(evs, "complete")), EVENT_TIMEOUT_S)
    finally:
        cache.close()
    rest = [ev[4] for ev in _by_receiver(events2, "ready")["t3"]]
    assert got3 + rest == source_digests, "t3 completes from the host cache with the source's bytes"


# --------------------------------------------------------------------------- in-process, real sockets


class Recorder:
    def __init__(self) -> None:
        self.units: list[int] = []
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        self.failed: list[str] = []
        self.threads: set[int] = set()
        self.done = asyncio.Event()

    def ready(self, unit: int, tensors: dict[str, torch.Tensor]) -> None:
        self.threads.add(threading.get_ident())
        self.units.append(unit)
        self.tensors[unit] = tensors

    def fail(self, reason: str) -> None:
        self.threads.add(threading.get_ident())
        self.failed.append(reason)
        self.done.set()

    def complete(self, _stats: object) -> None:
        self.done.set()


def _order(tid: str, token: str, n: int, downstream: str | None = None, timeout_s: float = 10.0) -> TransferOrder:
    return TransferOrder(tid, token, MODEL, "receive", list(range(n)), n, downstream=downstream, timeout_s=timeout_s)


async def test_async_callbacks_on_loop_and_wrong_token_refused(ckpt: Checkpoint) -> None:
    n = ckpt.config.num_units
    with DataPlaneServer() as srv:
        rec = Recorder()
        r = srv.expect(_order("tx", "right", n), rec.ready, rec.fail, on_complete=rec.complete)
        src = CheckpointSource(ckpt, MODEL)

        # Through the client: refused, with the reason, before any unit is sent.
        with pytest.raises(TransferError, match="bad token"):
            await asyncio.to_thread(send_units, src, srv.address, "tx", "wrong", list(range(n)))
        # A raw client that does not wait for the verdict and streams a whole model anyway.
        raw = ConnHeader("tx", "wrong", MODEL, tuple(range(n))).encode()
        for u in range(n):
            raw += b"".join(bytes(p) for p in iter_unit_frames(u, src.unit(u)))
        host, port = srv.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.settimeout(10)
            await asyncio.to_thread(s.sendall, raw[: 1 << 16])
            ok, reason = read_status(s.recv_into)
            assert not ok and reason == "bad token"
        assert srv.refused == 2
        assert rec.units == [] and rec.failed == [] and r.stats.nbytes == 0 and r.stats.t_connected is None

        # The expectation survived the strangers: the real sender still gets through.
        send = dataclasses.replace(_order("tx", "right", n), role="send", downstream=srv.address)
        stats = await send_units_async(src, send)
        done = await r.wait()
        assert done.nbytes == ckpt.total_nbytes() and stats.nbytes > done.nbytes
        assert rec.units == list(range(n)) and rec.threads == {threading.get_ident()}, "callbacks run on the loop"
        for u in range(n):
            for name, t in rec.tensors[u].items():
                assert bytes(tensor_bytes(t)) == bytes(ckpt.raw(name))
                assert tuple(t.shape) == tuple(ckpt.tensor(name).shape) and t.dtype == ckpt.tensor(name).dtype


def _stream(ckpt: Checkpoint, tid: str, token: str, corrupt_unit: int | None = None) -> list[bytes]:
    """The frames of a whole transfer, one bytes object per unit after the header; optionally with
    one bit flipped inside a unit's payload (after its sender computed the CRC)."""
    n = ckpt.config.num_units
    src = CheckpointSource(ckpt, MODEL)
    out = [ConnHeader(tid, token, MODEL, tuple(range(n))).encode()]
    for u in range(n):
        unit = bytearray(b"".join(bytes(p) for p in iter_unit_frames(u, src.unit(u))))
        if u == corrupt_unit:
            unit[len(unit) // 2] ^= 0x04
        out.append(bytes(unit))
    return out


async def _send_raw(addr: str, parts: list[bytes]) -> None:
    host, port = addr.rsplit(":", 1)

    def go() -> None:
        with socket.create_connection((host, int(port))) as s:
            s.settimeout(10)
            s.sendall(parts[0])
            ok, reason = read_status(s.recv_into)
            assert ok, reason
            # A receiver may cut a stream it has rejected (a bad unit) before the rest is sent.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for p in parts[1:]:
                    s.sendall(p)

    await asyncio.to_thread(go)


@pytest.mark.parametrize("path", ["relay", "copy", "shm"])
async def test_forwarder_passes_on_the_bytes_it_keeps(ckpt: Checkpoint, path: str) -> None:
    n = ckpt.config.num_units
    relay = path == "relay"
    # Same host here: only a hop with same-host links off (or relaying) forwards over TCP.
    with DataPlaneServer(relay=relay, shm=path == "shm") as a, DataPlaneServer() as b:
        ra, rb = Recorder(), Recorder()
        wb = b.expect(_order("f1", "k", n), rb.ready, rb.fail)
        wa = a.expect(_order("f1", "k", n, downstream=b.address), ra.ready, ra.fail)
        await asyncio.to_thread(send_units, CheckpointSource(ckpt, MODEL), a.address, "f1", "k", list(range(n)))
        sa, sb = await asyncio.wait_for(asyncio.gather(wa.wait(), wb.wait()), EVENT_TIMEOUT_S)
    # Through the relay every payload byte went downstream in the kernel, none through a send
    # from the forwarder's buffer; either way both hops hold the source's bytes, every unit.
    want = "relay" if relay and TeeRelay.available() else path if path == "shm" else "copy"
    assert sa.forward_path == want and sb.forward_path is None
    assert (sa.receive_path, sb.receive_path) == (("shm", "shm") if path == "shm" else ("tcp", "tcp"))
    assert sa.relayed == (ckpt.total_nbytes() if sa.forward_path == "relay" else 0)
    assert sa.forward_error is None and not ra.failed and not rb.failed
    for rec in (ra, rb):
        assert rec.units == list(range(n))
        for u in range(n):
            for name, t in rec.tensors[u].items():
                assert bytes(tensor_bytes(t)) == bytes(ckpt.raw(name))


async def test_a_forwarder_on_an_emulated_link_passes_on_each_unit_while_still_receiving(ckpt: Checkpoint) -> None:
    """Three hops, every sender paced like a NIC with a transmit queue (the benchmark's link):
    each hop gets the source's bytes, and the last hop has its first unit before the first hop has
    its last one: units are forwarded as they arrive, not stored until the transfer is in."""
    n = ckpt.config.num_units
    rate = ckpt.total_nbytes() / 0.5  # about half a second on the line per hop
    order: list[tuple[str, int]] = []

    class Logged(Recorder):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def ready(self, unit: int, tensors: dict[str, torch.Tensor]) -> None:
            order.append((self.name, unit))
            super().ready(unit, tensors)

    def nic() -> RateLimiter:
        return RateLimiter(rate, burst=1 << 14, queue=True)

    with DataPlaneServer(egress=nic(), chunk=1 << 14) as a, DataPlaneServer(egress=nic(), chunk=1 << 14) as b:
        with DataPlaneServer(chunk=1 << 14) as c:
            recs = {name: Logged(name) for name in "abc"}
            waits = [
                c.expect(_order("e1", "k", n), recs["c"].ready, recs["c"].fail),
                b.expect(_order("e1", "k", n, downstream=c.address), recs["b"].ready, recs["b"].fail),
                a.expect(_order("e1", "k", n, downstream=b.address), recs["a"].ready, recs["a"].fail),
            ]
            src = CheckpointSource(ckpt, MODEL)
            await asyncio.to_thread(send_units, src, a.address, "e1", "k", list(range(n)), limiter=nic(), chunk=1 << 14)
            stats = await asyncio.wait_for(asyncio.gather(*(w.wait() for w in waits)), EVENT_TIMEOUT_S)
    assert [s.forward_path for s in stats] == [None, "copy", "copy"]
    assert all(s.forward_error is None for s in stats)
    for rec in recs.values():
        assert not rec.failed and rec.units == list(range(n))
        for u in range(n):
            for name, t in rec.tensors[u].items():
                assert bytes(tensor_bytes(t)) == bytes(ckpt.raw(name))
    assert order.index(("c", 0)) < order.index(("a", n - 1))


@pytest.mark.parametrize("relay", [True, False], ids=["relay", "copy"])
async def test_corrupted_unit_never_ready_anywhere_in_chain(ckpt: Checkpoint, relay: bool) -> None:
    n = ckpt.config.num_units
    with DataPlaneServer(relay=relay) as a, DataPlaneServer() as b:
        ra, rb = Recorder(), Recorder()
        b.expect(_order("c1", "k", n), rb.ready, rb.fail)
        a.expect(_order("c1", "k", n, downstream=b.address), ra.ready, ra.fail)
        await _send_raw(a.address, _stream(ckpt, "c1", "k", corrupt_unit=2))
        await asyncio.wait_for(asyncio.gather(ra.done.wait(), rb.done.wait()), EVENT_TIMEOUT_S)
        # The forwarder sent the bad bytes on before it could know; the next hop checks the
        # source's CRC too, so neither declares unit 2 (or anything after it) ready.
        for rec in (ra, rb):
            assert rec.units == [0, 1]
            assert len(rec.failed) == 1 and "checksum" in rec.failed[0] and "unit 2" in rec.failed[0]


async def test_truncated_stream_never_ready(ckpt: Checkpoint) -> None:
    n = ckpt.config.num_units
    with DataPlaneServer() as srv:
        rec = Recorder()
        srv.expect(_order("tr", "k", n), rec.ready, rec.fail)
        parts = _stream(ckpt, "tr", "k")
        await _send_raw(srv.address, [*parts[:3], parts[3][: len(parts[3]) // 2]])
        await asyncio.wait_for(rec.done.wait(), EVENT_TIMEOUT_S)
        assert rec.units == [0, 1] and len(rec.failed) == 1 and "Truncated" in rec.failed[0]


async def test_no_connection_times_out_and_close_fails_pending(ckpt: Checkpoint) -> None:
    with DataPlaneServer() as srv:
        rec = Recorder()
        r = srv.expect(_order("late", "k", 3, timeout_s=0.2), rec.ready, rec.fail)
        with pytest.raises(TransferError, match="no connection"):
            await asyncio.wait_for(r.wait(), EVENT_TIMEOUT_S)
        rec2 = Recorder()
        r2 = srv.expect(_order("pending", "k", 3), rec2.ready, rec2.fail)
    with pytest.raises(TransferError, match="closed"):
        await asyncio.wait_for(r2.wait(), EVENT_TIMEOUT_S)
    assert rec.failed and rec2.failed and not rec.units


def test_host_cache_copy_mode_and_policy(ckpt: Checkpoint, model_dir: Path) -> None:
    now = [100.0]
    cache = HostCache(mode="copy", clock=lambda: now[0])
    try:
        e = cache.load(MODEL, model_dir)
        assert cache.load(MODEL, model_dir) is e, "one copy per model"
        assert cache.nbytes() >= ckpt.total_nbytes() and cache.status()[MODEL]["mode"] == "copy"
        with cache.lease(MODEL) as src:
            for u in range(ckpt.config.num_units):
                for meta, data in src.unit(u):
                    if meta.name == FILES_TENSOR:
                        # Config and tokenizer ride with unit 0 for workers that cannot read them.
                        assert u == 0 and unpack(bytes(data))["config.json"] == (model_dir / "config.json").read_bytes()
                        continue
                    assert bytes(data) == bytes(ckpt.raw(meta.name))
            assert not cache.release(MODEL), "a leased model is not dropped"
        now[0] += 10
        assert cache.sweep({MODEL: 1}, keep_alive_s=60) == []
        now[0] += 60
        released = cache.sweep({MODEL: 1}, keep_alive_s=60)
        assert [m for m, _ in released] == [MODEL] and not cache.has(MODEL) and cache.nbytes() == 0
    finally:
        cache.close()
    assert keep_alive_decision(1000, 0, in_use=1, live_holders=0).release is False
    assert keep_alive_decision(1000, 0, in_use=0, live_holders=0, keep_alive_cold_s=3600).release is False
    assert keep_alive_decision(5000, 0, in_use=0, live_holders=0, keep_alive_cold_s=3600).release is True
    assert keep_alive_decision(400, 0, in_use=0, live_holders=2, keep_alive_s=300).release is True


async def test_a_stalled_next_hop_does_not_hold_up_the_forwarder() -> None:
    """The forwarder receives, verifies and reports every unit while its next hop reads nothing
    (far more bytes than the sockets between them can buffer); the next hop, reading afterwards,
    gets every unit byte for byte with the source's CRC."""
    gen = torch.Generator().manual_seed(5)
    units = {u: {f"u{u}.w": torch.randn(2 << 20, generator=gen)} for u in range(4)}  # 8 MB each
    source = TensorSource(MODEL, units)
    stalled = socket.create_server(("127.0.0.1", 0))
    addr = f"127.0.0.1:{stalled.getsockname()[1]}"
    accepted: list[socket.socket] = []
    handshake = threading.Event()

    def next_hop() -> None:
        # Answers the connection header, then reads nothing until told to.
        conn, _ = stalled.accept()
        accepted.append(conn)
        conn.settimeout(EVENT_TIMEOUT_S)
        read_conn_header(conn.recv_into)
        conn.sendall(encode_status(True))
        handshake.set()

    hop = threading.Thread(target=next_hop)
    hop.start()
    order = TransferOrder("st", "k", MODEL, "receive", [0, 1, 2, 3], 4, downstream=addr, timeout_s=EVENT_TIMEOUT_S)
    try:
        with DataPlaneServer() as srv:
            rec = Recorder()
            srv.expect(order, rec.ready, rec.fail, on_complete=rec.complete)
            await asyncio.to_thread(send_units, source, srv.address, "st", "k", [0, 1, 2, 3])
            await asyncio.wait_for(rec.done.wait(), EVENT_TIMEOUT_S)
            assert rec.units == [0, 1, 2, 3] and not rec.failed
            assert handshake.is_set()
            hop.join(EVENT_TIMEOUT_S)
            conn = accepted[0]
            for u in range(4):
                uh, raw = read_unit_header(conn.recv_into, expect=u)
                buf = bytearray(uh.layout()[1])
                crc = recv_unit_body(conn.recv_into, uh, raw, memoryview(buf))
                sent_crc, _ = read_crc(conn.recv_into)
                assert crc == sent_crc == source.crcs[u]
                assert bytes(buf) == bytes(tensor_bytes(units[u][f"u{u}.w"]))
    finally:
        for c in accepted:
            c.close()
        stalled.close()
        hop.join(EVENT_TIMEOUT_S)


async def test_a_failed_reception_nobody_awaits_is_not_logged_as_never_retrieved(ckpt: Checkpoint) -> None:
    """A re-planned transfer's old reception fails and is dropped without a `wait()`: its failure is
    reported through on_failed and the log, not again by asyncio at garbage collection."""
    import gc

    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    try:
        with DataPlaneServer() as srv:
            rec = Recorder()
            r = srv.expect(_order("gone", "k", ckpt.config.num_units), rec.ready, rec.fail, loop=loop)
            r.cancel("re-planned")
            fut = r._future
            assert fut is not None
            await wait_until(fut.done, 10, "the failed reception settled")
            assert rec.failed == ["re-planned"]
            awaited = srv.expect(_order("kept", "k", ckpt.config.num_units), rec.ready, rec.fail, loop=loop)
            awaited.cancel("stop")
            with pytest.raises(TransferError, match="stop"):
                await asyncio.wait_for(awaited.wait(), 10)
            del r, fut
        gc.collect()
        assert not [c for c in unretrieved if "never retrieved" in str(c.get("message", ""))]
    finally:
        loop.set_exception_handler(previous)
