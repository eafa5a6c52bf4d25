"""What one hop between two of the mesh's processes costs on this machine, with nothing of the
mesh in it: the floor under `bench serve`'s added latency.

A streamed request crosses four process hops (client → gateway → worker, engine thread → gateway
→ client) and one thread hop (the worker's loop → its engine thread) before its last token is
out, and the engine thread pays a `send` after every step. Each is measured here bare: a message
over a Unix socket from a process pinned to one CPU to a process blocked in `epoll` on another
(one-way, by `CLOCK_MONOTONIC` stamps, which every process shares on Linux); the `send` call's own
time in the sender; and a `threading.Event` set from one thread to a thread waiting on another
CPU. Each sender either sleeps between messages (an idle mesh) or computes a torch burst shaped
like a decode step (`--burst-mb` of weights, one thread), which leaves the CPU's caches full of
weights when the `send` runs, as in the engine thread.

    cascade bench hops                  writes bench/results/hops.{md,json}
    cascade bench hops --messages 100   a short run

Linux only (CPU pinning, `fork`); it needs two CPUs.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any

from bench.common import md_table, result_header, shown, write_result

_STAMP = struct.Struct("q")
_MESSAGE = 64  # bytes: a stamp and padding, about a one-token frame's size class


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench hops", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=400, help="messages per measurement (default 400)")
    p.add_argument("--gap-ms", type=float, default=12.0, help="time between two messages, idle (default 12: a step)")
    p.add_argument("--burst-mb", type=float, default=96.0, help="weights a burst streams through (default 96)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--out", default="hops", help="result name under bench/results (default hops)")
    a = p.parse_args(argv)
    if a.messages < 10 or a.gap_ms < 0 or a.burst_mb <= 0:
        p.error("--messages must be at least 10, --gap-ms at least 0 and --burst-mb above 0")
    return a


def _burst_fn(mb: float) -> Any:
    import torch

    torch.set_num_threads(1)
    n = max(1, int(mb * 1e6 / (512 * 3072 * 4)))
    weights = [torch.randn(512, 3072) for _ in range(n)]
    x = torch.randn(1, 512)

    def burst() -> None:
        for w in weights:
            x @ w

    return burst


def _summary_us(ns: list[int]) -> dict[str, float]:
    qs = statistics.quantiles(ns, n=10)
    return {"p50": statistics.median(ns) / 1e3, "p10": qs[0] / 1e3, "p90": qs[8] / 1e3}


def process_hop(cpus: tuple[int, int], messages: int, between: Any) -> tuple[list[int], list[int]]:
    """(one-way latencies, the sender's `send` times) in ns, receiver on cpus[0] in epoll."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the receiver
        try:
            a.close()
            os.close(r)
            os.sched_setaffinity(0, {cpus[0]})
            ep = select.epoll()
            ep.register(b.fileno(), select.EPOLLIN)
            got = bytearray()
            while True:
                ep.poll()
                t = time.perf_counter_ns()
                d = b.recv(_MESSAGE, socket.MSG_WAITALL)
                if len(d) < _MESSAGE:
                    break
                got += _STAMP.pack(t - _STAMP.unpack_from(d)[0])
            with os.fdopen(w, "wb") as f:
                f.write(bytes(got))
        finally:
            os._exit(0)
    b.close()
    os.close(w)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[1]})
    sends = []
    try:
        pad = b"x" * (_MESSAGE - _STAMP.size)
        for _ in range(messages):
            between()
            t = time.perf_counter_ns()
            a.send(_STAMP.pack(t) + pad)
            sends.append(time.perf_counter_ns() - t)
    finally:
        a.close()
        os.sched_setaffinity(0, before)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    return [_STAMP.unpack_from(raw, i)[0] for i in range(0, len(raw), _STAMP.size)], sends


def thread_hop(cpus: tuple[int, int], messages: int, between: Any) -> list[int]:
    """One-way latency in ns of `Event.set` on cpus[1] to the waiter's return on cpus[0]."""
    ev, done = threading.Event(), threading.Event()
    stamp = [0]
    out: list[int] = []

    def waiter() -> None:
        os.sched_setaffinity(0, {cpus[0]})
        while True:
            ev.wait()
            t = time.perf_counter_ns()
            ev.clear()
            if stamp[0] < 0:
                return
            out.append(t - stamp[0])
            done.set()

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[1]})
    try:
        for _ in range(messages):
            between()
            done.clear()
            stamp[0] = time.perf_counter_ns()
            ev.set()
            done.wait(5)
    finally:
        stamp[0] = -1
        ev.set()
        th.join(5)
        os.sched_setaffinity(0, before)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not sys.platform.startswith("linux"):
        print("bench hops needs Linux (CPU pinning, fork)", file=sys.stderr)
        return 2
    cpus_all = sorted(os.sched_getaffinity(0))
    if len(cpus_all) < 2:
        print("bench hops needs two CPUs", file=sys.stderr)
        return 2
    cpus = (cpus_all[0], cpus_all[-1])  # receiver, sender: the gateway's and the pinned engine's
    burst = _burst_fn(a.burst_mb)
    t0 = time.perf_counter()
    burst()
    burst_ms = (time.perf_counter() - t0) * 1e3

    def idle() -> None:
        time.sleep(a.gap_ms / 1e3)

    rows: dict[str, dict[str, Any]] = {}
    for name, between in (("idle", idle), ("after a burst", burst)):
        print(f"process hop, sender {name} …", flush=True)
        lat, sends = process_hop(cpus, a.messages, between)
        rows[f"process → process, sender {name}"] = {"one_way_us": _summary_us(lat), "send_us": _summary_us(sends)}
        print(f"thread hop, setter {name} …", flush=True)
        waits = thread_hop(cpus, a.messages, between)
        rows[f"thread → thread (Event), setter {name}"] = {"one_way_us": _summary_us(waits)}
    table_rows = [
        [
            k,
            f"{v['one_way_us']['p50']:.0f}",
            f"{v['one_way_us']['p10']:.0f}-{v['one_way_us']['p90']:.0f}",
            f"{v['send_us']['p50']:.0f}" if "send_us" in v else "",
        ]
        for k, v in rows.items()
    ]
    table = (
        f"# One hop between two processes (`python -m cascade.cli bench hops`)\n\n"
        f"Receiver on CPU {cpus[0]} blocked in epoll, sender pinned to CPU {cpus[1]}; {a.messages} messages of "
        f"{_MESSAGE} bytes, {a.gap_ms:g} ms apart when idle; a burst streams {a.burst_mb:g} MB of float32 weights "
        f"through one torch thread ({burst_ms:.1f} ms here).\n\n"
        + md_table(["hop", "one-way p50 µs", "p10-p90 µs", "the sender's send p50 µs"], table_rows)
    )
    print(table)
    if not a.no_write:
        doc = {
            **result_header("hops"),
            "parameters": {
                "messages": a.messages,
                "gap_ms": a.gap_ms,
                "burst_mb": a.burst_mb,
                "burst_ms": burst_ms,
                "receiver_cpu": cpus[0],
                "sender_cpu": cpus[1],
                "message_bytes": _MESSAGE,
            },
            "emulated": "nothing: real processes, sockets and torch compute",
            "hops": rows,
        }
        for path in write_result(a.out, doc, table):
            print(f"wrote {shown(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
