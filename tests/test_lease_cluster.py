"""The loader lease on a real 3-node NATS cluster with JetStream (the bucket replicated 3 times, as
deploy/k8s runs it): two leaderships connected by the seed list agree on one
leader; when the node the leader is connected to dies, its client fails over to another node and
there is again exactly one leader, renewing, and never two at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from nats.aio.client import Client as NATS

from cascade.cli.embedded_nats import EmbeddedNats
from cascade.controlstore import ControlStore, StoreUnavailable, open_store
from cascade.natsutil import connect
from services.loader.leadership import Leadership
from services.loader.lease import Lease
from tests.natscluster import nats_cluster
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[EmbeddedNats]]:
    with nats_cluster(tmp_path) as nodes:
        yield list(nodes)


async def _store(nc: NATS, prefix: str) -> ControlStore:
    """The replicated bucket, once the cluster's JetStream has elected its meta leader."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        try:
            return await open_store(nc, prefix, replicas=3)
        except StoreUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)  # the cluster forming: retried with a deadline


async def test_one_leader_through_the_loss_of_the_leaders_node(cluster: list[EmbeddedNats], prefix: str) -> None:
    urls = [n.url for n in cluster]
    log = structlog.get_logger()
    ships: list[Leadership] = []
    conns: list[NATS] = []
    tasks: list[asyncio.Task[None]] = []
    both_leading = 0

    async def noop(*_: object) -> None:
        return None

    try:
        for i in range(2):
            conns.append(await connect(",".join(urls), f"l{i}"))  # the seed list
            store = await _store(conns[i], prefix)
            ships.append(Leadership(store, Lease(f"l{i}", 1.5), noop, noop, log))
        tasks = [asyncio.ensure_future(s.run()) for s in ships]

        async def watch() -> None:
            nonlocal both_leading
            while True:
                if all(s.leading for s in ships):
                    both_leading += 1
                await asyncio.sleep(0.005)  # sampling the two leaderships

        tasks.append(asyncio.ensure_future(watch()))
        await wait_until(lambda: sum(s.leading for s in ships) == 1, 30, "one leader")
        nc = conns[next(i for i, s in enumerate(ships) if s.leading)]
        node = next(n for n in cluster if nc.connected_url is not None and nc.connected_url.port == n.port)
        node.stop()
        await wait_until(
            lambda: nc.is_connected and nc.connected_url is not None and nc.connected_url.port != node.port,
            30,
            "the leader's client on another node",
        )
        # Renewals go on through the surviving nodes (or the other took over): one leader, renewing.
        await wait_until(lambda: sum(s.leading for s in ships) == 1, 30, "one leader after the loss")
        now_leading = next(s for s in ships if s.leading)
        rev = now_leading.lease.revision
        await wait_until(lambda: now_leading.lease.revision >= rev + 3, 30, "renewals after the loss")
        assert now_leading.leading
        assert both_leading == 0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            with contextlib.suppress(Exception):
                await c.close()
