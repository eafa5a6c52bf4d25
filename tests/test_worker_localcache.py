"""A worker with its local host-memory cache on, over a real nats-server: the first load reads the
disk and keeps a copy; after an unload, loads by either path (LoadModel, a "disk" transfer order)
install from that copy, announce every unit once, in order, and generate the same greedy tokens."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cascade.config import GenerateSpec
from cascade.messages import (
    BatchReply,
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    LayerReady,
    LoadModel,
    Ok,
    SamplingParams,
    ServiceStatus,
    StatusRequest,
    TokenEvents,
    TransferEvent,
    TransferOrder,
    UnloadModel,
    decode,
)
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import model_dir_fixture, serving
from tests.waiting import wait_until

SPEC = GenerateSpec(layers=3, hidden=64, heads=4, kv_heads=2, vocab=320, seed=7)
UNITS = SPEC.layers + 2


model_dir = model_dir_fixture(SPEC)


@pytest.fixture
async def worker(nats_url: str, subjects: Subjects) -> AsyncIterator[WorkerService]:
    # Both paces on, so the paced paths run (nothing here asserts a time).
    cfg = WorkerSettings(
        nats_url, subjects.prefix, "wc", heartbeat_s=0.2, drain_timeout_s=2, load_mb_s=200.0,
        local_cache_mb=16.0, local_cache_mb_s=400.0,
    )  # fmt: skip
    svc = WorkerService(cfg)
    async with serving(nats_url, subjects.prefix, svc, stop_s=30):
        yield svc


async def _append(store: list[Any], msg: Any) -> None:
    store.append(decode(msg.data))


async def test_a_reload_comes_from_the_local_cache_with_the_same_tokens(
    nats_url: str, subjects: Subjects, worker: WorkerService, model_dir: Path
) -> None:
    nc = await connect(nats_url, "test-localcache")
    ready: list[LayerReady] = []
    transfers: list[TransferEvent] = []
    beats: list[Heartbeat] = []
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()

    async def on_tokens(m: Any) -> None:
        for e in decode(m.data, TokenEvents).events:
            tokens.setdefault(e.request_id, []).extend(e.token_ids)
            if e.finish_reason:
                finished.add(e.request_id)

    try:
        await nc.subscribe(subjects.ready("wc"), cb=functools.partial(_append, ready))
        await nc.subscribe(subjects.transfer_event("wc"), cb=functools.partial(_append, transfers))
        await nc.subscribe(subjects.tokens("gw"), cb=on_tokens)
        await nc.subscribe(subjects.heartbeat("wc"), cb=functools.partial(_append, beats))
        await wait_until(lambda: bool(beats), what="worker up (it beats once subscribed)")

        async def status() -> dict[str, Any]:
            st = await request(nc, subjects.status(), StatusRequest("test"), ServiceStatus, timeout=5)
            return st.detail

        async def greedy(rid: str) -> list[int]:
            params = SamplingParams(max_tokens=12, ignore_eos=True)  # temperature 0: greedy
            req = GenerateRequest(rid, "m", ByteTokenizer().encode("the same prompt"), params)
            reply = await request(nc, subjects.generate("wc"), GenerateBatch("gw", [req]), BatchReply, timeout=10)
            assert reply.accepted == [rid]
            await wait_until(lambda: rid in finished, what=f"{rid} finished")
            return tokens[rid]

        def this_load() -> list[int]:
            """The units announced since the last reset (an unload's)."""
            since = max((i for i, r in enumerate(ready) if r.reset), default=-1) + 1
            return [r.unit for r in ready[since:]]

        async def loaded_units() -> list[int]:
            await wait_until(lambda: worker.slot.state == "serving" and len(this_load()) >= UNITS, what="serving")
            return this_load()

        async def unload() -> None:
            await request(nc, subjects.unload("wc"), UnloadModel(), Ok, timeout=10)
            await wait_until(lambda: bool(ready) and ready[-1].reset, what="reset announced")

        # First load: the disk, copied into the cache on the way.
        await request(nc, subjects.load("wc"), LoadModel("m", str(model_dir)), Ok, timeout=10)
        assert await loaded_units() == list(range(UNITS))
        first = await status()
        assert first["load_source"] == "disk"
        assert [c["model"] for c in first["local_cache"]["models"]] == ["m"]
        assert first["local_cache"]["models"][0]["mb"] > 0
        from_disk = await greedy("r-disk")
        assert len(from_disk) == 12

        # Unloaded, the copy stays; a "disk" order (the loader's path) installs from it.
        await unload()
        assert [c["model"] for c in (await status())["local_cache"]["models"]] == ["m"]
        order = TransferOrder("t-1", "tok", "m", "disk", list(range(UNITS)), UNITS, path=str(model_dir))
        await request(nc, subjects.transfer("wc"), order, Ok, timeout=10)
        assert await loaded_units() == list(range(UNITS))  # every unit once, in order
        await wait_until(lambda: any(t.kind == "complete" for t in transfers), what="transfer complete")
        second = await status()
        assert second["load_source"] == "local-cache"
        assert second["local_cache"]["hits"] == 1
        assert await greedy("r-cache-order") == from_disk

        # And LoadModel (the simple path) does too.
        await unload()
        await request(nc, subjects.load("wc"), LoadModel("m", str(model_dir)), Ok, timeout=10)
        assert await loaded_units() == list(range(UNITS))
        third = await status()
        assert third["load_source"] == "local-cache" and third["local_cache"]["hits"] == 2
        assert await greedy("r-cache-load") == from_disk
    finally:
        await nc.drain()
