"""Burst-trace benchmark: the bursty window of the Azure code trace replayed open-loop against five
scaling configurations of the same mesh, each on the same number of emulated-GPU workers, in one run.

    python bench/burst.py            (or: cascade bench burst)
    python bench/burst.py --quick    (a 2-3 minute sanity run: a short window, three configurations)
    python bench/burst.py --repeats 3   (each configuration three times, in rounds; the table pools them)

Configurations (docs/deployment.md):
  cascade        loading = "multicast", scaling = "live", policy `rate`, min_replicas 0: to zero in the
                 lulls, back from the loader's host copy on every worker (activation_scale)
  serverlessllm  loading = "disk", scaling = "stop-the-world", policy `concurrency` with keep-alive; each
                 worker keeps the checkpoints it read in its own host memory (CASCADE_LOCAL_CACHE_MB), so a
                 later load on a worker that held the model installs from DRAM at the emulated link's pace
  allcache       loading = "host-cache", scaling = "stop-the-world", policy `concurrency`
  static-peak    policy `manual`, min_replicas = the peak's need (at most the workers there are)
  static-mean    policy `manual`, min_replicas = the mean's need

The window and the level are those of docs/burst-window.md: trace seconds 1060-1390, compressed, with
the mean load at 0.3 of the cluster's capacity, so that its busiest 10 s fill the cluster (the trace is
on-off: at half, no static cluster holds its bursts), as the device profile computes it (bench/scaleup.py's
`capacity_req_s`). Each worker is an emulated accelerator (real torch on a small model, each step
padded to the profile's time; short real prompts priced as long ones); parameter loads are paced to
what the emulated model would take: the disk at the profile's `disk_mb_s`, data-plane transfers
(host cache or peer) and loads from a worker's local host-memory cache at an emulated link.
Reports TTFT and inter-token latency percentiles, SLO attainment, instance-seconds (instances
holding the model, loading or serving, integrated from worker heartbeats) and scale events, beside
the issue's targets. Writes bench/results/burst.{json,md,png}: the JSON is a summary (the table's
figures, each run's headline figures and scale decisions, the parameters, the commit and the
machine); `--raw DIR` also writes every request's record, gzip-compressed, to DIR.

The pieces: burst_plan.py (the schedule and the emulation), burst_configs.py (the configurations
compared), burst_run.py (one configuration against a mesh of its own), burst_metrics.py (per-request
figures), burst_report.py (pooling, targets, the markdown), burst_results.py (the raw document and
its summary), burst_plot.py (the figure).

Trace: Azure LLM inference trace 2023 (code service), ../shared/traces/, CC BY 4.0, Patel et al.,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024; read in place.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.burst_configs import CONFIG_KEYS, cascade_knobs, make_configs
from bench.burst_plan import MODEL, SPEC, make_emulation, make_plan
from bench.burst_plot import plot
from bench.burst_report import pooled_rows, report, verdicts_by_round
from bench.burst_results import result_doc, summarise
from bench.burst_run import run_config
from bench.common import RESULTS, add_raw_option, raw_path, result_header, write_result
from bench.tracelib import DEFAULT_TRACE, TraceError
from cascade.models.generate import generate_model


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cascade bench burst",
        description="Replay the burst window of the Azure code trace against Cascade, ServerlessLLM-style, "
        "AllCache and static provisioning on emulated GPUs; writes bench/results/burst.{json,md,png}.",
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace CSV (default: the shared Azure trace)")
    p.add_argument("--start", type=float, default=1060.0, help="window start, trace seconds (default 1060)")
    p.add_argument("--duration", type=float, default=330.0, help="window length, trace seconds (default 330)")
    p.add_argument("--compress", type=float, default=2.0, help="time compression (default 2: 330 s in 165 s)")
    p.add_argument(
        "--load",
        type=float,
        default=0.3,
        help="mean load over the cluster's capacity (default 0.3: the window's busiest 10 s then fill the "
        "cluster; docs/burst-window.md says why not 0.5)",
    )
    p.add_argument("--workers", type=int, default=4, help="workers (emulated GPUs) in every configuration (default 4)")
    p.add_argument("--configs", default=",".join(CONFIG_KEYS), help=f"configurations to run (default {CONFIG_KEYS})")
    p.add_argument("--profile", default="llama2-7b-a100-80gb", help="device profile to emulate")
    p.add_argument("--max-batch", type=int, default=32, help="per-instance batch limit (default 32)")
    p.add_argument(
        "--token-scale",
        type=float,
        default=16.0,
        help="each real prompt/context token is priced as this many on the emulated device; prompts are "
        "scaled by its inverse, so the device sees the trace's lengths (default 16)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=512,
        help="each worker's prefill budget per step, in emulated tokens: longer prompts are prefilled in "
        "chunks, so a step lasts at most about 70 ms on the profile with a full decode batch beside it (default "
        "512; 4096 fits two mean prompts whole)",
    )
    p.add_argument("--link-gb-s", type=float, default=25.0, help="emulated data-plane link, GB/s (default 25)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="TTFT SLO (default 1000 ms)")
    p.add_argument("--slo-tbt-ms", type=float, default=100.0, help="mean time-between-tokens SLO (default 100 ms)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of rate scaling and prompt ids (default 0)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, in rounds (each round runs them all in order); the "
        "table pools a configuration's runs and lists each run's SLO attainment and instance-seconds "
        "(default 1). One run's SLO attainment moves by a few points from the next on this machine",
    )
    p.add_argument(
        "--cascade-knobs",
        default="",
        help="KNOB=VALUE,... over Cascade's knobs (bench/burst_configs.py), to try a variant of its policy "
        "against the others in the same run; the result records them (default: none)",
    )
    p.add_argument("--quick", action="store_true", help="a 2-3 minute sanity run: trace 840-900 s at 4x, 3 configs")
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    add_raw_option(p, "burst", "every request's record, every scale decision and ack")
    a = p.parse_args(argv)
    if a.quick:
        a.start, a.duration, a.compress = 840.0, 60.0, 4.0
        if a.configs == ",".join(CONFIG_KEYS):
            a.configs = "cascade,serverlessllm,static-peak"
    unknown = [c for c in a.configs.split(",") if c not in CONFIG_KEYS]
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIG_KEYS)}")
    if a.workers < 2:
        p.error("--workers must be at least 2")
    try:
        cascade_knobs(a.cascade_knobs)
    except ValueError as e:
        p.error(f"--cascade-knobs: {e}")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if a.raw is not None and a.no_write:
        p.error("--raw and --no-write exclude each other")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_begin = time.monotonic()
    try:
        plan = make_plan(a, a.profile)
    except TraceError as e:
        print(f"cascade bench burst: {e}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cascade-burst-") as tmp:
        model_dir = Path(tmp) / MODEL
        generate_model(model_dir, SPEC)
        emu = make_emulation(a, model_dir)
        configs = make_configs(a, plan, emu)
        print(
            f"{len(plan.arrivals)} requests over {plan.window_s:.0f} s (mean {plan.mean_rate:.1f} req/s, peak "
            f"{plan.peak_rate:.1f}); one instance {plan.capacity_req_s:.2f} req/s; {a.workers} workers; "
            f"disk load {emu.disk_s:.2f} s, data-plane load {emu.link_s:.3f} s (emulated)",
            flush=True,
        )
        runs = [(rnd, cfg) for rnd in range(1, a.repeats + 1) for cfg in configs]
        for i, (rnd, cfg) in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {cfg.label}: {cfg.loading} / {cfg.scaling} / {cfg.policy} "
                  f"(replicas {cfg.min_replicas}-{cfg.max_replicas})"
                  f"{f', round {rnd} of {a.repeats}' if a.repeats > 1 else ''} …", flush=True)  # fmt: skip
            try:
                r = asyncio.run(run_config(a, cfg, plan, emu, model_dir))
            except Exception as e:  # one configuration failing must not lose the others' results
                print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
                failed.append({"key": cfg.key, "round": rnd, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            r["round"] = rnd
            rows.append(r)
            s = r["summary"]
            print(
                f"  TTFT p50/p99 {s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms, SLO "
                f"{100 * s['slo']['attainment']:.1f} %, {r['instance_seconds']:.0f} instance-s, "
                f"{r['scale_events']} scale events, {s['ok']}/{s['requests']} ok, overruns "
                f"{r['emulated_device']['overrun_steps']}/{r['emulated_device']['steps']} steps "
                f"({time.monotonic() - t_begin:.0f} s elapsed)",
                flush=True,
            )
    runs_rows = rows
    rows = pooled_rows(a, runs_rows) if a.repeats > 1 else runs_rows
    by_round = verdicts_by_round(runs_rows, a.repeats) if a.repeats > 1 else []
    raw = {
        **result_header("burst"),
        **result_doc(a, plan, emu, rows, runs_rows, by_round, failed, argv, time.monotonic() - t_begin),
    }
    doc = summarise(raw)
    doc["raw"] = (
        f"per-request records in {raw_path(a.raw, 'burst')}"
        if a.raw is not None
        else "per-request records not kept (python bench/burst.py --raw DIR writes them)"
    )
    # Rendered from the summary, so the committed JSON holds every figure the markdown shows.
    text = report(doc)
    print()
    print(text)
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        png = RESULTS / "burst.png"
        plot(a, plan, [r for r in runs_rows if r["round"] == 1] or runs_rows, png)
        caption = "latency and instances over time" + (f", round 1 of {a.repeats}" if a.repeats > 1 else "")
        written = write_result("burst", doc, text + f"\n![{caption}]({png.name})\n", raw, a.raw)
        print(f"wrote {', '.join(map(str, written))} and {png}")
    print(f"total {time.monotonic() - t_begin:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
