"""Two worker processes (`cascade worker --slots 2`) over a real nats-server, each shared by a
stage of two models: model A's two stages on the first instance of each, model B's on the second.
Both answer with their whole model's greedy tokens; a quota is applied, acked with the value and
published; model B is scaled away (its stages unloaded) and the workers, and model A through them,
go on; a load past --memory-mb is refused with a clear error."""

from __future__ import annotations

import asyncio
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
    LoadModel,
    Ok,
    QuotaSet,
    RemoteError,
    RouteStage,
    SamplingParams,
    SetQuota,
    TokenEvents,
    UnloadModel,
    decode,
)
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.worker.engine import Engine
from tests.enginehelp import load_model, run_engine
from tests.waiting import wait_until
from tests.workerprocs import WorkerProcs

tok = ByteTokenizer()
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
L = 4
PROMPT = "shared workers"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        generate_model(root / name, GenerateSpec(layers=L, hidden=64, heads=4, kv_heads=2, vocab=320, seed=seed))
        out[name] = root / name
    return out


def whole_tokens(path: Path) -> list[int]:
    e = Engine(load_model(path), tok)
    e.submit("r", "g", tok.encode(PROMPT), GREEDY)
    return [t for ev in run_engine(e)["r"] for t in ev.token_ids]


@pytest.fixture
async def mesh(nats_url: str, subjects: Subjects, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    procs = WorkerProcs(nats_url, subjects.prefix, tmp_path)
    nc = await connect(nats_url, "test")
    beats: dict[str, Heartbeat] = {}

    async def on_heartbeat(m: Any) -> None:
        hb = decode(m.data, Heartbeat)
        beats[hb.worker_id] = hb

    try:
        await nc.subscribe(subjects.heartbeat_all(), cb=on_heartbeat)
        for p in ("p1", "p2"):
            procs.start(p, "--slots", "2", "--memory-mb", "64", "--heartbeat-s", "0.2")
        ids = {"p1", "p1-2", "p2", "p2-2"}
        await wait_until(lambda: ids <= set(beats), timeout=120, what="four instances heartbeating")
        yield {"nc": nc, "s": subjects, "beats": beats, "procs": procs}
    finally:
        await nc.drain()
        procs.stop_all()


async def collect(nc: Any, s: Subjects, gw: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}

    async def on_tokens(m: Any) -> None:
        for e in decode(m.data, TokenEvents).events:
            out.setdefault(e.request_id, []).append(e)

    await nc.subscribe(s.tokens(gw), cb=on_tokens)
    return out


async def generate(
    m: dict[str, Any], out: dict[str, list[Any]], rid: str, model: str, head: str, tail: str
) -> list[int]:
    nc, s, beats = m["nc"], m["s"], m["beats"]
    route = [
        RouteStage(head, 0, 2, beats[head].stage_addr or ""),
        RouteStage(tail, 2, L, beats[tail].stage_addr or ""),
    ]
    req = GenerateRequest(rid, model, tok.encode(PROMPT), GREEDY, route=route)
    reply = await request(nc, s.generate(head), GenerateBatch("gw", [req]), BatchReply, timeout=10)
    assert reply.accepted == [rid], reply
    await wait_until(lambda: bool(out.get(rid)) and out[rid][-1].finish_reason is not None, what=rid)
    assert out[rid][-1].finish_reason == "length", out[rid][-1]
    return [t for e in out[rid] for t in e.token_ids]


async def test_two_models_stages_share_two_workers(mesh: dict[str, Any], models: dict[str, Path]) -> None:
    nc, s, beats, procs = mesh["nc"], mesh["s"], mesh["beats"], mesh["procs"]
    placement = {"p1": ("A", 0, 2), "p2": ("A", 2, 4), "p1-2": ("B", 0, 2), "p2-2": ("B", 2, 4)}
    for w, (model, a, b) in placement.items():
        msg = LoadModel(model, str(models[model]), group=f"{model}-g", stage_start=a, stage_end=b)
        await request(nc, s.load(w), msg, Ok, timeout=30)
    await wait_until(
        lambda: all(beats[w].state == "serving" and beats[w].group for w in placement), timeout=60, what="stages up"
    )
    assert {beats[w].shared_device for w in placement} == {"p1", "p2"}
    assert beats["p1"].shared_device == beats["p1-2"].shared_device == "p1"

    out = await collect(nc, s, "gw")
    expect = {m: whole_tokens(models[m]) for m in ("A", "B")}
    got_a, got_b = await asyncio.gather(
        generate(mesh, out, "a1", "A", "p1", "p2"), generate(mesh, out, "b1", "B", "p1-2", "p2-2")
    )
    assert got_a == expect["A"] and got_b == expect["B"]
    assert expect["A"] != expect["B"]  # two different models, not one answered twice

    # A quota: applied on the engine thread, acked with the value, published for tap and status.
    seen: list[QuotaSet] = []

    async def on_quota(m: Any) -> None:
        seen.append(decode(m.data, QuotaSet))

    await nc.subscribe(s.quota_set("p1"), cb=on_quota)
    q = await request(nc, s.quota("p1"), SetQuota(3.0, decision_id="d1"), QuotaSet, timeout=10)
    assert (q.quota, q.share, q.quotas, q.device) == (3.0, 0.75, {"p1": 3.0, "p1-2": 1.0}, "p1")
    await wait_until(lambda: bool(seen), what="quota_set event")
    assert seen[0].decision_id == "d1"
    with pytest.raises(RemoteError, match="bad_quota"):
        await request(nc, s.quota("p1"), SetQuota(0.0), QuotaSet, timeout=10)

    # Model B scaled away: its stages go, the workers and model A stay.
    for w in ("p1-2", "p2-2"):
        await request(nc, s.unload(w), UnloadModel("down"), Ok, timeout=30)
    await wait_until(lambda: beats["p1-2"].state == "idle" and beats["p2-2"].state == "idle", what="B unloaded")
    assert all(p.poll() is None for p in procs.procs.values())
    assert await generate(mesh, out, "a2", "A", "p1", "p2") == expect["A"]

    # Memory: each instance's weights and KV are held in the worker's ledger; a load past
    # --memory-mb is refused before any byte moves, saying what is held.
    with pytest.raises(RemoteError, match=r"no_memory.*--memory-mb"):
        await request(nc, s.load("p1-2"), LoadModel("B", str(models["B"]), kv_cache_mb=100.0), Ok, timeout=30)
    assert await generate(mesh, out, "a3", "A", "p1", "p2") == expect["A"]
