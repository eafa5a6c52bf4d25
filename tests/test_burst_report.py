"""bench/burst.py's pooling of repeated runs (`--repeats`): pure functions over result rows."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench.burst import parse, pooled_rows, runs_table, slo_share, verdicts


def run(key: str, rnd: int, ttfts: list[float | None], instance_s: float, events: int = 0) -> dict[str, Any]:
    """A result row as `analyse` writes it, with only what pooling reads."""
    n = len(ttfts)
    status = ["ok" if t is not None else "error" for t in ttfts]
    attained = slo_share(list(zip(ttfts, [20.0] * n, status, strict=True)), 1000, 100, True, True)
    return {
        "key": key,
        "label": key,
        "round": rnd,
        "deployment": {"policy": "manual"},
        "summary": {
            "ok": sum(1 for t in ttfts if t is not None),
            "itl_definition": "per request",
            "slo": {"ttft_ms": 1000.0, "tbt_ms": 100.0, "attainment": attained},
            "ttft_ms": {"p99": max((t for t in ttfts if t is not None), default=0.0)},
        },
        "instance_seconds": instance_s,
        "scale_events": events,
        "scale_up_events": events,
        "scale_down_events": 0,
        "emulated_device": {"steps": 10, "overrun_steps": 1, "overrun_s": 0.1, "padded_s": 5.0, "significant": False},
        "timeline": {
            "ttft_ms": ttfts,
            "tpot_ms": [20.0] * n,
            "status": status,
        },
    }


@pytest.fixture
def args() -> argparse.Namespace:
    return parse(["--repeats", "2"])


def test_slo_share_counts_failures_and_each_limit() -> None:
    tl: list[tuple[float | None, float | None, str]] = [
        (500.0, 20.0, "ok"),  # meets both
        (1500.0, 20.0, "ok"),  # TTFT over
        (500.0, 150.0, "ok"),  # time per output token over
        (500.0, None, "ok"),  # one output token: no TBT to judge
        (None, None, "error"),  # failed: a miss however fast
    ]
    assert slo_share(tl, 1000, 100, True, True) == pytest.approx(2 / 5)
    assert slo_share(tl, 1000, 100, True, False) == pytest.approx(3 / 5)
    assert slo_share(tl, 1000, 100, False, True) == pytest.approx(3 / 5)
    assert slo_share([], 1000, 100, True, True) != slo_share([], 1000, 100, True, True)  # nan


def test_pooled_rows_pool_requests_and_average_the_rest(args: argparse.Namespace) -> None:
    runs = [
        run("cascade", 1, [100.0, 2000.0, 300.0, 400.0], 440.0, events=10),
        run("static-peak", 1, [100.0, 200.0, 300.0, 400.0], 660.0),
        run("cascade", 2, [100.0, 200.0, None, 400.0], 460.0, events=12),
        run("static-peak", 2, [100.0, 200.0, 300.0, 1400.0], 660.0),
    ]
    pooled = {r["key"]: r for r in pooled_rows(args, runs)}
    assert list(pooled) == ["cascade", "static-peak"]  # the order the runs came in
    c = pooled["cascade"]
    assert c["runs"] == 2 and c["summary"]["requests"] == 8 and c["summary"]["ok"] == 7
    assert c["summary"]["slo"]["attainment"] == pytest.approx(6 / 8)  # the mean of 3/4 and 3/4
    assert c["instance_seconds"] == pytest.approx(450.0)
    assert c["scale_events"] == 11.0
    assert c["emulated_device"]["steps"] == 20 and c["emulated_device"]["overrun_s"] == pytest.approx(0.2)
    assert c["summary"]["ttft_ms"]["max"] == pytest.approx(2000.0)  # over every run's requests
    assert pooled["static-peak"]["summary"]["slo"]["attainment"] == pytest.approx(7 / 8)

    table = runs_table(list(pooled.values()), runs, 2)
    assert "| cascade | 75.0 / 440 | 75.0 / 460 |" in table
    assert "| static-peak | 100.0 / 660 | 75.0 / 660 |" in table

    slo = next(v for v in verdicts(pooled) if "SLO attainment" in v["target"])
    assert slo["figure"] == "75.0 % vs 87.5 %: -12.5 points" and not slo["met"]


def test_a_failed_run_shows_in_the_runs_table(args: argparse.Namespace) -> None:
    runs = [run("cascade", 1, [100.0], 400.0)]
    assert "| cascade | 100.0 / 400 | failed |" in runs_table(pooled_rows(args, runs), runs, 2)


def test_repeats_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
