"""The engine's admission rule as a pure function (services/worker/admission.py): the engine and
the simulator both ask it, so its rules are pinned here without torch."""

from __future__ import annotations

from services.worker.admission import Budget, Staged, admit


def test_prompts_under_way_go_first_then_oldest_whole_prompts() -> None:
    plan = admit(512, [100, 600], [(1.0, 200), (2.0, 300)], [], free_slots=8, chunk_cap=512)
    # The first prompt under way finishes (100), the second takes the rest of the budget (412);
    # nothing is left for the waiting ones.
    assert plan.chunks == [100, 412]
    assert plan.takes == []


def test_a_prompt_that_does_not_fit_starts_as_a_chunk_and_stops_the_step() -> None:
    plan = admit(512, [], [(1.0, 200), (2.0, 400), (3.0, 10)], [], free_slots=8, chunk_cap=512)
    assert plan.takes == [("whole", 0, 200), ("start", 1, 312)]


def test_the_oldest_prompt_waits_for_a_slot_and_younger_work_behind_it() -> None:
    relayed = Staged(5.0, "relayed", 64, 0.5)
    plan = admit(512, [], [(1.0, 100), (2.0, 100)], [relayed], free_slots=1, chunk_cap=512)
    assert plan.takes == [("whole", 0, 100)]  # no slot for the second; the younger relayed chunk waits


def test_stage_work_is_merged_by_arrival_and_priced_by_its_share_of_the_layers() -> None:
    staged = [Staged(0.5, "relayed", 128, 0.25), Staged(1.5, "driven", 4000, 0.5)]
    plan = admit(512, [], [(1.0, 100)], staged, free_slots=8, chunk_cap=512)
    # relayed: 128 tokens x 0.25 = 32 of the budget; the local prompt 100; the driven route's
    # chunk is cut in whole-model tokens: (512 - 132) / 0.5 = 760, capped at the budget (512).
    assert plan.takes == [("relayed", 0, 128), ("whole", 0, 100), ("driven", 1, 512)]


def test_a_tie_in_arrival_goes_to_the_local_prompt() -> None:
    plan = admit(100, [], [(1.0, 100)], [Staged(1.0, "relayed", 10, 1.0)], free_slots=4, chunk_cap=100)
    assert plan.takes == [("whole", 0, 100)]


def test_the_first_take_always_succeeds() -> None:
    b = Budget(10)
    assert b.take(50) and b.left == -40
    assert not b.take(1)
    plan = admit(10, [], [], [Staged(0.0, "relayed", 80, 1.0)], free_slots=4, chunk_cap=10)
    assert plan.takes == [("relayed", 0, 80)]  # a chunk bigger than the budget still gets its step


class Pool:
    """A KV block gate over a counted pool: each waiting prompt needs ceil(tokens / 16) blocks less
    the ones its cached front holds; staged work needs a block per 16 tokens. Records its calls."""

    def __init__(self, free: int, prompts: list[int], cached: dict[int, int] | None = None) -> None:
        self.free = free
        self.prompts = prompts
        self.cached = cached or {}
        self.calls: list[tuple[str, int, int]] = []

    def reserve(self, w: int, /) -> int | None:
        cached = self.cached.get(w, 0)
        need = -(-self.prompts[w] // 16) - cached // 16
        self.calls.append(("reserve", w, need))
        if need > self.free:
            return None
        self.free -= need
        return cached

    def grow(self, i: int, tokens: int, /) -> bool:
        need = -(-tokens // 16)
        self.calls.append(("grow", i, need))
        if need > self.free:
            return False
        self.free -= need
        return True


def test_a_prompt_waits_for_its_blocks_and_everything_younger_waits_behind_it() -> None:
    prompts = [100, 200, 16]
    pool = Pool(free=8, prompts=prompts)  # 7 blocks for the first, 13 for the second: no room
    staged = [Staged(5.0, "relayed", 16, 0.5)]
    plan = admit(4096, [], [(1.0, 100), (2.0, 200), (3.0, 16)], staged, free_slots=8, chunk_cap=512, blocks=pool)
    assert plan.takes == [("whole", 0, 100)]
    # The third prompt (1 block) and the relayed chunk would fit, but are younger: never asked.
    assert pool.calls == [("reserve", 0, 7), ("reserve", 1, 13)]
    assert pool.free == 1


def test_without_a_block_gate_every_prompt_fits() -> None:
    plan = admit(4096, [], [(1.0, 100), (2.0, 200)], [], free_slots=8, chunk_cap=512)
    assert plan.takes == [("whole", 0, 100), ("whole", 1, 200)]


def test_a_cached_front_is_not_recomputed_and_admission_goes_on_when_the_rest_fits() -> None:
    # The first prompt's first 96 tokens are in the prefix cache: it computes 54 as a chunk that
    # ends it, and the next prompt is admitted in the same step.
    pool = Pool(free=100, prompts=[150, 40], cached={0: 96})
    plan = admit(4096, [], [(1.0, 150), (2.0, 40)], [], free_slots=8, chunk_cap=512, blocks=pool)
    assert plan.takes == [("start", 0, 54), ("whole", 1, 40)]
    # With a budget smaller than the rest, the chunk is cut and nothing younger starts.
    pool = Pool(free=100, prompts=[150, 40], cached={0: 96})
    plan = admit(30, [], [(1.0, 150), (2.0, 40)], [], free_slots=8, chunk_cap=512, blocks=pool)
    assert plan.takes == [("start", 0, 30)]
    assert [c[0] for c in pool.calls] == ["reserve"]


def test_stage_work_waits_for_blocks_without_spending_the_budget() -> None:
    staged = [Staged(0.5, "relayed", 64, 0.5), Staged(0.7, "driven", 300, 0.5)]
    pool = Pool(free=3, prompts=[10])  # the relayed chunk needs 4 blocks
    plan = admit(512, [], [(1.0, 10)], staged, free_slots=8, chunk_cap=512, blocks=pool)
    assert plan.takes == []
    assert pool.calls == [("grow", 0, 4)]
    # With room, the driven route's chunk asks for the blocks of the tokens it computes now.
    pool = Pool(free=100, prompts=[10])
    plan = admit(512, [], [(1.0, 10)], staged, free_slots=8, chunk_cap=512, blocks=pool)
    assert plan.takes == [("relayed", 0, 64), ("driven", 1, 300), ("whole", 0, 10)]
    assert pool.calls == [("grow", 0, 4), ("grow", 1, 19), ("reserve", 0, 1)]
