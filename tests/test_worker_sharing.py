"""Sharing one worker between instances: the stride scheduler gives each instance its quota's
share of the steps under contention (and the device to whoever has work otherwise), the memory
ledger refuses what would not fit with a clear error, and two real engines on one engine thread
take their steps by quota."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from cascade.config import GenerateSpec
from cascade.messages import SamplingParams
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from services.worker.engine import Engine, StepResult
from services.worker.runner import EngineRunner, EngineThread
from services.worker.sharing import MemoryLedger, MemoryRefused, QuotaError, StrideScheduler
from tests.enginehelp import load_model

# ---- the scheduler ----------------------------------------------------------------------------


def test_shares_follow_quotas_under_contention() -> None:
    s = StrideScheduler()
    s.add("a", 3.0)
    s.add("b", 1.0)
    s.add("c", 0.5)
    order = [s.pick(["a", "b", "c"]) for _ in range(900)]
    counts = {n: order.count(n) for n in "abc"}
    # 3 : 1 : 0.5 of 900 steps, off by at most one step each (stride scheduling's bound).
    assert abs(counts["a"] - 600) <= 1 and abs(counts["b"] - 200) <= 1 and abs(counts["c"] - 100) <= 1
    assert s.steps() == counts
    # Interleaved, not in runs: within any 9 consecutive picks, "a" steps 5 to 7 times.
    assert all(5 <= order[i : i + 9].count("a") <= 7 for i in range(0, 891))


def test_idle_instances_give_their_share_and_bank_no_credit() -> None:
    s = StrideScheduler()
    s.add("a")
    s.add("b")
    assert [s.pick(["a"]) for _ in range(50)] == ["a"] * 50  # b has no work: a gets the device
    # b comes back: an even split from now on, not 50 steps of catching up.
    order = [s.pick(["a", "b"]) for _ in range(20)]
    assert order.count("b") == 10
    assert s.pick([]) is None


def test_one_instance_alone_steps_as_the_general_case_counts_it() -> None:
    """An instance alone on its thread (every unshared worker, every step) is counted as with
    company, so one that joins later finds it where the general rule would have put it."""
    s = StrideScheduler()
    s.add("a", 2.0)
    assert [s.pick(["a"]) for _ in range(10)] == ["a"] * 10
    assert s.pick(["not-here"]) is None and s.pick([]) is None
    assert s.steps() == {"a": 10} and s.shares["a"].pass_ == pytest.approx(5.0)
    s.add("b")  # joins where "a" stands: shares by quota from now on, no catching up
    order = [s.pick(["a", "b"]) for _ in range(30)]
    assert abs(order.count("a") - 20) <= 1


def test_quota_changes_apply_and_bad_ones_are_refused() -> None:
    s = StrideScheduler()
    s.add("a")
    s.add("b")
    assert s.set_quota("a", 4) == 4.0
    order = [s.pick(["a", "b"]) for _ in range(500)]
    assert abs(order.count("a") - 400) <= 2
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(QuotaError, match="share above 0"):
            s.set_quota("a", bad)
    with pytest.raises(QuotaError, match="no instance 'z'"):
        s.set_quota("z", 1)


# ---- the ledger -------------------------------------------------------------------------------


def test_ledger_refuses_what_does_not_fit_and_frees_on_release() -> None:
    led = MemoryLedger(100_000_000)
    led.reserve("a", weights=60_000_000)
    led.reserve("a", kv=10_000_000)
    with pytest.raises(MemoryRefused, match=r"b needs 40.0 MB more .* only 30.0 MB .* \(held: a 70.0 MB\)"):
        led.reserve("b", weights=40_000_000)
    assert "b" not in led.held and led.used == 70_000_000  # a refusal changes nothing
    assert led.release("a").total == 70_000_000
    led.reserve("b", weights=40_000_000)
    assert led.free() == 60_000_000
    assert MemoryLedger(0).reserve("x", weights=10**15).total == 10**15  # 0: unbounded


# ---- two real engines on one engine thread ----------------------------------------------------

tok = ByteTokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model")
    generate_model(d, GenerateSpec(layers=2, hidden=32, heads=2, kv_heads=1, vocab=320, seed=3))
    return d


async def test_two_instances_step_by_quota_on_one_thread(model_dir: Path) -> None:
    thread = EngineThread(threads=1)
    engines = {n: Engine(load_model(model_dir), tok, max_batch=2, worker_id=n) for n in ("a", "b")}
    trace: list[str] = []
    lock = threading.Lock()
    for name, eng in engines.items():
        real = eng.step

        def step(real=real, name=name) -> StepResult:  # type: ignore[no-untyped-def]
            with lock:
                trace.append(name)
            return real()

        eng.step = step  # type: ignore[method-assign]
    done = {n: asyncio.Event() for n in engines}

    def idle(name: str, in_flight: int) -> None:
        if in_flight == 0 and not engines[name].has_work():
            done[name].set()

    async def deliver(_: StepResult) -> None:
        return None

    quotas = {"a": 3.0, "b": 1.0}
    lanes: dict[str, EngineRunner] = {}
    for n, eng in engines.items():

        def get(e: Engine = eng) -> Engine:
            return e

        def on_idle(k: int, n: str = n) -> None:
            idle(n, k)

        lanes[n] = EngineRunner(get, deliver, on_idle, shared=thread, name=n, quota=quotas[n])
    # The work is queued before the thread starts, so both lanes contend from the first step.
    for n, eng in engines.items():
        for i in range(2):
            eng.submit(f"{n}{i}", "g", tok.encode("quota"), SamplingParams(max_tokens=60, ignore_eos=True))
    for lane in lanes.values():
        lane.start()
        asyncio.get_running_loop().create_task(lane.publish())
    lanes["a"].wake()
    try:
        await asyncio.wait_for(asyncio.gather(*(d.wait() for d in done.values())), 120)
    finally:
        for lane in lanes.values():
            await lane.stop()
    # While both had work (until "a"'s last step), "b" took a quarter of the steps.
    last_a = max(i for i, n in enumerate(trace) if n == "a")
    window = trace[: last_a + 1]
    share_b = window.count("b") / len(window)
    assert abs(share_b - 0.25) <= 0.03, (share_b, len(window))
    assert lanes["a"].steps == trace.count("a") and lanes["b"].steps == trace.count("b")


def test_a_measured_kv_budget_takes_an_even_share_of_what_is_left() -> None:
    led = MemoryLedger(90_000_000)
    led.reserve("a", weights=10_000_000)
    # Two instances on the worker, none with a KV cache yet: a may take half of the 80 MB left.
    assert led.fair_share("a", 2) == 40_000_000
    led.reserve("a", kv=40_000_000)
    led.reserve("b", weights=10_000_000)
    # b is the last without one: it takes all that is left.
    assert led.fair_share("b", 2) == 30_000_000
    assert MemoryLedger(0).fair_share("a", 2) is None  # unbounded
