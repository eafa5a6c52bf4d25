"""bench/schedstat.py: a process tree's CPU time by group, from Linux's per-thread schedstat."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import schedstat

pytestmark = pytest.mark.skipif(not schedstat.available(), reason="no /proc schedstat here")

# Burns 50 ms of its own CPU time (not wall time), says so, then waits for its stdin to close.
_BURN = (
    "import sys, time\n"
    "t = time.thread_time()\n"
    "while time.thread_time() - t < 0.05: pass\n"
    "print('done', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_child_s_cpu_time_counts_in_its_group_and_nothing_else_does() -> None:
    me = os.getpid()
    child = subprocess.Popen([sys.executable, "-c", _BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        # The walk starts at the child's parent (this process) and finds it as a descendant.
        group = lambda pid, tid: "child" if pid == child.pid else ("me" if pid == me else None)  # noqa: E731
        before = schedstat.tree(me, group)
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        after = schedstat.tree(me, group)
        used = schedstat.delta_ms(before, after)
        run, wait = used["child"]
        assert run >= 45.0 and wait >= 0.0  # its 50 ms of CPU, however the machine is loaded
        assert set(used) <= {"child", "me"}
    finally:
        child.communicate("")


def test_mesh_grouping_names_services_by_command_and_splits_the_pinned_engine_thread() -> None:
    cpu = min(os.sched_getaffinity(0))
    group = schedstat.mesh_grouping({cpu})
    # This process is no service: its executable's name.
    assert group(os.getpid(), os.getpid()) == os.path.basename(sys.executable)
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()", "worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Running its own command line (until its exec, /proc shows the parent's or nothing).
        assert sleeper.stdout is not None and sleeper.stdout.readline().strip() == "up"
        os.sched_setaffinity(sleeper.pid, {cpu})
        engine = schedstat.mesh_grouping({cpu})(sleeper.pid, sleeper.pid)
        others = set(os.sched_getaffinity(0)) - {cpu}
        if others:
            os.sched_setaffinity(sleeper.pid, others)
            assert schedstat.mesh_grouping({cpu})(sleeper.pid, sleeper.pid) == "worker, other threads"
        assert engine == "worker engine thread"
        assert schedstat.mesh_grouping(())(sleeper.pid, sleeper.pid) == "worker"
    finally:
        sleeper.communicate("")


def test_delta_ms_counts_groups_that_appear_between_readings() -> None:
    assert schedstat.delta_ms({"a": (1_000_000, 0)}, {"a": (3_000_000, 500_000), "b": (2_000_000, 0)}) == {
        "a": (2.0, 0.5),
        "b": (2.0, 0.0),
    }
