"""Options and output every benchmark shares: tables never print nan or None, and nothing
machine-wide (the page cache) is touched unless asked for."""

from __future__ import annotations

import pytest

from bench.common import md_table, summary
from bench.multicast import parse_args as multicast_args


def test_markdown_tables_show_a_dash_where_a_figure_has_no_samples() -> None:
    empty = summary([])  # every request of a level failed
    text = md_table(["level", "p50", "p99", "note"], [[1, empty["p50"], empty["p99"], None], [8, 12.5, 1234.0, "ok"]])
    assert "nan" not in text.lower() and "None" not in text
    assert text.splitlines()[2] == "| 1 | — | — | — |"
    assert text.splitlines()[3] == "| 8 | 12.5 | 1234 | ok |"


def test_multicast_drops_the_page_cache_only_when_asked() -> None:
    assert multicast_args([]).drop_caches is False
    assert multicast_args(["--drop-caches"]).drop_caches is True
    assert multicast_args(["--no-cold"]).drop_caches is False  # the old flag still parses


def test_dtypes_counts_the_equal_prefix_and_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.dtypes import main, same_prefix

    assert same_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert same_prefix([1, 2], [1, 2, 3]) == 2
    assert same_prefix([], [1]) == 0
    # Refused before any model is read: the model path need not exist.
    assert main(["--model", "/nonexistent", "--batches", "1,x", "--no-write"]) == 2
    assert "--batches must be integers" in capsys.readouterr().err
    assert main(["--model", "/nonexistent", "--rounds", "0", "--no-write"]) == 2


def test_scaleup_from_zero_times_coverage_and_full_loads() -> None:
    from bench.scaleup_zero import ZeroLog, coverage, parse

    log = ZeroLog(t0=1.0, num_units=4)
    # Two instances, ordered: a takes 0, 1 then 2, 3; b takes 2, 3 then 0, 1.
    log.ready = [(0.5, "a", 0), (0.6, "b", 2), (1.0, "a", 1), (1.1, "b", 3), (1.5, "a", 2), (1.6, "b", 0),
                 (2.0, "a", 3), (2.1, "b", 1)]  # fmt: skip
    assert coverage(log) == (1.1, 2.0, 2.1)  # every unit somewhere at 1.1; a whole at 2.0, b at 2.1
    log.ready = log.ready[:6]
    covered, first_full, last_full = coverage(log)
    assert covered == 1.1 and first_full != first_full and last_full != last_full  # nobody whole: nan
    assert parse(["--from-zero"]).replicas == 3
    with pytest.raises(SystemExit):
        parse(["--replicas", "1"])
