"""Where a process tree's CPU went, from Linux's per-thread scheduler statistics.

`/proc/<pid>/task/<tid>/schedstat` holds, per thread, the nanoseconds it ran and the nanoseconds
it waited runnable on a run queue (kernels with schedstats, which every distribution's has).
Taken around one request, the first is what each process spent on it, which the machine's
other load does not change; the second is time a thread was ready and could not run, which is
how contention for the cores shows: for the engine thread, any of it is added to the request's
latency. Elsewhere than Linux the readings are empty and the callers print nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

Reading = dict[str, tuple[int, int]]  # group → (ns run, ns waited on a run queue)

_PROC = Path("/proc")


def available() -> bool:
    return (_PROC / "self" / "task" / str(threading.get_native_id()) / "schedstat").exists()


def _thread(pid: int, tid: int) -> tuple[int, int] | None:
    try:
        run, wait, _ = (int(x) for x in (_PROC / str(pid) / "task" / str(tid) / "schedstat").read_text().split())
    except (OSError, ValueError):
        return None  # gone meanwhile, or no schedstats
    return run, wait


def this_thread() -> tuple[int, int]:
    return _thread(os.getpid(), threading.get_native_id()) or (0, 0)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in (_PROC / str(pid) / "task" / str(pid) / "children").read_text().split()]
    except (OSError, ValueError):
        return []


def tree(root: int, group: Callable[[int, int], str | None]) -> Reading:
    """Every thread of `root` and its descendants, summed by `group(pid, tid)` (None: left out)."""
    out: dict[str, list[int]] = {}
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            tids = [int(t) for t in os.listdir(_PROC / str(pid) / "task")]
        except OSError:
            continue
        for tid in tids:
            key = group(pid, tid)
            got = _thread(pid, tid) if key is not None else None
            if key is None or got is None:
                continue
            acc = out.setdefault(key, [0, 0])
            acc[0] += got[0]
            acc[1] += got[1]
        todo += _children(pid)
    return {k: (v[0], v[1]) for k, v in out.items()}


def delta_ms(before: Reading, after: Reading) -> dict[str, tuple[float, float]]:
    """(ms run, ms waited) per group between two readings."""
    out = {}
    for k, (run, wait) in after.items():
        r0, w0 = before.get(k, (0, 0))
        out[k] = ((run - r0) / 1e6, (wait - w0) / 1e6)
    return out


def mesh_grouping(engine_cpus: Iterable[int]) -> Callable[[int, int], str | None]:
    """Group a `cascade up` tree's threads by service (the CLI command in the process's command
    line; nats-server by name) and the worker's engine thread apart: it is the one pinned to
    `engine_cpus` (the worker's `--cpus`). Without pinning it cannot be told apart and the
    worker counts whole."""
    pinned = set(engine_cpus)
    names: dict[int, str] = {}

    def group(pid: int, tid: int) -> str | None:
        name = names.get(pid)
        if name is None:
            try:
                argv = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
            except OSError:
                return None
            words = [a.decode(errors="replace") for a in argv]
            cmd = next((w for w in words if w in ("gateway", "worker", "scaler", "loader", "up")), None)
            name = cmd if cmd is not None else os.path.basename(words[0]) if words and words[0] else "?"
            if name != "?":
                names[pid] = name  # an empty command line (a process not yet exec'd) is read again
        if name == "worker" and pinned:
            try:
                return "worker engine thread" if os.sched_getaffinity(tid) == pinned else "worker, other threads"
            except OSError:
                return None
        return name

    return group
