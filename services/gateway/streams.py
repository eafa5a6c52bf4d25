"""Per-request state and the hub that routes token events from workers to the
request waiting for them.

Every admitted request has one `RequestState`; its `events` queue receives the
worker's `TokenEvent`s and, when the gateway gives up on it, one `Failure`. The
hub knows which worker each request is bound to, which gives the gateway's own
in-flight count per instance (used by the router) and the list of requests to
retry or fail when a worker dies.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
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


@dataclass(eq=False, slots=True)
class RequestState:
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    # Monotonic times: when it may be dispatched (arrival, or after a back-off) and when it
    # stops waiting for an instance.
    ready_at: float = 0.0
    deadline: float = 0.0
    arrived_at: float = field(default_factory=time.time)  # wall clock, for workers' prefill order
    quiet: bool = False  # arrived after a spell with no arrivals: nothing to batch it with
    events: asyncio.Queue[TokenEvent | Failure] = field(default_factory=asyncio.Queue)
    worker_id: str | None = None
    produced: bool = False  # a token reached us: retrying elsewhere would repeat output
    attempts: int = 0  # dispatches that counted against the retry budget
    overloads: int = 0  # "overloaded" rejections (back-off exponent)
    avoid: set[str] = field(default_factory=set)
    cancelled: bool = False  # the client left or the gateway gave up
    finished: bool = False  # a final event or a failure was delivered


class StreamHub:
    """Routes `TokenEvents` to requests; tracks which worker holds which request."""

    # Requests we stopped listening to, and (worker, request) pairs already told to stop: late
    # events for them are dropped quietly instead of each engine step triggering another Cancel.
    _MEMORY = 4096

    def __init__(self, on_stray: Callable[[str, list[str]], None]) -> None:
        """`on_stray(worker_id, request_ids)` is called for events no live request expects from
        that worker (the caller cancels them there)."""
        self._on_stray = on_stray
        self._requests: dict[str, RequestState] = {}
        self._by_worker: dict[str, set[str]] = {}
        self._quiet: OrderedDict[tuple[str, str], None] = OrderedDict()

    # ---- registration ------------------------------------------------------
    def open(self, req: RequestState) -> None:
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id} is already open")
        self._requests[req.request_id] = req

    def close(self, req: RequestState) -> str | None:
        """Forget `req`; returns the worker it was still bound to (the caller may cancel it there)."""
        worker = self.unbind(req)
        self._requests.pop(req.request_id, None)
        self._remember(("", req.request_id))
        return worker

    def _remember(self, key: tuple[str, str]) -> None:
        self._quiet[key] = None
        while len(self._quiet) > self._MEMORY:
            self._quiet.popitem(last=False)

    def bind(self, req: RequestState, worker_id: str) -> None:
        self.unbind(req)
        req.worker_id = worker_id
        self._by_worker.setdefault(worker_id, set()).add(req.request_id)

    def unbind(self, req: RequestState) -> str | None:
        worker = req.worker_id
        if worker is not None:
            ids = self._by_worker.get(worker)
            if ids is not None:
                ids.discard(req.request_id)
                if not ids:
                    del self._by_worker[worker]
            req.worker_id = None
        return worker

    # ---- queries -----------------------------------------------------------
    def inflight(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def inflight_by_worker(self) -> dict[str, int]:
        return {w: len(ids) for w, ids in self._by_worker.items()}

    def unstarted_by_worker(self) -> dict[str, tuple[int, int]]:
        """Per worker, (prompts, prompt tokens) of this gateway's requests there that have no token
        yet: its prefill backlog as far as this gateway knows, with no heartbeat's delay."""
        out: dict[str, tuple[int, int]] = {}
        for w, ids in self._by_worker.items():
            lens = [len(r.prompt_ids) for rid in ids if (r := self._requests.get(rid)) and not r.produced]
            if lens:
                out[w] = (len(lens), sum(lens))
        return out

    def on_worker(self, worker_id: str) -> list[RequestState]:
        return [self._requests[r] for r in self._by_worker.get(worker_id, ()) if r in self._requests]

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
            if req is None or req.worker_id != msg.worker_id or req.finished:
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
        if req.finished:
            return
        req.finished = True
        self.unbind(req)
        req.events.put_nowait(final)
