"""Two loaders over a real JetStream broker, real processes: the leader is SIGKILLed while the
worker it ordered is still reading the checkpoint (paced disk load), and the other loader takes
the lease over, finishes that decision from the journal and acks it, once. The scaler decides
nothing again and no second worker loads."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.config import GenerateSpec
from cascade.messages import HostCacheRequest, Ok, ScaleRequest
from cascade.models.generate import generate_model
from cascade.natsutil import connect, gather_status, request
from cascade.subjects import Subjects
from tests.test_control_restart import MODEL, Procs, Watch
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

LEASE_S = "1.5"


SMALL = GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256)
# 6.2 MB in 8 units: the first (0.16 MB) arrives quickly, the rest take seconds each when paced.
LARGER = GenerateSpec(layers=6, hidden=128, heads=4, kv_heads=2, vocab=320, max_position=256)


def _procs(js_url: str, prefix: str, tmp_path: Path, min_replicas: int, loading: str, spec: GenerateSpec) -> Procs:
    model = tmp_path / "models" / MODEL
    generate_model(model, spec)
    cfg = tmp_path / "deploy.toml"
    cfg.write_text(
        f'[[models]]\nname = "{MODEL}"\npath = "{model}"\nmin_replicas = {min_replicas}\nmax_replicas = 2\n'
        f'policy = "manual"\nloading = "{loading}"\n'
    )
    return Procs(js_url, prefix, tmp_path, cfg)


@pytest.fixture
def mesh(js_url: str, prefix: str, tmp_path: Path) -> Iterator[Procs]:
    # The worker reads the checkpoint itself, paced (Procs sets CASCADE_LOAD_MB_S): the load lasts
    # seconds, and goes on without a loader; the kill lands inside it.
    with _procs(js_url, prefix, tmp_path, 1, "disk", SMALL) as p:
        yield p


@pytest.fixture
def cache_mesh(js_url: str, prefix: str, tmp_path: Path) -> Iterator[Procs]:
    # The leader's own host copy is the source: its death cuts the transfer.
    with _procs(js_url, prefix, tmp_path, 0, "host-cache", LARGER) as p:
        yield p


async def _roles(url: str, s: Subjects) -> dict[str, str]:
    nc = await connect(url, "test-roles")
    try:
        st = await gather_status(nc, s, window_s=0.3)
    finally:
        await nc.close()
    return {x.instance: x.detail.get("lease", {}).get("role", "?") for x in st.services if x.service == "loader"}


async def _two_loaders(
    mesh: Procs, js_url: str, s: Subjects, *extra: str, leader_only: tuple[str, ...] = ()
) -> tuple[str, str]:
    """Start loader la, and lb once la leads; (leader, follower) once both say their role.
    `leader_only`: flags for la alone (the follower is the one that takes over)."""
    lease = ("--lease", "required", "--lease-s", LEASE_S, *extra)
    roles: dict[str, str] = {}

    async def until(want: dict[str, str]) -> None:
        deadline = asyncio.get_running_loop().time() + 60
        while roles != want:  # a 0.3 s status gather per look
            roles.update(await _roles(js_url, s))
            assert asyncio.get_running_loop().time() < deadline, f"roles {roles}\n{mesh.logs_tail()}"

    mesh.start("la", "loader", "--loader-id", "la", *lease, *leader_only)
    await until({"la": "leader"})
    mesh.start("lb", "loader", "--loader-id", "lb", *lease)
    await until({"la": "leader", "lb": "follower"})
    return "la", "lb"


async def test_leader_killed_mid_decision_the_other_loader_finishes_it_once(
    mesh: Procs, js_url: str, prefix: str
) -> None:
    s = Subjects(prefix)
    nc = await connect(js_url, "test-watch")
    watch = Watch()
    try:
        await watch.attach(nc, s)
        leader, follower = await _two_loaders(mesh, js_url, s)

        for w in ("w1", "w2"):
            mesh.start(w, "worker", "--worker-id", w, "--kv-cache-mb", "16")
        mesh.start("scaler", "scaler")
        try:
            await wait_until(lambda: watch.decisions, 60, "the scale decision")
            # The leader has journaled the worker it chose before ordering it: a worker loading
            # the model means the order is out.
            await wait_until(
                lambda: any(hb.model == MODEL and hb.state == "loading" for hb in watch.latest.values()),
                60,
                "a worker loading",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{mesh.logs_tail()}") from None
        loading = [w for w, hb in watch.latest.items() if hb.model == MODEL and hb.state == "loading"]
        assert not watch.acks, "the load finished before the kill: nothing to take over"
        mesh.kill(leader)

        d = watch.decisions[0]
        try:
            await wait_until(lambda: any(a.decision_id == d.decision_id for a in watch.acks), 120, "the ack")
            await wait_until(lambda: watch.serving() == 1, 60, "one serving instance")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{mesh.logs_tail()}") from None
        acks = [a for a in watch.acks if a.decision_id == d.decision_id]
        assert len(acks) == 1 and acks[0].ok, acks
        assert acks[0].workers == loading, (acks[0].workers, loading)
        assert watch.most == 1  # never a second instance
        follower_log = (mesh.logs / f"{follower}.log").read_text(errors="replace")
        assert "lease_acquired" in follower_log and "decision_taken_over" in follower_log
        # The survivor leads now, and the scaler decided nothing again (no more decisions than one).
        assert (await _roles(js_url, s)) == {follower: "leader"}
        assert len(watch.decisions) == 1, watch.decisions
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def test_leader_killed_while_it_sends_the_other_loader_plans_again_once(
    cache_mesh: Procs, js_url: str, prefix: str
) -> None:
    """The leader itself heads the transfer (its host copy, paced): killing it cuts the stream.
    The worker gives the broken load up; the new leader sees that and plans the decision again,
    from its own reading of the store, and acks it once, with one instance."""
    mesh = cache_mesh
    s = Subjects(prefix)
    nc = await connect(js_url, "test-watch")
    watch = Watch()
    try:
        await watch.attach(nc, s)
        # The leader's sends are paced to about 15 s for the model; the new leader's re-plan is
        # not (it reads the store into its own copy and sends at once).
        leader, follower = await _two_loaders(
            mesh, js_url, s, "--transfer-timeout-s", "3", leader_only=("--send-mb-s", "0.4")
        )
        for w in ("w1", "w2"):
            mesh.start(w, "worker", "--worker-id", w, "--kv-cache-mb", "16", "--load-mb-s", "4")
        mesh.start("scaler", "scaler")
        try:
            # Only the leader answers: the copy is in the leader's memory.
            await request(nc, s.host_cache(), HostCacheRequest("load", MODEL), Ok, timeout=30)
            await wait_until(lambda: len(watch.latest) == 2, 60, "both workers")
            await request(nc, s.scale_request(), ScaleRequest(MODEL, 1), Ok, timeout=30)
            await wait_until(
                lambda: any(
                    hb.model == MODEL and hb.state == "loading" and 0 < hb.units_ready < hb.num_units
                    for hb in watch.latest.values()
                ),
                60,
                "a worker part-way through its load",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{mesh.logs_tail()}") from None
        assert not watch.acks
        mesh.kill(leader)
        [d] = watch.decisions
        try:
            await wait_until(lambda: any(a.decision_id == d.decision_id for a in watch.acks), 120, "the ack")
            await wait_until(lambda: watch.serving() == 1, 60, "one serving instance")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{mesh.logs_tail()}") from None
        acks = [a for a in watch.acks if a.decision_id == d.decision_id]
        assert len(acks) == 1 and acks[0].ok and len(acks[0].workers) == 1, acks
        assert watch.most == 1
        log = (mesh.logs / f"{follower}.log").read_text(errors="replace")
        assert "decision_taken_over" in log and "decision_replanned" in log
        # The re-plan's transfers are the new leader's own (a worker may still hold the old ids).
        assert f"plan={d.decision_id}-{follower}-p1" in log
        assert len(watch.decisions) == 1, watch.decisions
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
