"""bench floor's parts do what its path needs: frames come off a socket whole however the bytes
arrive, and the relay passes the client's bytes to the worker and the engine thread's to the
client, unchanged, once all three have connected."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.floor import _READY, Frames, _connect, frame, measure, parse, relay
from cascade.config import GenerateSpec
from cascade.models.generate import generate_model

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's")


def test_frames_are_read_whole_from_bytes_split_anywhere() -> None:
    a, b = socket.socketpair()
    with a, b:
        wire = frame(b"first") + frame(b"") + frame(b"x" * 70_000)
        reader = Frames(b)
        done = threading.Event()

        def trickle() -> None:
            for i in range(0, len(wire), 7_001):
                a.sendall(wire[i : i + 7_001])
            done.set()

        t = threading.Thread(target=trickle)
        t.start()
        assert [reader.next(), reader.next(), reader.next()] == [b"first", b"", b"x" * 70_000]
        t.join()
        a.close()
        with pytest.raises(ConnectionError):
            reader.next()


@linux
def test_the_relay_passes_bytes_both_ways_once_all_three_are_connected() -> None:
    name = f"cascade-floor-test-{os.getpid()}"
    t = threading.Thread(target=relay, args=(name,), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while f"@{name}" not in open("/proc/net/unix").read():
        assert time.monotonic() < deadline, "the relay did not bind"
        time.sleep(0.01)
    client = _connect(name, b"C")
    requests = _connect(name, b"R")
    tokens = _connect(name, b"T")
    try:
        assert client.recv(1) == _READY
        client.sendall(frame(b'{"id": "r1"}'))
        assert Frames(requests).next() == b'{"id": "r1"}'
        tokens.sendall(frame(b"[0.1, []]"))
        assert Frames(client).next() == b"[0.1, []]"
    finally:
        client.close()
        t.join(10)
        requests.close()
        tokens.close()
    assert not t.is_alive()  # the client's close ends it


def test_what_cannot_be_measured_is_refused_with_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--requests", "1"])
    assert e.value.code == 2 and "--requests must be at least 2" in capsys.readouterr().err


@linux
def test_the_floor_runs_its_pairs_through_real_processes_and_the_engine(tmp_path: Path) -> None:
    """Two pairs on a small generated model: each request's tokens come back through the relay,
    its steps are read from the worker, and both variants (a send per step, the last only) and the
    in-process engine give their figures; the relay and worker are gone after."""
    folder = tmp_path / "model"
    generate_model(folder, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=1))
    got = measure(folder, 2, 3, 4, 1, frozenset(), progress=False)
    assert got["pairs"] == 2 and got["floor_ms"]["n"] == 2 and got["inprocess_ms"]["n"] == 2
    assert got["floor_ms"]["p50"] > 0 and got["inprocess_ms"]["p50"] > 0
    assert got["steps_ms_per_request"]["floor"] > 0 and got["steps_ms_per_request"]["inprocess"] > 0
    assert got["last_only_added_same_steps_ms"]["n"] == 2
    assert not [p for p in _children() if "bench.floor" in " ".join(p)]


def _children() -> list[list[str]]:
    """Command lines of this process's children (from /proc: no psutil here)."""
    me = str(os.getpid())
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            if stat.rsplit(")", 1)[1].split()[1] != me:
                continue
            out.append(open(f"/proc/{pid}/cmdline").read().split("\0"))
        except OSError:
            continue
    return out
