"""Host copies across loaders (services/loader/copies.py): where the leader places K copies of a
model, what it drops, how the planner picks among copies, and the deployment setting."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import structlog

from cascade.config import ConfigError, Deployment, GenerateSpec, ModelDeployment, load_deployment
from cascade.messages import HostCopies, HostCopyOrder, RemoteError, TransferOrder
from cascade.models.generate import generate_model
from cascade.natsutil import TaskSet
from cascade.subjects import Subjects
from services.loader.cachekeeper import HostCacheKeeper
from services.loader.copies import CopyOrder, CopyTable, LoaderCopies, place_copies
from services.loader.main import Loader
from services.loader.planner import MeshSnapshot, PlanRequest, select_sources
from services.loader.settings import LoaderSettings
from tests.test_planner import idle, on
from tests.waiting import wait_until
from tests.workerprocs import REPO

M = "m"


def lc(lid: str, host: str, models: tuple[str, ...] = (), cache: bool = True) -> LoaderCopies:
    return LoaderCopies(lid, host, frozenset(models), cache=cache)


def test_one_copy_goes_to_the_leader() -> None:
    loaders = [lc("a", "h1"), lc("b", "h2"), lc("c", "h3")]
    assert place_copies({M: 1}, loaders, "b") == [CopyOrder("b", M, "fill")]


def test_k_copies_spread_over_distinct_hosts_first() -> None:
    # a and b share h1; the second copy goes to h2, not to the leader's host-mate.
    loaders = [lc("a", "h1", (M,)), lc("b", "h1"), lc("c", "h2")]
    assert place_copies({M: 2}, loaders, "a") == [CopyOrder("c", M, "fill")]
    # More copies than hosts: then a second copy on a host already holding one.
    assert place_copies({M: 3}, loaders, "a") == [CopyOrder("c", M, "fill"), CopyOrder("b", M, "fill")]


def test_extra_copies_are_dropped_keeping_distinct_hosts_and_the_leaders() -> None:
    loaders = [lc("a", "h1", (M,)), lc("b", "h1", (M,)), lc("c", "h2", (M,))]
    assert place_copies({M: 2}, loaders, "b") == [CopyOrder("a", M, "drop")]
    assert place_copies({M: 1}, loaders, "c") == [CopyOrder("a", M, "drop"), CopyOrder("b", M, "drop")]


def test_an_unwanted_model_is_dropped_everywhere_and_no_cache_gets_nothing() -> None:
    loaders = [lc("a", "h1", (M,)), lc("b", "h2", ("x",)), lc("c", "h3", cache=False)]
    assert place_copies({"x": 3}, loaders, "a") == [CopyOrder("a", M, "drop"), CopyOrder("a", "x", "fill")]


def test_a_filling_copy_counts_and_placement_is_stable() -> None:
    loaders = [lc("a", "h1", (M,)), LoaderCopies("b", "h2", filling=frozenset({M}))]
    assert place_copies({M: 2}, loaders, "a") == []


def test_table_forgets_silent_loaders_adopts_on_takeover_and_sweeps() -> None:
    t = CopyTable("a", stale_s=3.0)
    t.heard(LoaderCopies("b", "h2", frozenset({M}), seen=10.0))
    t.heard(LoaderCopies("c", "h3", frozenset({"x"}), seen=5.0))
    assert [c.loader_id for c in t.peers(12.0)] == ["b"]  # c not heard for 7 s: gone
    assert t.adopt(12.0) == [M]
    # Live holders serve the model: its copies go after keep_alive_s idle, not before.
    assert t.sweep(100.0, {M: 1}, lambda _: 0, 300.0, 3600.0) == []
    [(model, why)] = t.sweep(400.0, {M: 1}, lambda _: 0, 300.0, 3600.0)
    assert model == M and why.release and M not in t.wanted


def test_planner_prefers_a_copy_on_the_targets_host() -> None:
    snap = MeshSnapshot(
        (on(idle("t1"), "h2"),),
        frozenset({M}),
        host_cache_host="h1",
        peer_copies=(("lb", "h2", frozenset({M})), ("lc", "h3", frozenset({M}))),
    )
    req = PlanRequest(M, ("t1",), "multicast", (10, 10))
    [src] = select_sources(snap, req)
    assert (src.kind, src.loader) == ("host-cache", "lb")
    # No copy on the target's host: the planning loader's own first.
    far = MeshSnapshot(snap.workers, snap.host_cache_models, host_cache_host="h1", peer_copies=snap.peer_copies[1:])
    [src] = select_sources(far, req)
    assert (src.kind, src.loader) == ("host-cache", "")
    # Only a peer holds it: the peer's copy, not the disk.
    peer_only = MeshSnapshot(snap.workers, frozenset(), peer_copies=snap.peer_copies[1:])
    [src] = select_sources(peer_only, req)
    assert (src.kind, src.loader) == ("host-cache", "lc")


def test_host_copies_in_the_deployment(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text('host_copies = 2\n[[models]]\nname = "a"\n[[models]]\nname = "b"\nhost_copies = 3\n')
    dep = load_deployment(f, tmp_path)
    assert [m.host_copies for m in dep.models] == [2, 3]
    f.write_text('[[models]]\nname = "a"\n')
    assert load_deployment(f, tmp_path).models[0].host_copies == 1
    for bad in ("0", "1.5", "true", '"2"'):
        f.write_text(f'[[models]]\nname = "a"\nhost_copies = {bad}\n')
        with pytest.raises(ConfigError, match="host_copies"):
            load_deployment(f, tmp_path)


async def test_a_loader_fills_sends_from_and_drops_its_copy_on_the_leaders_orders(tmp_path: Path) -> None:
    path = tmp_path / M
    generate_model(path, GenerateSpec(layers=1, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256))
    log = structlog.get_logger().bind(test="copies")
    tasks = TaskSet(log)
    dep = Deployment((ModelDeployment(M, path, 0, 1),))
    keeper = HostCacheKeeper(LoaderSettings(loader_id="lx", host_id="hx"), dep, tasks, log)
    announced: list[HostCopies] = []
    keeper.changed = lambda: announced.append(keeper.announcement())
    try:
        assert (await keeper.on_copy_order(HostCopyOrder("fill", M, str(path), "la"))).detail == f"filling {M}"
        await wait_until(lambda: keeper.models() == {M}, 60, "the copy filled")
        # Announced while filling, then held; the sizes a plan needs come from the copy.
        assert announced[0].filling == [M] and announced[-1] == HostCopies("lx", "hx", [M], [], True)
        assert keeper.unit_sizes(M) is not None and len(keeper.unit_sizes(M) or ()) > 0
        order = TransferOrder("t", "tok", "other", "send", [0], 1, downstream="127.0.0.1:1")
        with pytest.raises(RemoteError, match="not_cached"):
            await keeper.on_send(order)
        await keeper.on_copy_order(HostCopyOrder("drop", M, "", "la"))
        assert keeper.models() == frozenset() and announced[-1].models == []
    finally:
        await tasks.cancel_all()
        keeper.close()


async def test_a_new_leader_keeps_its_copy_while_it_reads_the_journal(tmp_path: Path) -> None:
    """From the lease on, the pulse places copies for what is wanted: a takeover adopts what the
    loaders hold before its first await (the journal's read), or the pulse meanwhile would find
    nothing wanted and drop every copy, the new leader's own first."""
    path = tmp_path / M
    generate_model(path, GenerateSpec(layers=1, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256))
    log = structlog.get_logger().bind(test="copies")
    tasks = TaskSet(log)
    dep = Deployment((ModelDeployment(M, path, 0, 1, host_copies=2),))
    settings = LoaderSettings(loader_id="lb", host_id="hb")
    keeper = HostCacheKeeper(settings, dep, tasks, log)
    loader = Loader(settings, dep, log)
    reading, go_on = asyncio.Event(), asyncio.Event()

    class Journal:
        async def pending(self) -> list[Any]:
            reading.set()
            await go_on.wait()
            return []

    class Nats:
        async def publish(self, subject: str, data: bytes) -> None:
            pass

    loader.keeper = keeper
    loader.decisions = cast(Any, SimpleNamespace(journal=Journal()))
    loader.leadership = cast(Any, SimpleNamespace(leading=True))
    loader.rt = cast(Any, SimpleNamespace(nc=Nats(), subjects=Subjects("t")))
    try:
        await keeper.on_copy_order(HostCopyOrder("fill", M, str(path), "la"))
        await wait_until(lambda: keeper.models() == {M}, 60, "the copy filled")
        # Both loaders held a copy when the old leader ("la") died; it is not stale yet.
        keeper.heard(HostCopies("la", "ha", [M], [], True))
        keeper.heard(keeper.announcement())
        taking_over = asyncio.ensure_future(loader.on_lead())
        await reading.wait()
        keeper.sweep({})  # the pulse, as the leader, while the journal is read
        assert keeper.models() == {M}
        go_on.set()
        await taking_over
        assert keeper.models() == {M} and M in keeper.copies.wanted
    finally:
        go_on.set()
        await tasks.cancel_all()
        keeper.close()


def test_the_loader_never_imports_torch(tmp_path: Path) -> None:
    """The loader handles checkpoints as layouts and bytes: its process starts without torch
    (seconds sooner on a small machine, ~200 MB smaller) and holds a copy without it."""
    path = tmp_path / M
    generate_model(path, GenerateSpec(layers=1, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import services.loader.main\n"
        "from services.loader.hostcache import HostCache\n"
        "for mode in ('mmap', 'copy'):\n"
        f"    assert HostCache(mode=mode).load('m', Path({str(path)!r})).nbytes > 0\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_item_sizes_are_torchs() -> None:
    import torch

    from cascade.models.checkpoint import DTYPES, ITEM_SIZES

    assert {k: torch.empty((), dtype=d).element_size() for k, d in DTYPES.items()} == ITEM_SIZES
