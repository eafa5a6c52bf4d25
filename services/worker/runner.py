"""The engine thread: the one thread that does this worker's torch work.

Every change to the model and every step run here, so nothing else writes model state, and
torch runs on one thread with the thread count the worker was given. Why one thread matters
beyond correctness: measured on this machine, an engine step run on a second thread took 52 ms
instead of 33 ms as soon as any other thread had run a parallel torch op (loading weights on an
executor thread did), whatever OMP_WAIT_POLICY, GOMP_SPINCOUNT or set_num_threads said.

The event loop hands work over and never waits on torch:

- `call(fn, *args)` runs `fn` here, between two steps, and resolves a future on the loop (a unit
  of weights installed, the batch limit changed);
- requests, cancels and stage frames go into the engine's thread-safe inboxes, then `wake()`;
- a step's token events for a gateway with a direct token link go on that link first
  (tokenlinks.py: one frame per gateway per step, no broker on the path); what is left takes
  the NATS paths below;
- steps run back to back while the engine has work. A step's token events are published by this
  thread itself, on a NATS connection of its own (`direct`), when the lane gives it a way to
  (`EngineRunner(direct_messages=...)`): handing them to the loop instead wakes the loop thread
  every step, and the two threads then take turns on the interpreter lock: measured at one
  stream, the engine spent 0.9–1.1 ms (median) between two steps, mostly in
  `call_soon_threadsafe`, against 0.4 ms publishing itself, and the loop waited for the lock up
  to several steps before it could publish a token (docs/architecture.md). The publish itself
  runs no loop turn when it can avoid one: the `PUB` commands go straight onto the connection's
  socket (directpub.py), and the connection's loop runs only when nats-py must do the publish
  (broker away, bytes of its own pending), while the thread waits for work (a turn every
  `directpub.IDLE_TURN_S` on a quiet connection, whose idle thread blocks on a plain event: a
  request wakes it in ~45 µs instead of ~200 µs through the loop; all the time while it
  reconnects), and between two steps when the socket holds unsent bytes or the loop has not run
  for `directpub.TURN_S` (the server's PINGs, a reconnect). Results that carry stage frames
  (`outbox`, async sends on the loop's stage links) still reach the loop through a queue and
  are published in order by `publish()`; a lane goes back to the direct path only once the
  loop has delivered all it was handed, and the direct connection is flushed (a PING answered,
  sent behind every byte written on its socket) before anything is handed over after it, so a
  gateway never sees a request's events out of order. Why not `run_in_executor` per step: each
  step would then wait for the loop to publish the previous step's tokens and schedule the next
  one, about a millisecond per step in future chaining and wake-ups, as much as a decode step of
  a small model;
- when the engine runs out of work, `on_idle(in_flight)` tells the loop how many sequences it
  still holds (counted here, not read across threads by the loop).

A worker shared by several instances (docs/pipelined-and-shared.md) has one `EngineThread` and one
`EngineRunner` per instance on it (a lane): the thread steps the engine of the instance the
quota scheduler (`sharing.StrideScheduler`) picks among those with work, so instances take turns
on the device by quota, one step at a time, and each lane's results go to its own instance.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
import torch

from cascade.cpus import pin_current_thread
from services.worker import directpub
from services.worker.directpub import DirectWriter, publish_all, turn
from services.worker.engine import Engine, StepResult
from services.worker.sharing import DEFAULT_QUOTA, StrideScheduler
from services.worker.tokenlinks import TokenLinks

T = TypeVar("T")

ENGINE_THREAD = "engine"


class EngineStopped(RuntimeError):
    """The engine thread stopped before it could run a call."""


class EngineThread:
    """The one thread of a worker that runs torch: every lane's steps and calls.

    `connect` opens the NATS connection this thread publishes token events on (see the module's
    docstring); without it, or when it fails, every result goes through the loop."""

    def __init__(
        self,
        logger: Any = None,
        threads: int = 1,
        connect: Callable[[], Awaitable[Any]] | None = None,
        cpus: frozenset[int] = frozenset(),
    ) -> None:
        self.log = logger or structlog.get_logger()
        self._threads = threads
        self._cpus = cpus
        self._connect = connect
        # This thread's own event loop, for its NATS connection: it runs while a direct publish
        # goes out and while the thread waits for work (so the client answers the server's pings
        # and reconnects), never while a step computes.
        self._eloop: asyncio.AbstractEventLoop | None = None
        self._awake: asyncio.Event | None = None
        self.direct: Any = None  # the connection, while it can be used
        self._writer: DirectWriter | None = None  # writes on `direct`'s socket without a loop turn
        self._wake = threading.Event()
        self._loop_waiting = False  # the thread waits for work inside its connection's loop
        # Something may wait in the direct connection's buffers (this thread wrote or ran its loop
        # since `_tend` last found nothing): only then, or once `TURN_S` has passed, does a step
        # pay for asking (reading nats-py's and the transport's state, run cold after a step, costs
        # more than the rest of the thread's work between two steps when the events go by a link).
        self._direct_dirty = True
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = (
            collections.deque()
        )
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD, daemon=True)
        # Lanes and the scheduler change only on this thread (in calls) once it runs.
        self.lanes: dict[str, EngineRunner] = {}
        self.scheduler = StrideScheduler()

    @property
    def started(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()
        # Only a thread waiting inside its connection's loop needs that loop woken (a write on its
        # self-pipe); one blocked on `_wake` itself is woken by the set above. Read after the set:
        # a thread that enters the loop's wait after this read sees `_wake` set and does not wait.
        if not self._loop_waiting:
            return
        eloop, awake = self._eloop, self._awake
        if eloop is not None and awake is not None:
            try:
                eloop.call_soon_threadsafe(awake.set)
            except RuntimeError:  # its loop closed: the thread is past its last wait
                pass

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        assert self._loop is not None, "the engine thread is not started"
        fut: asyncio.Future[T] = self._loop.create_future()
        if self._stopping:
            fut.set_exception(EngineStopped("the engine thread has stopped"))
            return fut
        self._calls.append((fn, args, fut))
        self.wake()
        return fut

    def add(self, lane: EngineRunner, quota: float) -> None:
        """Before start, or on this thread (a call)."""
        self.lanes[lane.name] = lane
        self.scheduler.add(lane.name, quota)

    def remove(self, name: str) -> None:
        """On this thread (a call), or after it stopped: the lane steps no more."""
        lane = self.lanes.pop(name, None)
        if lane is not None and lane.token_links is not None:
            lane.token_links.close()
        self.scheduler.remove(name)

    def set_quota(self, name: str, quota: float) -> tuple[float, dict[str, float]]:
        """On this thread (a call): the lane's new share of the steps; the value applied and every
        lane's quota after it. Raises QuotaError."""
        return self.scheduler.set_quota(name, quota), self.scheduler.quotas()

    async def stop(self) -> None:
        """Stop after the current step; calls not yet run fail with EngineStopped."""
        self._stopping = True
        self.wake()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)
        while self._calls:
            _, _, fut = self._calls.popleft()
            if not fut.done():
                fut.set_exception(EngineStopped("the engine thread has stopped"))

    # ---- the engine thread -------------------------------------------------
    def _with_work(self) -> dict[str, Engine]:
        out = {}
        for name, lane in self.lanes.items():
            eng = lane._get_engine()
            if eng is not None and eng.has_work():
                out[name] = eng
        return out

    def _run(self) -> None:
        # Before torch starts any intra-op threads: they inherit this thread's CPUs.
        pin_current_thread(self._cpus)
        torch.set_num_threads(self._threads)
        self._open_direct()
        try:
            self._serve()
        finally:
            self._close_direct()

    def _open_direct(self) -> None:
        if self._connect is None:
            return
        self._eloop = asyncio.new_event_loop()
        self._awake = asyncio.Event()
        try:
            self.direct = self._eloop.run_until_complete(self._connect())
            self._writer = DirectWriter(self.direct)
        except Exception as e:  # the loop's connection still carries every result
            self.log.warning("direct_publish_unavailable", error=repr(e))

    def _close_direct(self) -> None:
        for lane in list(self.lanes.values()):
            if lane.token_links is not None:
                lane.token_links.close()
        eloop, self._eloop = self._eloop, None
        if eloop is None:
            return
        nc, self.direct, self._writer = self.direct, None, None
        if nc is not None:
            try:
                # Flushed first: what was published here reaches the server before the events the
                # worker still sends on its own connection (a drain's last events).
                eloop.run_until_complete(asyncio.wait_for(_flush_and_close(nc), _DIRECT_CLOSE_S))
            except Exception as e:
                self.log.warning("direct_publish_close_failed", error=repr(e))
        eloop.close()

    def _sleep(self) -> None:
        """Wait for work. With a direct connection that has nothing to send and is not
        reconnecting, on `_wake` itself with a turn of the connection's loop every `IDLE_TURN_S` (the
        server's PINGs answered, a closed socket noticed, as while the engine is busy); otherwise
        inside that loop until woken, so that a reconnect or a flush runs meanwhile. Waking a
        thread blocked on the event is a futex wake, about 45 µs here, against about 200 µs to
        wake it inside its loop (the self-pipe write, the loop's poll, the event's future and
        task, the loop's stop): it is on every request's path to the first step, once the engine
        has gone idle."""
        if self._eloop is None or self.direct is None:
            self._wake.wait()
            return
        while not self._wake.is_set():
            writer = self._writer
            if writer is not None and writer.quiet():
                if self._wake.wait(directpub.IDLE_TURN_S):
                    return
                self._tend()
                continue
            self._loop_waiting = True
            try:
                self._run_eloop(self._idle())
            finally:
                self._loop_waiting = False

    async def _idle(self) -> None:
        assert self._awake is not None
        while not self._wake.is_set():
            await self._awake.wait()
            self._awake.clear()

    def _hand_over(self, lane: EngineRunner, result: StepResult) -> None:
        """Publish `result` here when the lane can and nothing it handed the loop is pending;
        else hand it to the loop (after flushing the direct connection, so order holds)."""
        assert self._loop is not None
        links = lane.token_links
        if links is not None and result.events:
            # Events for gateways linked directly go on their links first (tokenlinks.py says which);
            # what is left goes by NATS as below.
            left = links.send(result)
            if not left and not result.outbox:
                return
            if len(left) != len(result.events):
                result = dataclasses.replace(result, events=left)
        nc, eloop, writer = self.direct, self._eloop, self._writer
        direct = lane._direct_messages
        if nc is not None and eloop is not None and writer is not None and direct is not None:
            if not result.outbox and lane._handed == lane._delivered:
                try:
                    messages = direct(result)
                    self._direct_dirty = True
                    if not writer.write(messages):
                        # nats-py's own path: buffered while the broker is away, or behind what
                        # it already holds (directpub.py says when).
                        self._run_eloop(publish_all(nc, messages))
                    lane._direct_unflushed = True
                    lane.direct_results += 1
                    return
                except Exception as e:
                    self.log.warning("direct_publish_failed", instance=lane.name, error=repr(e))
            if lane._direct_unflushed and nc.is_connected:
                # (While the broker is away both connections buffer; the gateway's index check
                # catches what a reconnect reorders, as it catches lost events.) The flush's PING
                # goes out behind every byte written on the socket directly.
                try:
                    self._run_eloop(asyncio.wait_for(nc.flush(), _DIRECT_FLUSH_S))
                except Exception as e:
                    self.log.warning("direct_flush_failed", instance=lane.name, error=repr(e))
                lane._direct_unflushed = False
        lane._handed += 1
        self._loop.call_soon_threadsafe(lane._results.put_nowait, result)

    def _run_eloop(self, aw: Awaitable[T]) -> T:
        assert self._eloop is not None
        self._direct_dirty = True
        try:
            return self._eloop.run_until_complete(aw)
        finally:
            if self._writer is not None:
                self._writer.last_turn = time.monotonic()

    def _tend(self, now: float = 0.0) -> None:
        """Run the direct connection's loop between two steps when it needs to (directpub.py's
        `wants_turn`): the server's PINGs answered, a reconnect noticed, bytes the socket did not
        take at once sent, however long the engine stays busy. `now`: a monotonic reading taken
        just before (0: read it here)."""
        writer = self._writer
        if writer is None or self._eloop is None:
            return
        now = now or time.monotonic()
        if not self._direct_dirty and now - writer.last_turn < directpub.TURN_S:
            return
        if not writer.wants_turn(now):
            self._direct_dirty = False
            return
        try:
            self._run_eloop(turn())
        except Exception as e:
            self.log.warning("direct_turn_failed", error=repr(e))

    def _serve(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            self._sleep()
            self._wake.clear()
            if self._stopping:
                return
            self._run_calls()
            busy = self._with_work()
            eng: Engine | None = None
            ended = 0.0  # when the last step of this busy run returned (0: none yet)
            while not self._stopping and (self._calls or busy):
                self._tend(ended)
                if self._calls:
                    # A call may change lanes and models: what has work is read again after it
                    # (else the reading at the end of the last step stands, microseconds old).
                    self._run_calls()
                    busy = self._with_work()
                name = self.scheduler.pick(busy)
                if name is None:
                    continue
                lane, eng = self.lanes[name], busy[name]
                t0 = time.monotonic()
                if ended:
                    # From one step's return to the next step: this thread's own cost per step
                    # (its events sent, the next lane picked), which an engine run in-process
                    # does not pay.
                    lane.gap_s += t0 - ended
                    lane.gaps += 1
                try:
                    result = eng.step()
                except Exception as e:
                    # The engine turns model errors into failed requests; anything reaching here is a
                    # bug that may have left the batch inconsistent. End every request with the
                    # error (never leave a client waiting) and go on serving new ones.
                    self.log.exception("engine_step_failed", instance=name)
                    events = eng.drain_all(f"engine failure: {type(e).__name__}: {e}")
                    self._hand_over(lane, StepResult(events, [], 0, 0, 0, 0))
                    busy = {}
                    break
                lane.steps += 1
                if result.target_s > 0:
                    elapsed = time.monotonic() - t0
                    if elapsed < result.target_s:
                        # Emulated device: the results exist when the device would have finished.
                        lane.padded_s += result.target_s - elapsed
                        time.sleep(result.target_s - elapsed)
                    else:
                        lane.overrun_steps += 1
                        lane.overrun_s += elapsed - result.target_s
                ended = time.monotonic()
                lane.busy_s += ended - t0  # its step, padding included: its time on the device
                if result.events or result.outbox:
                    self._hand_over(lane, result)
                busy = self._with_work()  # a model dropped meanwhile stops stepping here
            self.scheduler.pick(())  # every lane idle: none keeps credit for the pause
            for lane in list(self.lanes.values()):
                held = lane._get_engine()
                in_flight = held.in_flight() if held is not None else 0
                if in_flight == 0 and lane.token_links is not None:
                    lane.token_links.idle()
                loop.call_soon_threadsafe(lane._on_idle, in_flight)
            held = None
            # Hold no engine while asleep: a model unloaded meanwhile must be freed, not kept
            # alive by this thread's frame until the next wake-up.
            eng = None
            busy = {}

    def _run_calls(self) -> None:
        assert self._loop is not None
        while self._calls:
            fn, args, fut = self._calls.popleft()
            try:
                value = fn(*args)
            except Exception as e:
                self._loop.call_soon_threadsafe(_settle, fut, None, e)
            else:
                self._loop.call_soon_threadsafe(_settle, fut, value, None)
            # A model's load is a long run of calls (one per unit): the connection's loop still
            # runs every `TURN_S` meanwhile.
            self._tend()


class EngineRunner:
    """One instance's lane on the engine thread: its own by default, or a shared worker's.

    `direct_messages(result)` encodes a result's events as NATS messages (subject, payload) for
    the engine thread to publish on its own connection (see the module's docstring), on this
    thread; `deliver(result)` publishes them on the loop."""

    def __init__(
        self,
        get_engine: Callable[[], Engine | None],
        deliver: Callable[[StepResult], Awaitable[None]],
        on_idle: Callable[[int], None],
        logger: Any = None,
        threads: int = 1,
        shared: EngineThread | None = None,
        name: str = "main",
        quota: float = DEFAULT_QUOTA,
        direct_messages: Callable[[StepResult], list[tuple[str, bytes]]] | None = None,
        connect: Callable[[], Awaitable[Any]] | None = None,
        cpus: frozenset[int] = frozenset(),
        token_links: TokenLinks | None = None,
    ) -> None:
        """`connect` and `cpus`: the direct connection and CPUs of the thread this lane makes (not
        with `shared`, whose thread has its own). `token_links`: this lane's direct links to
        gateways (tokenlinks.py), tried before NATS for every result's events."""
        self.token_links = token_links
        self._get_engine = get_engine
        self._deliver = deliver
        self._direct_messages = direct_messages
        # Results handed to the loop, and those it delivered: each written by one thread only.
        self._handed = 0
        self._delivered = 0
        self._direct_unflushed = False  # published directly since the last hand-over
        self.direct_results = 0  # results published on the engine thread's connection
        self._on_idle = on_idle
        self.name = name
        self.log = logger or structlog.get_logger()
        self._owns_thread = shared is None
        self.thread = shared or EngineThread(self.log, threads, connect, cpus)
        self._quota = quota
        self._stopped = False
        self._added: asyncio.Future[None] | None = None
        self._results: asyncio.Queue[StepResult] = asyncio.Queue()
        # Emulated device: how far steps were padded, and how often real compute overran the profile.
        self.padded_s = 0.0
        self.overrun_steps = 0
        self.overrun_s = 0.0
        self.steps = 0
        self.busy_s = 0.0  # seconds the engine thread spent on this lane's steps
        # Seconds between two back-to-back steps of this thread (the one before may be another
        # lane's), and how many such gaps: the per-step cost of serving beside the steps.
        self.gap_s = 0.0
        self.gaps = 0

    def start(self) -> None:
        if self.thread.started:
            # Joins between two steps of the lanes already running; kept so that its outcome is read.
            self._added = self.thread.call(self.thread.add, self, self._quota)
        else:
            self.thread.add(self, self._quota)
            self.thread.start()

    def wake(self) -> None:
        """New work for the engine (requests, cancels, stage frames): safe from any thread."""
        self.thread.wake()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run `fn(*args)` on the engine thread between two steps; from the event loop."""
        if self._stopped:
            fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            fut.set_exception(EngineStopped("the engine thread has stopped"))
            return fut
        return self.thread.call(fn, *args)

    async def set_quota(self, quota: float) -> tuple[float, dict[str, float]]:
        """This lane's share of the engine steps, from the next step on: the value applied and the
        quotas of every lane on the thread."""
        return await self.thread.call(self.thread.set_quota, self.name, quota)

    def quota(self) -> float:
        """This lane's quota as last applied (0 before it joined the thread)."""
        share = self.thread.scheduler.shares.get(self.name)
        return share.quota if share is not None else 0.0

    async def stop(self) -> None:
        """Stop stepping this lane after the current step; results already produced are still
        delivered, calls not yet run fail with EngineStopped. The thread stops with its last lane."""
        if self._stopped:
            return
        if self.thread.started and not self._owns_thread:
            try:
                await self.thread.call(self.thread.remove, self.name)
            except EngineStopped:
                pass
        self._stopped = True
        if self._owns_thread or not self.thread.lanes:
            await self.thread.stop()
        self.thread.remove(self.name)
        while not self._results.empty():
            await self._deliver(self._results.get_nowait())
            self._delivered += 1

    async def publish(self) -> None:
        """The loop side: deliver step results in order (a task for the service's lifetime)."""
        while True:
            result = await self._results.get()
            try:
                await self._deliver(result)
            finally:
                self._delivered += 1


# How long the engine thread waits for its direct connection's flush (before a hand-over to the
# loop) and close: a broker gone quiet must not stall the steps for long.
_DIRECT_FLUSH_S = 2.0
_DIRECT_CLOSE_S = 5.0


async def _flush_and_close(nc: Any) -> None:
    if nc.is_connected:
        await nc.flush()
    await nc.close()


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return  # its caller stopped waiting (cancelled)
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
