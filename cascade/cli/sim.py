"""`cascade sim`: one simulated run of the mesh (the `sim` package: the services' own scaler,
loader, router, batcher and admission rule on modelled hosts, links and time; no broker, no
processes, no sleeping). The comparisons with their plots are benchmarks:
`cascade bench sim-scale` and `cascade bench sim-calibrate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cascade.cli.common import CliError
from cascade.cliargs import positive_float, positive_int

SYSTEMS = ("cascade", "serverlessllm", "allcache", "static-peak", "static-mean")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sim",
        help="simulate the mesh at any scale (Cascade, ServerlessLLM-style, AllCache, static) on a trace",
        description="Simulate one system on a cluster of ACCELERATORS emulated devices (8 per host by default) "
        "serving a workload set to fill it, with the services' own decision code, and print what it measured: "
        "TTFT, time per output token, SLO attainment, accelerator-seconds, scale events, and the simulator's "
        "own speed. Profiles: docs/device-profiles.",
    )
    p.add_argument("--system", choices=SYSTEMS, default="cascade", help="configuration of the mesh (default cascade)")
    p.add_argument("--accelerators", type=positive_int, default=32, help="accelerators in the cluster (default 32)")
    p.add_argument("--per-host", type=positive_int, default=8, help="accelerators per host (default 8)")
    p.add_argument(
        "--profile",
        default="llama2-7b-a100-80gb",
        help="device profile: the model and accelerator (a name in docs/device-profiles, or a path)",
    )
    p.add_argument(
        "--workload",
        choices=("code", "conversation"),
        default="code",
        help="code: the Azure code trace on disk; conversation: synthetic (gamma arrivals, Splitwise-like lengths)",
    )
    p.add_argument("--start", type=float, default=0.0, help="code trace: window start, trace seconds (default 0)")
    p.add_argument(
        "--duration", type=float, default=0.0, help="seconds of workload (default: the whole trace, or an hour)"
    )
    p.add_argument("--compress", type=positive_float, default=1.0, help="code trace: time compression (default 1)")
    p.add_argument(
        "--fill",
        type=positive_float,
        default=1.0,
        help="the workload's busiest 10 s over the cluster's capacity (default 1: its peak fills the cluster)",
    )
    p.add_argument("--cv", type=positive_float, default=2.0, help="conversation: inter-arrival CV (burstiness)")
    p.add_argument("--models", type=positive_int, default=1, help="models sharing the cluster (default 1)")
    p.add_argument("--zipf", type=float, default=1.0, help="with several models, popularity ~ 1/rank^zipf")
    p.add_argument("--max-batch", type=positive_int, default=32, help="per-instance batch limit (default 32)")
    p.add_argument(
        "--max-prefill-tokens", type=positive_int, default=512, help="prefill budget per step, tokens (default 512)"
    )
    p.add_argument("--nic-gbps", type=positive_float, default=200.0, help="RDMA NIC speed, Gb/s (default 200)")
    p.add_argument("--nics-per-host", type=positive_int, default=8, help="NICs per host (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the services' phases")
    p.add_argument("--json", type=Path, default=None, help="also write the summary (and the run's parameters) here")
    p.set_defaults(func=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    from bench.common import result_header
    from cascade.config import ConfigError
    from sim.mesh import run
    from sim.report import summary
    from sim.scenarios import ScaleSpec, build

    spec = ScaleSpec(
        accelerators=args.accelerators,
        per_host=args.per_host,
        profile=args.profile,
        workload=args.workload,
        start_s=args.start,
        duration_s=args.duration,
        compress=args.compress,
        fill=args.fill,
        models=args.models,
        zipf=args.zipf,
        max_batch=args.max_batch,
        max_prefill_tokens=args.max_prefill_tokens,
        nic_gbps=args.nic_gbps,
        nics_per_host=args.nics_per_host,
        cv=args.cv,
        seed=args.seed,
    )
    try:
        built = build(spec, args.system)
    except (ValueError, ConfigError) as e:
        raise CliError(str(e)) from None
    info = built.info
    w = info["workload"]
    print(
        f"{built.system.label}: {info['instances']} instance(s) of {spec.profile} ({info['accelerators_per_instance']} "
        f"accelerator(s) each) on {info['hosts']} host(s); {w['requests']} requests over {w['span_s']:.0f} s "
        f"(mean {w['mean_req_s']:.1f} req/s, busiest 10 s {w['peak_req_s']:.1f}); one instance serves "
        f"{info['capacity_req_s_per_instance']:.2f} req/s",
        flush=True,
    )
    result = run(built.scenario)
    s = summary(result, info["slo"]["ttft_ms"], info["slo"]["tpot_ms"])
    t, p = s["ttft_ms"], s["tpot_ms"]
    print(f"TTFT ms       p50 {t['p50']:.0f}  p95 {t['p95']:.0f}  p99 {t['p99']:.0f}")
    print(f"TPOT ms       p50 {p['p50']:.1f}  p99 {p['p99']:.1f}")
    print(
        f"SLO           {100 * s['slo']['attainment']:.1f} % (TTFT <= {s['slo']['ttft_ms']:g} ms and TPOT <= "
        f"{s['slo']['tpot_ms']:g} ms; {s['requests'] - s['ok']} of {s['requests']} failed or timed out)"
    )
    print(f"accelerator-s {s['accelerator_seconds']:.0f} over {s['window_s']:.0f} s")
    print(f"scale events  {s['scale_up_events']} up ({s['instances_added']} instances), {s['scale_down_events']} down")
    print(f"routes        {s['routed']['full']} full, {s['routed']['pipelined']} pipelined")
    print(
        f"simulator     {s['events']} events in {s['wall_s']:.1f} s wall, {s['cpu_s']:.1f} s CPU "
        f"({s['events_per_cpu_s']:.0f} events per CPU second)"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    **result_header("sim"),
                    "command": "cascade sim " + " ".join(sys.argv[2:]),
                    "info": info,
                    "summary": s,
                },
                indent=2,
                default=str,
            )
        )
    return 0
