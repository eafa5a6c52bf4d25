"""bench serve's pooling of the overhead pairs: the figures over every pair, and the mean added
latency with the steps' own speed difference taken out."""

from __future__ import annotations

import pytest

from bench.serve import summarize_overhead


def _run(
    added: list[float], mesh_steps_s: float | None, inprocess_steps_s: float, gap_s: float = 0.0, gaps: int = 0
) -> dict[str, object]:
    n = len(added)
    return {
        "mesh_gap_s": gap_s if mesh_steps_s is not None else None,
        "mesh_gaps": gaps if mesh_steps_s is not None else None,
        "mesh_ms": [200.0 + x for x in added],
        "inprocess_ms": [200.0] * n,
        "added_ms": added,
        "added_ttft_ms": [1.0] * n,
        "cpu_mesh": [],
        "cpu_local": [],
        "mesh_steps_s": mesh_steps_s,
        "inprocess_steps_s": inprocess_steps_s,
    }


def test_the_steps_difference_is_taken_out_of_the_mean_per_mesh_and_pooled() -> None:
    # Mesh A: its steps ran 2 ms a request faster than in-process, which hid 2 ms of path.
    # Mesh B: 3 ms slower, which showed as 3 ms of path that was not there.
    a = _run([3.0, 5.0], mesh_steps_s=2 * 0.190, inprocess_steps_s=2 * 0.192)
    b = _run([7.0, 9.0, 8.0, 8.0], mesh_steps_s=4 * 0.195, inprocess_steps_s=4 * 0.192)
    ov = summarize_overhead([a, b])
    assert ov["pairs"] == 6 and ov["added_latency_p50_by_mesh_ms"] == [4.0, 8.0]
    assert ov["added_latency_mean_same_steps_by_mesh_ms"] == pytest.approx([6.0, 5.0])
    assert ov["steps_ms_per_request"]["mesh"] == pytest.approx((0.380 + 0.780) / 6 * 1e3)
    assert ov["steps_ms_per_request"]["inprocess"] == pytest.approx(192.0)
    mean = (3 + 5 + 7 + 9 + 8 + 8) / 6
    assert ov["added_latency_mean_ms"] == pytest.approx(mean)
    assert ov["added_latency_mean_same_steps_ms"] == pytest.approx(mean - ((0.380 + 0.780) / 6 * 1e3 - 192.0))


def test_without_the_workers_step_time_only_the_pooled_pairs_are_given() -> None:
    ov = summarize_overhead([_run([1.0, 2.0, 3.0], None, 0.5)])
    assert ov["added_latency_ms"]["p50"] == 2.0
    assert "added_latency_mean_same_steps_ms" not in ov and "steps_ms_per_request" not in ov


def test_the_engine_threads_time_between_steps_is_pooled_over_every_gap() -> None:
    a = _run([3.0], mesh_steps_s=0.2, inprocess_steps_s=0.2, gap_s=15 * 100e-6, gaps=15)
    b = _run([3.0], mesh_steps_s=0.2, inprocess_steps_s=0.2, gap_s=45 * 60e-6, gaps=45)
    assert summarize_overhead([a, b])["engine_gap_us"] == pytest.approx((15 * 100 + 45 * 60) / 60)
    assert "engine_gap_us" not in summarize_overhead([_run([3.0], 0.2, 0.2)])  # no gap counted


def test_pair_by_pair_figures_take_each_requests_own_steps_out() -> None:
    a = {**_run([3.0, 5.0], 0.4, 0.4), "added_same_steps_ms": [1.0, 9.0], "added_raw_same_steps_ms": [0.5]}
    b = {**_run([4.0], 0.2, 0.2), "added_same_steps_ms": [2.0]}
    ov = summarize_overhead([a, b])
    assert ov["added_latency_same_steps_ms"]["p50"] == 2.0
    assert ov["added_latency_same_steps_p50_by_mesh_ms"] == [5.0, 2.0]
    assert ov["added_latency_same_steps_raw_client_ms"]["p50"] == 0.5
    assert ov["added_latency_same_steps_raw_client_p50_by_mesh_ms"] == [0.5]
