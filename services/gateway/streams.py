"""A request's life in the gateway, and the hub that routes token events from workers to the
request waiting for them.

Every admitted request has one `RequestState`. Its life is one `Phase`, changed only through
`RequestState.advance`, which holds the allowed transitions in one table:

    QUEUED ──dispatch──▶ PREFILL ──first token──▶ DECODE ──final event──▶ DONE
       ▲                    │                        │
       └──────retry─────────┘                        └──worker lost──▶ MIGRATING ──dispatch──▶ PREFILL
    any live phase ──▶ FAILED (the gateway gave up) or CANCELLED (the client left)

A MIGRATING request waits in its model's queue like a QUEUED one, but is sent with the tokens
it streamed so far (`streamed`) appended to its prompt; a migrated request whose new worker
fails before its first token goes back to MIGRATING, not QUEUED.

While PREFILL or DECODE the request is bound to exactly one worker (`worker_id`); the worker is
stored there and nowhere else. Its `events` queue receives the worker's `TokenEvent`s and, when
the gateway gives up on it, one `Failure`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cascade.messages import SamplingParams, TokenEvent, TokenEvents


@dataclass(frozen=True, slots=True)
class Failure:
    """The gateway gave up on a request: an HTTP status and an OpenAI error code."""

    status: int
    message: str
    code: str
    retry_after_s: float | None = None


class Phase(enum.Enum):
    QUEUED = "queued"  # admitted, waiting in its model's queue for an instance
    PREFILL = "prefill"  # dispatched to a worker, no token yet: another instance may still take it
    DECODE = "decode"  # tokens reached the client: a failure now is reported, not retried
    MIGRATING = "migrating"  # its worker was lost mid-stream; being re-sent with the tokens so far
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def live(self) -> bool:
        return self not in _ENDED

    @property
    def bound(self) -> bool:
        """A worker holds the request in this phase."""
        return self in (Phase.PREFILL, Phase.DECODE)


_ENDED = frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED})

_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.PREFILL, Phase.FAILED, Phase.CANCELLED}),
    # Back to the queue when the worker turned it away or went silent before its first token; DONE
    # directly when the model ended it without a token (EOS first).
    Phase.PREFILL: frozenset({Phase.QUEUED, Phase.MIGRATING, Phase.DECODE, Phase.DONE, Phase.FAILED, Phase.CANCELLED}),
    Phase.DECODE: frozenset({Phase.DONE, Phase.FAILED, Phase.CANCELLED, Phase.MIGRATING}),
    Phase.MIGRATING: frozenset({Phase.PREFILL, Phase.FAILED, Phase.CANCELLED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
}


class PhaseError(RuntimeError):
    """A transition the life cycle does not allow: a bug in the caller, never a client's fault."""


class EventQueue:
    """A request's events, for its one reader (the request's handler), with the reader's silence
    timeout kept by one timer per request instead of one per event.

    `asyncio.Queue.get` under `asyncio.timeout` made, per event of every stream, a timer (heap
    push, then cancel), a timeout context and a getter future list; here a wait makes one future,
    and a watchdog timer, armed at the first wait, is re-armed only when it fires early (the
    reader waited again since). A wait still ends `timeout` after it began when nothing comes."""

    __slots__ = ("_deadline", "_items", "_timer", "_waiter")

    def __init__(self) -> None:
        self._items: deque[TokenEvent | Failure] = deque()
        self._waiter: asyncio.Future[bool] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def put_nowait(self, ev: TokenEvent | Failure) -> None:
        self._items.append(ev)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(True)

    def get_nowait(self) -> TokenEvent | Failure:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def wait(self, timeout: float) -> bool:
        """Until an event is there (True), or `timeout` seconds passed without one (False)."""
        if self._items:
            return True
        if self._waiter is not None:
            raise RuntimeError("a request's events have one reader")
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()  # a shorter timeout than the last wait's
            self._timer = None
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._watch)
        self._waiter = w = loop.create_future()
        try:
            return await w
        finally:
            self._waiter = None

    def _watch(self) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done():
            return  # nobody waits now: the next wait arms it again
        loop = w.get_loop()
        if loop.time() >= self._deadline:
            w.set_result(False)
        else:
            self._timer = loop.call_at(self._deadline, self._watch)  # the reader waited again since

    def close(self) -> None:
        """The reader is done: no timer outlives the request."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass(eq=False, slots=True)
class RequestState:
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    phase: Phase = Phase.QUEUED
    worker_id: str | None = None  # set while bound (PREFILL, DECODE), None otherwise
    # Queue timing (monotonic), the batcher's: when it may be dispatched (arrival, or after a
    # back-off), when it stops waiting for an instance, and whether it came after a quiet spell.
    ready_at: float = 0.0
    deadline: float = 0.0
    quiet: bool = False
    arrived_at: float = field(default_factory=time.time)  # wall clock, for workers' prefill order
    events: EventQueue = field(default_factory=EventQueue)
    # Retry bookkeeping.
    attempts: int = 0  # dispatches that counted against the retry budget
    overloads: int = 0  # "overloaded" rejections (back-off exponent)
    avoid: set[str] = field(default_factory=set)  # workers that already failed it
    # Later stages of its pipelined route (the first is `worker_id`): a failure on the route may
    # be theirs, so a migration avoids them too.
    relays: tuple[str, ...] = ()
    # Per later stage (as `relays`): the share of the model's decoder layers it runs for this
    # request, so the router can tell how much prompt work a route left queued on its tail.
    relay_shares: tuple[float, ...] = ()
    # Migration: every token id streamed to the client so far, how many of them the current
    # dispatch resumed from (they ended its prompt), and how many times it moved.
    streamed: list[int] = field(default_factory=list)
    resumed: int = 0
    migrations: int = 0
    # For metrics (monotonic): its last dispatch before its first token (queue time ends there,
    # prefill time starts), and the worker whose tokens reached the client last (unlike
    # `worker_id`, kept after the request ends: the `worker` label of its finished-request metrics).
    dispatched_at: float = 0.0
    served_by: str = ""
    # n > 1: the token ids each choice streamed, how many of them its current dispatch resumed
    # from (after a migration each choice goes on from its own tokens), and the choices ended.
    choice_streamed: dict[int, list[int]] = field(default_factory=dict)
    choice_resumed: dict[int, int] = field(default_factory=dict)
    choices_done: set[int] = field(default_factory=set)
    # Monotonic time its current worker was last heard for it (dispatch, then each event): after
    # a broker loss, a request not heard since has lost events nobody will resend.
    heard_at: float = 0.0
    # Dispatches so far (never reset): the current one's number goes out with it and comes back in
    # its events, so a late event of an earlier dispatch to the same worker is never taken as new.
    dispatches: int = 0
    # Consolidation: the whole instance it moves to once its partial route's cancel is through
    # (None: not moving), and how many times it moved so (not counted against migration_limit).
    consolidate_to: str | None = None
    consolidations: int = 0

    def advance(self, to: Phase, worker_id: str | None = None) -> None:
        """Move to `to` (binding `worker_id` when it is PREFILL); raises PhaseError if not allowed."""
        if to not in _ALLOWED[self.phase]:
            raise PhaseError(f"request {self.request_id}: {self.phase.value} -> {to.value} is not allowed")
        if to is Phase.PREFILL:
            if worker_id is None:
                raise PhaseError(f"request {self.request_id}: dispatched without a worker")
            self.worker_id = worker_id
        elif not to.bound:
            self.worker_id = None
        self.phase = to

    @property
    def ended(self) -> bool:
        return not self.phase.live

    @property
    def needs_full_instance(self) -> bool:
        """n > 1 choices with prompt logprobs: on a pipelined route the choices run as separate
        sequences and the prompt's logprobs would come with whichever choice's first token, not
        before every choice's first chunk; a whole instance scores the prompt once, before its
        fork. Such a request goes to the route's tail (a whole instance) and is served there."""
        return self.params.n > 1 and self.params.prompt_logprobs is not None

    @property
    def produced(self) -> bool:
        """A token reached the client: starting it afresh elsewhere would repeat output."""
        return bool(self.streamed) or self.phase in (Phase.DECODE, Phase.MIGRATING, Phase.DONE)

    @property
    def waiting(self) -> bool:
        """In its model's queue, not on a worker."""
        return self.phase in (Phase.QUEUED, Phase.MIGRATING)


class StreamHub:
    """Routes `TokenEvents` to requests; answers which worker holds which request."""

    # Requests we stopped listening to, and (worker, request) pairs already told to stop: late
    # events for them are dropped quietly instead of each engine step triggering another Cancel.
    _MEMORY = 4096

    def __init__(self, on_stray: Callable[[str, list[str]], None]) -> None:
        """`on_stray(worker_id, request_ids)` is called for events no live request expects from
        that worker (the caller cancels them there)."""
        self._on_stray = on_stray
        self._requests: dict[str, RequestState] = {}
        self._quiet: OrderedDict[tuple[str, str], None] = OrderedDict()

    # ---- registration ------------------------------------------------------
    def open(self, req: RequestState) -> None:
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id} is already open")
        self._requests[req.request_id] = req

    def close(self, req: RequestState) -> None:
        """Forget `req` (its handler is done with it)."""
        self._requests.pop(req.request_id, None)
        self._remember(("", req.request_id))

    def _remember(self, key: tuple[str, str]) -> None:
        self._quiet[key] = None
        while len(self._quiet) > self._MEMORY:
            self._quiet.popitem(last=False)

    # ---- queries -----------------------------------------------------------
    # Computed from the requests themselves (a few hundred at most), so the worker a request is
    # bound to is stored once, on the request.
    def inflight(self, worker_id: str) -> int:
        return sum(1 for r in self._requests.values() if r.worker_id == worker_id)

    def inflight_by_worker(self) -> dict[str, int]:
        return dict(Counter(r.worker_id for r in self._requests.values() if r.worker_id is not None))

    def unstarted_by_worker(self) -> dict[str, tuple[int, int]]:
        """Per worker, (prompts, prompt tokens) of this gateway's requests there that have no token
        yet: its prefill backlog as far as this gateway knows, with no heartbeat's delay."""
        out: dict[str, tuple[int, int]] = {}
        for r in self._requests.values():
            if r.phase is Phase.PREFILL and r.worker_id is not None:
                n, tokens = out.get(r.worker_id, (0, 0))
                out[r.worker_id] = (n + 1, tokens + len(r.prompt_ids))
        return out

    def relayed_unstarted_by_worker(self) -> dict[str, int]:
        """Per worker, prompt tokens of this gateway's pipelined routes that have no token yet and
        run later stages there, each weighed by the share of the layers that stage runs: the
        prefill those routes have queued on their tails, in full-model prompt tokens."""
        out: dict[str, float] = {}
        for r in self._requests.values():
            if r.phase is Phase.PREFILL and r.relays:
                for w, share in zip(r.relays, r.relay_shares, strict=False):
                    out[w] = out.get(w, 0.0) + len(r.prompt_ids) * share
        return {w: round(t) for w, t in out.items()}

    def routing_loads(self) -> tuple[dict[str, int], dict[str, tuple[int, int]], dict[str, int]]:
        """`inflight_by_worker`, `unstarted_by_worker` and `relayed_unstarted_by_worker` in one
        pass over the open requests: the router asks for all three at every pick."""
        inflight: dict[str, int] = {}
        unstarted: dict[str, tuple[int, int]] = {}
        relayed: dict[str, float] = {}
        for r in self._requests.values():
            w = r.worker_id
            if w is None:
                continue
            inflight[w] = inflight.get(w, 0) + 1
            if r.phase is Phase.PREFILL:
                n, tokens = unstarted.get(w, (0, 0))
                unstarted[w] = (n + 1, tokens + len(r.prompt_ids))
                for relay, share in zip(r.relays, r.relay_shares, strict=False):
                    relayed[relay] = relayed.get(relay, 0.0) + len(r.prompt_ids) * share
        return inflight, unstarted, {w: round(t) for w, t in relayed.items()}

    def on_worker(self, worker_id: str) -> list[RequestState]:
        return [r for r in self._requests.values() if r.worker_id == worker_id]

    def open_requests(self) -> list[RequestState]:
        return list(self._requests.values())

    def __len__(self) -> int:
        return len(self._requests)

    # ---- events ------------------------------------------------------------
    def match(self, msg: TokenEvents) -> list[tuple[RequestState, TokenEvent]]:
        """Pair each event with the live request it belongs to.

        An event counts only when its request is bound to the sending worker: after a retry,
        a late event from the first worker must not interleave with the second one's output.
        Events nobody expects go to `on_stray` (once per worker and request), so that worker stops.
        """
        matched: list[tuple[RequestState, TokenEvent]] = []
        stray: list[str] = []
        for ev in msg.events:
            req = self._requests.get(ev.request_id)
            stale = ev.attempt != 0 and ev.attempt != (req.dispatches if req is not None else 0)
            if req is not None and stale and req.worker_id == msg.worker_id and req.phase.bound:
                continue  # an earlier dispatch's event from the same worker: neither ours nor a stray
            if req is None or req.worker_id != msg.worker_id or not req.phase.bound:
                key = (msg.worker_id, ev.request_id)
                if ev.finish_reason is None and ("", ev.request_id) not in self._quiet and key not in self._quiet:
                    self._remember(key)
                    stray.append(ev.request_id)
                continue
            matched.append((req, ev))
        if stray:
            self._on_stray(msg.worker_id, stray)
        return matched

    def finish(self, req: RequestState, final: TokenEvent | Failure) -> None:
        """Deliver the last event of `req` (the worker's final one or the gateway's failure).
        Only the first final event counts; the request leaves its worker's in-flight count."""
        if req.ended:
            return
        ok = isinstance(final, TokenEvent) and final.finish_reason in ("stop", "length")
        req.advance(Phase.DONE if ok else Phase.FAILED)
        req.events.put_nowait(final)
