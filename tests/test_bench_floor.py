"""bench floor's parts do what its path needs: frames come off a socket whole however the bytes
arrive, and the relay passes the client's bytes to the worker and the engine thread's to the
client, unchanged, once all three have connected."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import pytest

from bench.floor import _READY, Frames, _connect, frame, parse, relay

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
