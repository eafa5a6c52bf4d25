"""Scale-ups through the real loader and real worker services on a real nats-server: the loader
plans, workers receive, verify, forward and install units, and announce each one.

Workers run in this process (`cascade.service.serve`), except the one a test kills: that one is
a `cascade worker` process, so it can die the way a crashed process does (SIGKILL, no goodbye on
its sockets)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.framing import ConnHeader, read_status
from cascade.messages import (
    BatchReply,
    GenerateBatch,
    GenerateRequest,
    HostCacheRequest,
    LayerReady,
    MessageError,
    Ok,
    SamplingParams,
    ScaleAck,
    ScaleDecision,
    TokenEvents,
    TransferEvent,
    TransferOrder,
    TransferPlanned,
    UnloadModel,
    decode,
    encode,
)
from cascade.models.checkpoint import Checkpoint
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import connect, gather_status, request
from cascade.subjects import Subjects
from services.loader.main import Loader
from services.worker.dataplane import model_unit_tensors, tensor_bytes
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import loader_settings, model_dir_fixture, serving
from tests.waiting import wait_for_change, wait_until

pytestmark = pytest.mark.e2e

MODEL = "mc"
SPEC = GenerateSpec(layers=6, hidden=128, heads=4, kv_heads=2, vocab=320, seed=11)
HB_S = 0.2
EVENT_TIMEOUT_S = 60.0
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
REPO = Path(__file__).resolve().parent.parent


model_dir = model_dir_fixture(SPEC, "models", MODEL)


@pytest.fixture(scope="module")
def source_crcs(model_dir: Path) -> list[int]:
    ckpt = Checkpoint(model_dir)
    try:
        return [_crc(ckpt.unit_tensors(u)) for u in range(ckpt.config.num_units)]
    finally:
        ckpt.close()


def _crc(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32 over each tensor's name, dtype, shape and bytes, in order."""
    crc = 0
    for name, t in tensors.items():
        crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode(), crc)
        crc = zlib.crc32(tensor_bytes(t), crc)
    return crc


# --------------------------------------------------------------------------- the mesh


@dataclass
class Mesh:
    nc: NATS
    s: Subjects
    loader: Loader
    workers: dict[str, WorkerService]
    ready: dict[str, list[LayerReady]] = field(default_factory=dict)
    plans: list[TransferPlanned] = field(default_factory=list)
    events: list[TransferEvent] = field(default_factory=list)
    acks: dict[str, ScaleAck] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, pred: Callable[[], object], what: str, timeout: float = EVENT_TIMEOUT_S) -> None:
        """Wait on the mesh's own events (every message below sets `changed`), with a deadline."""
        await wait_for_change(self.changed, pred, timeout, what)

    async def decide(self, d: ScaleDecision) -> ScaleAck:
        await self.nc.publish(self.s.scale_decision(), encode(d))
        await self.until(lambda: d.decision_id in self.acks, f"ack of {d.decision_id}")
        return self.acks[d.decision_id]

    async def generate(self, worker: str, rid: str, prompt: str = "chain multicast") -> list[int]:
        req = GenerateRequest(rid, MODEL, ByteTokenizer().encode(prompt), GREEDY)
        reply = await request(self.nc, self.s.generate(worker), GenerateBatch("gw", [req]), BatchReply, timeout=10)
        assert reply.accepted == [rid], reply
        await self.until(lambda: rid in self.finished, f"request {rid} on {worker}")
        return self.tokens[rid]


async def _listen(m: Mesh) -> None:
    async def on_ready(msg: Msg) -> None:
        ev = decode(msg.data, LayerReady)
        m.ready.setdefault(ev.worker_id, []).append(ev)
        m.changed.set()

    async def on_plan(msg: Msg) -> None:
        m.plans.append(decode(msg.data, TransferPlanned))
        m.changed.set()

    async def on_event(msg: Msg) -> None:
        m.events.append(decode(msg.data, TransferEvent))
        m.changed.set()

    async def on_ack(msg: Msg) -> None:
        try:
            ack = decode(msg.data, ScaleAck)
        except MessageError:
            return
        m.acks[ack.decision_id] = ack
        m.changed.set()

    async def on_tokens(msg: Msg) -> None:
        for e in decode(msg.data, TokenEvents).events:
            m.tokens.setdefault(e.request_id, []).extend(e.token_ids)
            if e.finish_reason is not None:
                m.finished.add(e.request_id)
        m.changed.set()

    async def on_beat(_: Msg) -> None:
        m.changed.set()  # lets waits re-check conditions on worker state

    for subject, cb in (
        (m.s.ready_all(), on_ready),
        (m.s.transfer_plan(), on_plan),
        (m.s.transfer_event_all(), on_event),
        (m.s.scale_ack(), on_ack),
        (m.s.tokens("gw"), on_tokens),
        (m.s.heartbeat_all(), on_beat),
    ):
        await m.nc.subscribe(subject, cb=cb)
    await m.nc.flush()


@asynccontextmanager
async def _mesh(
    nats_url: str, s: Subjects, model_dir: Path, worker_ids: list[str], loader_extra: tuple[str, ...] = ()
) -> AsyncIterator[Mesh]:
    """A loader and in-process workers, and a connection that hears their events."""
    nc = await connect(nats_url, "test-multicast")
    try:
        dep = Deployment(models=(ModelDeployment(MODEL, model_dir, 0, 4, loading="multicast"),))
        flags = ("--loader-id", "loader-t", "--heartbeat-s", str(HB_S), "--idle-wait-s", "5", "--load-timeout-s", "60",
                 "--transfer-timeout-s", "20", *loader_extra)  # fmt: skip
        loader = Loader(loader_settings(nats_url, s.prefix, *flags), dep, structlog.get_logger().bind(test="mc"))
        workers = {
            w: WorkerService(WorkerSettings(nats_url, s.prefix, w, heartbeat_s=HB_S, drain_timeout_s=2))
            for w in worker_ids
        }
        m = Mesh(nc, s, loader, workers)
        await _listen(m)
        async with serving(nats_url, s.prefix, loader, *workers.values()):
            yield m
    finally:
        await nc.drain()


@pytest.fixture
async def mesh4(nats_url: str, subjects: Subjects, model_dir: Path) -> AsyncIterator[Mesh]:
    async with _mesh(nats_url, subjects, model_dir, ["w0", "w1", "w2", "w3"]) as m:
        up = lambda: all(w.started and w.heartbeat().data_addr for w in m.workers.values())  # noqa: E731
        await wait_until(up, what="data planes up")
        await m.until(lambda: len(m.loader.table.views(m.loader.clock())) == 4, "loader sees 4 workers")
        yield m


def _check_model(m: Mesh, worker: str, source_crcs: list[int]) -> None:
    model = m.workers[worker].slot.model
    assert model is not None and model.is_complete()
    got = [_crc(model_unit_tensors(model, u)) for u in range(len(source_crcs))]
    assert got == source_crcs, f"{worker}: units whose bytes differ from the checkpoint: " + str(
        [u for u, (a, b) in enumerate(zip(got, source_crcs, strict=True)) if a != b]
    )


def _check_readiness(m: Mesh, worker: str, n: int) -> None:
    evs = [e for e in m.ready.get(worker, []) if not e.reset]
    assert [e.unit for e in evs] == list(range(n)), f"{worker}: units announced {[e.unit for e in evs]}"
    seqs = [e.seq for e in m.ready[worker]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{worker}: readiness seq gap {seqs}"


# --------------------------------------------------------------------------- tests


async def test_multicast_to_three_workers(mesh4: Mesh, source_crcs: list[int]) -> None:
    m = mesh4
    n = SPEC.layers + 2
    # Nothing holds the model yet: even in multicast mode the first instance reads the disk, and
    # the loader keeps the one host copy for later.
    first = await m.decide(ScaleDecision("d-first", MODEL, "up", 1, 1, "test"))
    assert first.ok and first.workers == ["w0"], first
    assert [c.source for c in m.plans[-1].chains] == ["disk"] and "disk" in m.plans[-1].note

    ack = await m.decide(ScaleDecision("d-three", MODEL, "up", 3, 4, "test"))
    assert ack.ok, ack.error
    assert sorted(ack.workers) == ["w1", "w2", "w3"]
    plan = m.plans[-1]
    assert plan.decision_id == "d-three" and plan.mode == "multicast"
    (chain,) = plan.chains
    assert chain.source == "w0" and chain.targets == ["w1", "w2", "w3"] and chain.units == list(range(n))

    for w in ("w1", "w2", "w3"):
        _check_readiness(m, w, n)
        _check_model(m, w, source_crcs)
        assert m.workers[w].slot.state == "serving"
    done = {(e.worker_id, e.role) for e in m.events if e.kind == "complete" and e.transfer_id == chain.transfer_id}
    assert done == {("w0", "send"), ("w1", "receive"), ("w2", "receive"), ("w3", "receive")}
    assert not [e for e in m.events if e.kind != "complete"], "no transfer failed"

    want = await m.generate("w0", "src")
    for w in ("w1", "w2", "w3"):
        assert await m.generate(w, f"on-{w}") == want, f"{w} answers differently from the source"

    # `cascade status` sees the finished transfers and the host copy the disk load left behind.
    await m.until(
        lambda: m.loader.keeper is not None and m.loader.keeper.cache is not None and m.loader.keeper.cache.has(MODEL),
        "host cache filled",
    )
    st = await gather_status(m.nc, m.s, 0.5)
    (loader,) = [x for x in st.services if x.service == "loader"]
    rows = [r for r in loader.detail["transfers"] if r["decision_id"] == "d-three"]
    assert sorted(r["worker"] for r in rows) == ["w1", "w2", "w3"]
    assert all(r["state"] == "done" and r["units_ready"] == n and r["source"] == "w0" for r in rows)
    assert loader.detail["host_cache"][MODEL]["nbytes"] > 0 and loader.detail["host_cache_bytes"] > 0


async def test_each_mode_loads_a_correct_model(mesh4: Mesh, source_crcs: list[int]) -> None:
    m = mesh4
    ack = await m.decide(ScaleDecision("d-disk", MODEL, "up", 1, 1, "test", loading="disk"))
    assert ack.ok and ack.workers == ["w0"], ack
    assert [c.source for c in m.plans[-1].chains] == ["disk"]

    # On demand, the host cache takes the model (a disk-mode load does not fill it).
    assert m.loader.keeper is not None and m.loader.keeper.cache is not None and not m.loader.keeper.cache.has(MODEL)
    reply = await request(m.nc, m.s.host_cache(), HostCacheRequest("load", MODEL), Ok, timeout=30)
    assert "in the host cache" in reply.detail
    ack = await m.decide(ScaleDecision("d-cache", MODEL, "up", 1, 2, "test", loading="host-cache"))
    assert ack.ok and ack.workers == ["w1"], ack
    assert [c.source for c in m.plans[-1].chains] == ["host-cache"]

    ack = await m.decide(ScaleDecision("d-multi", MODEL, "up", 1, 3, "test", loading="multicast"))
    assert ack.ok and ack.workers == ["w2"], ack
    assert m.plans[-1].chains[0].source in ("w0", "w1")

    want = await m.generate("w0", "m-src")
    for w in ("w0", "w1", "w2"):
        _check_model(m, w, source_crcs)
        _check_readiness(m, w, SPEC.layers + 2)
    for w in ("w1", "w2"):
        assert await m.generate(w, f"m-{w}") == want

    reply = await request(m.nc, m.s.host_cache(), HostCacheRequest("release", MODEL), Ok, timeout=10)
    assert "released" in reply.detail and not m.loader.keeper.cache.has(MODEL)


async def test_wrong_token_is_refused_and_nothing_is_written(mesh4: Mesh, model_dir: Path) -> None:
    m = mesh4
    w = m.workers["w3"]
    n = SPEC.layers + 2
    order = TransferOrder("tok-1", "the-right-token", MODEL, "receive", list(range(n)), n, path=str(model_dir))
    await request(m.nc, m.s.transfer("w3"), order, Ok, timeout=10)
    addr = w.heartbeat().data_addr
    assert addr is not None
    host, port = addr.rsplit(":", 1)

    def knock() -> tuple[bool, str]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(ConnHeader("tok-1", "a-wrong-token", MODEL, tuple(range(n))).encode())
            return read_status(sock.recv_into)

    ok, reason = await asyncio.to_thread(knock)
    assert not ok and reason == "bad token"
    assert w.slot.model is not None and w.slot.ready == set() and not m.ready.get("w3")
    await request(m.nc, m.s.unload("w3"), UnloadModel(), Ok, timeout=10)
    assert w.slot.state == "idle"


# --------------------------------------------------------------------------- a member dies


def _spawn_worker(wid: str, nats_url: str, prefix: str, log_path: Path) -> tuple[subprocess.Popen[bytes], Any]:
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade.cli", "worker", "--worker-id", wid, "--nats-url", nats_url,
         "--prefix", prefix, "--heartbeat-s", str(HB_S)],
        cwd=REPO, env={**os.environ, "CASCADE_LOG_FORMAT": "json"}, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, log


@pytest.fixture
async def chain_with_process(nats_url: str, subjects: Subjects, model_dir: Path) -> AsyncIterator[tuple[Mesh, Any]]:
    """w0 (source), w1, w3 in process; w2 a `cascade worker` process. Every send is capped at
    2 MB/s, so the chain is still busy when a test kills w2."""
    async with _mesh(nats_url, subjects, model_dir, ["w0", "w1", "w3"], ("--send-mb-s", "2")) as m:
        proc, log = _spawn_worker("w2", nats_url, subjects.prefix, model_dir.parent / f"w2-{subjects.prefix}.log")
        try:
            await m.until(lambda: len(m.loader.table.views(m.loader.clock())) == 4, "loader sees 4 workers")
            yield m, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
            log.close()


async def test_middle_of_chain_dies_and_the_last_one_still_serves(
    chain_with_process: tuple[Mesh, Any], source_crcs: list[int]
) -> None:
    m, proc = chain_with_process
    n = SPEC.layers + 2
    first = await m.decide(ScaleDecision("k-first", MODEL, "up", 1, 1, "test", loading="disk"))
    assert first.ok and first.workers == ["w0"], first

    await m.nc.publish(m.s.scale_decision(), encode(ScaleDecision("k-three", MODEL, "up", 3, 4, "test")))
    await m.until(lambda: any(p.decision_id == "k-three" for p in m.plans), "the plan")
    (chain,) = m.plans[-1].chains
    assert chain.source == "w0" and chain.targets == ["w1", "w2", "w3"]
    # Mid-transfer, decided by events: w2 holds the embedding and two layers, the rest is on its way.
    k = 3
    await m.until(lambda: len(m.ready.get("w2", [])) >= k, f"w2 holding {k} units")
    proc.send_signal(signal.SIGKILL)  # a crash: no goodbye on its sockets, no last heartbeat
    await asyncio.to_thread(proc.wait, 30)
    assert len(m.ready["w2"]) < n, "the kill came too late to be mid-transfer"

    await m.until(lambda: "k-three" in m.acks, "the decision's ack")
    ack = m.acks["k-three"]
    assert not ack.ok and sorted(ack.workers) == ["w1", "w3"], ack
    assert "w2" in ack.error
    replans = [p for p in m.plans if p.decision_id == "k-three" and p.replaces]
    assert replans and replans[0].replaces == chain.transfer_id
    (again,) = replans[0].chains
    assert again.targets == ["w3"] and again.source == "w0" and again.units[0] >= 1, again
    failed = [e for e in m.events if e.worker_id == "w3" and e.kind == "failed"]
    assert failed and failed[0].transfer_id == chain.transfer_id

    for w in ("w1", "w3"):
        _check_model(m, w, source_crcs)
        _check_readiness(m, w, n)
    want = await m.generate("w0", "k-src")
    assert await m.generate("w3", "k-w3") == want
    assert await m.generate("w1", "k-w1") == want
