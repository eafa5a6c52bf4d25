"""The scaler's loop waits on its wake-up events between ticks (services/scaler/main.py
`_wait_any`); a cancel of the loop's task must end it wherever in that wait it lands. Once it did
not: a cancel that arrived while the wait cleaned up was swallowed, the loop ran on, and whoever
stopped the scaler (ServiceHost, SIGTERM) waited for it forever."""

from __future__ import annotations

import asyncio

import pytest

from services.scaler.main import _wait_any


async def test_a_cancel_ends_the_waiting_loop_wherever_it_lands() -> None:
    wake, urgent = asyncio.Event(), asyncio.Event()
    stop = False  # ends a loop that outlived its cancel, so a failure does not spin on

    async def loop() -> None:
        while not stop:
            wake.set()  # set every turn: some waits end by an event, the rest by their timeout
            await _wait_any(wake, urgent, timeout=0)
            wake.clear()
            await _wait_any(urgent, timeout=0)

    # Cancel after every number of loop-iterations in a range wide enough to land at each await
    # point of a few turns of the loop (which await depends only on the count: asyncio is
    # deterministic here).
    for turns in range(60):
        task = asyncio.ensure_future(loop())
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            stop = True
            pytest.fail(f"the loop outlived its cancel (cancelled after {turns} loop turns)")
        with pytest.raises(asyncio.CancelledError):
            task.result()


async def test_it_returns_on_the_first_event_or_the_timeout() -> None:
    a, b = asyncio.Event(), asyncio.Event()
    waiter = asyncio.ensure_future(_wait_any(a, b, timeout=30))
    await asyncio.sleep(0)
    assert not waiter.done()
    b.set()
    await asyncio.wait_for(waiter, 5)
    await asyncio.wait_for(_wait_any(a, timeout=0.01), 5)  # neither set: the timeout ends it
