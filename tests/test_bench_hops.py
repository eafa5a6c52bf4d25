"""bench hops measures what it says: one latency per message on each path, positive, the sender's
send time beside each, and its CPU pinning undone after."""

from __future__ import annotations

import os
import sys
import time

import pytest

from bench.hops import parse, process_hop, thread_hop

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and two CPUs"
)


def _cpus() -> tuple[int, int]:
    c = sorted(os.sched_getaffinity(0))
    return c[0], c[-1]


def test_process_hops_give_one_positive_latency_per_message() -> None:
    before = os.sched_getaffinity(0)
    lat, sends = process_hop(_cpus(), 20, lambda: time.sleep(0.001))
    assert len(lat) == len(sends) == 20
    assert all(0 < x < 1e9 for x in lat) and all(s > 0 for s in sends)
    assert os.sched_getaffinity(0) == before


def test_thread_hops_give_one_positive_latency_per_set() -> None:
    before = os.sched_getaffinity(0)
    waits = thread_hop(_cpus(), 20, lambda: time.sleep(0.001))
    assert len(waits) == 20 and all(0 < x < 1e9 for x in waits)
    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("argv", [["--messages", "3"], ["--gap-ms", "-1"], ["--burst-mb", "0"]])
def test_what_cannot_be_measured_is_refused_with_a_clear_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and "--messages must be at least 10" in capsys.readouterr().err
