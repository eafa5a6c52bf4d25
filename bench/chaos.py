"""`cascade bench chaos`: faults under load, and what clients see.

A whole `cascade up` mesh on the emulated accelerator (steps padded to a device profile's time,
disk loads and parameter sends paced) serves a window of the Azure LLM code trace replayed open
loop (or, with --clients, closed-loop streaming clients) while, one window at a time, a fault is
injected: SIGKILL of a serving worker, of a worker receiving a multicast (a scale-up is asked
first), of a worker serving as a stage of a partial route (a scale-up under load, with a burst that
fills the serving instances; the bench reads the gateway's dispatches and the workers' answers,
and kills the head of the first partial route accepted by a worker still loading, the moment it
accepts it: it drives the route then), of the loader, the
scaler, the gateway (clients retry a refused connection), and of the NATS server (`cascade up`
restarts every one of them). The mesh keeps `--spare` idle workers beyond the most instances the
faults ask for, as a deployment keeps spare capacity: a killed worker's replacement is then a
load onto an idle worker, not the killed process restarted and loaded again.

Per fault: requests accepted (the gateway answered with a status), completed (every token,
`[DONE]`), of those the gateway migrated (its `migrations_total` over the window), failed with an
explicit error (an HTTP error status, an error chunk, or a connection cut mid-stream, which a
client sees), lost (a stream that ended cleanly without its final chunk or short of tokens) and
hung (no end within the request deadline); both must be 0. Recovery: from the fault until the
mesh serves at full capacity again, i.e. the target count of instances serving (by heartbeats
heard in the last three intervals) and a request sent after the fault completed (a probe is sent
at the kill, so a pause in the trace's arrivals does not count); `capacity` is
the first part alone. Per worker fault, the scale decisions, acks and transfer plans that followed
it are recorded with their times: where the recovery went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from nats.aio.client import Client as NATS

from bench.common import md_table, result_header, sse_events, write_result
from bench.mesh import Mesh
from bench.tracelib import (
    DEFAULT_TRACE,
    LICENCE,
    Arrival,
    ScheduleSpec,
    TraceError,
    build_schedule,
    load_trace,
    missing_trace,
    prompt_ids,
)
from cascade.config import GenerateSpec, read_mesh_file
from cascade.device_profile import load_profile
from cascade.messages import (
    BatchReply,
    GenerateBatch,
    Heartbeat,
    LayerReady,
    MessageError,
    Ok,
    ScaleAck,
    ScaleDecision,
    ScaleRequest,
    TransferPlanned,
    decode,
)
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.natsutil import request
from cascade.subjects import Subjects

MODEL = "chaos-model"
HEARTBEAT_S = 0.5
# Scale-ups the stage fault may take before a partial route runs through a loading head.
STAGE_ATTEMPTS = 3
# The stage fault first: on the first scale-up the serving instances are few enough for its burst to
# fill them and shed front layers onto the loading head; later in the run (more instances, the
# trace elsewhere) a link-pace load often ends before any partial route runs through it.
FAULTS = ("worker_stage", "worker_serving", "worker_multicast", "loader", "scaler", "gateway", "nats")
SCALE_UP_FAULTS = ("worker_multicast", "worker_stage")  # each asks for one more instance first


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", default=",".join(FAULTS), help=f"faults in order (default: all: {','.join(FAULTS)})")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: the most instances the faults ask for, plus --spare)",
    )
    p.add_argument(
        "--spare",
        type=int,
        default=1,
        help="idle workers kept beyond the most instances asked for (default 1, as a deployment keeps spare "
        "capacity: a killed worker's replacement is then a multicast onto an idle worker, not a process "
        "restart and a load; 0 to measure the restart)",
    )
    p.add_argument("--replicas", type=int, default=2, help="instances serving before the scale-up faults (default 2)")
    p.add_argument(
        "--clients",
        type=int,
        default=0,
        help="closed-loop streaming clients instead of the trace replay (default 0: replay the trace)",
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help=f"trace CSV to replay (default {DEFAULT_TRACE})")
    p.add_argument(
        "--trace-start", type=float, default=180.0, help="replay from this many trace seconds (default 180: a burst)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=16.0,
        help="the trace's arrivals compressed in time to this mean rate, requests/s (default 16: its bursts "
        "then fill the instances)",
    )
    p.add_argument("--max-prompt", type=int, default=256, help="cap on a replayed prompt's tokens (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the replayed prompts (default 0)")
    p.add_argument(
        "--max-tokens", type=int, default=24, help="tokens per request (caps the trace's output lengths; default 24)"
    )
    p.add_argument("--max-batch", type=int, default=4, help="each worker's batch limit (default 4)")
    p.add_argument("--profile", default="llama2-7b-a100-80gb", help="device profile to emulate")
    p.add_argument(
        "--load-s",
        type=float,
        default=3.0,
        help="emulated time to load the model on one instance (default 3: slow enough that a worker can be "
        "caught mid-multicast and as the loading stage of a partial route; 0.54 is the profile's 13.5 GB at "
        "25 GB/s, bench burst's link, for recovery at that pace)",
    )
    p.add_argument("--window-s", type=float, default=12.0, help="load before and after each fault, at least (s)")
    p.add_argument("--recover-timeout-s", type=float, default=60.0, help="give up waiting for full capacity after")
    p.add_argument("--request-deadline-s", type=float, default=60.0, help="a request with no end by then is hung")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the real (small) model")
    p.add_argument("--no-write", action="store_true")
    p.add_argument(
        "--out", default="chaos", help="result name under bench/results (default chaos: chaos.json and chaos.md)"
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    started: float
    ended: float = float("nan")
    kind: str = "hung"  # completed | error_status | error_chunk | cut | lost | hung
    status: int = 0
    tokens: int = 0
    retries: int = 0  # connections refused before the gateway answered


CLOSED_LOOP_PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


async def one_request(
    http: aiohttp.ClientSession,
    base: Any,
    max_tokens: int,
    deadline_s: float,
    headers: dict[str, str],
    prompt: list[int] = CLOSED_LOOP_PROMPT,
) -> Outcome:
    body = {
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    o = Outcome(started=time.monotonic())

    async def go() -> None:
        while True:
            try:
                async with http.post(f"{base()}/completions", json=body, headers=headers) as resp:
                    o.status = resp.status
                    if resp.status != 200:
                        await resp.read()
                        o.kind = "error_status"
                        return
                    await read_stream(resp, o, max_tokens)
                    return
            except aiohttp.ClientConnectorError:
                # The gateway is down (being restarted): not accepted yet, try again.
                o.retries += 1
                await asyncio.sleep(0.1)  # a client's retry back-off
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # The gateway died with the request: before its answer or mid-stream, the client knows.
                o.kind = "cut"
                return

    try:
        await asyncio.wait_for(go(), deadline_s)
    except TimeoutError:
        o.kind = "hung"
    o.ended = time.monotonic()
    return o


async def read_stream(resp: aiohttp.ClientResponse, o: Outcome, max_tokens: int) -> None:
    done = finished = False
    usage = 0
    async for obj in sse_events(resp):
        if obj is None:
            done = True
            continue
        if "error" in obj:
            o.kind = "error_chunk"
            return
        for ch in obj.get("choices") or []:
            if ch.get("finish_reason"):
                finished = True
        if obj.get("usage"):
            usage = int(obj["usage"].get("completion_tokens", 0))
    o.tokens = usage
    o.kind = "completed" if done and finished and usage == max_tokens else "lost"


# --------------------------------------------------------------------------- the mesh as seen


@dataclass
class Watch:
    beats: dict[str, tuple[float, Heartbeat]] = field(default_factory=dict)
    # Units announced per worker since its last reset (readiness events come as each unit lands,
    # sooner than the next heartbeat: a fast transfer is caught mid-way here).
    units: dict[str, set[int]] = field(default_factory=dict)
    num_units: int = 0
    # Every heartbeat of a worker not serving: what a scale-up fault saw when its moment never came.
    not_serving: list[Heartbeat] = field(default_factory=list)
    arrival: dict[str, list[int]] = field(default_factory=dict)  # units in the order announced
    # Partial routes as the gateway dispatches them (its GenerateBatch to the route's head names
    # every stage): request id → the loading worker heading it.
    partial: dict[str, str] = field(default_factory=dict)
    asked: dict[str, list[str]] = field(default_factory=dict)  # reply inbox → partial-route requests
    # The first partial route a head still loading accepted: (time, head, its units ready then).
    stage_running: tuple[float, str, int] | None = None
    stage_seen: asyncio.Event = field(default_factory=asyncio.Event)
    # The control plane's answers, timed: (monotonic time, kind, fields) for decisions, acks, plans.
    control: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)

    def receiving(self) -> list[Heartbeat]:
        """Workers part-way through receiving the model (some units, not all, not serving)."""
        out = []
        for w, got in self.units.items():
            seen = self.beats.get(w)
            if seen is None or seen[1].state == "serving":
                continue
            if 0 < len(got) < self.num_units:
                out.append(seen[1])
        return out

    async def attach(self, nc: NATS, s: Subjects) -> None:
        async def on_beat(msg: Any) -> None:
            with contextlib.suppress(MessageError):
                hb = decode(msg.data, Heartbeat)
                old = self.beats.get(hb.worker_id)
                if old is not None and old[1].pid != hb.pid:
                    self.units.pop(hb.worker_id, None)  # restarted: it holds nothing of before
                self.beats[hb.worker_id] = (time.monotonic(), hb)
                if hb.state != "serving":
                    self.not_serving.append(hb)

        async def on_ready(msg: Any) -> None:
            with contextlib.suppress(MessageError):
                ev = decode(msg.data, LayerReady)
                if ev.reset:
                    self.units.pop(ev.worker_id, None)
                elif ev.model == MODEL:
                    self.num_units = ev.num_units
                    self.units.setdefault(ev.worker_id, set()).add(ev.unit)
                    self.arrival.setdefault(ev.worker_id, []).append(ev.unit)

        async def on_generate(msg: Any) -> None:
            with contextlib.suppress(MessageError):
                batch = decode(msg.data, GenerateBatch)
                for r in batch.requests:
                    head = r.route[0].worker_id if len(r.route) > 1 else ""
                    got = len(self.units.get(head, ()))
                    # Still loading by its readiness events (a heartbeat may be half an interval old).
                    if r.model == MODEL and head and 0 < got < self.num_units:
                        self.partial[r.request_id] = head
                        if msg.reply:
                            self.asked.setdefault(msg.reply, []).append(r.request_id)

        async def on_reply(msg: Any) -> None:
            rids = self.asked.pop(msg.subject, None)
            if rids is None or self.stage_running is not None:
                return
            with contextlib.suppress(MessageError):
                accepted = set(decode(msg.data, BatchReply).accepted) & set(rids)
                if accepted:
                    head = self.partial[min(accepted)]
                    self.stage_running = (time.monotonic(), head, len(self.units.get(head, ())))
                    self.stage_seen.set()

        async def on_control(msg: Any) -> None:
            now = time.monotonic()
            with contextlib.suppress(MessageError):
                if msg.subject == s.scale_decision():
                    d = decode(msg.data, ScaleDecision)
                    self.control.append((now, "decision", {"id": d.decision_id, "action": d.action,
                                                           "count": d.count, "avoid": d.avoid}))  # fmt: skip
                elif msg.subject == s.scale_ack():
                    a = decode(msg.data, ScaleAck)
                    self.control.append((now, "ack", {"id": a.decision_id, "ok": a.ok, "workers": a.workers,
                                                      "error": a.error[:160]}))  # fmt: skip
                else:
                    p = decode(msg.data, TransferPlanned)
                    chains = [f"{c.source} -> {' -> '.join(c.targets)}" for c in p.chains]
                    self.control.append((now, "plan", {"id": p.decision_id, "mode": p.mode, "chains": chains,
                                                       "replan": bool(p.replaces)}))  # fmt: skip

        await nc.subscribe(s.heartbeat_all(), cb=on_beat)
        await nc.subscribe(s.ready_all(), cb=on_ready)
        # The gateway's dispatches: each names its route (a plain subscriber gets a copy of each
        # request to a worker; it answers nothing).
        await nc.subscribe(f"{s.prefix}.worker.*.generate", cb=on_generate)
        # And the heads' answers (nats-py's request inboxes): a partial route runs once its head
        # accepted the request, i.e. drives it. Subscribed up front, so no answer can come first.
        await nc.subscribe("_INBOX.>", cb=on_reply)
        for subject in (s.scale_decision(), s.scale_ack(), s.transfer_plan()):
            await nc.subscribe(subject, cb=on_control)

    def idle(self) -> list[Heartbeat]:
        return [hb for hb in self.fresh() if hb.state == "idle"]

    def fresh(self) -> list[Heartbeat]:
        now = time.monotonic()
        return [hb for t, hb in self.beats.values() if now - t <= 3 * HEARTBEAT_S]

    def serving(self) -> list[Heartbeat]:
        return [
            hb
            for hb in self.fresh()
            if hb.model == MODEL and hb.state == "serving" and hb.units_ready == hb.num_units > 0
        ]


async def migrations(http: aiohttp.ClientSession, base: str) -> tuple[float, float]:
    """The gateway's counts of requests moved off a lost worker: (migrated: after tokens reached
    the client, `cascade:migrations_total`; re-sent: before any, `cascade_gateway_retries_total`
    for a worker or stage that stopped heart-beating or never answered the dispatch). (0, 0)
    when they cannot be read (the gateway is down)."""
    try:
        async with http.get(base.removesuffix("/v1") + "/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return 0.0, 0.0
    # The gateway names its metrics vLLM's way (`cascade:`, services/gateway/metrics.py); the bench
    # read `cascade_gateway_migrations_total` before, which matched nothing: 0 in every row.
    migrated = resent = 0.0
    for line in text.splitlines():
        if line.startswith("cascade:migrations_total{"):
            migrated += float(line.rsplit(" ", 1)[1])
        elif line.startswith("cascade_gateway_retries_total{") and ("stopped" in line or "neither accepted" in line):
            # Its worker (or a stage of its route) stopped heart-beating, or died before answering.
            resent += float(line.rsplit(" ", 1)[1])
    return migrated, resent


# --------------------------------------------------------------------------- faults


async def wait_for(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)  # polling heartbeats with a deadline
    return False


class Chaos:
    def __init__(self, a: argparse.Namespace, mesh: Mesh, nc: NATS, watch: Watch) -> None:
        self.a = a
        self.mesh = mesh
        self.nc = nc
        self.watch = watch
        self.s = Subjects(str(mesh.info.get("prefix", "cascade")))
        self.target = a.replicas
        self.killed: set[int] = set()  # worker pids killed: their last heartbeats do not count
        self.schedule: list[Arrival] = []  # the trace's arrivals, replayed in a loop across windows
        self.next_arrival = 0

    def pid(self, name: str) -> int:
        info = read_mesh_file(self.mesh.home) or {}
        return int(info["pids"][name])

    async def scale(self, n: int) -> None:
        self.target = n
        await request(self.nc, self.s.scale_request(), ScaleRequest(MODEL, n), Ok, timeout=10)

    async def inject(self, fault: str, send: Any) -> dict[str, Any]:
        """Inject the fault; returns what was done. `send(prompt, max_tokens)` adds a request to
        the window's load (the stage fault's burst)."""
        spare = sorted(hb.worker_id for hb in self.watch.idle())
        if fault == "worker_serving":
            # Under a trace's bursts the mesh may be idle at the scheduled moment: kill mid-request.
            await wait_for(lambda: any(hb.running > 0 for hb in self.watch.serving()), 30)
            busy = sorted(self.watch.serving(), key=lambda hb: -hb.running)
            victim = busy[0].worker_id
            self.killed.add(busy[0].pid)
            os.kill(busy[0].pid, signal.SIGKILL)
            return {"killed": victim, "running": busy[0].running, "idle_workers": spare}
        if fault in SCALE_UP_FAULTS:
            seen_from = len(self.watch.not_serving)
            burst = 0
            if fault == "worker_stage":
                self.watch.partial.clear()
                self.watch.stage_running = None
                self.watch.stage_seen.clear()
            await self.scale(self.target + 1)

            def loading() -> list[Heartbeat]:
                return [hb for hb in self.watch.fresh() if hb.model == MODEL and hb.state == "loading"]

            if fault == "worker_multicast":
                ok = await wait_for(lambda: bool(self.watch.receiving()), 30)
                cands = self.watch.receiving() or loading()
            else:
                # A scale-up is asked because the load rose: a burst as it goes out keeps the
                # serving instances busy (out of batch slots, prompts waiting) through the new
                # instance's load, so the gateway sheds the front layers of new requests onto it
                # (partial routes). The kill comes the moment one runs through it: a head still
                # loading (by its readiness) accepted a request of a partial route, so it drives it.
                # Sized to fill them, not to queue beyond: every batch slot of the instances
                # already serving (a backlog past that would only delay the first request sent
                # after the fault, which recovery waits for).
                burst = self.a.max_batch * (self.target - 1)
                for attempt in range(STAGE_ATTEMPTS):
                    for i in range(burst):
                        send(prompt_ids(self.a.max_prompt, self.a.seed + 1, attempt * burst + i), self.a.max_tokens)
                    # A partial route runs through the head while it loads, or not at all: waiting
                    # long past the load only moves the trace's replay on (and into its lulls).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.watch.stage_seen.wait(), max(5.0, 8 * self.a.load_s))
                    if self.watch.stage_running is not None or attempt == STAGE_ATTEMPTS - 1:
                        break
                    # The new instance finished loading before a partial route ran through it (a
                    # link-pace load is short, and the gateway may hold routes back while the busy
                    # instances have prefill queued): take it back and scale up again.
                    await self.scale(self.target - 1)
                    await wait_for(lambda: not loading() and len(self.watch.serving()) <= self.target, 30)
                    self.watch.partial.clear()
                    await self.scale(self.target + 1)
                what_attempts = attempt + 1
                ok = self.watch.stage_running is not None
                head = self.watch.stage_running[1] if self.watch.stage_running is not None else ""
                cands = [hb for _, hb in self.watch.beats.values() if hb.worker_id == head] or loading()
                if self.watch.stage_running is not None:
                    t_seen, _, units_then = self.watch.stage_running
                    seen_ms = round((time.monotonic() - t_seen) * 1000, 1)
            if not cands:
                beats = self.watch.not_serving[seen_from:]
                seen = sorted(
                    {
                        f"{hb.worker_id}:{hb.state}:units={hb.units_ready}:stage={bool(hb.stage_addr)}:driven={hb.driven}"
                        for hb in beats
                    }
                )
                arrived = {w: self.watch.arrival.get(w, []) for w in {hb.worker_id for hb in beats}}
                return {
                    "killed": None,
                    "note": "no loading worker seen",
                    "not_serving_beats": seen[:12],
                    "units_in_order": arrived,
                }
            hb = cands[0]
            routed = len(self.watch.partial)  # partial routes dispatched to a loading head so far
            self.killed.add(hb.pid)
            os.kill(hb.pid, signal.SIGKILL)
            what = {
                "killed": hb.worker_id, "units_ready": len(self.watch.units.get(hb.worker_id, ())),
                "num_units": self.watch.num_units, "condition_seen": ok,
            }  # fmt: skip
            if fault == "worker_stage":
                what["partial_routes_at_kill"] = routed
                what["attempts"] = what_attempts
                what["burst"] = burst
                if self.watch.stage_running is not None:
                    # Units it held when it accepted the route, and how long the kill took after.
                    what["units_at_accept"] = units_then
                    what["killed_ms_after_accept"] = seen_ms
            else:
                what["driven"] = hb.driven
            # Idle workers left for a replacement (the one the scale-up took is not one).
            what["idle_workers"] = sorted(w.worker_id for w in self.watch.idle())
            return what
        name = {"loader": "loader", "scaler": "scaler", "gateway": "gateway", "nats": "nats"}[fault]
        os.kill(self.pid(name), signal.SIGKILL)
        return {"killed": name}


async def run_fault(chaos: Chaos, fault: str, http: aiohttp.ClientSession, base: Any) -> dict[str, Any]:
    a = chaos.a
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    headers: dict[str, str] = {}

    async def client() -> None:
        while not stop.is_set():
            outcomes.append(await one_request(http, base, a.max_tokens, a.request_deadline_s, headers))

    in_flight: set[asyncio.Future[None]] = set()

    async def replay() -> None:
        """The trace's arrivals at their times (open loop: a slow mesh does not slow them)."""
        sched = chaos.schedule
        while not stop.is_set():
            i = chaos.next_arrival % len(sched)
            arr = sched[i]
            gap = arr.t - sched[i - 1].t if i > 0 else 0.0
            if gap > 0:
                await asyncio.sleep(gap)  # the arrival process itself, not a wait for a condition
            chaos.next_arrival += 1
            prompt = prompt_ids(min(arr.prompt_tokens, a.max_prompt), a.seed, chaos.next_arrival)
            out = min(arr.output_tokens, a.max_tokens)

            async def one(prompt: list[int] = prompt, out: int = out) -> None:
                outcomes.append(await one_request(http, base, out, a.request_deadline_s, headers, prompt))

            f = asyncio.ensure_future(one())
            in_flight.add(f)
            f.add_done_callback(in_flight.discard)

    def send(prompt: list[int], out: int) -> None:
        """One more request in this window, sent now (a fault's burst)."""

        async def one() -> None:
            outcomes.append(await one_request(http, base, out, a.request_deadline_s, headers, prompt))

        f = asyncio.ensure_future(one())
        in_flight.add(f)
        f.add_done_callback(in_flight.discard)

    mig0 = await migrations(http, base())
    if a.clients:
        clients = [asyncio.ensure_future(client()) for _ in range(a.clients)]
    else:
        clients = [asyncio.ensure_future(replay())]
    try:
        await asyncio.sleep(a.window_s / 3)  # steady load before the fault (the schedule itself)
        what = await chaos.inject(fault, send)
        t_fault = time.monotonic()  # the kill (after a scale-up fault's wait for its moment)
        # Requests sent and not answered in full yet: the backlog a request sent now waits behind.
        open_at_fault = len(in_flight) if not a.clients else a.clients
        if not a.clients:
            # A probe sent at the kill: recovery waits for a request sent after the fault, and the
            # trace's own arrivals may pause for seconds (its bursts), which is no part of it.
            probe_prompt = prompt_ids(min(64, a.max_prompt), a.seed + 2, chaos.next_arrival)

            async def probe() -> None:
                # The bench's instrument, not a client: a probe that went out on a pooled connection
                # to the gateway just killed is cut before any answer, and would leave recovery to
                # the trace's next arrival (36 s in one run). It asks again, as the OpenAI client
                # retries a connection error; only its last attempt counts among the outcomes.
                until = time.monotonic() + a.request_deadline_s
                while True:
                    o = await one_request(http, base, a.max_tokens, a.request_deadline_s, headers, probe_prompt)
                    if o.kind != "cut" or time.monotonic() >= until or stop.is_set():
                        outcomes.append(o)
                        return

            pf = asyncio.ensure_future(probe())
            in_flight.add(pf)
            pf.add_done_callback(in_flight.discard)
        print(f"  {fault}: {what}", flush=True)
        dropped_at: float | None = None
        capacity_at: float | None = None

        def full() -> bool:
            nonlocal dropped_at, capacity_at
            n = sum(1 for hb in chaos.watch.serving() if hb.pid not in chaos.killed)
            if n < chaos.target and dropped_at is None:
                dropped_at = time.monotonic()
            if n >= chaos.target and capacity_at is None:
                capacity_at = time.monotonic()
            return n >= chaos.target

        def served_after() -> float | None:
            done = [o.ended for o in outcomes if o.kind == "completed" and o.started >= t_fault]
            return min(done) if done else None

        capacity_ok = await wait_for(lambda: full() and served_after() is not None, a.recover_timeout_s)
        first_served = served_after()
        recovered = time.monotonic() - t_fault if capacity_ok else None
        await asyncio.sleep(max(0.0, a.window_s - (time.monotonic() - t_fault)))  # load after the fault
    finally:
        stop.set()
        if not a.clients:
            clients[0].cancel()  # the sender; the requests it sent run to their end below
        await asyncio.gather(*clients, *list(in_flight), return_exceptions=True)
    mig1 = await migrations(http, base())
    kinds = {k: sum(1 for o in outcomes if o.kind == k) for k in ("completed", "error_status", "error_chunk", "cut")}
    accepted = len(outcomes)  # every request a gateway took (refused connections are retried, not counted)
    lost = sum(1 for o in outcomes if o.kind == "lost")
    hung = sum(1 for o in outcomes if o.kind == "hung")
    return {
        "fault": fault,
        "injected": what,
        "accepted": accepted,
        "completed": kinds["completed"],
        "migrated": max(0.0, mig1[0] - mig0[0]) if fault != "gateway" else None,
        "resent": max(0.0, mig1[1] - mig0[1]) if fault != "gateway" else None,
        "failed_explicit": kinds["error_status"] + kinds["error_chunk"] + kinds["cut"],
        "failed_by_kind": {k: kinds[k] for k in ("error_status", "error_chunk", "cut")},
        "statuses": sorted({o.status for o in outcomes if o.kind == "error_status"}),
        "lost": lost,
        "hung": hung,
        "complete_pct": round(100.0 * kinds["completed"] / accepted, 2) if accepted else None,
        "client_retries": sum(o.retries for o in outcomes),
        "capacity_dropped": dropped_at is not None,
        "recovery_s": round(recovered, 2) if recovered is not None else None,
        # The mesh's own part: the target count of instances serving again (by heartbeats).
        "capacity_s": round(capacity_at - t_fault, 2) if capacity_at is not None else None,
        # The other part: the first request sent after the fault answered in full, and how many
        # requests were open when the fault came (those sent before it go first, oldest first).
        "first_served_s": round(first_served - t_fault, 2) if first_served is not None else None,
        "open_at_fault": open_at_fault,
        "target_instances": chaos.target,
        # What the control plane did after the fault, in seconds from it: where recovery went.
        "after_fault": [
            {"t_s": round(t - t_fault, 3), "kind": kind, **fields}
            for t, kind, fields in chaos.watch.control
            if t_fault - 0.05 <= t <= t_fault + (recovered if recovered is not None else a.recover_timeout_s)
        ],
        "replacement": replacement(chaos.watch.control, t_fault, what),
    }


def replacement(control: list[tuple[float, str, dict[str, Any]]], t_fault: float, what: dict[str, Any]) -> str:
    """How the killed worker's capacity came back, in words: the first plan after the fault that
    loads a worker, its source, and whether that worker is a spare or the killed one restarted."""
    killed = what.get("killed")
    for t, kind, f in control:
        if kind != "plan" or t < t_fault:
            continue
        for chain in f["chains"]:
            src, _, targets = chain.partition(" -> ")
            ts = targets.split(" -> ")
            how = "the killed worker restarted by cascade up" if killed in ts else "a spare idle worker"
            return f"{f['mode']} from {src} onto {', '.join(ts)} ({how}), planned {t - t_fault:.2f} s after the fault"
    return "no new load planned in the window"


# Trace seconds replayed (in a loop): long enough that the windows do not see the same arrivals.
TRACE_WINDOW_S = 1800.0


def trace_schedule(a: argparse.Namespace) -> tuple[list[Arrival], dict[str, Any]]:
    """The trace window's arrivals compressed in time to `a.rate` requests/s on average."""
    rows = load_trace(a.trace)
    base = build_schedule(rows, ScheduleSpec(start_s=a.trace_start, duration_s=TRACE_WINDOW_S, seed=a.seed))
    if len(base) < 2:
        raise TraceError(f"{a.trace}: fewer than 2 requests from {a.trace_start:g} s on")
    span = base[-1].t - base[0].t
    compress = a.rate * span / (len(base) - 1)
    sched = build_schedule(
        rows, ScheduleSpec(start_s=a.trace_start, duration_s=TRACE_WINDOW_S, compress=compress, seed=a.seed)
    )
    info = {
        "trace": str(a.trace), "licence": LICENCE, "start_s": a.trace_start, "window_s": TRACE_WINDOW_S,
        "requests": len(sched), "compress": round(compress, 3), "mean_rate": a.rate,
        "prompt_tokens_capped_at": a.max_prompt, "output_tokens_capped_at": a.max_tokens,
    }  # fmt: skip
    return sched, info


async def drive(a: argparse.Namespace, mesh: Mesh, schedule: list[Arrival]) -> list[dict[str, Any]]:
    nc = await mesh.connect("bench-chaos")
    watch = Watch()
    chaos = Chaos(a, mesh, nc, watch)
    chaos.schedule = schedule
    try:
        await watch.attach(nc, chaos.s)
        if not await wait_for(lambda: len(watch.serving()) >= a.replicas, 120):
            raise RuntimeError("the mesh did not serve on its replicas")

        def base() -> str:
            # The gateway keeps its port across restarts (the supervisor passes the same one).
            return str(mesh.url)

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        rows = []
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
            for fault in [f for f in a.faults.split(",") if f]:
                if fault not in FAULTS:
                    raise SystemExit(f"unknown fault {fault!r} (known: {', '.join(FAULTS)})")
                rows.append(await run_fault(chaos, fault, http, base))
                r = rows[-1]
                print(
                    f"  → accepted {r['accepted']}, completed {r['completed']}, failed {r['failed_explicit']}, "
                    f"lost {r['lost']}, hung {r['hung']}, recovery {r['recovery_s']} s",
                    flush=True,
                )
        return rows
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def markdown(
    rows: list[dict[str, Any]], a: argparse.Namespace, command: str, load: dict[str, list[float]] | None = None
) -> str:
    table = md_table(
        ["fault", "accepted", "completed", "migrated", "re-sent", "failed (explicit)", "lost", "hung", "complete %",
         "capacity s", "recovery s", "instances"],
        [
            [r["fault"], r["accepted"], r["completed"], "n/a" if r["migrated"] is None else int(r["migrated"]),
             "n/a" if r.get("resent") is None else int(r["resent"]),
             f"{r['failed_explicit']} {r['failed_by_kind']}" if r["failed_explicit"] else 0, r["lost"], r["hung"],
             r["complete_pct"], r.get("capacity_s", "n/a"),
             r["recovery_s"] if r["recovery_s"] is not None else "not within timeout",
             r["target_instances"]]
            for r in rows
        ],
    )  # fmt: skip
    return (
        "# Chaos: faults under load\n\n"
        f"`{command}`\n\n"
        + (
            f"Load average (1, 5, 15 min) {', '.join(map(str, load['start']))} at the start, "
            f"{', '.join(map(str, load['end']))} at the end ({os.cpu_count()} cores).\n\n"
            if load
            else ""
        )
        + (
            f"{a.clients} closed-loop streaming clients, {a.max_tokens} tokens per request"
            if a.clients
            else f"The Azure LLM code trace replayed open-loop from {a.trace_start:g} s, compressed to "
            f"{a.rate:g} requests/s on average (its burstiness kept), prompts capped at {a.max_prompt} and "
            f"outputs at {a.max_tokens} tokens"
        )
        + f", {a.workers} workers ({a.spare} spare: idle beyond the most instances the faults ask for), "
        f"{a.replicas} instances before the scale-up faults (each of those adds one); each fault in its own "
        f"window of at least {a.window_s:g} s. `migrated`: the gateway's migrations_total over the window "
        "(requests moved after tokens reached the client); `re-sent`: its retries of requests whose worker "
        "or route stage died before their first token; both "
        "(n/a for the gateway fault: the restarted gateway counts from 0). `failed (explicit)`: error "
        "statuses, error chunks, and streams cut by a dying gateway. Targets: 0 lost, 0 hung, >= 99 % "
        "complete for worker faults, recovery <= 3 s after a worker fault. `capacity s`: from the fault until "
        "the target count of instances serves again (by heartbeats); `recovery s`: that and a request sent "
        "after the fault completed (one is sent at the kill; it may queue behind the load already waiting). "
        "A killed worker's capacity comes "
        f"back as a new instance loaded in full, which takes {a.load_s:g} s here (emulated), so recovery from "
        "a worker fault reads that much above the mesh's own reaction time.\n\n"
        + table
        + "\nWhat each fault did:\n\n"
        + "".join(f"- {r['fault']}: {injected(r['injected'])}\n" for r in rows)
        + "\nWhere a worker fault's recovery went (the control plane's messages after the kill, s from it; "
        "`replacement`: the first load planned after it):\n\n"
        + "".join(
            f"- {r['fault']}: {r.get('open_at_fault', 'n/a')} requests open at the kill, the first sent after it "
            f"answered in full at {r.get('first_served_s', 'n/a')} s; replacement {r.get('replacement', 'n/a')}; "
            + ", ".join(f"{e['t_s']:g} {e['kind']} {control_words(e)}" for e in r.get("after_fault", []))
            + "\n"
            for r in rows
            if r["fault"].startswith("worker_")
        )
    )


def control_words(e: dict[str, Any]) -> str:
    if e["kind"] == "decision":
        return f"{e['action']} {e['count']}" + (f" avoid {','.join(e['avoid'])}" if e["avoid"] else "")
    if e["kind"] == "ack":
        return "ok" if e["ok"] else "failed (" + e["error"][:80] + ")"
    return f"{e['mode']}{' re-plan' if e['replan'] else ''} {'; '.join(e['chains'])}"


def injected(what: dict[str, Any]) -> str:
    if what.get("killed") is None:
        return f"NOT injected ({what.get('note', 'nothing to kill')})"
    return ", ".join(f"{k} {v}" for k, v in what.items())


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    ups = sum(1 for f in a.faults.split(",") if f in SCALE_UP_FAULTS)
    if a.workers is None:
        # Every instance the faults ask for has a worker, and `spare` idle ones stay beyond them.
        a.workers = a.replicas + ups + a.spare
    command = "cascade bench chaos " + " ".join(argv or [])
    schedule: list[Arrival] = []
    trace_info: dict[str, Any] | None = None
    if not a.clients:
        try:
            schedule, trace_info = trace_schedule(a)
        except FileNotFoundError:
            print(f"cascade bench chaos: {missing_trace(a.trace)}", file=sys.stderr)
            return 2
        except TraceError as e:
            print(f"cascade bench chaos: {e}", file=sys.stderr)
            return 2
    spec = GenerateSpec(layers=a.layers, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=2048, seed=5)
    with tempfile.TemporaryDirectory(prefix="cascade-chaos-") as tmp:
        model_dir = Path(tmp) / MODEL
        generate_model(model_dir, spec)
        ck = Checkpoint(model_dir)
        load_mb_s = ck.total_nbytes() / 1e6 / a.load_s
        ck.close()
        deploy = (
            f'[[models]]\nname = "{MODEL}"\npath = "{model_dir}"\nmin_replicas = {a.replicas}\n'
            f'max_replicas = {a.workers}\npolicy = "manual"\n'
        )
        mesh = Mesh(
            ["--workers", str(a.workers), "--max-restarts", "20"],
            {
                "CASCADE_DEVICE_PROFILE": a.profile,
                "CASCADE_LOAD_MB_S": f"{load_mb_s:.6f}",
                # Parameter sends paced like disk loads: a multicast lasts long enough to be caught.
                "CASCADE_LOADER_SEND_MB_S": f"{load_mb_s:.6f}",
                # A small batch limit: the instances are busy under the clients, so the gateway routes
                # through a loading instance for the layers it holds (partial routes).
                "CASCADE_MAX_BATCH": str(a.max_batch),
                "CASCADE_HEARTBEAT_S": str(HEARTBEAT_S),
                "CASCADE_LOG_LEVEL": "warning",
                "CASCADE_KV_CACHE_MB": "64",
            },
            deploy_toml=deploy,
        )
        # The machine may be shared (other benchmarks, builds): what else ran shows in the load.
        load_at_start = os.getloadavg()
        mesh.start()
        try:
            rows = asyncio.run(drive(a, mesh, schedule))
        finally:
            mesh.stop()
        load = {"start": [round(x, 2) for x in load_at_start], "end": [round(x, 2) for x in os.getloadavg()]}
    text = markdown(rows, a, command, load)
    print()
    print(text)
    if not a.no_write:
        prof = load_profile(a.profile)
        doc = {
            **result_header("chaos"),
            "command": command,
            "parameters": {**vars(a), "trace": str(a.trace)},
            "trace": trace_info,
            "model_spec": {k: getattr(spec, k) for k in GenerateSpec.__slots__},
            "emulated": {
                "device": prof.describe(),
                "load": f"disk loads and parameter sends paced to {a.load_s} s per instance for the whole model "
                "(CASCADE_LOAD_MB_S, CASCADE_LOADER_SEND_MB_S); transfers between workers over loopback TCP",
                "note": "real torch on the small model; each step padded to the profile's time",
            },
            "load_average": load,
            "rows": rows,
        }
        written = write_result(a.out, doc, text)
        print(f"wrote {', '.join(map(str, written))}")
    return 0
