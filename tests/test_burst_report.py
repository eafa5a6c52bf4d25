"""bench/burst.py's report: the pooling of repeated runs (`--repeats`), pure functions over result
rows, and the summary the results keep, which must hold every figure the report prints."""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import common
from bench.burst import parse
from bench.burst_metrics import slo_share
from bench.burst_report import pooled_rows, report, runs_table, verdicts, verdicts_by_round
from bench.burst_results import summarise


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


def raw_doc(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A raw result document as bench/burst.py builds it (`burst_results.result_doc`), from runs that
    also carry what only the raw document keeps: decisions, acks, per-worker counters."""
    for r in runs:
        r["deployment"] = {"policy": "manual", "loading": "multicast", "scaling": "live"}
        r["decisions"] = [{"t": 1.5, "id": "d1", "action": "up", "count": 2, "target": 3, "reason": "demand"}]
        r["acks"] = [{"t": 2.0, "id": "d1", "ok": True, "error": ""}]
        r["emulated_device"]["per_worker"] = {"worker-0": {"steps": 10.0}}
    rows = pooled_rows(args, runs)
    return {
        "benchmark": "burst",
        "commit": "0" * 40,
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python bench/burst.py --repeats 2",
        "trace": {"licence": "the trace's notice"},
        "workload": {
            "requests": 4,
            "window_s": 165.0,
            "schedule": {"rate_scale": 0.7658},
            "mean_req_s": 5.92,
            "peak_req_s_10_trace_s_bins": 19.6,
            "instance_capacity_req_s": 4.92,
            "instance_capacity_simulated_req_s": 4.58,
            "unloaded_prefill_ms_mean_prompt": 167.0,
            "unloaded_decode_step_ms_b1": 11.8,
            "mean_need": 2,
            "peak_need_uncapped": 4,
            "prompt_emulated_tokens_mean": 2152.3,
            "output_tokens_mean": 25.9,
        },
        "emulated": {
            "device": {"profile": "llama2-7b-a100-80gb"},
            "emulated_model_bytes": 13476823040,
            "disk_mb_s": 2000.0,
            "disk_load_s": 6.738,
            "link_load_s": 0.539,
        },
        "targets": verdicts({r["key"]: r for r in rows}),
        "targets_by_round": verdicts_by_round(runs, 2),
        "rows": rows,
        "runs": runs,
        "failed": [{"key": "allcache", "round": 2, "error": "RuntimeError: mesh did not come up"}],
    }


def test_the_summary_keeps_every_figure_the_report_prints(args: argparse.Namespace) -> None:
    raw = raw_doc(
        args,
        [
            run("cascade", 1, [100.0, 2000.0, 300.0, 400.0], 440.0, events=10),
            run("static-peak", 1, [100.0, 200.0, 300.0, 400.0], 660.0),
            run("cascade", 2, [100.0, 200.0, None, 400.0], 460.0, events=12),
            run("static-peak", 2, [100.0, 200.0, 300.0, 1400.0], 660.0),
        ],
    )
    text = report(raw)
    doc = summarise(raw)
    assert report(doc) == text
    figures = ("| cascade | 75.0 / 440 | 75.0 / 460 |", "75.0 % vs 87.5 %: -12.5 points", "13.48 GB at 2000 MB/s")
    assert all(f in text for f in figures)
    assert "allcache: RuntimeError: mesh did not come up" in text
    # Per request and per message stays in the raw document; the scale decisions stay as lines.
    flat = orjson.dumps(doc).decode()
    assert '"timeline"' not in flat and '"acks"' not in flat and '"per_worker"' not in flat
    assert doc["runs"][0]["scale_decisions"] == ["1.50 s up 2 to 3: demand"]
    assert [r["instance_seconds"] for r in doc["runs"]] == [440.0, 660.0, 460.0, 660.0]


def test_write_result_keeps_the_raw_document_out_of_the_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, raw_dir = tmp_path / "results", tmp_path / "raw"
    monkeypatch.setattr(common, "RESULTS", results)
    raw = {"benchmark": "burst", "rows": [{"timeline": {"ttft_ms": [1.0, 2.0]}}]}
    written = common.write_result("burst", {"benchmark": "burst", "rows": [{}]}, "| table |\n")
    assert written == [results / "burst.json", results / "burst.md"]
    assert b"timeline" not in (results / "burst.json").read_bytes()
    written = common.write_result("burst", {"benchmark": "burst"}, "| table |\n", raw, raw_dir)
    assert written[-1] == raw_dir / "burst.raw.json.gz"
    assert orjson.loads(gzip.decompress(written[-1].read_bytes())) == raw


def test_cascade_knobs_override_the_configuration_and_bad_ones_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.burst_configs import cascade_knobs

    assert cascade_knobs("keep_alive_s=0.5, down_step=1") == {"keep_alive_s": 0.5, "down_step": 1.0}
    assert cascade_knobs("") == {}
    assert parse(["--cascade-knobs", "keep_alive_s=2"]).cascade_knobs == "keep_alive_s=2"
    for bad in ("keep_alive_s", "=1", "keep_alive_s=fast"):
        with pytest.raises(SystemExit):
            parse(["--cascade-knobs", bad])
        assert "--cascade-knobs" in capsys.readouterr().err
