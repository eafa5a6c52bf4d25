"""Thin helpers over nats-py shared by every service and command: connect, typed
request/reply with timeouts and error replies, handler wrapping, task keeping,
the status scatter-gather and the one shutdown signal."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from cascade.messages import (
    ErrorReply,
    Heartbeat,
    MessageError,
    RemoteError,
    ServiceStatus,
    StatusRequest,
    decode,
    encode,
)
from cascade.natsauth import PASSWORD_ENV, TOKEN_ENV, USER_ENV, NatsCredentials, credentials_for
from cascade.subjects import Subjects

T = TypeVar("T")
log = structlog.get_logger()


class RequestTimeout(TimeoutError):
    """Nobody answered a request in time (or nobody listens on the subject)."""


class NoResponders(RequestTimeout):
    """Nobody listens on the subject: the broker said so at once (its owner is gone)."""


def server_list(url: str) -> list[str]:
    """The servers of a `--nats-url`: one URL, or a comma-separated seed list of a NATS cluster
    (`nats://a:4222,nats://b:4222`). nats-py connects to one and fails over to any other, and to
    those the cluster announces."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError(f"no NATS server in {url!r}")
    return servers


async def connect(
    url: str,
    name: str,
    connect_timeout_s: float = 10.0,
    logger: Any = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    credentials: NatsCredentials | None = None,
) -> NATS:
    """Connect to NATS, retrying until `connect_timeout_s` (a broker that starts beside us);
    ConnectionError after that. Once connected, reconnects are unlimited: a broker that restarts
    is logged going and coming back, and `on_reconnect` runs once it is back (re-announce state).

    nats-py keeps retrying a first connection that fails when reconnects are allowed, so the
    budget is enforced here, around each attempt and around the whole.

    Credentials: `credentials`, else those `cascade/natsauth.py` finds for `url` (the URL's own,
    the CASCADE_NATS_* variables, the mesh's file). A broker that refuses them is an error at
    once, not after the whole budget: retrying cannot fix a wrong password."""
    creds = credentials if credentials is not None else credentials_for(url)
    try:
        return await asyncio.wait_for(
            _connect(url, name, connect_timeout_s, logger or log, on_reconnect, creds), connect_timeout_s + 1.0
        )
    except TimeoutError:
        raise ConnectionError(f"cannot reach NATS at {url} within {connect_timeout_s:g}s") from None


def _refused(e: BaseException) -> bool:
    return "authorization violation" in str(e).lower()


async def _connect(
    url: str,
    name: str,
    connect_timeout_s: float,
    lg: Any,
    on_reconnect: Callable[[], Awaitable[None]] | None,
    creds: NatsCredentials | None,
) -> NATS:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout_s
    last: Exception | None = None
    seen: list[Exception] = []
    # nats-py retries a refused first connection by itself until its own timeout: the refusal is
    # seen here first, and ends the wait.
    refused = asyncio.Event()

    async def on_error(e: Exception) -> None:
        seen.append(e)
        if _refused(e):
            refused.set()
        await _quiet_error(e)

    conn: list[NATS] = []

    async def on_disconnected() -> None:
        # nats-py calls this on our own close too: only a lost broker is worth a warning.
        if conn and (conn[0].is_closed or conn[0].is_draining):
            return
        lg.warning("nats_disconnected", url=url)

    async def on_reconnected() -> None:
        lg.info("nats_reconnected", url=url)
        if on_reconnect is not None:
            try:
                await on_reconnect()
            except Exception as e:  # re-announcing is best effort; the next heartbeat says it again
                lg.warning("reannounce_failed", error=repr(e))

    auth: dict[str, str] = {}
    if creds is not None:
        auth = {"token": creds.token} if creds.token else {"user": creds.user, "password": creds.password}
    while True:
        remaining = deadline - loop.time()
        try:
            attempt = asyncio.ensure_future(
                nats.connect(
                    server_list(url),
                    **auth,
                    name=name,
                    connect_timeout=min(2.0, max(connect_timeout_s, 0.1)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    # Without these, nats-py logs a traceback per failed attempt.
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                )
            )
            nc = await _first(attempt, refused, max(remaining, 0.1))
            conn.append(nc)
            return nc
        except Exception as e:  # nats-py raises several unrelated types here
            last = e
            if _refused(e) or any(_refused(x) for x in seen):
                reason = "no credentials were presented" if creds is None else "it refused the credentials presented"
                raise ConnectionError(
                    f"NATS at {url} requires authentication and {reason}: set {USER_ENV}/{PASSWORD_ENV} (or "
                    f"{TOKEN_ENV}), put them in the URL, or run from the mesh's CASCADE_HOME"
                ) from None
            if loop.time() >= deadline:
                why = seen[-1] if seen else last
                detail = str(why) or type(why).__name__
                raise ConnectionError(f"cannot reach NATS at {url} within {connect_timeout_s:g}s: {detail}") from None
            await asyncio.sleep(0.2)


async def _first(attempt: asyncio.Future[NATS], refused: asyncio.Event, timeout: float) -> NATS:
    """The connection `attempt` makes, unless the broker refuses us (or time runs out) first."""
    gate: asyncio.Future[Any] = asyncio.ensure_future(refused.wait())
    both: set[asyncio.Future[Any]] = {attempt, gate}
    try:
        done, _ = await asyncio.wait(both, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gate.cancel()
    if attempt in done:
        return attempt.result()
    attempt.cancel()
    await asyncio.gather(attempt, gate, return_exceptions=True)
    if refused.is_set():
        raise ConnectionError("nats: authorization violation")
    raise TimeoutError


async def _quiet_error(e: Exception) -> None:
    log.debug("nats_error", error=str(e))


async def request(nc: NATS, subject: str, msg: Any, expect: type[T], timeout: float) -> T:
    """Typed request/reply: raises RemoteError for an error reply, RequestTimeout when nobody answers."""
    try:
        reply = await nc.request(subject, encode(msg), timeout=timeout)
    except (TimeoutError, NatsTimeout):
        raise RequestTimeout(f"no reply on {subject} within {timeout:.1f}s") from None
    except NoRespondersError:
        raise NoResponders(f"nobody listens on {subject}") from None
    return parse_reply(reply.data, expect, subject)


def parse_reply(data: bytes, expect: type[T], subject: str) -> T:
    """A reply's payload as `expect`: raises RemoteError for an ErrorReply, MessageError for
    anything else (`subject`, or whichever path it came by, names it in the error)."""
    obj: Any = decode(data)
    if isinstance(obj, ErrorReply):
        raise RemoteError(obj.code, obj.message)
    if not isinstance(obj, expect):
        raise MessageError(f"expected {expect.__name__} in reply on {subject}, got {type(obj).__name__}")
    return obj


def handler(fn: Callable[[Any], Awaitable[Any]], logger: Any = None) -> Callable[[Msg], Awaitable[None]]:
    """Wrap a request handler: decode the message, answer its return value, and answer any
    failure as an ErrorReply instead of letting it escape (the caller would hang until timeout)."""
    lg = logger or log

    async def wrapped(msg: Msg) -> None:
        try:
            req: Any = decode(msg.data)
            out = await fn(req)
            if msg.reply and out is not None:
                await msg.respond(encode(out))
        except Exception as e:
            if msg.reply:
                await msg.respond(encode(failure_reply(e, msg.subject, lg)))
            else:
                failure_reply(e, msg.subject, lg)

    return wrapped


def failure_reply(e: Exception, subject: str, logger: Any) -> ErrorReply:
    """What a request handler's failure answers (logged here): a bad message, a RemoteError's own
    code, else an internal error."""
    if isinstance(e, MessageError):
        logger.warning("bad_message", subject=subject, error=str(e))
        return ErrorReply("bad_message", str(e))
    if isinstance(e, RemoteError):
        return ErrorReply(e.code, e.message)
    logger.exception("handler_failed", subject=subject)
    return ErrorReply("internal", f"{type(e).__name__}: {e}")


class TaskSet:
    """Background tasks kept alive until shutdown; a task that dies is logged, never lost."""

    def __init__(self, logger: Any = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = logger or log
        self.failed: asyncio.Event = asyncio.Event()

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)
            self.failed.set()

    async def cancel_all(self, grace_s: float = 10.0) -> None:
        """Cancel every task and wait for them, at most `grace_s`: a task that ignores its cancel
        is named in the log and left, so a service's shutdown (SIGTERM) still ends."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=grace_s)
        if stuck:
            self._log.error("tasks_ignored_cancel", tasks=sorted(t.get_name() for t in stuck), grace_s=grace_s)


def stop_event() -> asyncio.Event:
    """One Event set by SIGINT or SIGTERM: the single shutdown path of every service."""
    ev = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, ev.set)
    return ev


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class MeshStatus:
    services: list[ServiceStatus]
    heartbeats: dict[str, Heartbeat]  # by worker id, the latest heard in the window


async def gather_status(nc: NATS, subjects: Subjects, window_s: float, requester: str = "cli") -> MeshStatus:
    """Publish one StatusRequest with a reply inbox and collect every answer until the window ends.

    Scatter-gather cannot know how many services exist, so the window is the only end; heartbeats
    heard meanwhile fill in worker figures a status reply may not carry."""
    replies: dict[tuple[str, str], ServiceStatus] = {}
    beats: dict[str, Heartbeat] = {}

    async def on_reply(msg: Msg) -> None:
        try:
            st = decode(msg.data, ServiceStatus)
        except MessageError:
            return  # an error reply or a foreign message: not a status
        replies[(st.service, st.instance)] = st

    async def on_beat(msg: Msg) -> None:
        try:
            hb = decode(msg.data, Heartbeat)
        except MessageError:
            return
        beats[hb.worker_id] = hb

    inbox = nc.new_inbox()
    sub_r = await nc.subscribe(inbox, cb=on_reply)
    sub_h = await nc.subscribe(subjects.heartbeat_all(), cb=on_beat)
    try:
        await nc.publish(subjects.status(), encode(StatusRequest(requester)), reply=inbox)
        await nc.flush()
        await asyncio.sleep(window_s)  # the gather window itself, not a synchronisation guess
    finally:
        await sub_r.unsubscribe()
        await sub_h.unsubscribe()
    services = sorted(replies.values(), key=lambda s: (s.service, s.instance))
    return MeshStatus(services=services, heartbeats=beats)
