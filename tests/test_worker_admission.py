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
