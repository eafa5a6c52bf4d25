"""The live dashboard: `/dashboard` serves a page shipped in the package (no build step, no
CDN), and `/dashboard/events` streams the mesh to it as server-sent events.

The stream starts with a `snapshot` (instances with the units each holds, recent scale
decisions and transfer plans), then carries every scale decision, ack, transfer plan and
transfer outcome as it crosses the bus, an `instances` frame whenever heartbeats or readiness
change the picture (at most every `min_gap_s`, so a 100-layer load is not 100 frames per
client), and a `stats` frame every `interval_s` (time to first token, inter-token latency,
tokens/s and queue depth per model).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from cascade.workers import WorkerView
from services.gateway.meshwatch import Frame, IntervalStats, MeshWatch

# A client that falls this many frames behind is dropped (it reconnects and gets a snapshot):
# a stalled browser tab must not grow the gateway's memory.
_MAX_BACKLOG = 256
_STATIC = {
    "dashboard.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}


def sse(event: str, body: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


def describe_instance(v: WorkerView) -> dict[str, Any]:
    return {
        "worker_id": v.worker_id,
        "state": v.state,
        "model": v.model,
        "num_units": v.num_units,
        "units_ready": v.units_ready,
        "ready_units": sorted(v.ready_units),
        "running": v.running,
        "waiting": v.waiting,
        "max_batch": v.max_batch,
        "tokens_per_s": v.tokens_per_s,
        "kv_cache_usage": v.kv_cache_usage,
        # A worker's heartbeat keeps its last load's rate after the load ends.
        "loading_mb_s": v.loading_mb_s if v.units_ready < v.num_units else 0.0,
    }


class DashboardHub:
    """Fans frames out to every connected page."""

    def __init__(
        self,
        watch: MeshWatch,
        workers: Callable[[], Sequence[WorkerView]],
        queues: Callable[[], dict[str, int]],
        interval_s: float = 1.0,
        min_gap_s: float = 0.1,
    ) -> None:
        self.watch = watch
        self.stats = IntervalStats()
        self._workers = workers
        self._queues = queues
        self.interval_s = interval_s
        self.min_gap_s = min_gap_s
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._changed = asyncio.Event()

    # ---- inputs ------------------------------------------------------------
    def changed(self) -> None:
        """Heartbeats or readiness changed the instances' picture."""
        self._changed.set()

    def publish(self, frame: Frame | None) -> None:
        if frame is not None:
            self._send(sse(*frame))

    # ---- clients -----------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[bytes | None]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._clients.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[bytes | None]) -> None:
        self._clients.discard(q)

    def close(self) -> None:
        """Ends every stream (the gateway shuts down)."""
        for q in self._clients:
            q.put_nowait(None)
        self._clients.clear()

    @property
    def clients(self) -> int:
        return len(self._clients)

    def _send(self, data: bytes) -> None:
        for q in list(self._clients):
            if q.qsize() >= _MAX_BACKLOG:
                self._clients.discard(q)
                q.put_nowait(None)
            else:
                q.put_nowait(data)

    # ---- frames ------------------------------------------------------------
    def instances(self) -> list[dict[str, Any]]:
        return [describe_instance(v) for v in self._workers()]

    def snapshot(self) -> dict[str, Any]:
        return {
            "instances": self.instances(),
            "decisions": list(self.watch.decisions),
            "plans": list(self.watch.plans),
            "queues": self._queues(),
            "interval_s": self.interval_s,
            "ts": time.time(),
        }

    def stats_frame(self, interval_s: float) -> dict[str, Any]:
        stats = self.stats.take(interval_s)
        queues = self._queues()
        waiting: dict[str, int] = {}
        running: dict[str, int] = {}
        for v in self._workers():
            if v.model:
                waiting[v.model] = waiting.get(v.model, 0) + v.waiting
                running[v.model] = running.get(v.model, 0) + v.running
        models = sorted(set(queues) | set(stats) | set(waiting))
        out = {}
        for m in models:
            s = stats.get(m, {"ttft_ms": None, "itl_ms": None, "tokens_per_s": 0.0})
            out[m] = {
                **s,
                "queued": queues.get(m, 0),  # in the gateway, waiting for an instance
                "waiting": waiting.get(m, 0),  # admitted by workers, waiting for a batch slot
                "running": running.get(m, 0),
            }
        return {"ts": time.time(), "models": out}

    async def run(self) -> None:
        """The periodic frames: `instances` when something changed, `stats` every interval."""
        last_stats = time.monotonic()
        while True:
            wait = max(0.0, last_stats + self.interval_s - time.monotonic())
            # asyncio.timeout, not wait_for: on 3.11 a cancel that races wait_for's own timeout can
            # come out as TimeoutError, which this loop would swallow, and the gateway's close would
            # wait for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            if self._changed.is_set():
                self._changed.clear()
                if self._clients:
                    self._send(sse("instances", self.instances()))
                # Coalesce a burst of readiness events into one frame per gap (a rate limit).
                await asyncio.sleep(self.min_gap_s)
            now = time.monotonic()
            if now - last_stats >= self.interval_s:
                frame = self.stats_frame(now - last_stats)
                last_stats = now
                if self._clients:
                    self._send(sse("stats", frame))


# --------------------------------------------------------------------------- HTTP

DASHBOARD = web.AppKey("dashboard", DashboardHub)


def add_routes(app: web.Application, hub: DashboardHub) -> None:
    app[DASHBOARD] = hub
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/static/{name}", static)
    app.router.add_get("/dashboard/events", events)
    app.on_shutdown.append(_close_streams)


async def _close_streams(app: web.Application) -> None:
    app[DASHBOARD].close()


def _read(name: str) -> bytes:
    return (resources.files("services.gateway") / "static" / name).read_bytes()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_read("dashboard.html"), content_type="text/html", charset="utf-8")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kind = _STATIC.get(name)
    if kind is None:
        raise web.HTTPNotFound()
    return web.Response(body=_read(name), content_type=kind, charset="utf-8")


async def events(request: web.Request) -> web.StreamResponse:
    hub = request.app[DASHBOARD]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    q = hub.subscribe()
    try:
        await resp.write(sse("snapshot", hub.snapshot()))
        while True:
            data = await q.get()
            if data is None:
                break
            await resp.write(data)
    except ConnectionResetError:
        pass  # the page went away
    finally:
        hub.unsubscribe(q)
    return resp
