"""Runs the lease (lease.py) against the control store: reads the key, writes it with
compare-and-set, and tells the loader when it starts or stops leading."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cascade.controlstore import KV_TIMEOUT_S, Conflict, ControlStore
from services.loader.lease import LEASE_KEY, Acquire, Lease, Renew, StepDown, Wait

POLL_MAX_S = 0.25  # a follower looks at the key at least this often (takeover = lease + one look)


class Leadership:
    def __init__(
        self,
        store: ControlStore,
        lease: Lease,
        on_lead: Callable[[], Awaitable[None]],
        on_follow: Callable[[str], Awaitable[None]],
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.lease = lease
        self.on_lead = on_lead
        self.on_follow = on_follow
        self.log = log
        self.clock = clock
        self.poll_s = min(POLL_MAX_S, lease.lease_s / 10)
        self.closed = False

    @property
    def leading(self) -> bool:
        """Leading, and the lease not run out on our own clock: a renewal stuck on a dead broker
        node must not leave us acting while a follower may take over."""
        lease = self.lease
        return lease.leading and not self.closed and self.clock() - lease.sent_at < lease.lease_s

    async def run(self) -> None:
        await self.read()
        while not self.closed:
            now = self.clock()
            act = self.lease.next(now)
            if isinstance(act, Wait):
                # Followers look at the key while they wait (a renewal restarts their count);
                # the leader only writes.
                await asyncio.sleep(max(0.0, min(act.until - now, self.poll_s)))  # a timer
                if not self.lease.leading:
                    await self.read()
            elif isinstance(act, StepDown):
                self.log.warning("lease_lost", why=act.why)
                self.lease.lost(self.clock())
                await self.on_follow(act.why)
            elif isinstance(act, Renew):
                await self.write(act.last, renew=True)
            elif isinstance(act, Acquire):
                await self.write(act.last, renew=False)

    async def read(self) -> None:
        try:
            e = await self.store.get(LEASE_KEY)
        except Exception as err:  # the broker away: keep the last view, its clock keeps running
            self.log.debug("lease_read_failed", error=repr(err))
            await asyncio.sleep(self.poll_s)  # a retry timer
            return
        was_leading = self.lease.leading
        if e is None:
            self.lease.observed(None, 0, self.clock())
        else:
            self.lease.observed(str(e.value.get("holder")), e.revision, self.clock())
        if was_leading and not self.lease.leading:
            await self.on_follow(f"{self.lease.holder} holds the lease")

    async def write(self, last: int, renew: bool) -> None:
        sent = self.clock()
        value = {"holder": self.lease.me, "lease_s": self.lease.lease_s, "ts": time.time()}
        # A renewal waits no longer than the lease has left: then it steps down on time.
        timeout = max(0.01, self.lease.sent_at + self.lease.lease_s - sent) if renew else KV_TIMEOUT_S
        try:
            if last:
                rev = await self.store.update(LEASE_KEY, value, last, timeout)
            else:
                rev = await self.store.create(LEASE_KEY, value, timeout)
        except Conflict:
            was_leading = self.lease.leading
            self.lease.lost(self.clock())
            await self.read()
            if was_leading:
                self.log.warning("lease_taken", holder=self.lease.holder)
                await self.on_follow(f"{self.lease.holder} took the lease")
            return
        except Exception as err:  # a timeout or a lost broker: try again; the lease runs out if it lasts
            self.log.warning("lease_write_failed", renew=renew, error=repr(err))
            await asyncio.sleep(self.poll_s)  # a retry timer
            return
        if self.closed:
            return
        was_leading = self.lease.leading
        self.lease.won(rev, sent)
        if not was_leading:
            self.log.info("lease_acquired", revision=rev, lease_s=self.lease.lease_s)
            await self.on_lead()

    async def release(self) -> None:
        """A clean stop hands the lease over at once: delete the key if it is still ours."""
        self.closed = True
        if not self.lease.leading:
            return
        self.lease.leading = False
        try:
            await self.store.kv.delete(LEASE_KEY, last=self.lease.revision)
            self.log.info("lease_released")
        except Exception as e:  # someone took it already, or the broker is away: it runs out
            self.log.warning("lease_release_failed", error=repr(e))
