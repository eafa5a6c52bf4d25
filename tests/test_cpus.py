"""CPU lists and the worker's `--cpus`: the engine thread, and only it, runs where it is told."""

from __future__ import annotations

import os
import threading

import pytest

from cascade.config import ConfigError
from cascade.cpus import available_cpus, check_cpus, parse_cpu_list
from services.worker.runner import EngineThread
from services.worker.settings import WorkerSettings

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning is Linux-only")


def test_cpu_lists_parse_as_taskset_writes_them() -> None:
    assert parse_cpu_list("") == frozenset()
    assert parse_cpu_list("3") == {3}
    assert parse_cpu_list("0,2-4, 7") == {0, 2, 3, 4, 7}
    for bad in ("a", "1-", "3-1", "-1", "1,,x", "1.5"):
        with pytest.raises(ConfigError):
            parse_cpu_list(bad)


@linux_only
def test_a_cpu_this_process_may_not_use_is_refused_at_start() -> None:
    outside = max(available_cpus()) + 1
    with pytest.raises(ConfigError, match=str(outside)):
        check_cpus(frozenset({outside}))
    with pytest.raises(ConfigError):
        WorkerSettings(nats_url="nats://127.0.0.1:1", prefix="cascade", worker_id="w", cpus=str(outside))
    ok = WorkerSettings(nats_url="nats://127.0.0.1:1", prefix="cascade", worker_id="w", cpus=str(min(available_cpus())))
    assert ok.engine_cpus == {min(available_cpus())}


@linux_only
async def test_the_engine_thread_runs_on_its_cpus_and_the_loop_keeps_its_own() -> None:
    cpu = max(available_cpus())
    before = os.sched_getaffinity(0)
    thread = EngineThread(threads=1, cpus=frozenset({cpu}))
    thread.start()
    try:
        seen = await thread.call(lambda: (threading.current_thread().name, os.sched_getaffinity(0)))
    finally:
        await thread.stop()
    assert seen[0] != threading.current_thread().name
    assert seen[1] == {cpu}
    # Linux's affinity is per thread: the caller's loop thread is where it was.
    assert os.sched_getaffinity(0) == before
