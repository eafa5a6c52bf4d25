"""The scaler moving a quota on a real shared worker: one `cascade worker --slots 2` process holds
model A on one instance and model B on the other, the scaler (A deployed with `coscale = true`)
hears A's engine steps take most of the process while B idles, and raises A's quota taking from B:
both `QuotaSet`s go out on NATS with the scaler's decision ids, and the heartbeats show them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import structlog

from cascade.cli.tapformat import format_message
from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import (
    BatchReply,
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    LoadModel,
    Ok,
    QuotaSet,
    SamplingParams,
    decode,
)
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import connect, request
from cascade.service import serve
from cascade.subjects import Subjects
from services.scaler.main import Scaler
from tests.waiting import wait_until
from tests.workerprocs import WorkerProcs

pytestmark = pytest.mark.e2e

tok = ByteTokenizer()
HB_S = 0.2


async def test_the_scaler_raises_a_busy_models_quota_on_a_shared_worker(
    nats_url: str, subjects: Subjects, tmp_path: Path
) -> None:
    paths = {}
    for name, seed in (("A", 1), ("B", 2)):
        paths[name] = tmp_path / name
        generate_model(paths[name], GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, seed=seed))
    # One instance each, fixed: only the quota can move.
    dep = Deployment(
        (
            ModelDeployment("A", paths["A"], 1, 1, policy="manual", coscale=True),
            ModelDeployment("B", paths["B"], 1, 1, policy="manual"),
        )
    )
    procs = WorkerProcs(nats_url, subjects.prefix, tmp_path)
    nc = await connect(nats_url, "test-coscale")
    stop = asyncio.Event()
    task: asyncio.Task[int] | None = None
    beats: dict[str, Heartbeat] = {}
    quota_sets: list[QuotaSet] = []
    tapped: list[str] = []  # the scaler's SetQuota requests as `cascade tap` prints them

    async def on_heartbeat(m: Any) -> None:
        hb = decode(m.data, Heartbeat)
        beats[hb.worker_id] = hb

    async def on_quota_set(m: Any) -> None:
        quota_sets.append(decode(m.data, QuotaSet))

    async def on_set_quota(m: Any) -> None:
        tapped.append(format_message(m.subject, m.data))

    try:
        await nc.subscribe(subjects.heartbeat_all(), cb=on_heartbeat)
        await nc.subscribe(subjects.quota_set("p1"), cb=on_quota_set)
        await nc.subscribe(subjects.quota_set("p1-2"), cb=on_quota_set)
        await nc.subscribe(subjects.quota("p1"), cb=on_set_quota)
        procs.start("p1", "--slots", "2", "--heartbeat-s", str(HB_S), "--metrics-s", "0.5")
        await wait_until(lambda: {"p1", "p1-2"} <= set(beats), timeout=120, what="two instances heartbeating")
        await request(nc, subjects.load("p1"), LoadModel("A", str(paths["A"])), Ok, timeout=30)
        await request(nc, subjects.load("p1-2"), LoadModel("B", str(paths["B"])), Ok, timeout=30)
        await wait_until(
            lambda: beats["p1"].state == "serving" and beats["p1-2"].state == "serving", timeout=60, what="A and B up"
        )
        assert beats["p1"].shared_device == beats["p1-2"].shared_device == "p1"
        assert beats["p1"].quota == beats["p1-2"].quota == 1.0

        scaler = Scaler(
            dep,
            "scaler-c",
            tick_s=0.2,
            heartbeat_s=HB_S,
            stale_s=2.0,
            log=structlog.get_logger().bind(service="scaler"),
        )
        task = asyncio.create_task(serve(scaler, nats_url, subjects.prefix, stop))

        # A busy (long greedy requests keep its engine stepping), B idle.
        params = SamplingParams(max_tokens=1500, ignore_eos=True)
        reqs = [GenerateRequest(f"a{i}", "A", tok.encode(f"busy {i}"), params) for i in range(8)]
        reply = await request(nc, subjects.generate("p1"), GenerateBatch("gw", reqs), BatchReply, timeout=10)
        assert sorted(reply.accepted) == sorted(r.request_id for r in reqs), reply

        def raised_and_lent() -> bool:
            # Two orders, answered one after the other: wait for both answers.
            return any(q.worker_id == "p1" and q.quota > 0.5 for q in quota_sets) and any(
                q.worker_id == "p1-2" and q.decision_id.startswith("scaler-c-q") for q in quota_sets
            )

        await wait_until(raised_and_lent, timeout=60, what="A's quota raised and B's lowered")
        mine = [q for q in quota_sets if q.decision_id.startswith("scaler-c-q")]
        a = next(q for q in mine if q.worker_id == "p1" and q.quota > 0.5)
        b = [q for q in mine if q.worker_id == "p1-2"]
        assert b and b[0].quota < 0.5, "B lends what A takes"
        assert a.reason.startswith("demand") and a.device == "p1"
        await wait_until(lambda: any(a.decision_id in line for line in tapped), what="the SetQuota tapped")
        line = next(x for x in tapped if a.decision_id in x)
        assert "set_quota" in line and f"quota={a.quota:g}" in line and "reason='demand" in line, line
        # The quotas as fractions of the worker: A's share is its quota.
        await wait_until(
            lambda: beats["p1"].quota > 0.5 and beats["p1-2"].quota < 0.5, what="heartbeats show the quotas"
        )
        assert beats["p1"].quota + beats["p1-2"].quota == pytest.approx(1.0, abs=1e-3)
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await nc.drain()
        procs.stop_all()
