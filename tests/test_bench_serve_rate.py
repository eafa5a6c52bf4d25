"""`cascade bench serve` in vLLM's vocabulary: arrivals, goodput, the figures and vLLM's table,
on synthetic request records (the mesh run itself is the benchmark, not a test)."""

from __future__ import annotations

import math
import statistics

import pytest

from bench.serve import parse, rate_mode
from bench.serve_rate import UsageError, arrival_gaps, compute, parse_goodput, table


def test_vllm_options_select_the_vllm_run() -> None:
    assert not rate_mode(parse([]))
    assert not rate_mode(parse(["--concurrency", "1,8"]))
    for argv in (["--request-rate", "8"], ["--burstiness", "0.5"], ["--num-prompts", "10"], ["--max-concurrency", "4"]):
        assert rate_mode(parse(argv)), argv
    a = parse(["--request-rate", "8", "--goodput", "ttft:500", "tpot:100", "--save-result"])
    assert a.goodput == ["ttft:500", "tpot:100"] and a.save_result


def test_goodput_parses_vllm_keys_and_refuses_the_rest() -> None:
    assert parse_goodput(["ttft:500", "tpot:100", "e2el:2000"]) == {"ttft": 500.0, "tpot": 100.0, "e2el": 2000.0}
    for bad in (["ttft=500"], ["itl:5"], ["ttft:fast"], ["tpot:0"]):
        with pytest.raises(UsageError):
            parse_goodput(bad)


def test_gamma_arrivals_keep_the_rate_and_burstiness_sets_the_spread() -> None:
    steady = arrival_gaps(4000, rate=8.0, burstiness=1.0, seed=1)
    bursty = arrival_gaps(4000, rate=8.0, burstiness=0.25, seed=1)
    for gaps in (steady, bursty):
        assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.1)
    cv = lambda g: statistics.pstdev(g) / statistics.fmean(g)  # noqa: E731
    # Gamma with shape k has a coefficient of variation 1/sqrt(k): 1 for Poisson, 2 at k = 0.25.
    assert cv(steady) == pytest.approx(1.0, rel=0.1)
    assert cv(bursty) == pytest.approx(2.0, rel=0.15)
    assert arrival_gaps(5, rate=math.inf, burstiness=1.0, seed=0) == [0.0] * 4
    assert arrival_gaps(50, 8.0, 0.5, seed=3) == arrival_gaps(50, 8.0, 0.5, seed=3)


def _req(start: float, ttft: float, tokens: int, tpot: float) -> dict[str, object]:
    stamps = [start + ttft + i * tpot for i in range(tokens)]
    end = stamps[-1]
    return {
        "ok": True,
        "start": start,
        "end": end,
        "ttft": ttft,
        "tpot": (end - start - ttft) / (tokens - 1),
        "itl": [tpot] * (tokens - 1),
        "e2el": end - start,
        "stamps": stamps,
        "prompt_tokens": 10,
        "output_tokens": tokens,
    }


def test_figures_and_goodput_follow_vllm_definitions() -> None:
    results = [
        _req(0.0, 0.2, 11, 0.05),  # good: TTFT 200 ms, TPOT 50 ms
        _req(0.5, 0.9, 11, 0.05),  # TTFT 900 ms misses ttft:500
        _req(1.0, 0.1, 11, 0.2),  # TPOT 200 ms misses tpot:100
        {"ok": False, "start": 1.5, "end": 1.6, "error": "HTTP 503"},
    ]
    m = compute(results, duration=4.0, goodput={"ttft": 500.0, "tpot": 100.0}, percentiles=[50.0, 99.0])
    assert (m["completed"], m["failed"], m["errors"]) == (3, 1, {"HTTP 503": 1})
    assert m["good_requests"] == 1 and m["request_goodput"] == pytest.approx(0.25)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 33
    assert m["output_throughput"] == pytest.approx(33 / 4)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["median_tpot_ms"] == pytest.approx(50.0)
    assert m["max_concurrent_requests"] == 3
    assert m["percentiles_ttft_ms"][0] == [50.0, pytest.approx(200.0)]


def test_the_table_has_vllm_lines_and_never_nan_or_none() -> None:
    a = parse(["--request-rate", "8", "--max-concurrency", "4", "--metric-percentiles", "50,99"])
    m = compute([_req(0.0, 0.2, 5, 0.05)], 1.0, {"ttft": 500.0}, [50.0, 99.0])
    text = table(m, a.max_concurrency, 8.0, ["ttft", "tpot", "itl", "e2el"], [50.0, 99.0])
    for line in (
        "============ Serving Benchmark Result ============",
        "Successful requests:                     1",
        "Maximum request concurrency:             4",
        "Request rate configured (RPS):           8.00",
        "Request goodput (req/s):                 1.00",
        "---------------Time to First Token----------------",
        "Median TTFT (ms):                        200.00",
        "P99 TTFT (ms):                           200.00",
        "-----Time per Output Token (excl. 1st token)------",
        "----------------End-to-end Latency----------------",
    ):
        assert line in text.splitlines(), line
    # Nothing came back: every figure without samples reads n/a, never nan or None.
    empty = compute([{"ok": False, "start": 0.0, "end": 1.0, "error": "HTTP 503"}], 1.0, {}, [99.0])
    text = table(empty, a.max_concurrency, math.inf, ["ttft", "tpot", "itl", "e2el"], [99.0])
    assert "nan" not in text.lower() and "None" not in text
    assert "Median TTFT (ms):                        n/a" in text.splitlines()
    assert "Request rate configured" not in text  # vLLM leaves it out at an infinite rate


def test_sweep_options_are_refused_beside_vllm_options(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.serve import main

    assert main(["--request-rate", "8", "--concurrency", "4"]) == 2
    assert "use --max-concurrency and --num-prompts" in capsys.readouterr().err
    assert main(["--request-rate", "8", "--goodput", "itl:5"]) == 2
    assert "--goodput takes KEY:MS" in capsys.readouterr().err
