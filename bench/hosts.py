"""Scale-out across three emulated hosts: diskless workers fed over the network against workers
that each read their own disk.

Three hosts on one machine: each is a loopback address (127.0.0.1, .2, .3) with a `--host-id` of
its own, one idle worker listening there and a loader of its own (the loaders share the lease,
on a nats-server with JetStream: one leads and plans, the others follow and keep host copies when
the leader places them). Two configurations, each with fresh processes:

  diskless  the workers run with `--model-source network` and see no model store; the model is
            in `--host-copies` loaders' host caches (the only reads of the store, before the
            runs) and every new instance gets weights, config and tokenizer over the data plane:
            a chain from a host copy (one on a target's host first) through the targets, every
            send paced at `--link-mb-s` (the emulated link between hosts; forwarding hops cannot
            go faster than what reaches them);
  disk      every worker reads the checkpoint from its own disk, paced at `--disk-mb-s` (the
            emulated disk), all targets at once.

For N = 1, 2, 3 the benchmark publishes a `ScaleDecision` (up N) and times, from the publish, the
moment every one of the N new instances holds every unit (its last `LayerReady`), and the ack;
then it unloads them. The page cache is warm in both: the disk and the link are emulated by
pacing, which the result records.

    python bench/hosts.py                 # ~0.5 GB model, N = 1, 2, 3
    cascade bench hosts --size-gb 0.1     # the same, quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import md_table, result_header, stop_processes, write_result
from bench.multicast import ensure_model

REPO = Path(__file__).resolve().parents[1]
PREFIX = "benchhosts"
HOSTS = (("host-a", "127.0.0.1"), ("host-b", "127.0.0.2"), ("host-c", "127.0.0.3"))
CONFIGS = ("diskless", "disk")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench hosts", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-gb", type=float, default=0.5, help="model size in GB (default 0.5)")
    p.add_argument("--ns", default="1,2,3", help="new instances per scale-out, comma-separated (default 1,2,3)")
    p.add_argument("--link-mb-s", type=float, default=1000.0, help="emulated link between hosts, MB/s (default 1000)")
    p.add_argument("--disk-mb-s", type=float, default=1000.0, help="emulated disk of each worker, MB/s (default 1000)")
    p.add_argument(
        "--host-copies", type=int, default=1, help="the model's host_copies: loaders holding a copy (default 1)"
    )
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration and N; the table shows the median")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="where generated models live (default $CASCADE_HOME/bench-models)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="per-run timeout in seconds")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    a = p.parse_args(argv)
    a.n_list = sorted({int(x) for x in a.ns.split(",") if x})
    if not a.n_list or min(a.n_list) < 1 or max(a.n_list) > len(HOSTS):
        p.error(f"--ns takes counts between 1 and {len(HOSTS)}")
    a.config_list = [c for c in a.configs.split(",") if c]
    if any(c not in CONFIGS for c in a.config_list):
        p.error(f"--configs takes {', '.join(CONFIGS)}")
    if a.link_mb_s <= 0 or a.disk_mb_s <= 0 or a.repeats < 1 or not 1 <= a.host_copies <= len(HOSTS):
        p.error(f"--link-mb-s and --disk-mb-s must be above 0, --repeats at least 1, --host-copies 1 to {len(HOSTS)}")
    return a


def run_config(config: str, model_dir: Path, n_list: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start a broker, and a loader and a worker on each host for `config`; run every N."""
    from cascade.cli.embedded_nats import EmbeddedNats

    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    with tempfile.TemporaryDirectory(prefix="cascade-bench-hosts-") as tmp:
        t = Path(tmp)
        broker = EmbeddedNats(jetstream=True, store_dir=t / "js").start()
        entry = {"name": model_dir.name, "path": str(model_dir), "min_replicas": 0, "host_copies": args.host_copies}
        deploy = t / "deploy.json"
        deploy.write_text(json.dumps({"models": [entry]}))
        base = ["--nats-url", broker.url, "--prefix", PREFIX, "--heartbeat-s", "0.5"]
        cmds = []
        lids = []
        for host, _ in HOSTS:
            lid = f"loader-{host}"
            lids.append(lid)
            loader = ["loader", *base, "--config", str(deploy), "--loader-id", lid, "--host-id", host]
            loader += ["--lease", "required", "--load-timeout-s", str(args.timeout), "--idle-wait-s", "30"]
            loader += ["--send-mb-s", str(args.link_mb_s), "--host-cache", "mmap" if config == "diskless" else "off"]
            cmds.append((lid, loader))
        wids = []
        for host, addr in HOSTS:
            wid = f"{config}-{host}"
            wids.append(wid)
            w = ["worker", *base, "--worker-id", wid, "--threads", "1", "--stage-host", addr, "--host-id", host]
            if config == "diskless":
                w += ["--model-source", "network", "--files-dir", str(t / f"files-{wid}")]
            else:
                w += ["--load-mb-s", str(args.disk_mb_s)]
            cmds.append((wid, w))
        env = {**os.environ, "CASCADE_LOG_FORMAT": "json"}
        try:
            for name, argv in cmds:
                with (t / f"{name}.log").open("wb") as log:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "cascade.cli", *argv], cwd=REPO, stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    )  # fmt: skip
                procs.append((name, proc))
            return asyncio.run(_runs(config, broker.url, t, [n for n, _ in procs], wids, lids, model_dir, n_list, args))
        finally:
            stop_processes(proc for _, proc in procs)
            broker.stop()


async def _runs(
    config: str,
    nats_url: str,
    tmp: Path,
    names: list[str],
    wids: list[str],
    lids: list[str],
    model_dir: Path,
    n_list: list[int],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    from bench.meshevents import MeshEvents, tail_logs
    from cascade.messages import (
        HostCacheRequest,
        Ok,
        ScaleDecision,
        UnloadModel,
        encode,
    )
    from cascade.models.checkpoint import Checkpoint
    from cascade.natsutil import connect, gather_status, request
    from cascade.subjects import Subjects

    ckpt = Checkpoint(model_dir)
    num_units, total = ckpt.config.num_units, ckpt.total_nbytes()
    ckpt.close()
    model = model_dir.name
    s = Subjects(PREFIX)
    events = MeshEvents(s, "hosts bench", lambda: tail_logs(tmp, names))
    ready, acks, plans, beats = events.ready, events.acks, events.plans, events.beats

    async def until(pred: Any, what: str) -> None:
        await events.until(pred, what, args.timeout)

    nc = await connect(nats_url, "bench-hosts")
    rows: list[dict[str, Any]] = []
    try:
        await events.subscribe(nc)

        async def all_idle() -> None:
            await until(lambda: all(beats.get(w) == "idle" for w in wids), "every worker idle")
            deadline = time.monotonic() + args.timeout
            while True:  # polling the loader's view (readiness, not only heartbeats), with a deadline
                st = await gather_status(nc, s, 0.3)
                loaders = {x.instance: x.detail for x in st.services if x.service == "loader"}
                leading = [d for d in loaders.values() if d.get("role") == "leader"]
                # Every loader up, and the leader (the one that plans) sees every worker idle.
                if set(loaders) == set(lids) and leading and leading[0]["workers"].get("idle") == len(wids):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hosts bench: no leader seeing every worker idle ({sorted(loaders)})")

        await all_idle()
        fill_s = None
        holders: list[str] = []
        if config == "diskless":
            # The reads of the model store: into the leader's host cache, then the other copies the
            # leader places (host_copies), before any run.
            t0 = time.monotonic()
            await request(nc, s.host_cache(), HostCacheRequest("load", model), Ok, timeout=args.timeout)
            deadline = time.monotonic() + args.timeout
            while len(holders) < args.host_copies:  # polling the loaders' status, with a deadline
                st = await gather_status(nc, s, 0.3)
                holders = sorted(
                    x.instance
                    for x in st.services
                    if x.service == "loader" and model in (x.detail.get("host_cache") or {})
                )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"hosts bench: {holders} hold a host copy, {args.host_copies} wanted")
            fill_s = time.monotonic() - t0
        seq = 0
        for rep in range(args.repeats):
            for n in n_list:
                seq += 1
                print(f"  {config} N={n} run {rep + 1}", file=sys.stderr, flush=True)
                for w in wids:
                    ready.pop(w, None)
                mode = "multicast" if config == "diskless" else "disk"
                d = ScaleDecision(f"bench-{config}-{seq}", model, "up", n, n, "benchmark", loading=mode)
                t0 = time.monotonic()
                await nc.publish(s.scale_decision(), encode(d))
                await until(lambda d=d: d.decision_id in acks, f"the ack of {d.decision_id}")
                t_ack, ack = acks[d.decision_id]
                if not ack.ok or len(ack.workers) != n:
                    raise RuntimeError(f"hosts bench: {d.decision_id} (N={n}) failed: {ack.error}")
                per: dict[str, float] = {}
                for w in ack.workers:
                    evs = [(t, e) for t, e in ready.get(w, []) if not e.reset]
                    if sorted(e.unit for _, e in evs) != list(range(num_units)):
                        raise RuntimeError(f"hosts bench: {w} announced units {[e.unit for _, e in evs]}")
                    per[w] = max(t for t, _ in evs) - t0
                chains = [
                    f"{c.source} -> {' -> '.join(c.targets)}" for p in plans.get(d.decision_id, []) for c in p.chains
                ]
                rows.append(
                    {
                        "config": config,
                        "n": n,
                        "run": rep,
                        "all_serving_s": max(per.values()),
                        "ack_s": t_ack - t0,
                        "per_instance_s": per,
                        "chains": chains,
                        "host_cache_fill_s": fill_s,
                        "host_copies_on": holders,
                        "model_bytes": total,
                    }
                )
                await asyncio.gather(
                    *(
                        request(nc, s.unload(w), UnloadModel(d.decision_id), Ok, timeout=args.timeout)
                        for w in ack.workers
                    )
                )
                await all_idle()
    finally:
        await nc.drain()
    return rows


def summarize(rows: list[dict[str, Any]], n_list: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in n_list:
        row: dict[str, Any] = {"n": n}
        for config in CONFIGS:
            runs = [r for r in rows if r["config"] == config and r["n"] == n]
            if runs:
                row[f"{config}_s"] = statistics.median(r["all_serving_s"] for r in runs)
                row[f"{config}_runs_s"] = [round(r["all_serving_s"], 3) for r in runs]
                row[f"{config}_chains"] = runs[-1]["chains"]
        out.append(row)
    return out


def table(summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = [
        "N new instances",
        f"diskless: host copy → chain, {args.link_mb_s:g} MB/s links (s)",
        f"each reads its own disk, {args.disk_mb_s:g} MB/s (s)",
        "diskless / disk",
    ]
    body = []
    for r in summary:
        a, b = r.get("diskless_s"), r.get("disk_s")
        body.append(
            [
                str(r["n"]),
                f"{a:.2f}" if a is not None else "-",
                f"{b:.2f}" if b is not None else "-",
                f"{a / b:.2f}" if a is not None and b else "-",
            ]
        )
    return md_table(head, body)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from cascade.config import cascade_home

    cache_dir = args.cache_dir or cascade_home() / "bench-models"
    model_dir = ensure_model(cache_dir, args.size_gb)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    for config in args.config_list:
        rows += run_config(config, model_dir, args.n_list, args)
    load_after = os.getloadavg()
    summary = summarize(rows, args.n_list)
    tbl = table(summary, args)
    print(tbl)
    if args.no_write:
        return 0
    from cascade.models.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    nbytes = ckpt.total_nbytes()
    ckpt.close()
    doc = {
        **result_header("hosts"),
        "parameters": {
            "size_gb": args.size_gb,
            "model_bytes": nbytes,
            "model": model_dir.name,
            "ns": args.n_list,
            "link_mb_s": args.link_mb_s,
            "disk_mb_s": args.disk_mb_s,
            "repeats": args.repeats,
            "host_copies": args.host_copies,
            "hosts": [{"host_id": h, "address": a} for h, a in HOSTS],
        },
        "emulated": (
            "three hosts as loopback addresses on one machine, one worker and one loader each (the loaders share "
            f"the lease; {args.host_copies} of them hold a host copy, placed by the leader); the link between "
            "hosts is the loaders' --send-mb-s pace on every send (a chain's forwarding hops go no faster than "
            "what reaches them; a hop within one host is paced the same); each worker's disk is its --load-mb-s "
            "pace over a warm page cache"
        ),
        # The machine is shared: its load says how much the figures owe to other processes.
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "summary": summary,
        "runs": rows,
    }
    md = (
        "# Scale-out across three emulated hosts: diskless workers against each reading its own disk\n\n"
        f"`cascade bench hosts --size-gb {args.size_gb:g} --link-mb-s {args.link_mb_s:g} --disk-mb-s "
        f"{args.disk_mb_s:g} --host-copies {args.host_copies} --repeats {args.repeats}` at commit "
        f"`{doc['commit']}`. Time from the scale decision until every new instance holds every unit (median "
        "of the runs). Model: "
        f"{nbytes / 1e9:.2f} GB.\n\n{tbl}\n\nRuns (s): "
        + "; ".join(f"N={r['n']} diskless {r.get('diskless_runs_s')}, disk {r.get('disk_runs_s')}" for r in summary)
        + f".\n\n{doc['emulated']}. Load average (1, 5, 15 min) before {load_before}, after {load_after}: "
        "every process of every emulated host shares this machine's cores, so each hop of a chain costs "
        "the others CPU here, which separate hosts would not.\n"
    )
    for p in write_result("hosts", doc, md):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
