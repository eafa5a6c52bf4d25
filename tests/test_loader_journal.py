"""A loader that takes the lease over finishes what the dead leader left, with a real JetStream
broker and the real loader service in-process: the lease key and the journal are written as a
leader that then died would have left them (it never renews), and one decision is only heard (the
leader died before journaling it). The loader follows until the lease runs out, then acks each
decision once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from cascade.config import Deployment, ModelDeployment
from cascade.controlstore import open_store
from cascade.messages import ScaleAck, ScaleDecision, decode, encode
from cascade.natsutil import connect
from cascade.service import ServiceHost
from cascade.subjects import Subjects
from services.loader.journal import DecisionJournal
from services.loader.lease import LEASE_KEY
from services.loader.main import Loader
from services.loader.settings import LoaderSettings
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


async def test_the_new_leader_finishes_journaled_and_heard_decisions_once(
    js_url: str, prefix: str, tmp_path: Path
) -> None:
    s = Subjects(prefix)
    nc = await connect(js_url, "test")
    acks: list[ScaleAck] = []

    async def on_ack(msg: Any) -> None:
        acks.append(decode(msg.data, ScaleAck))

    host: ServiceHost | None = None
    try:
        await nc.subscribe(s.scale_ack(), cb=on_ack)
        store = await open_store(nc, prefix)
        # The dead leader: it held the lease and had ordered w-gone to unload m (that worker is not
        # in the mesh any more, so nothing holds m: the unload is done).
        await store.create(LEASE_KEY, {"holder": "ghost", "lease_s": 1.0})
        ordered = ScaleDecision("ghost-1", "m", "down", 1, 0, "test")
        journal = DecisionJournal(store, "ghost", structlog.get_logger())
        await journal.received(ordered)
        await journal.ordered(ordered, ("w-gone",))

        dep = Deployment((ModelDeployment("m", tmp_path / "m", min_replicas=0),))
        settings = LoaderSettings(loader_id="heir", heartbeat_s=0.2, lease="required", lease_s=1.0)
        loader = Loader(settings, dep, structlog.get_logger().bind(service="loader"))
        host = ServiceHost(loader, js_url, prefix)
        await host.start()
        await wait_until(lambda: loader.leadership is not None and loader.leadership.lease.holder == "ghost", 10)
        assert not loader.leading
        # Heard while following: the ghost never journaled it (it died first).
        heard = ScaleDecision("ghost-2", "m", "down", 1, 0, "test")
        await nc.publish(s.scale_decision(), encode(heard))
        await nc.flush()
        await wait_until(lambda: "ghost-2" in loader.heard, 10, "the follower hearing the decision")
        assert acks == []  # a follower orders and acks nothing

        await wait_until(lambda: {a.decision_id for a in acks} == {"ghost-1", "ghost-2"}, 30, "both acks")
        assert loader.leading
        by_id = {a.decision_id: a for a in acks}
        assert len(acks) == 2
        # The journaled unload was done (its worker holds nothing now); the heard one is carried
        # out afresh and fails honestly: no instance of m to remove.
        assert by_id["ghost-1"].ok and by_id["ghost-1"].workers == ["w-gone"]
        assert not by_id["ghost-2"].ok and "no instance of m" in by_id["ghost-2"].error
        await wait_until(lambda: not loader.running, 10, "the decisions to end")
        assert await journal.pending() == []  # each deleted after its ack
        lease = await store.get(LEASE_KEY)
        assert lease is not None and lease.value["holder"] == "heir"
        # A redelivery is ignored, not applied again: a later decision's ack comes, and still
        # one ack for the redelivered one (one subscription delivers in order).
        await nc.publish(s.scale_decision(), encode(heard))
        await nc.publish(s.scale_decision(), encode(ScaleDecision("probe-3", "m", "down", 1, 0, "test")))
        await nc.flush()
        await wait_until(lambda: any(a.decision_id == "probe-3" for a in acks), 30, "the later ack")
        assert [a.decision_id for a in acks].count("ghost-2") == 1

        # A clean stop hands the lease over at once: the key is deleted.
        await host.stop()
        host = None
        assert await store.get(LEASE_KEY) is None
    finally:
        if host is not None:
            await host.stop()
        with contextlib.suppress(Exception):
            await nc.close()


async def test_without_jetstream_one_loader_plans_alone_or_refuses_to_start(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    """The session's broker has no JetStream: `--lease auto` plans alone and says so; `required`
    (how several loaders run) does not start."""
    dep = Deployment((ModelDeployment("m", tmp_path / "m", min_replicas=0),))
    logs: list[dict[str, Any]] = []

    def capture(_: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        logs.append(dict(event, level=method))
        raise structlog.DropEvent

    log = structlog.wrap_logger(None, processors=[capture])
    alone = Loader(LoaderSettings(loader_id="alone", heartbeat_s=0.2), dep, log)
    host = ServiceHost(alone, nats_url, prefix)
    try:
        await host.start()
        assert alone.leadership is None and alone.leading
        assert alone.lease_status() == {"role": "alone"}
        [line] = [e for e in logs if e["event"] == "lease_unavailable"]
        assert line["level"] == "warning" and "run only one loader" in line["note"]
        assert "JetStream" in line["error"]
    finally:
        await host.stop()

    strict = Loader(LoaderSettings(loader_id="strict", heartbeat_s=0.2, lease="required"), dep, log)
    with pytest.raises(ConnectionError, match="--lease required"):
        await ServiceHost(strict, nats_url, prefix).start()


async def test_a_pipelined_up_avoids_backed_off_workers_and_is_journaled_before_its_orders(
    js_url: str, prefix: str, tmp_path: Path
) -> None:
    """Issue 22: a pipelined up, like a single-worker one, takes no worker its decision avoids and
    writes its workers (group after group) to the journal before any order goes out; three real
    worker processes, their stage loads paced so the decision is seen in flight."""
    from cascade.config import GenerateSpec
    from cascade.models.generate import generate_model
    from tests.workerprocs import WorkerProcs

    model = tmp_path / "piped"
    generate_model(model, GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256))
    s = Subjects(prefix)
    nc = await connect(js_url, "test")
    acks: list[ScaleAck] = []

    async def on_ack(msg: Any) -> None:
        acks.append(decode(msg.data, ScaleAck))

    (tmp_path / "logs").mkdir()
    workers = WorkerProcs(js_url, prefix, tmp_path / "logs")
    host: ServiceHost | None = None
    try:
        await nc.subscribe(s.scale_ack(), cb=on_ack)
        for w in ("w-a", "w-b", "w-c"):
            # Paced reads: each stage's load lasts about a second, long enough to look at the journal.
            workers.start(w, env={"CASCADE_HEARTBEAT_S": "0.2", "CASCADE_LOAD_MB_S": "0.2"})
        dep = Deployment((ModelDeployment("piped", model, min_replicas=0, stages=2),))
        settings = LoaderSettings(loader_id="leader", heartbeat_s=0.2, lease="required", lease_s=1.0)
        loader = Loader(settings, dep, structlog.get_logger().bind(service="loader"))
        host = ServiceHost(loader, js_url, prefix)
        await host.start()
        await wait_until(lambda: loader.leading, 10, "the lease")
        assert loader.decisions is not None
        table = loader.decisions.table
        await wait_until(lambda: table.idle() == {"w-a", "w-b", "w-c"}, 90, "three idle workers")
        store = await open_store(nc, prefix)
        journal = DecisionJournal(store, "test", structlog.get_logger())

        # w-a is backed off for the model: the only group left is w-b, w-c (by id it would be w-a, w-b).
        d = ScaleDecision("pd", "piped", "up", 1, 1, "test", avoid=["w-a"])
        await nc.publish(s.scale_decision(), encode(d))
        await nc.flush()
        seen: list[tuple[str, ...]] = []
        deadline = asyncio.get_running_loop().time() + 30
        while not seen and not acks:  # polling the store with a deadline
            assert asyncio.get_running_loop().time() < deadline, "no ordered journal entry"
            seen = [
                j.workers for j in await journal.pending() if j.state == "ordered" and j.decision.decision_id == "pd"
            ]
        assert seen and seen[0] == ("w-b", "w-c"), (seen, acks)
        assert table.get("w-a") is not None and table.get("w-a").state == "idle"  # type: ignore[union-attr]
        await wait_until(lambda: bool(acks), 60, "the ack")
        (ack,) = acks
        assert ack.ok and ack.workers == ["pd.0"], ack
        await wait_until(lambda: not loader.running, 10, "the decision to end")
        assert await journal.pending() == []
        stages = {w: (v.group, v.stage_start, v.stage_end) for w in ("w-b", "w-c") if (v := table.get(w)) is not None}
        assert stages == {"w-b": ("pd.0", 0, 2), "w-c": ("pd.0", 2, 4)}
        assert table.get("w-a").state == "idle"  # type: ignore[union-attr]
    finally:
        if host is not None:
            await host.stop()
        workers.stop_all()
        with contextlib.suppress(Exception):
            await nc.close()
