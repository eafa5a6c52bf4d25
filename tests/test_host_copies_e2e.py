"""Host copies across loaders, real processes: a JetStream broker, two loaders on two host ids
under the lease, two diskless workers (they read no model store). With `host_copies = 2` both
loaders hold a copy after the first scale-up; the model store is then moved away and the leader
SIGKILLed, and the new leader serves the next scale-up from its own warm copy. With the default
`host_copies = 1` there is exactly one copy in the mesh."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from cascade.config import GenerateSpec
from cascade.messages import Ok, ScaleDecision, TransferPlanned, UnloadModel, decode, encode
from cascade.models.generate import generate_model
from cascade.natsutil import connect, gather_status, request
from cascade.subjects import Subjects
from tests.test_control_restart import MODEL, Procs, Watch
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

SMALL = GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256)
HOSTS = {"la": "host-a", "lb": "host-b"}


def _mesh(js_url: str, prefix: str, tmp_path: Path, host_copies: int) -> Procs:
    model = tmp_path / "models" / MODEL
    generate_model(model, SMALL)
    cfg = tmp_path / "deploy.toml"
    cfg.write_text(
        f'host_copies = {host_copies}\n[[models]]\nname = "{MODEL}"\npath = "{model}"\nmin_replicas = 0\n'
        'max_replicas = 2\npolicy = "manual"\nloading = "multicast"\n'
    )
    return Procs(js_url, prefix, tmp_path, cfg)


@pytest.fixture
def two_copies(js_url: str, prefix: str, tmp_path: Path) -> Iterator[Procs]:
    with _mesh(js_url, prefix, tmp_path, 2) as p:
        yield p


@pytest.fixture
def one_copy(js_url: str, prefix: str, tmp_path: Path) -> Iterator[Procs]:
    with _mesh(js_url, prefix, tmp_path, 1) as p:
        yield p


async def _loaders(nc: NATS, s: Subjects) -> dict[str, dict[str, Any]]:
    """Each loader's status detail, as `cascade status` gathers it."""
    st = await gather_status(nc, s, window_s=0.3)
    return {x.instance: x.detail for x in st.services if x.service == "loader"}


def _copies(loaders: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {lid: sorted(d.get("host_cache") or {}) for lid, d in loaders.items()}


async def _start(mesh: Procs, nc: NATS, s: Subjects, watch: Watch, on_follower_host: bool = False) -> tuple[str, str]:
    """Two loaders on two hosts, then two diskless workers (one per host, or with
    `on_follower_host` both on the follower's); (leader, follower)."""
    for lid, host in HOSTS.items():
        mesh.start(lid, "loader", "--loader-id", lid, "--host-id", host, "--lease", "required", "--lease-s", "1.5")
    roles: dict[str, str] = {}
    deadline = asyncio.get_running_loop().time() + 60
    while sorted(roles.values()) != ["follower", "leader"]:  # a 0.3 s status gather per look
        roles = {lid: d.get("lease", {}).get("role", "?") for lid, d in (await _loaders(nc, s)).items()}
        assert asyncio.get_running_loop().time() < deadline, f"no leader and follower: {roles}\n{mesh.logs_tail()}"
    leader = next(i for i, r in roles.items() if r == "leader")
    follower = next(i for i in roles if i != leader)
    hosts = [HOSTS[follower]] * 2 if on_follower_host else list(HOSTS.values())
    for i, host in enumerate(hosts, 1):
        w = f"w{i}"
        files = str(mesh.logs / f"files-{w}")
        mesh.start(
            w, "worker", "--worker-id", w, "--host-id", host, "--kv-cache-mb", "16",
            "--model-source", "network", "--files-dir", files,
        )  # fmt: skip
    await wait_until(lambda: len(watch.latest) == 2, 60, "both workers")
    return leader, follower


async def _scale_up(nc: NATS, s: Subjects, watch: Watch, decision_id: str, mesh: Procs) -> list[str]:
    await nc.publish(s.scale_decision(), encode(ScaleDecision(decision_id, MODEL, "up", 1, 1, "test")))
    try:
        await wait_until(
            lambda: any(a.decision_id == decision_id for a in watch.acks), 120, f"the ack of {decision_id}"
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{mesh.logs_tail()}") from None
    [ack] = [a for a in watch.acks if a.decision_id == decision_id]
    assert ack.ok and len(ack.workers) == 1, (ack, mesh.logs_tail())
    return list(ack.workers)


async def _plans(nc: NATS, s: Subjects) -> list[TransferPlanned]:
    plans: list[TransferPlanned] = []

    async def on_plan(msg: Any) -> None:
        plans.append(decode(msg.data, TransferPlanned))

    await nc.subscribe(s.transfer_plan(), cb=on_plan)
    await nc.flush()
    return plans


async def test_two_copies_the_new_leader_serves_from_its_warm_copy(
    two_copies: Procs, js_url: str, prefix: str, tmp_path: Path
) -> None:
    mesh, s = two_copies, Subjects(prefix)
    nc = await connect(js_url, "test-copies")
    watch = Watch()
    try:
        await watch.attach(nc, s)
        plans = await _plans(nc, s)
        leader, follower = await _start(mesh, nc, s, watch)
        # The first load of the model in the mesh: the leader reads the store into its cache (the
        # workers cannot read it), then places the second copy on the other host.
        [w] = await _scale_up(nc, s, watch, "d1", mesh)
        copies: dict[str, list[str]] = {}

        async def both_hold() -> bool:
            copies.update(_copies(await _loaders(nc, s)))
            return copies == {leader: [MODEL], follower: [MODEL]}

        deadline = asyncio.get_running_loop().time() + 60
        while not await both_hold():  # a 0.3 s status gather per look
            assert asyncio.get_running_loop().time() < deadline, f"copies {copies}\n{mesh.logs_tail()}"
        # No live holder left (the next load must come from a host copy), and no model store.
        await request(nc, s.unload(w), UnloadModel("test"), Ok, timeout=60)
        await wait_until(lambda: watch.serving() == 0, 60, "the instance gone")
        store = tmp_path / "models" / MODEL
        store.rename(tmp_path / "moved-away")
        mesh.kill(leader)
        deadline = asyncio.get_running_loop().time() + 60
        while (roles := {i: d["lease"]["role"] for i, d in (await _loaders(nc, s)).items()}) != {follower: "leader"}:
            assert asyncio.get_running_loop().time() < deadline, f"no takeover: {roles}\n{mesh.logs_tail()}"

        await _scale_up(nc, s, watch, "d2", mesh)
        await wait_until(lambda: watch.serving() == 1, 60, "one serving instance")
        [plan] = [p for p in plans if p.decision_id == "d2"]
        assert [c.source for c in plan.chains] == ["host-cache"], plan
        log = (mesh.logs / f"{follower}.log").read_text(errors="replace")
        assert "host_copy_fill" in log  # its copy came from the old leader's order
        assert not store.exists()
        assert _copies(await _loaders(nc, s)) == {follower: [MODEL]}
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def test_a_copy_on_the_targets_host_heads_the_chain_from_the_follower(
    two_copies: Procs, js_url: str, prefix: str
) -> None:
    """The workers sit on the follower's host: once both loaders hold a copy, the leader plans the
    next load from the follower's copy (same host as the target), and the follower sends it."""
    mesh, s = two_copies, Subjects(prefix)
    nc = await connect(js_url, "test-copies")
    watch = Watch()
    try:
        await watch.attach(nc, s)
        plans = await _plans(nc, s)
        leader, follower = await _start(mesh, nc, s, watch, on_follower_host=True)
        [w] = await _scale_up(nc, s, watch, "d1", mesh)  # from the leader's copy: the only one yet
        copies: dict[str, list[str]] = {}
        deadline = asyncio.get_running_loop().time() + 60
        while copies != {leader: [MODEL], follower: [MODEL]}:  # a 0.3 s status gather per look
            copies = _copies(await _loaders(nc, s))
            assert asyncio.get_running_loop().time() < deadline, f"copies {copies}\n{mesh.logs_tail()}"
        await request(nc, s.unload(w), UnloadModel("test"), Ok, timeout=60)
        await wait_until(lambda: watch.serving() == 0, 60, "the instance gone")
        # The leader must have heard the follower's copy before it plans (it announces every pulse).
        deadline = asyncio.get_running_loop().time() + 60
        while (await _loaders(nc, s))[leader]["host_copies"]["loaders"].get(follower, {}).get("models") != [MODEL]:
            assert asyncio.get_running_loop().time() < deadline, mesh.logs_tail()

        await _scale_up(nc, s, watch, "d2", mesh)
        [plan] = [p for p in plans if p.decision_id == "d2"]
        assert [c.source for c in plan.chains] == ["host-cache"], plan
        follower_log = (mesh.logs / f"{follower}.log").read_text(errors="replace")
        leader_log = (mesh.logs / f"{leader}.log").read_text(errors="replace")
        assert "cache_send_done" in follower_log, follower_log[-3000:]
        assert leader_log.count("cache_send_done") == 1  # d1 only
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def test_one_copy_by_default_exactly_one_in_the_mesh(one_copy: Procs, js_url: str, prefix: str) -> None:
    mesh, s = one_copy, Subjects(prefix)
    nc = await connect(js_url, "test-copies")
    watch = Watch()
    try:
        await watch.attach(nc, s)
        leader, follower = await _start(mesh, nc, s, watch)
        await _scale_up(nc, s, watch, "d1", mesh)
        seen: dict[str, Any] = {}

        async def settled() -> bool:
            # The leader has heard both loaders announce what they hold, its own copy among them:
            # any placement it would make from that view has been made.
            st = await _loaders(nc, s)
            seen.update(st[leader].get("host_copies", {}).get("loaders", {}))
            return set(seen) == {leader, follower} and seen[leader]["models"] == [MODEL]

        deadline = asyncio.get_running_loop().time() + 60
        while not await settled():
            assert asyncio.get_running_loop().time() < deadline, f"{seen}\n{mesh.logs_tail()}"
        # A second scale-up (from the live holder now) changes nothing either.
        await _scale_up(nc, s, watch, "d2", mesh)
        assert _copies(await _loaders(nc, s)) == {leader: [MODEL], follower: []}
        log = (mesh.logs / f"{follower}.log").read_text(errors="replace")
        assert "host_copy_fill" not in log and "host_cache_filled" not in log
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
