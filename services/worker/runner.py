"""Runs the engine's steps back to back on a dedicated thread.

Why not `run_in_executor` per step: each step would then wait for the event
loop to publish the previous step's tokens and schedule the next one, which
costs about a millisecond per step in future chaining and wake-ups — as much
as a whole decode step of a small model. Here the engine thread starts the
next step at once, and the loop publishes results concurrently, in order,
from a queue. The loop never waits on torch work.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from services.worker.engine import Engine, StepResult


class EngineRunner:
    def __init__(
        self,
        get_engine: Callable[[], Engine | None],
        deliver: Callable[[StepResult], Awaitable[None]],
        on_idle: Callable[[], None],
        logger: Any = None,
    ) -> None:
        self._get_engine = get_engine
        self._deliver = deliver
        self._on_idle = on_idle
        self.log = logger or structlog.get_logger()
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._results: asyncio.Queue[StepResult] = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        # Emulated device: how far steps were padded, and how often real compute overran the profile.
        self.padded_s = 0.0
        self.overrun_steps = 0
        self.overrun_s = 0.0
        self.steps = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def wake(self) -> None:
        """New work for the engine (requests, cancels, stage frames): safe from any thread."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop after the current step; results already produced are still delivered."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)
        while not self._results.empty():
            await self._deliver(self._results.get_nowait())

    async def publish(self) -> None:
        """The loop side: deliver step results in order (a task for the service's lifetime)."""
        while True:
            result = await self._results.get()
            await self._deliver(result)

    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            eng = self._get_engine()
            while eng is not None and eng.has_work() and not self._stopping:
                t0 = time.monotonic()
                try:
                    result = eng.step()
                except Exception as e:
                    # The engine turns model errors into failed requests; anything reaching here is a
                    # bug that may have left the batch inconsistent. End every request with the
                    # error (never leave a client waiting) and go on serving new ones.
                    self.log.exception("engine_step_failed")
                    events = eng.drain_all(f"engine failure: {type(e).__name__}: {e}")
                    loop.call_soon_threadsafe(self._results.put_nowait, StepResult(events, [], 0, 0, 0, 0))
                    break
                self.steps += 1
                if result.target_s > 0:
                    elapsed = time.monotonic() - t0
                    if elapsed < result.target_s:
                        # Emulated device: the results exist when the device would have finished.
                        self.padded_s += result.target_s - elapsed
                        time.sleep(result.target_s - elapsed)
                    else:
                        self.overrun_steps += 1
                        self.overrun_s += elapsed - result.target_s
                if result.events or result.outbox:
                    loop.call_soon_threadsafe(self._results.put_nowait, result)
            # Hold no engine while asleep: a model unloaded meanwhile must be freed, not kept
            # alive by this thread's frame until the next wake-up.
            eng = None
            loop.call_soon_threadsafe(self._on_idle)
