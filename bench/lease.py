"""`cascade bench lease`: how fast another loader plans when the leader goes.

Real loader processes (`cascade loader --lease required`) on one real nats-server with
JetStream, no workers (the lease does not depend on them). Per trial the leader is SIGKILLed (a
crash: its lease must run out) or SIGTERMed (a clean stop: it hands the lease over), then started
again to follow. Two figures per trial, from the moment of the signal:

- lease: until the control store's lease key names another loader (a watcher polls it every
  5 ms, so figures carry up to 5 ms of polling);
- leading: until the new leader says `ServiceReady` (it has read the journal and taken over what
  was in flight, here nothing): from then on it plans.

Each trial signals the leader just after the watcher sees one of its renewals, so a SIGKILL
takeover is near its worst case: the whole lease, plus one look of the follower at the key
(every min(0.25, lease/10) s). A leader that dies just before a renewal is replaced up to a third
of the lease sooner.

Nothing is emulated; every process shares the machine's cores (and with anything else running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, dist_ms, md_table, result_header, stop_processes, write_result
from cascade.cli.embedded_nats import EmbeddedNats
from cascade.config import GenerateSpec
from cascade.controlstore import ControlStore, open_store
from cascade.messages import MessageError, ServiceReady, decode
from cascade.models.generate import generate_model
from cascade.natsutil import connect
from cascade.subjects import Subjects
from services.loader.lease import LEASE_KEY

PREFIX = "benchlease"
POLL_S = 0.005


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench lease", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=10, help="trials per stop kind (default 10)")
    p.add_argument("--loaders", type=int, default=2, help="loaders running (default 2)")
    p.add_argument("--lease-s", type=float, default=1.5, help="the loaders' --lease-s (default 1.5)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/lease.*")
    a = p.parse_args(argv)
    if a.trials < 1 or a.loaders < 2 or a.lease_s <= 0:
        p.error("--trials must be at least 1, --loaders at least 2 and --lease-s above 0")
    return a


@dataclass
class Loaders:
    url: str
    config: Path
    logs: Path
    lease_s: float
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        env.update(PYTHONPATH=str(ROOT), CASCADE_HOME=str(self.logs / "home"))
        argv = [sys.executable, "-m", "cascade.cli", "loader", "--nats-url", self.url, "--prefix", PREFIX]
        argv += ["--config", str(self.config), "--loader-id", name, "--lease", "required"]
        argv += ["--lease-s", f"{self.lease_s:g}", "--host-cache", "off"]
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


async def holder(store: ControlStore) -> tuple[str | None, int]:
    e = await store.get(LEASE_KEY)
    return (None, 0) if e is None else (str(e.value.get("holder")), e.revision)


async def until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g}s")
        await asyncio.sleep(POLL_S)  # polling the key with a deadline


async def run(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model = tmp / "m"
    generate_model(model, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=256))
    cfg = tmp / "deploy.toml"
    cfg.write_text(f'[[models]]\nname = "m"\npath = "{model}"\nmin_replicas = 0\nmax_replicas = 1\n')
    srv = EmbeddedNats(jetstream=True, store_dir=tmp / "js").start()
    loaders = Loaders(srv.url, cfg, tmp, a.lease_s)
    nc = await connect(srv.url, "bench-lease")
    ready: list[tuple[float, str]] = []

    async def on_ready(msg: Any) -> None:
        with contextlib.suppress(MessageError):
            r = decode(msg.data, ServiceReady)
            if r.service == "loader":
                ready.append((time.monotonic(), r.instance))

    trials: list[dict[str, Any]] = []
    try:
        await nc.subscribe(Subjects(PREFIX).service_ready(), cb=on_ready)
        store = await open_store(nc, PREFIX)
        names = [f"loader-{i}" for i in range(a.loaders)]
        for n in names:
            loaders.start(n)

        async def all_up() -> bool:
            h, _ = await holder(store)
            return h is not None and len({i for _, i in ready}) == len(names)

        await until(all_up, 120, "leader with every loader up")
        for kind in ("SIGKILL", "SIGTERM"):
            for t in range(a.trials):
                # Settle: every loader up, and two renewals seen since (the followers' counts run).
                _, rev = await holder(store)

                async def renewed(rev: int = rev) -> bool:
                    return (await holder(store))[1] >= rev + 2

                await until(renewed, 30, "two renewals")
                old, _ = await holder(store)
                assert old is not None
                mark = len(ready)
                t0 = time.monotonic()
                proc = loaders.procs[old]
                proc.send_signal(signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)

                async def moved(old: str = old) -> bool:
                    h, _ = await holder(store)
                    return h is not None and h != old

                await until(moved, 30, "takeover")
                t_lease = time.monotonic() - t0
                new, _ = await holder(store)

                async def leads(new: str | None = new, mark: int = mark) -> bool:
                    return any(i == new for _, i in ready[mark:])

                await until(leads, 30, "ServiceReady of the new leader")
                t_lead = next(ts for ts, i in ready[mark:] if i == new) - t0
                proc.wait(30)
                trials.append(
                    {"kind": kind, "trial": t, "old": old, "new": new, "lease_s": t_lease, "leading_s": t_lead}
                )
                print(
                    f"{kind} {t}: {old} -> {new}: lease {t_lease * 1000:.0f} ms, leading {t_lead * 1000:.0f} ms",
                    flush=True,
                )
                mark = len(ready)
                loaders.start(old)

                async def back(old: str = old, mark: int = mark) -> bool:
                    return any(i == old for _, i in ready[mark:])

                await until(back, 120, f"{old} back, following")
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
        loaders.stop_all()
        srv.stop()
    return {"trials": trials}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    with tempfile.TemporaryDirectory(prefix="cascade-bench-lease-") as d:
        out = asyncio.run(run(a, Path(d)))
    trials = out["trials"]
    doc: dict[str, Any] = result_header("lease")
    doc["parameters"] = vars(a)
    doc["emulated"] = {
        "nothing": "real loader processes and a real nats-server (JetStream, file store) on one machine, over "
        "loopback; no workers; the lease key is polled every 5 ms"
    }
    rows, figures = [], {}
    for kind in ("SIGKILL", "SIGTERM"):
        ts = [t for t in trials if t["kind"] == kind]
        lease = dist_ms([t["lease_s"] for t in ts])
        lead = dist_ms([t["leading_s"] for t in ts])
        figures[kind] = {"lease_ms": lease, "leading_ms": lead}
        rows.append([kind, len(ts), lease["p50"], lease["max"], lead["p50"], lead["max"]])
    doc["figures"] = figures
    doc["trials"] = trials
    table = md_table(["stop", "trials", "lease taken p50 ms", "max ms", "new leader plans p50 ms", "max ms"], rows)
    md = (
        f"# bench lease\n\n{a.loaders} loaders, `--lease-s {a.lease_s:g}`, {a.trials} trials per stop kind; "
        f"commit {doc['commit']}, {doc['machine']['cores']} cores ({doc['machine']['cpu']}).\n\n"
        "From the signal to the leader until the lease key names another loader, and until that loader "
        "says ServiceReady (it plans from then on). SIGKILL: the lease must run out; SIGTERM: the leader "
        "deletes the key as it stops. The signal goes just after a renewal is seen, so SIGKILL figures are "
        "near the worst case (the whole lease plus one look of the follower at the key).\n\n"
        + table
        + "\nReproduce: `python -m cascade.cli bench lease "
        f"--trials {a.trials} --loaders {a.loaders} --lease-s {a.lease_s:g}`\n"
    )
    print(table)
    if not a.no_write:
        for p in write_result("lease", doc, md):
            print(f"wrote {p}")
    return 0
