"""The worker service over a real nats-server with real torch: load with per-unit readiness,
generate with streamed token events, reject what it cannot serve, cancel, unload."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cascade.config import GenerateSpec
from cascade.messages import (
    BatchLimit,
    BatchReply,
    Cancel,
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    InstanceMetrics,
    LayerReady,
    LoadModel,
    Ok,
    RemoteError,
    SamplingParams,
    SetBatchLimit,
    SnapshotRequest,
    TokenEvents,
    UnloadModel,
    WorkerSnapshot,
    decode,
    encode,
)
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import InProcess, model_dir_fixture, serving
from tests.waiting import wait_until

SPEC = GenerateSpec(layers=3, hidden=64, heads=4, kv_heads=2, vocab=320, seed=3)


model_dir = model_dir_fixture(SPEC)


@pytest.fixture
async def worker(nats_url: str, subjects: Subjects) -> AsyncIterator[WorkerService]:
    svc = WorkerService(WorkerSettings(nats_url, subjects.prefix, "w1", heartbeat_s=0.2, drain_timeout_s=2))
    async with serving(nats_url, subjects.prefix, svc, stop_s=30):
        yield svc


async def test_load_generate_cancel_unload(
    nats_url: str, subjects: Subjects, worker: WorkerService, model_dir: Path
) -> None:
    nc = await connect(nats_url, "test")
    ready: list[LayerReady] = []
    beats: list[Heartbeat] = []
    events: dict[str, list] = {}
    batch_sizes: list[int] = []
    try:
        await nc.subscribe(subjects.ready("w1"), cb=functools.partial(_append, ready))
        await nc.subscribe(subjects.heartbeat("w1"), cb=functools.partial(_append, beats))

        async def on_tokens(m) -> None:  # type: ignore[no-untyped-def]
            te = decode(m.data, TokenEvents)
            batch_sizes.append(te.batch_size)
            for e in te.events:
                events.setdefault(e.request_id, []).append(e)

        await nc.subscribe(subjects.tokens("gw1"), cb=on_tokens)
        await wait_until(lambda: bool(beats))
        assert beats[-1].state == "idle"

        with pytest.raises(RemoteError, match="load_failed"):
            await request(nc, subjects.load("w1"), LoadModel("m", "/nonexistent"), Ok, timeout=10)
        await request(nc, subjects.load("w1"), LoadModel("m", str(model_dir), "d1"), Ok, timeout=10)
        with pytest.raises(RemoteError, match="busy"):
            await request(nc, subjects.load("w1"), LoadModel("m", str(model_dir)), Ok, timeout=10)
        n = SPEC.layers + 2
        await wait_until(lambda: len(ready) == n and worker.slot.state == "serving")
        assert [r.unit for r in ready] == list(range(n))
        assert [r.seq for r in ready] == list(range(1, n + 1))
        snap = await request(nc, subjects.snapshot("w1"), SnapshotRequest(), WorkerSnapshot, timeout=5)
        assert snap.ready_units == list(range(n)) and snap.seq == n and snap.state == "serving"

        tok = ByteTokenizer()
        reqs = [
            GenerateRequest(f"r{i}", "m", tok.encode(f"prompt {i}"), SamplingParams(max_tokens=8, ignore_eos=True))
            for i in range(6)
        ]
        reqs.append(GenerateRequest("bad", "other", tok.encode("x"), SamplingParams()))
        reqs.append(GenerateRequest("long", "m", [1] * 5000, SamplingParams()))
        reqs.append(
            GenerateRequest("forever", "m", tok.encode("y"), SamplingParams(max_tokens=10_000, ignore_eos=True))
        )
        reply = await request(nc, subjects.generate("w1"), GenerateBatch("gw1", reqs), BatchReply, timeout=10)
        assert sorted(reply.accepted) == sorted([*(f"r{i}" for i in range(6)), "forever"])
        assert {r.request_id: r.code for r in reply.rejected} == {"bad": "wrong_model", "long": "too_long"}
        await wait_until(lambda: all(events.get(f"r{i}") and events[f"r{i}"][-1].finish_reason for i in range(6)))
        for i in range(6):
            evs = events[f"r{i}"]
            assert sum(len(e.token_ids) for e in evs) == 8
            assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == 8
        assert max(batch_sizes) >= 6  # the batch ran them together
        await nc.publish(subjects.cancel("w1"), encode(Cancel(["forever"])))
        await wait_until(lambda: bool(events.get("forever")) and events["forever"][-1].finish_reason == "cancelled")

        await request(nc, subjects.unload("w1"), UnloadModel("d2"), Ok, timeout=10)
        assert ready[-1].reset and worker.slot.state == "idle"
        reply = await request(nc, subjects.generate("w1"), GenerateBatch("gw1", reqs[:1]), BatchReply, timeout=10)
        assert reply.rejected[0].code == "not_ready"
    finally:
        await nc.drain()


async def _append(store: list, msg) -> None:  # type: ignore[no-untyped-def]
    store.append(decode(msg.data))


async def test_instance_metrics_and_a_batch_limit_set_at_run_time(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    cfg = WorkerSettings(nats_url, subjects.prefix, "w2", heartbeat_s=0.2, max_batch=4, kv_slots=8, metrics_s=0.1)
    svc = WorkerService(cfg)
    group = InProcess(nats_url, subjects.prefix)
    group.start(svc)
    nc = await connect(nats_url, "test-metrics")
    metrics: list[InstanceMetrics] = []
    beats: list[Heartbeat] = []
    try:
        await nc.subscribe(subjects.metrics("worker", "w2"), cb=functools.partial(_append, metrics))
        await nc.subscribe(subjects.heartbeat("w2"), cb=functools.partial(_append, beats))
        await wait_until(lambda: bool(beats), what="worker up (it beats once subscribed)")
        with pytest.raises(RemoteError, match="no_model"):
            await request(nc, subjects.batch_limit("w2"), SetBatchLimit(6), BatchLimit, timeout=5)
        await request(nc, subjects.load("w2"), LoadModel("m", str(model_dir)), Ok, timeout=10)
        await wait_until(lambda: svc.slot.state == "serving", what="serving")
        # Raised within the KV slots the worker allocated, no further; 0 = back to its own.
        r = await request(nc, subjects.batch_limit("w2"), SetBatchLimit(16, "d-v1", "surge"), BatchLimit, timeout=5)
        assert (r.worker_id, r.model, r.max_batch, r.requested, r.kv_slots) == ("w2", "m", 8, 16, 8)
        tok = ByteTokenizer()
        reqs = [
            GenerateRequest(f"r{i}", "m", tok.encode(f"p {i}"), SamplingParams(max_tokens=6, ignore_eos=True))
            for i in range(6)
        ]
        await request(nc, subjects.generate("w2"), GenerateBatch("gw", reqs), BatchReply, timeout=10)
        await wait_until(lambda: sum(m.generated_tokens for m in metrics) >= 36, what="metrics counting every token")
        steps = [st for m in metrics for st in m.steps]
        assert max(st.batch for st in steps) == 6  # the raised limit let all six run together
        assert all(st.steps > 0 and st.total_ms > 0 for st in steps)
        assert sum(m.prompt_tokens for m in metrics) == sum(len(q.prompt_ids) for q in reqs)
        last = metrics[-1]
        assert (last.model, last.max_batch, last.kv_slots, last.state) == ("m", 8, 8, "serving")
        assert [m.seq for m in metrics] == list(range(1, len(metrics) + 1))
        r = await request(nc, subjects.batch_limit("w2"), SetBatchLimit(0), BatchLimit, timeout=5)
        assert r.max_batch == 4
        await request(nc, subjects.unload("w2"), UnloadModel(), Ok, timeout=10)
        assert svc.slot.state == "idle" and svc.instance_metrics(0.1) is None  # no model, no metrics
    finally:
        await nc.drain()
        await group.stop(30)


async def test_a_kv_budget_smaller_than_the_load_serves_every_request_and_announces_max_model_len(
    nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    """--kv-cache-mb holds 8 blocks of 16 tokens: max_model_len is capped to 128 and announced, a
    longer prompt is refused, and six requests needing 4 blocks each all finish, by admission and
    preemption, with the tokens of an unconstrained engine, streamed without a gap or a repeat."""
    from cascade.models.checkpoint import Checkpoint
    from services.worker.engine import Engine
    from services.worker.model import LlamaModel

    per_block = 16 * 2 * SPEC.layers * SPEC.kv_heads * (SPEC.hidden // SPEC.heads) * 4
    cfg = WorkerSettings(
        nats_url, subjects.prefix, "wkv", heartbeat_s=0.2, drain_timeout_s=2, kv_cache_mb=8.5 * per_block / 1e6
    )
    svc = WorkerService(cfg)
    group = InProcess(nats_url, subjects.prefix)
    group.start(svc)
    nc = await connect(nats_url, "test")
    beats: list[Heartbeat] = []
    events: dict[str, list] = {}
    tok = ByteTokenizer()
    try:
        await nc.subscribe(subjects.heartbeat("wkv"), cb=functools.partial(_append, beats))

        async def on_tokens(m) -> None:  # type: ignore[no-untyped-def]
            for e in decode(m.data, TokenEvents).events:
                events.setdefault(e.request_id, []).append(e)

        await nc.subscribe(subjects.tokens("gw1"), cb=on_tokens)
        await wait_until(lambda: bool(beats))
        await request(nc, subjects.load("wkv"), LoadModel("m", str(model_dir)), Ok, timeout=10)
        await wait_until(lambda: bool(beats) and beats[-1].state == "serving")
        assert beats[-1].max_model_len == 128
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        prompts = {f"r{i}": tok.encode(f"request number {i}, a bit longer") for i in range(6)}
        reqs = [GenerateRequest(rid, "m", p, params) for rid, p in prompts.items()]
        reqs.append(GenerateRequest("long", "m", [1] * 128, params))
        reply = await request(nc, subjects.generate("wkv"), GenerateBatch("gw1", reqs), BatchReply, timeout=10)
        assert [(r.request_id, r.code) for r in reply.rejected] == [("long", "too_long")]
        await wait_until(lambda: all(events.get(r) and events[r][-1].finish_reason for r in prompts), timeout=60)

        ck = Checkpoint(model_dir)
        m = LlamaModel(ck.config)
        for u in range(ck.config.num_units):
            m.load_unit(u, ck.unit_tensors(u))
        alone = Engine(m, tok, max_batch=8)
        for rid, p in prompts.items():
            alone.submit(rid, "g", p, params)
        expect: dict[str, list[int]] = {}
        while alone.has_work():
            for _, ev in alone.step().events:
                expect.setdefault(ev.request_id, []).extend(ev.token_ids)
        got = {rid: [t for e in evs for t in e.token_ids] for rid, evs in events.items()}
        assert got == expect
        assert all(evs[-1].finish_reason == "length" and evs[-1].error is None for evs in events.values())
        status = svc.slot.engine.figures if svc.slot.engine else None
        assert status is not None and status.num_preemptions > 0 and status.kv_blocks_total == 8
    finally:
        await nc.drain()
        await group.stop(30)
