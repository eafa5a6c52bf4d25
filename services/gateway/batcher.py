"""Dynamic batching per model, with Ray Serve `@serve.batch` semantics.

Admitted requests wait in one bounded queue per model. Once an instance can take
them, the batcher gathers requests until `max_batch_size` or until
`wait_s` has passed since the first of them could go, and hands them to its
owner's `dispatch` as one batch (all on the same route). A full batch leaves at once,
and so does one the route's instance has no room to grow (`Route.room`: its
batch slots, its prefill backlog, and no more than keeps it level with the next
instance); what does not fit waits for the next pick.
One departure from Ray Serve: a request that arrives alone after a quiet spell
(no arrival in the previous `wait_s`) leaves at once. Workers batch
continuously, so waiting then would only add `wait_s` to its latency; under
load, arrivals are dense and batches form as before. With `submit(at_once=True)` (the gateway
core's admission) such a request is dispatched in the caller's own turn, without a wake of the
batcher's task. While no instance is
ready, requests stay queued until their own deadline, then the owner's `expired`
gets them. When requests start to wait for room (none was waiting before), the
owner's `holding` is called once, so it can tell the scaler before its next load
report. The batcher does no I/O: it talks to its owner through one interface,
`Dispatcher`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from services.gateway.router import Route
from services.gateway.streams import RequestState


class Dispatcher(Protocol):
    """What a batcher asks of its owner (the gateway core; fakes in tests)."""

    def pick(self, model: str, avoid: frozenset[str]) -> Route | None:
        """Where the next batch of `model` goes, avoiding `avoid` unless nothing else serves."""
        ...

    def dispatch(self, route: Route, batch: list[RequestState]) -> None:
        """Send `batch` (taken off the queue) along `route`; binds them before returning."""
        ...

    def expired(self, req: RequestState) -> None:
        """`req` waited its whole queue timeout for an instance."""
        ...

    def holding(self, model: str) -> None:
        """Requests of `model` began to wait for room."""
        ...


class QueueFull(Exception):
    """The model's queue is at its bound; the caller answers 429."""


class Batcher:
    def __init__(
        self,
        model: str,
        *,
        max_batch_size: int,
        wait_s: float,
        max_queue: int,
        queue_timeout_s: float,
        owner: Dispatcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.model = model
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._owner = owner
        self._holding = False  # requests wait because no instance has room
        self._clock = clock
        self._queue: deque[RequestState] = deque()
        self._wake = asyncio.Event()
        self._last_arrival = float("-inf")
        # No queued request's deadline is earlier than this (a lower bound, exact after a scan):
        # a step under overload then costs O(1) in the queue's length, not a scan of it.
        self._first_deadline = float("inf")

    # ---- admission ---------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, req: RequestState, at_once: bool = False) -> None:
        """Queue a new request, or raise QueueFull.

        `at_once`: when the request is alone in the queue after a quiet spell, take the step the
        batcher's task would take on its next turn (it dispatches such a request at once) here, in
        the caller's turn: the lone request on a quiet gateway then leaves without a wake of the
        task and a loop turn. Anything else (a batch forming, no instance, no room) is left to the
        task as before."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"model {self.model} has {len(self._queue)} requests queued (bound {self.max_queue})")
        now = self._clock()
        req.ready_at = now
        req.deadline = now + self.queue_timeout_s
        req.quiet = now - self._last_arrival > self.wait_s
        self._last_arrival = now
        self._queue.append(req)
        self._first_deadline = min(self._first_deadline, req.deadline)
        if at_once and req.quiet and len(self._queue) == 1:
            self.step()
            if not self._queue:
                return  # dispatched: the task, asleep until woken, has nothing to do
        self._wake.set()

    def requeue(self, req: RequestState, delay_s: float = 0.0, fresh_deadline: bool = True) -> None:
        """Put a request that an instance gave back at the front of the queue. It was admitted
        already, so the bound does not apply. A fresh deadline gives it a full queue timeout to
        find another instance; `delay_s` holds it back (back-off after "overloaded")."""
        now = self._clock()
        req.ready_at = now + delay_s
        if fresh_deadline:
            req.deadline = now + self.queue_timeout_s
        self._queue.appendleft(req)
        self._first_deadline = min(self._first_deadline, req.deadline)
        self._wake.set()

    def is_queued(self, req: RequestState) -> bool:
        return req in self._queue

    def discard(self, req: RequestState) -> bool:
        """Drop a queued request (its client left). True when it was queued."""
        try:
            self._queue.remove(req)
        except ValueError:
            return False
        return True

    def take_all(self) -> list[RequestState]:
        """Empty the queue (shutdown); the caller answers the requests."""
        out = list(self._queue)
        self._queue.clear()
        return out

    def wake(self) -> None:
        """Something changed that may let queued requests go (an instance appeared or freed up)."""
        self._wake.set()

    # ---- the loop ----------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._wake.clear()
            timeout = self.step()
            if timeout == 0:
                await asyncio.sleep(0)  # more to dispatch: let handlers and replies run between batches
                continue
            try:
                # asyncio.timeout, not wait_for: a cancel racing wait_for's timeout can surface as
                # TimeoutError on 3.11, and this loop would then never stop.
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def step(self) -> float | None:
        """Dispatch what can go now. Returns how long to sleep unless woken (None: until woken,
        0: go again at once)."""
        now = self._clock()
        # A request held back after "overloaded" must not bounce past its deadline, even while
        # its instance is up.
        self._expire(now, only_held=True)
        if not self._queue:
            self._holding = False
            return None
        # Ready requests in queue order, read only as far as needed: a batch never holds more than
        # max_batch_size, so the first that many decide whether to wait; the rest is read only
        # when some of those are skipped below.
        ready_iter = (r for r in self._queue if r.ready_at <= now)
        ready = list(itertools.islice(ready_iter, self.max_batch_size))
        if not ready:
            if self._first_deadline <= now:
                # The bound may be stale (a held-only scan does not renew it): renew it, so the
                # sleep below is never zero or negative (a spinning loop).
                self._expire(now)
                if not self._queue:
                    return None
            return min(min(r.ready_at for r in self._queue), self._first_deadline) - now
        head = ready[0]
        route = self._owner.pick(self.model, frozenset(head.avoid))
        if route is None:
            if not self._holding:
                self._holding = True
                self._owner.holding(self.model)
            self._expire(now)
            return None if not self._queue else self._first_deadline - now
        if route.stages and head.needs_full_instance:
            # Its route's tail is a whole instance: it goes there, busy as it is, and waits its turn.
            route = Route(route.stages[-1].worker_id)
        # The window never outlasts the head's deadline: with an instance up, it goes rather than expires.
        window_end = min(head.ready_at + self.wait_s, head.deadline)
        alone = len(ready) == 1 and head.quiet
        # No use waiting for more when the instance has no room for more than are here.
        full = route.room is not None and not route.room.admits(len(ready), sum(len(r.prompt_ids) for r in ready))
        if len(ready) < self.max_batch_size and now < window_end and not alone and not full:
            return window_end - now
        self._holding = False
        worker = route.worker_id
        batch: list[RequestState] = []
        tokens = 0
        for r in itertools.chain(ready, ready_iter):
            if len(batch) >= self.max_batch_size:
                break
            # The rest waits for the next pick, which weighs this batch (another instance, or this
            # one once it has room).
            if batch and route.room is not None and not route.room.admits(len(batch), tokens):
                break
            if route.stages and r.needs_full_instance:
                continue  # the next pick finds it a whole instance
            # A request that already failed on `worker` goes there only if nothing else can serve it.
            if r is not head and worker in r.avoid:
                alt = self._owner.pick(self.model, frozenset(r.avoid))
                if alt is None or alt.worker_id != worker:
                    continue
            batch.append(r)
            tokens += len(r.prompt_ids)
        for r in batch:
            self._queue.remove(r)
        self._owner.dispatch(route, batch)
        return 0.0 if self._queue else None

    def _expire(self, now: float, only_held: bool = False) -> None:
        if now < self._first_deadline:
            return
        if not only_held:
            self._first_deadline = min((r.deadline for r in self._queue if r.deadline > now), default=float("inf"))
        expired = [r for r in self._queue if r.deadline <= now and not (only_held and r.ready_at <= now)]
        for r in expired:
            self._queue.remove(r)
            self._owner.expired(r)
