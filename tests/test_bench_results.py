"""The committed benchmark results are summaries (STYLE.md: no raw dumps in git) that hold every
figure their markdown shows: each one renders its .md again from its .json alone."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bench import scaleup, serve_rate
from bench.burst_report import report
from bench.common import RESULTS

# Another benchmark's own format, rewritten elsewhere; serve's JSON has always been its summary.
SUMMARIES = ("burst", "burst.repeat", "scaleup", "serve", "serve-rate")


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads((RESULTS / f"{name}.json").read_bytes())
    return doc


def markdown_body(name: str) -> str:
    """The committed markdown without the figure's line the benchmark appends after the report."""
    return (RESULTS / f"{name}.md").read_text().rsplit("\n![", 1)[0]


@pytest.mark.parametrize("name", SUMMARIES)
def test_committed_results_are_summaries(name: str) -> None:
    path = RESULTS / f"{name}.json"
    assert path.stat().st_size < 64_000, f"{path} is a raw dump, not a summary"
    doc = load(name)
    assert doc["commit"] and doc["machine"]
    assert b'"timeline"' not in path.read_bytes()


def test_burst_json_renders_burst_md() -> None:
    assert report(load("burst")) == markdown_body("burst")


def test_scaleup_json_renders_scaleup_md() -> None:
    doc = load("scaleup")
    assert scaleup.markdown(doc["rows"], doc["ratios"]) == markdown_body("scaleup")


def test_serve_rate_json_renders_serve_rate_md() -> None:
    doc = load("serve-rate")
    assert serve_rate.markdown(doc) == (RESULTS / "serve-rate.md").read_text()
    p = doc["parameters"]
    assert (p["request_rate"], p["burstiness"], p["goodput_ms"]) == (8.0, 0.5, {"ttft": 500.0, "tpot": 100.0})
