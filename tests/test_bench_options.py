"""Options and output every benchmark shares: tables never print nan or None, and nothing
machine-wide (the page cache) is touched unless asked for."""

from __future__ import annotations

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
