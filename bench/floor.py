"""The request path's floor on this machine: the mesh's topology and its engine, with none of the
mesh's own code on the path.

`bench serve` reads what the mesh adds to a request against the engine called in-process. This
builds the same path from bare parts, in processes placed as the mesh's are: a client (this
process), a relay standing for the gateway, and a worker whose main thread admits requests and
whose engine thread, pinned to the engine's CPU as in the mesh, steps the same `Engine` on the same
model and sends each step's tokens straight to the relay, which passes the bytes on to the client.
Frames are a length and a JSON body, read with blocking sockets: no HTTP, no validation, no
routing, no NATS, no event loop, no frame parsed by the relay. A request crosses four process
hops (client → relay → worker, engine thread → relay → client), one thread hop (the worker's
main thread → its engine thread) and one `send` after each step, as through the mesh, with the
least Python a path with those hops can run.

Requests alternate with the same request through the engine in-process (bench/serve.py's, pinned
to the same CPU), and each pair's added latency is read raw and less its own steps' difference (the
worker's time inside `Engine.step`, sent with each request's last tokens), as `bench serve` reads
the mesh's.

    cascade bench floor                    writes bench/results/floor.{md,json}
    cascade bench floor --requests 20 --no-write

Linux only (CPU pinning, abstract Unix sockets).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import md_table, result_header, shown, summary, write_result

_LEN = struct.Struct("!I")
_READY = b"!"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=120, help="paired requests (default 120)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16, as bench serve's pairs)")
    p.add_argument("--max-batch", type=int, default=32, help="the engines' max batch (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each engine (default 1)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--out", default="floor", help="result name under bench/results (default floor)")
    # The other processes' roles (this module started again as them).
    p.add_argument("--role", choices=("relay", "worker"), help=argparse.SUPPRESS)
    p.add_argument("--sock", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--engine-cpu", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.requests < 2 or a.max_tokens < 1:
        p.error("--requests must be at least 2 and --max-tokens at least 1")
    return a


def frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


class Frames:
    """Length-prefixed frames read off a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next(self) -> bytes:
        while True:
            if len(self.buf) >= 4:
                (n,) = _LEN.unpack_from(self.buf)
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    return body
            got = self.sock.recv(65536)
            if not got:
                raise ConnectionError("the peer closed the connection")
            self.buf += got


def _connect(name: str, role: bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\0" + name)
    s.sendall(role)
    return s


# ---- the relay (the gateway's place) -------------------------------------------------------------
def relay(name: str) -> None:
    """Accept the client (C), the worker's request connection (R) and its engine thread's token
    connection (T); then pass the client's bytes to R and T's bytes to the client, unparsed."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind("\0" + name)
    lsock.listen(4)
    peers: dict[bytes, socket.socket] = {}
    while len(peers) < 3:
        conn, _ = lsock.accept()
        peers[conn.recv(1)] = conn
    client, requests, tokens = peers[b"C"], peers[b"R"], peers[b"T"]
    client.sendall(_READY)
    sel = selectors.DefaultSelector()
    sel.register(client, selectors.EVENT_READ, requests)
    sel.register(tokens, selectors.EVENT_READ, client)
    while True:
        for key, _ in sel.select():
            data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            if not data:
                return
            key.data.sendall(data)


# ---- the worker ----------------------------------------------------------------------------------
def worker(name: str, folder: str, max_batch: int, threads: int, engine_cpu: int) -> None:
    from bench.serve import inprocess_engine
    from cascade.cpus import pin_current_thread
    from cascade.messages import SamplingParams

    engine, tok = inprocess_engine(Path(folder), max_batch, threads)
    requests = _connect(name, b"R")
    tokens = _connect(name, b"T")
    wake = threading.Event()
    quiet: set[str] = set()  # requests whose tokens go out with their last step only

    def engine_thread() -> None:
        import torch

        pin_current_thread(frozenset({engine_cpu}) if engine_cpu >= 0 else frozenset())
        torch.set_num_threads(threads)
        busy = 0.0
        while True:
            wake.wait()
            wake.clear()
            while engine.has_work():
                t0 = time.perf_counter()
                res = engine.step()
                busy += time.perf_counter() - t0
                rows = [
                    [ev.request_id, ev.token_ids, ev.text, ev.finish_reason]
                    for _, ev in res.events
                    if ev.finish_reason is not None or ev.request_id not in quiet
                ]
                if rows:
                    tokens.sendall(frame(orjson.dumps([busy, rows])))

    threading.Thread(target=engine_thread, daemon=True, name="engine").start()
    reader = Frames(requests)
    while True:
        try:
            r = orjson.loads(reader.next())
        except ConnectionError:
            return
        if not r["each_step"]:
            quiet.add(r["id"])
        engine.submit(
            r["id"], "floor", tok.encode(r["prompt"]), SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True)
        )
        wake.set()


# ---- the client, and the pairs ------------------------------------------------------------------
class FloorClient:
    def __init__(self, name: str) -> None:
        self.sock = _connect(name, b"C")
        if self.sock.recv(1) != _READY:
            raise ConnectionError("the relay did not come up")
        self.frames = Frames(self.sock)
        self.busy = 0.0
        self.n = 0

    def request(self, prompt: str, max_tokens: int, each_step: bool = True) -> dict[str, float]:
        """One request; `each_step` False: the worker sends its tokens with the last step only
        (what the sends after the other steps cost, by difference)."""
        self.n += 1
        rid = f"f{self.n}"
        t0 = time.perf_counter()
        body = {"id": rid, "prompt": prompt, "max_tokens": max_tokens, "each_step": each_step}
        self.sock.sendall(frame(orjson.dumps(body)))
        first = 0.0
        while True:
            busy, rows = orjson.loads(self.frames.next())
            done = False
            for got, _ids, text, finish in rows:
                if got != rid:
                    continue
                if text and not first:
                    first = time.perf_counter()
                done = done or finish is not None
            if done:
                end = time.perf_counter()
                steps, self.busy = busy - self.busy, busy
                return {"ttft": first - t0, "latency": end - t0, "steps": steps}


def run(a: argparse.Namespace) -> dict[str, Any]:
    """`cascade bench floor`'s run: the generated model, the engine CPU `bench serve` picks."""
    from cascade.config import GenerateSpec
    from cascade.cpus import available_cpus
    from cascade.models.generate import generate_model

    cpus = available_cpus()
    engine_cpus = frozenset({max(cpus)}) if len(cpus) >= 2 else frozenset()
    with tempfile.TemporaryDirectory(prefix="cascade-floor-") as scratch:
        folder = Path(scratch) / "model"
        generate_model(folder, GenerateSpec())
        return measure(folder, a.requests, a.max_tokens, a.max_batch, a.threads, engine_cpus)


def measure(
    folder: Path,
    requests: int,
    max_tokens: int,
    max_batch: int,
    threads: int,
    engine_cpus: frozenset[int],
    inprocess: tuple[Any, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`requests` pairs on the model in `folder`: the floor's path (each request twice: tokens
    after every step, and after the last step only) and the engine in-process, pinned to
    `engine_cpus` (its lowest; none: unpinned). `inprocess`: an (engine, tokenizer) already loaded
    from `folder` (`bench serve` has one), else one is loaded here."""
    from bench.serve import PROMPT, inprocess_engine, inprocess_request
    from cascade.cli.supervisor import die_with_parent_preexec

    engine_cpu = min(engine_cpus) if engine_cpus else -1
    pinned = frozenset({engine_cpu}) if engine_cpu >= 0 else frozenset()
    name = f"cascade-floor-{os.getpid()}"
    procs: list[subprocess.Popen[bytes]] = []
    me = [sys.executable, "-m", "bench.floor", "--sock", name]
    try:
        # Killed with this process too (Ctrl-C twice, SIGKILL): they would block forever.
        procs.append(subprocess.Popen([*me, "--role", "relay"], preexec_fn=die_with_parent_preexec()))
        _wait_listening(name, procs[0])
        knobs = ["--max-batch", str(max_batch), "--threads", str(threads), "--engine-cpu", str(engine_cpu)]
        procs.append(
            subprocess.Popen(
                [*me, "--role", "worker", "--folder", str(folder), *knobs], preexec_fn=die_with_parent_preexec()
            )
        )
        engine, tok = inprocess if inprocess is not None else inprocess_engine(folder, max_batch, threads)
        client = FloorClient(name)
        for _ in range(3):  # warm both
            client.request(PROMPT, max_tokens)
            inprocess_request(engine, tok, PROMPT, max_tokens, pinned)
        floor: list[dict[str, float]] = []
        quiet: list[dict[str, float]] = []
        local: list[dict[str, float]] = []
        for i in range(requests):
            # The two kinds take turns at going first (the one right after the in-process
            # request finds the caches holding the other process's weights).
            for each_step in (True, False) if i % 2 == 0 else (False, True):
                (floor if each_step else quiet).append(client.request(PROMPT, max_tokens, each_step))
            local.append(inprocess_request(engine, tok, PROMPT, max_tokens, pinned))
            if progress and (i + 1) % 20 == 0:
                print(f"  {i + 1}/{requests} pairs", flush=True)
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()

    def added(xs: list[dict[str, float]], key: str = "latency", same_steps: bool = False) -> dict[str, float]:
        return summary(
            [
                (f[key] - lo[key] - ((f["steps"] - lo["steps"]) if same_steps else 0.0)) * 1e3
                for f, lo in zip(xs, local, strict=True)
            ]
        )

    return {
        "pairs": requests,
        "max_tokens": max_tokens,
        "engine_cpu": engine_cpu,
        "floor_ms": summary([f["latency"] * 1e3 for f in floor]),
        "inprocess_ms": summary([lo["latency"] * 1e3 for lo in local]),
        "added_ms": added(floor),
        "added_ttft_ms": added(floor, "ttft"),
        "added_same_steps_ms": added(floor, same_steps=True),
        # The same requests with their tokens sent after the last step only: the other steps'
        # sends cost the difference.
        "last_only_added_same_steps_ms": added(quiet, same_steps=True),
        "steps_ms_per_request": {
            "floor": sum(f["steps"] for f in floor + quiet) / len(floor + quiet) * 1e3,
            "inprocess": sum(lo["steps"] for lo in local) / len(local) * 1e3,
        },
    }


def _wait_listening(name: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """The relay's socket is bound (it is abstract: read /proc/net/unix, polled with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the relay exited with {proc.returncode}")
        if f"@{name}" in Path("/proc/net/unix").read_text():
            return
        time.sleep(0.05)
    raise RuntimeError("the relay did not bind its socket in time")


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.role == "relay":
        relay(a.sock)
        return 0
    if a.role == "worker":
        worker(a.sock, a.folder, a.max_batch, a.threads, a.engine_cpu)
        return 0
    if not sys.platform.startswith("linux"):
        print("bench floor needs Linux (CPU pinning, abstract Unix sockets)", file=sys.stderr)
        return 2
    print(f"floor: {a.requests} pairs of {a.max_tokens}-token requests …", flush=True)
    r = run(a)
    rows = [
        ["the floor's path, end to end", r["floor_ms"]["p50"], r["floor_ms"]["p99"]],
        ["engine in-process", r["inprocess_ms"]["p50"], r["inprocess_ms"]["p99"]],
        ["added latency per request", r["added_ms"]["p50"], r["added_ms"]["p99"]],
        [
            "added latency less each pair's steps' difference",
            r["added_same_steps_ms"]["p50"], r["added_same_steps_ms"]["p99"],
        ],
        ["added time to first token", r["added_ttft_ms"]["p50"], r["added_ttft_ms"]["p99"]],
        [
            "added latency less the steps' difference, tokens sent after the last step only",
            r["last_only_added_same_steps_ms"]["p50"], r["last_only_added_same_steps_ms"]["p99"],
        ],
    ]  # fmt: skip
    table = (
        "# The request path's floor (`python -m cascade.cli bench floor`)\n\n"
        f"The mesh's hops with none of its code: {a.requests} pairs of {a.max_tokens}-token requests, each through "
        f"client → relay → worker → its engine thread (CPU {r['engine_cpu']}) → relay → client and through the engine "
        "in-process on the same CPU, one after the other.\n\n"
        + md_table(["per request", "p50 ms", "p99 ms"], rows)
        + f"\nThe steps alone, per request (mean): {r['steps_ms_per_request']['floor']:.2f} ms in the worker, "
        f"{r['steps_ms_per_request']['inprocess']:.2f} ms in-process.\n"
    )
    print(table)
    if not a.no_write:
        doc = {
            **result_header("floor"),
            "parameters": {
                "requests": a.requests,
                "max_tokens": a.max_tokens,
                "max_batch": a.max_batch,
                "threads": a.threads,
                "model": "cascade-tiny (generated, cascade.config.GenerateSpec defaults)",
            },
            "emulated": "nothing: real processes, sockets and the worker's Engine on torch",
            **r,
        }
        for path in write_result(a.out, doc, table):
            print(f"wrote {shown(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
