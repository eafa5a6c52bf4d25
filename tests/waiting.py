"""Polling with a deadline, for conditions no event announces (the guide allows it; sleeps
as synchronisation are not)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(pred: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_for_change(
    changed: asyncio.Event, pred: Callable[[], object], timeout: float, what: str = "condition"
) -> None:
    """Return once `pred()` holds, re-checked each time `changed` is set (by whatever the test
    listens to), with a deadline; no polling."""

    async def go() -> None:
        while not pred():
            changed.clear()
            await changed.wait()

    try:
        await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
