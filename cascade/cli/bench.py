"""`cascade bench NAME [ARGS]`: run one of the benchmarks in bench/ (`main(argv)`).

The benchmarks live beside the services, in the `bench` package; each is imported only when
run (they pull in torch and plotting), by a plain import.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from cascade.cli.common import CliError

BENCHMARKS: dict[str, str] = {
    "serve": "streamed completions at several concurrencies, and the mesh's own overhead",
    "hops": "one hop between two processes (and two threads) on this machine: the floor under serve's overhead",
    "floor": "the request path's floor: the mesh's hops and engine with none of its code, against in-process",
    "scaleup": "live against stop-the-world scaling: TTFT while new instances load",
    "multicast": "parameter transfers: chain multicast against star and disk, per target count",
    "burst": "a real trace's bursts: Cascade against ServerlessLLM-style, AllCache and static fleets",
    "trace": "open-loop replay of a request trace against any OpenAI-compatible server",
    "sim-calibrate": "the simulator against the real mesh: burst's and scaleup's configurations, side by side",
    "sim-scale": "the simulated comparison at 32, 128 and 1,000 accelerators, with plots",
    "chaos": "faults under load (workers, loader, scaler, gateway, broker killed): lost, hung, recovery",
    "kv": "the paged KV cache against the contiguous one: sequences within a budget, prefix caching, decode",
    "multimodel": "many models on one pool: replication vs AlpaServe placement vs placement + 2-D co-scaling",
    "lease": "several loaders: how fast another plans when the leader is SIGKILLed or SIGTERMed",
    "dtypes": "what bf16 or int8 weights would give: transformers generate per dtype, batch 1/8/32",
    "hosts": "scale-out across three emulated hosts: diskless workers fed over the network against own disks",
}


def benchmark(name: str) -> Callable[[list[str]], int | None]:
    """The benchmark's `main` (imported now, not before)."""
    try:
        if name == "serve":
            from bench.serve import main as serve

            return serve
        if name == "hops":
            from bench.hops import main as hops

            return hops
        if name == "floor":
            from bench.floor import main as floor

            return floor
        if name == "scaleup":
            from bench.scaleup import main as scaleup

            return scaleup
        if name == "multicast":
            from bench.multicast import main as multicast

            return multicast
        if name == "burst":
            from bench.burst import main as burst

            return burst
        if name == "trace":
            from bench.trace import main as trace

            return trace
        if name == "sim-calibrate":
            from bench.sim_calibrate import main as sim_calibrate

            return sim_calibrate
        if name == "sim-scale":
            from bench.sim_scale import main as sim_scale

            return sim_scale
        if name == "chaos":
            from bench.chaos import main as chaos

            return chaos
        if name == "kv":
            from bench.kv import main as kv

            return kv
        if name == "multimodel":
            from bench.multimodel import main as multimodel

            return multimodel
        if name == "dtypes":
            from bench.dtypes import main as dtypes

            return dtypes
        if name == "lease":
            from bench.lease import main as lease

            return lease
        if name == "hosts":
            from bench.hosts import main as hosts

            return hosts
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in ("bench", "sim"):
            raise CliError("the benchmarks are not part of this installation (run from a checkout)") from None
        raise CliError(f"benchmark {name} needs the Python package {e.name!r}") from None
    raise CliError(f"no benchmark {name!r} (available: {', '.join(BENCHMARKS)})")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ (e.g. `cascade bench serve --help`)",
        description="Run a benchmark with the remaining arguments. Without NAME, list them: "
        + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()),
    )
    p.add_argument("name", nargs="?", help="benchmark name: " + ", ".join(BENCHMARKS))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.name:
        print("benchmarks:")
        for name, what in BENCHMARKS.items():
            print(f"  {name:14} {what}")
        return 0
    main = benchmark(args.name)
    from bench.tracelib import TraceError  # importable: benchmark() found the bench package

    try:
        return int(main(list(args.bench_args)) or 0)
    except TraceError as e:  # a missing or unusable trace, in any benchmark that reads one
        raise CliError(f"bench {args.name}: {e}") from None
