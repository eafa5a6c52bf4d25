"""The batcher against in-memory pick/dispatch fakes. The step function is driven with a
fake clock; the run loop is checked with real time only through deadlines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from cascade.messages import SamplingParams
from services.gateway.batcher import Batcher, QueueFull
from services.gateway.router import Room, Route
from services.gateway.streams import RequestState


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Fakes:
    """The batcher's owner (`Dispatcher`). `pick` behaves like the router: instances in `avoid`
    only as a last resort."""

    def __init__(self, *instances: str) -> None:
        self.instances = list(instances or ["w1"])
        self.batches: list[tuple[str, list[str]]] = []
        self.timed_out: list[str] = []
        self.held = 0
        self.dispatched = asyncio.Event()

    def pick(self, model: str, avoid: frozenset[str]) -> Route | None:
        preferred = [w for w in self.instances if w not in avoid] or self.instances
        return Route(preferred[0]) if preferred else None

    def dispatch(self, route: Route, batch: list[RequestState]) -> None:
        self.batches.append((route.worker_id, [r.request_id for r in batch]))
        self.dispatched.set()

    def expired(self, req: RequestState) -> None:
        self.timed_out.append(req.request_id)

    def holding(self, model: str) -> None:
        self.held += 1


def make(fakes: Fakes, clock: Clock | None = None, **kw: float) -> Batcher:
    args: dict[str, float] = {"max_batch_size": 4, "wait_s": 0.01, "max_queue": 8, "queue_timeout_s": 5.0}
    args.update(kw)
    return Batcher(
        "m",
        max_batch_size=int(args["max_batch_size"]),
        wait_s=args["wait_s"],
        max_queue=int(args["max_queue"]),
        queue_timeout_s=args["queue_timeout_s"],
        owner=fakes,
        **({"clock": clock} if clock else {}),
    )


def req(i: int | str) -> RequestState:
    return RequestState(request_id=f"r{i}", model="m", prompt_ids=[1], params=SamplingParams())


# --------------------------------------------------------------------------- step, fake clock


def test_partial_batch_waits_for_the_window_then_goes() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, wait_s=0.25)  # binary fractions keep the fake clock exact
    b.submit(req(1))
    b.submit(req(2))
    assert b.step() == 0.25
    assert f.batches == []
    clock.t += 0.125
    b.submit(req(3))
    assert b.step() == 0.125  # the window counts from the first request
    clock.t += 0.125
    assert b.step() is None
    assert f.batches == [("w1", ["r1", "r2", "r3"])]
    assert b.depth == 0


def test_at_once_dispatches_a_lone_quiet_request_in_the_callers_turn() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, wait_s=0.25)
    b.submit(req(1), at_once=True)
    # No step by the batcher's task: dispatched inside submit, and the task is not woken for it.
    assert f.batches == [("w1", ["r1"])]
    assert b.depth == 0 and not b._wake.is_set()
    clock.t += 0.125
    b.submit(req(2), at_once=True)  # within the last one's window: batching as usual, the task decides
    assert f.batches == [("w1", ["r1"])] and b.depth == 1 and b._wake.is_set()
    assert b.step() == 0.25


def test_at_once_leaves_a_request_with_no_instance_to_the_task() -> None:
    clock, f = Clock(), Fakes()
    f.instances = []
    b = make(f, clock, wait_s=0.25)
    b.submit(req(1), at_once=True)
    assert f.batches == [] and b.depth == 1
    assert f.held == 1  # the scaler hears of it as it would from the task's step
    assert b._wake.is_set()  # the task computes its sleep (the request's deadline)
    f.instances = ["w2"]
    b.step()
    assert f.batches == [("w2", ["r1"])]


def test_at_once_does_not_jump_a_queue() -> None:
    clock, f = Clock(), Fakes()
    f.instances = []
    b = make(f, clock, wait_s=0.25)
    b.submit(req(1))
    clock.t += 1.0  # a quiet spell, but r1 still waits
    f.instances = ["w1"]
    b.submit(req(2), at_once=True)
    assert f.batches == [] and b.depth == 2  # not alone: the task sends them in order
    b.step()
    assert f.batches == [("w1", ["r1", "r2"])]


def test_a_request_after_a_quiet_spell_goes_at_once() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, wait_s=0.25)
    b.submit(req(1))
    assert b.step() is None  # alone after silence: nothing to wait for
    assert f.batches == [("w1", ["r1"])]
    clock.t += 0.125
    b.submit(req(2))  # arrives within the window of the last one: load is dense, batch as usual
    assert b.step() == 0.25
    clock.t += 1.0
    b.step()
    assert f.batches[-1] == ("w1", ["r2"])


def test_full_batch_goes_without_waiting() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, wait_s=60.0, max_batch_size=3, queue_timeout_s=600.0)
    for i in range(5):
        b.submit(req(i))
    assert b.step() == 0.0  # dispatched one full batch, more queued
    assert f.batches == [("w1", ["r0", "r1", "r2"])]
    assert b.step() == pytest.approx(60.0)  # the remaining two wait for their window
    clock.t += 60.0
    b.step()
    assert f.batches[-1] == ("w1", ["r3", "r4"])


def test_queue_bound_raises() -> None:
    f = Fakes()
    f.instances = []
    b = make(f, Clock(), max_queue=2)
    b.submit(req(1))
    b.submit(req(2))
    with pytest.raises(QueueFull):
        b.submit(req(3))
    # A request given back by a worker was admitted already: the bound does not apply.
    b.requeue(req(4))
    assert b.depth == 3


def test_requests_wait_while_no_instance_then_time_out() -> None:
    clock, f = Clock(), Fakes()
    f.instances = []
    b = make(f, clock, queue_timeout_s=5.0)
    b.submit(req(1))
    clock.t += 2.0
    b.submit(req(2))
    assert b.step() == pytest.approx(3.0)  # sleeps until the first deadline
    clock.t += 3.0
    assert b.step() == pytest.approx(2.0)
    assert f.timed_out == ["r1"]
    f.instances = ["w2"]  # an instance appears before r2's deadline
    clock.t += 0.5
    b.step()  # the window counted from r2's arrival is long over
    assert f.batches == [("w2", ["r2"])]
    assert f.timed_out == ["r1"]


def test_on_held_fires_once_each_time_requests_start_to_wait_for_room() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, wait_s=0.0)
    b.submit(req(1))
    b.step()
    assert f.batches == [("w1", ["r1"])] and f.held == 0  # room: nothing held
    f.instances = []
    b.submit(req(2))
    b.step()
    b.submit(req(3))
    b.step()
    clock.t += 0.5
    b.step()
    assert f.held == 1  # one signal for the spell of holding, not one per look
    f.instances = ["w1"]
    b.step()
    assert f.batches[-1] == ("w1", ["r2", "r3"])
    f.instances = []
    b.submit(req(4))
    b.step()
    assert f.held == 2  # a new spell
    b.discard(b.take_all()[0])
    b.step()  # the queue emptied: the spell is over
    b.submit(req(5))
    b.step()
    assert f.held == 3


def test_requeue_goes_first_with_backoff_and_fresh_deadline() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, wait_s=0.0)
    b.submit(req(1))
    r0 = req(0)
    b.requeue(r0, delay_s=0.5)
    assert r0.deadline == pytest.approx(clock.t + 5.0)
    b.step()
    assert f.batches == [("w1", ["r1"])]  # r0 is held back by its back-off
    assert b.step() == pytest.approx(0.5)
    clock.t += 0.5
    b.step()
    assert f.batches[-1] == ("w1", ["r0"])


def test_the_window_never_outlasts_the_deadline() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, wait_s=60.0, queue_timeout_s=5.0)
    b.submit(req(0))  # two together: a batch worth waiting for (a lone request would go at once)
    b.submit(req(1))
    assert b.step() == 5.0
    clock.t += 5.0
    b.step()
    assert f.batches == [("w1", ["r0", "r1"])] and f.timed_out == []  # an instance is up: they go


def test_a_request_bounced_past_its_deadline_expires_with_an_instance_up() -> None:
    clock, f = Clock(), Fakes()
    b = make(f, clock, queue_timeout_s=5.0)
    r = req(1)
    b.submit(r)
    b.take_all()  # dispatched; the instance said "overloaded" and it comes back, held back
    b.requeue(r, delay_s=10.0, fresh_deadline=False)
    assert b.step() == 5.0  # wakes for the deadline, before the back-off ends
    clock.t += 5.0
    assert b.step() is None
    assert f.timed_out == ["r1"] and f.batches == []


def test_avoided_instance_is_skipped_for_others_in_the_batch() -> None:
    clock, f = Clock(), Fakes("w1")  # the only instance: used even by requests that avoid it
    b = make(f, clock, wait_s=0.0)
    a, c = req("a"), req("c")
    c.avoid.add("w1")
    b.submit(a)
    b.submit(c)
    b.step()
    assert f.batches == [("w1", ["ra", "rc"])]

    f2 = Fakes("w1", "w2")
    b2 = make(f2, Clock(), wait_s=0.0)
    a, c = req("a"), req("c")
    c.avoid.add("w1")
    b2.submit(a)
    b2.submit(c)
    b2.step()
    b2.step()
    assert f2.batches == [("w1", ["ra"]), ("w2", ["rc"])]


def test_a_batch_holds_only_what_the_route_has_room_for_and_the_rest_is_picked_again() -> None:
    # Four long prompts held while no instance was up; then "a" comes up, moments before "b".
    # "a" has prefill room for two: two go there, and the next pick (which counts them) decides
    # the rest, here the second instance once it is up.
    clock, f = Clock(), Fakes("a")
    up = ["a"]
    sent: dict[str, int] = {}

    class Rooms(Fakes):
        def pick(self, model: str, avoid: frozenset[str]) -> Route | None:
            free = [w for w in up if sent.get(w, 0) < 2]
            if not free:
                return None
            w = free[0]
            room = Room(requests=8, prompts=sent.get(w, 0), tokens=100 * sent.get(w, 0), prefill_budget=50)
            return Route(w, room=room)

        def dispatch(self, route: Route, batch: list[RequestState]) -> None:
            sent[route.worker_id] = sent.get(route.worker_id, 0) + len(batch)
            f.dispatch(route, batch)

    b = Batcher("m", max_batch_size=8, wait_s=60.0, max_queue=8, queue_timeout_s=600.0, owner=Rooms("a"), clock=clock)
    for i in range(4):
        r = req(i)
        r.prompt_ids = [1] * 100
        b.submit(r)
    # No window wait: the room is full before the window could add anything.
    assert b.step() == 0.0
    assert f.batches == [("a", ["r0", "r1"])]
    assert b.step() == 600.0  # "a" is backlogged now and nothing else is up: held to the deadline
    assert len(f.batches) == 1
    up.append("b")
    b.step()
    assert f.batches[-1] == ("b", ["r2", "r3"])
    assert b.depth == 0


def test_discard_and_take_all() -> None:
    f = Fakes()
    f.instances = []
    b = make(f, Clock())
    r1, r2 = req(1), req(2)
    b.submit(r1)
    b.submit(r2)
    assert b.is_queued(r1)
    assert b.discard(r1)
    assert not b.discard(r1)
    assert b.take_all() == [r2]
    assert b.depth == 0


# --------------------------------------------------------------------------- run loop, real time


@contextlib.asynccontextmanager
async def running(b: Batcher) -> AsyncIterator[None]:
    task = asyncio.ensure_future(b.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_loop_sends_a_full_batch_at_once() -> None:
    f = Fakes()
    # A window this long would fail the deadline below if a full batch waited for it.
    b = make(f, wait_s=60.0, max_batch_size=4)
    async with running(b):
        for i in range(4):
            b.submit(req(i))
        await asyncio.wait_for(f.dispatched.wait(), 10.0)
    assert f.batches == [("w1", ["r0", "r1", "r2", "r3"])]


async def test_loop_gathers_concurrent_requests_into_one_batch() -> None:
    f = Fakes()
    b = make(f, wait_s=0.05, max_batch_size=32)
    async with running(b):
        for i in range(3):
            b.submit(req(i))  # same loop iteration: all inside the first one's window
        await asyncio.wait_for(f.dispatched.wait(), 10.0)
    assert f.batches == [("w1", ["r0", "r1", "r2"])]


async def test_loop_waits_for_an_instance_and_wakes_when_told() -> None:
    f = Fakes()
    f.instances = []
    b = make(f, wait_s=0.0, queue_timeout_s=60.0)
    async with running(b):
        b.submit(req(1))
        await asyncio.sleep(0)  # let the loop find no instance and go to sleep
        assert f.batches == []
        f.instances = ["w9"]
        b.wake()
        await asyncio.wait_for(f.dispatched.wait(), 10.0)
    assert f.batches == [("w9", ["r1"])]


async def test_loop_times_out_queued_requests() -> None:
    f = Fakes()
    f.instances = []
    done = asyncio.Event()

    class Expiring(Fakes):
        def expired(self, r: RequestState) -> None:
            f.timed_out.append(r.request_id)
            done.set()

    owner = Expiring()
    owner.instances = []
    b = Batcher("m", max_batch_size=4, wait_s=0.0, max_queue=4, queue_timeout_s=0.05, owner=owner)
    async with running(b):
        b.submit(req(1))
        await asyncio.wait_for(done.wait(), 10.0)
    assert f.timed_out == ["r1"]
    assert b.depth == 0


def test_prompt_logprobs_and_n_choices_take_pipelined_routes_like_any_request() -> None:
    """A route's last stage scores the prompt (prompt_logprobs) and keeps n choices apart, so such
    requests join a pipelined batch like the rest; only both at once wait for a whole instance."""
    from cascade.messages import RouteStage

    class Pipelined(Fakes):
        def pick(self, model: str, avoid: frozenset[str]) -> Route | None:
            return Route("new", (RouteStage("new", 0, 2), RouteStage("full", 2, 4)))

    clock, f = Clock(), Pipelined()
    b = make(f, clock, wait_s=0.0)
    scored = RequestState(request_id="s", model="m", prompt_ids=[1], params=SamplingParams(prompt_logprobs=1))
    choices = RequestState(request_id="c", model="m", prompt_ids=[1], params=SamplingParams(n=3))
    b.submit(req(1))
    b.submit(scored)
    b.submit(choices)
    both = RequestState(request_id="b", model="m", prompt_ids=[1], params=SamplingParams(n=2, prompt_logprobs=0))
    b.submit(both)
    b.step()
    assert f.batches == [("new", ["r1", "s", "c"])]
    # n choices that also score the prompt go to the route's tail, a whole instance.
    b.step()
    assert f.batches[1] == ("full", ["b"])
