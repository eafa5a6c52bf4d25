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
