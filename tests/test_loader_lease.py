"""The loader lease: the pure decisions (lease.py), then the compare-and-set it rests on and two
leaderships racing, against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import typing
from typing import Any

import pytest
import structlog

from cascade.controlstore import Conflict, StoreUnavailable, journal_key, open_store
from cascade.messages import ScaleDecision
from cascade.natsutil import connect
from services.loader.journal import DecisionJournal
from services.loader.leadership import Leadership
from services.loader.lease import Acquire, Lease, Renew, StepDown, Wait
from tests.waiting import wait_until

# ---- the pure lease ----------------------------------------------------------------------------


def test_no_key_is_acquired_by_create() -> None:
    lease = Lease("a", 1.5)
    lease.observed(None, 0, 10.0)
    assert lease.next(10.0) == Acquire(0)


def test_follower_waits_a_whole_lease_after_the_last_revision_it_saw() -> None:
    lease = Lease("b", 1.5)
    lease.observed("a", 7, 10.0)
    assert lease.next(11.0) == Wait(11.5)
    lease.observed("a", 8, 11.0)  # a renewal: the count starts again
    assert lease.next(12.4) == Wait(12.5)
    assert lease.next(12.5) == Acquire(8)


def test_the_same_revision_seen_again_does_not_restart_the_count() -> None:
    lease = Lease("b", 1.5)
    lease.observed("a", 7, 10.0)
    lease.observed("a", 7, 11.0)
    assert lease.next(11.5) == Acquire(7)


def test_leader_renews_every_third_and_steps_down_when_it_cannot() -> None:
    lease = Lease("a", 1.5)
    lease.won(3, sent_at=10.0)
    assert lease.leading
    assert lease.next(10.2) == Wait(10.5)
    assert lease.next(10.5) == Renew(3)
    lease.won(4, sent_at=10.5)
    assert lease.next(11.0) == Renew(4)  # a renewal that fails is tried again
    assert isinstance(lease.next(12.0), StepDown)


def test_leader_steps_down_before_any_follower_may_take_over() -> None:
    """The leader counts from when it sent its write, a follower from when it saw it (later)."""
    leader, follower = Lease("a", 1.5), Lease("b", 1.5)
    leader.won(5, sent_at=10.0)
    follower.observed("a", 5, 10.05)
    t = 10.0
    while not isinstance(leader.next(t), StepDown):
        assert not isinstance(follower.next(t), Acquire), t
        t = round(t + 0.01, 2)


def test_a_leader_that_reads_another_holder_follows() -> None:
    lease = Lease("a", 1.5)
    lease.won(3, 10.0)
    lease.observed("b", 4, 10.1)
    assert not lease.leading
    assert lease.next(10.2) == Wait(11.6)


def test_own_name_from_before_a_restart_is_taken_at_once() -> None:
    lease = Lease("a", 1.5)
    lease.observed("a", 9, 10.0)
    assert lease.next(10.0) == Acquire(9)


def test_lost_waits_for_a_fresh_read() -> None:
    lease = Lease("a", 1.5)
    lease.won(3, 10.0)
    lease.lost(10.1)
    assert not lease.leading
    assert isinstance(lease.next(10.2), Wait)


def test_bad_lease_length() -> None:
    with pytest.raises(ValueError):
        Lease("a", 0)


# ---- against a JetStream broker ----------------------------------------------------------------


@pytest.mark.e2e
async def test_compare_and_set_and_the_journal(js_url: str) -> None:
    nc = await connect(js_url, "test")
    try:
        store = await open_store(nc, "t1")
        rev = await store.create("lease.loader", {"holder": "a"})
        with pytest.raises(Conflict):
            await store.create("lease.loader", {"holder": "b"})
        with pytest.raises(Conflict):
            await store.update("lease.loader", {"holder": "b"}, last=rev + 5)
        rev2 = await store.update("lease.loader", {"holder": "b"}, last=rev)
        got = await store.get("lease.loader")
        assert got is not None and got.value == {"holder": "b"} and got.revision == rev2

        journal = DecisionJournal(store, "a", structlog.get_logger())
        d = ScaleDecision("s-1.2/x", "m", "up", 2, 3, "load")
        await journal.received(d)
        await journal.ordered(d, ("w1", "w2"))
        [j] = await journal.pending()
        assert j.decision == d and j.workers == ("w1", "w2") and j.state == "ordered" and j.by == "a"
        await journal.done(d)
        assert await journal.pending() == []
        assert journal_key("decision", "s-1.2/x").startswith("decision.")
    finally:
        await nc.close()


@pytest.mark.e2e
async def test_no_jetstream_is_said(nats_url: str) -> None:
    """The session's broker runs without JetStream."""
    nc = await connect(nats_url, "test")
    try:
        with pytest.raises(StoreUnavailable):
            await open_store(nc, "t2")
    finally:
        await nc.close()


@pytest.mark.e2e
async def test_two_leaderships_one_leader_and_takeover(js_url: str) -> None:
    """Two leaderships race for the key: exactly one leads; when it stops renewing (its task is
    cancelled, as a dead process stops), the other leads within a lease and a look."""
    log = structlog.get_logger()
    conns = [await connect(js_url, f"test-{i}") for i in range(2)]
    events: list[tuple[str, str]] = []
    ships: list[Leadership] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i, nc in enumerate(conns):
            name = f"l{i}"
            store = await open_store(nc, "t3")

            async def lead(name: str = name) -> None:
                events.append((name, "lead"))

            async def follow(why: str, name: str = name) -> None:
                events.append((name, "follow"))

            ships.append(Leadership(store, Lease(name, 0.6), lead, follow, log))
        tasks = [asyncio.ensure_future(s.run()) for s in ships]
        await wait_until(lambda: sum(s.leading for s in ships) == 1, 10, "one leader")
        # Several renewals pass and the leader stays the same one.
        leader = next(s for s in ships if s.leading)
        other = next(s for s in ships if s is not leader)
        first = leader.lease.revision
        await wait_until(lambda: leader.lease.revision >= first + 3, 10, "three renewals")
        assert leader.leading and not other.leading
        tasks[ships.index(leader)].cancel()
        await wait_until(lambda: other.leading, 10, "the takeover")
        assert [e for e in events if e[1] == "lead"] == [(leader.lease.me, "lead"), (other.lease.me, "lead")]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()


def test_leading_ends_when_the_lease_runs_out_on_our_clock() -> None:
    """A renewal stuck on a dead broker node: the leader stops counting as one on time, before
    its loop gets to step down."""
    now = [10.0]

    async def noop(*_: object) -> None:
        return None

    ship = Leadership(typing.cast(Any, None), Lease("a", 1.5), noop, noop, structlog.get_logger(), clock=lambda: now[0])
    ship.lease.won(1, sent_at=10.0)
    now[0] = 11.4
    assert ship.leading
    now[0] = 11.5
    assert not ship.leading and ship.lease.leading  # the loop has not stepped down yet
