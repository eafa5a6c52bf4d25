"""The supervisor's restart decisions, tick by tick with a fake clock."""

from __future__ import annotations

from cascade.cli.supervisor import RestartBook, RestartPolicy


def test_backoff_doubles_up_to_its_cap_and_a_crash_loop_gives_up() -> None:
    book = RestartBook(RestartPolicy(max_restarts=4, window_s=60, backoff_s=0.5, max_backoff_s=2))
    assert [book.died("w", t) for t in (0, 1, 2, 3)] == [0.5, 1.0, 2.0, 2.0]
    assert book.died("w", 4) is None
    # Another child has a book of its own.
    assert book.died("loader", 4) == 0.5


def test_deaths_older_than_the_window_are_forgotten() -> None:
    book = RestartBook(RestartPolicy(max_restarts=2, window_s=10, backoff_s=1, max_backoff_s=8))
    assert book.died("w", 0) == 1
    assert book.died("w", 5) == 2
    # The first death left the window: this is the second recent one, not the third.
    assert book.died("w", 12) == 2
    assert book.died("w", 13) is None


def test_zero_restarts_gives_up_at_the_first_death() -> None:
    assert RestartBook(RestartPolicy(max_restarts=0)).died("w", 0) is None
