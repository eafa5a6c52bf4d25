"""cascade.natsutil.TaskSet.cancel_all: every service's shutdown goes through it, so a task that
ignores its cancel must not hold the shutdown (SIGTERM) forever."""

from __future__ import annotations

import asyncio
from typing import Any

from cascade.natsutil import TaskSet


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))


async def test_a_task_that_ignores_its_cancel_is_named_and_left() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug this guards against: a cancel swallowed in a loop

    async def polite() -> None:
        await asyncio.Event().wait()

    log = _Log()
    tasks = TaskSet(log)
    s = tasks.spawn(stubborn(), "stubborn")
    p = tasks.spawn(polite(), "polite")
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.cancel_all(grace_s=0.2), 10)
    assert p.cancelled()
    assert log.events == [("tasks_ignored_cancel", {"tasks": ["stubborn"], "grace_s": 0.2})]
    release.set()
    await asyncio.wait_for(s, 10)


async def test_cancel_all_waits_for_tasks_that_clean_up() -> None:
    cleaned = asyncio.Event()

    async def cleans_up() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)
            cleaned.set()

    log = _Log()
    tasks = TaskSet(log)
    tasks.spawn(cleans_up(), "cleans-up")
    await asyncio.sleep(0)
    await tasks.cancel_all()
    assert cleaned.is_set() and log.events == []
