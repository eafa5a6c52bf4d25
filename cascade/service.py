"""The one shape of every service process: config → NATS → start → wait → drain.

    host = ServiceHost(MyService(cfg), nats_url, prefix)
    code = await host.run()            # until SIGINT/SIGTERM, or a background task failing

A service is an object with a name, an instance id and `start(rt)`. `start` subscribes,
spawns its tasks on `rt.tasks` and pushes its own teardown onto `rt.stack`; nothing else.
The host owns everything around it, in one order for all four services:

1. connect to NATS (bounded: a broker that never comes is an error, not a hang);
2. `start(rt)`; then announce `ServiceReady` (the scaler holds decisions until a loader said
   it, `cascade up` waits for every service's);
3. wait for the stop event (SIGINT/SIGTERM, or one passed in by an in-process caller) or
   for a background task to fail;
4. unwind in reverse: the service's own teardown (a worker drains its requests here), then
   its tasks are cancelled, then NATS is drained (bounded), so nothing it published is lost.

Teardown is idempotent and safe after a partial start: only what was set up is undone.
`run_process` is a service module's `run(args)`: logging, exit codes, `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cascade.inline import subscribe_inline
from cascade.messages import ServiceReady, decode, encode
from cascade.natsutil import TaskSet, connect, failure_reply, handler, stop_event
from cascade.subjects import Subjects

# Draining NATS at the end flushes what the service published last; a broken connection
# cannot drain, and is closed after this long.
DRAIN_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Runtime:
    """What a started service works with."""

    nc: NATS
    subjects: Subjects
    tasks: TaskSet
    stack: contextlib.AsyncExitStack
    log: Any
    # Called when the broker connection comes back after a loss (re-announce, wake what waited).
    on_reconnect: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    async def subscribe(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> Subscription:
        """A subscription for the service's lifetime (draining NATS ends it)."""
        return await self.nc.subscribe(subject, cb=cb)

    async def serve(self, subject: str, fn: Callable[[Any], Awaitable[Any]]) -> Subscription:
        """A request handler: typed message in, reply out, any failure answered as an error."""
        return await self.nc.subscribe(subject, cb=handler(fn, self.log))

    async def serve_now(self, subject: str, fn: Callable[[Any], Any]) -> Subscription:
        """`serve` for a plain function (it must not block, and cannot await), run in nats-py's
        read loop as the message is parsed (cascade/inline.py), not by a task of the subscription's
        own a loop turn later; its reply goes out from a task. For a quick handler on a request's
        path whose effect should not wait for that turn (the worker's admission, which wakes its
        engine thread)."""

        def handle(msg: Msg) -> None:
            try:
                out = fn(decode(msg.data))
            except Exception as e:
                out = failure_reply(e, msg.subject, self.log)
            if msg.reply and out is not None:
                self.tasks.spawn(_respond(msg, encode(out), self.log), "reply")

        return await subscribe_inline(self.nc, subject, handle, self.log)


async def _respond(msg: Msg, data: bytes, log: Any) -> None:
    try:
        await msg.respond(data)
    except Exception as e:  # the connection closing: the requester times out, as with `serve`
        log.warning("reply_failed", subject=msg.subject, error=repr(e))


class Service(Protocol):
    service: str  # "gateway" | "scaler" | "loader" | "worker"

    @property
    def instance(self) -> str: ...

    async def start(self, rt: Runtime) -> None: ...


class ServiceHost:
    """Runs one service: `start`/`stop` for in-process use (tests, benchmarks), `run` for a
    process. `stop` may be called any number of times, also after a failed `start`."""

    def __init__(
        self,
        service: Service,
        nats_url: str,
        prefix: str,
        *,
        connect_timeout_s: float = 30.0,
        logger: Any = None,
    ) -> None:
        self.service = service
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.connect_timeout_s = connect_timeout_s
        self.log = logger or structlog.get_logger().bind(service=service.service, instance=service.instance)
        self.tasks = TaskSet(self.log)
        self.rt: Runtime | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> Runtime:
        stack = self._stack = contextlib.AsyncExitStack()
        try:
            self.log.info("connecting", nats_url=self.nats_url)
            nc = await connect(
                self.nats_url,
                f"cascade-{self.service.service}-{self.service.instance}",
                self.connect_timeout_s,
                logger=self.log,
                on_reconnect=self._reconnected,
            )
            stack.push_async_callback(self._drain, nc)
            stack.push_async_callback(self.tasks.cancel_all)
            # The service's own teardown goes on top: it runs first, while its tasks and NATS work.
            self.rt = Runtime(nc, self.subjects, self.tasks, stack, self.log)
            await self.service.start(self.rt)
            # Subscriptions must be in place at the server before anyone acts on "ready".
            await nc.flush()
            await self._announce()
        except BaseException:
            await self.stop()
            raise
        return self.rt

    async def _reconnected(self) -> None:
        if self.rt is None:
            return
        for cb in self.rt.on_reconnect:
            cb()
        await self._announce()

    async def _announce(self) -> None:
        """Say `ServiceReady` (again after a broker restart: a scaler that restarted meanwhile
        re-sends its lost decisions when a loader says it)."""
        if self.rt is None:
            return
        ready = ServiceReady(self.service.service, self.service.instance, os.getpid())
        await self.rt.nc.publish(self.subjects.service_ready(), encode(ready))

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Until `stop` (default: SIGINT/SIGTERM) is set or a background task fails; 0 or 1."""
        stop = stop or stop_event()
        # A stop while it connects (the broker is away) ends the wait at once: exit 0, not an
        # error after the whole connect budget.
        starting = asyncio.ensure_future(self.start())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            self.log.info("stopping", reason="stop while starting")
            return 0
        starting.result()  # raises what start raised
        try:
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.tasks.failed.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            failed = self.tasks.failed.is_set()
            self.log.info("stopping", reason="a task failed" if failed else "stop")
        finally:
            await self.stop()
        return 1 if failed else 0

    async def __aenter__(self) -> ServiceHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _drain(self, nc: NATS) -> None:
        if nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT_S)
        except Exception as e:  # a broken connection cannot drain: closing is all that is left
            self.log.warning("nats_drain_failed", error=repr(e))
            with contextlib.suppress(Exception):
                await nc.close()


def run_process(make: Callable[[], Service], nats_url: str, prefix: str, log: Any) -> int:
    """A service module's `run(args)` after its configuration is checked: 0 after a signal,
    1 when it could not start (no broker) or a background task failed."""

    async def main() -> int:
        try:
            service = make()
        except (ValueError, OSError) as e:  # a configuration only the service itself can check
            log.error("bad_config", error=str(e))
            return 2
        try:
            return await ServiceHost(service, nats_url, prefix, logger=log).run()
        except ConnectionError as e:
            log.error("start_failed", error=str(e))
            return 1

    return asyncio.run(main())


async def serve(service: Service, nats_url: str, prefix: str, stop: asyncio.Event) -> int:
    """Run `service` in this event loop until `stop` is set (tests and benchmarks that run several
    services in one process)."""
    return await ServiceHost(service, nats_url, prefix).run(stop)
