"""Cascade's scaling policy on bench/burst.py's window, in the simulator: each variant of its
knobs (or another policy) against static at peak, a few seeds each, in seconds rather than the
real benchmark's quarter of an hour per round. A sweep for choosing what the real benchmark then
confirms: the simulator is calibrated on this window (bench/results/sim-calibration.md: SLO
attainment within 1.3 points of the real rounds, instance-seconds within 0.7 %), but it runs
every step for exactly the profile's time, so it flatters every configuration a little.

    python bench/sim_burst.py                                  the committed Cascade configuration
    python bench/sim_burst.py --variant 'down=downscale_delay_s=3' --variant 'ka=keep_alive_s=2'
    python bench/sim_burst.py --variant 'x=policy=rate,idle_down_s=1.5' --seeds 3 --json out.json

A variant is `NAME=KNOB=VALUE,KNOB=VALUE,...` over Cascade's knobs (bench/burst_configs.py);
`policy=NAME` changes the policy, `-KNOB` drops a knob. Prints, per variant, SLO attainment and
instance-seconds (pooled over seeds as bench/burst.py pools its repeats), both against static at
peak, the scale events, and the misses by 10 s of replay beside static at peak's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS
from bench.sim_calibrate import burst_scenarios, burst_setup, fitted_setup, raw_runs, stage_latency_s
from cascade.config import Deployment
from sim.mesh import Result, Scenario, run
from sim.report import request_arrays, summary

BIN_S = 10.0  # replay seconds per bin of the misses' timeline


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/sim_burst.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=[], help="NAME=KNOB=VALUE,... (repeatable)")
    p.add_argument("--seeds", type=int, default=2, help="simulated runs per variant, pooled (default 2)")
    p.add_argument("--load", type=float, default=None, help="the burst window's load (default: the committed run's)")
    p.add_argument("--burst-json", type=Path, default=RESULTS / "burst.json", help="the committed real burst result")
    p.add_argument("--json", type=Path, default=None, help="also write every variant's figures here")
    p.add_argument("--timeline", action="store_true", help="print each variant's instances over time (first seed)")
    return p.parse_args(argv)


def parse_variant(text: str) -> tuple[str, str | None, dict[str, float], list[str]]:
    name, _, spec = text.partition("=")
    policy: str | None = None
    knobs: dict[str, float] = {}
    drop: list[str] = []
    for item in filter(None, spec.split(",")):
        if item.startswith("-"):
            drop.append(item[1:])
            continue
        k, _, v = item.partition("=")
        if k == "policy":
            policy = v
        else:
            knobs[k] = float(v)
    return name, policy, knobs, drop


def with_knobs(sc: Scenario, policy: str | None, knobs: dict[str, float], drop: list[str]) -> Scenario:
    (md,) = sc.deployment.models
    merged = {k: v for k, v in {**md.knobs, **knobs}.items() if k not in drop}
    md = dataclasses.replace(md, knobs=merged, policy=policy or md.policy)
    return dataclasses.replace(sc, deployment=Deployment((md,)))


def misses_by_bin(r: Result, slo_ttft_ms: float, slo_tpot_ms: float, window_s: float) -> list[int]:
    a = request_arrays(r)
    meets = a["ok"] & (a["ttft_ms"] <= slo_ttft_ms) & ~(a["tpot_ms"] > slo_tpot_ms)
    bins = [0] * (int(window_s // BIN_S) + 1)
    for t, m in zip(a["t"], meets, strict=True):
        if not m:
            bins[min(int(t // BIN_S), len(bins) - 1)] += 1
    return bins


def timeline(r: Result, window_s: float, step: float = 1.0) -> str:
    """Instances holding the model at each `step` of replay (a digit per step)."""
    out = []
    t = 0.0
    while t < window_s:
        held = r.instance_seconds(r.t0 + t, r.t0 + t + step) / step
        out.append(str(round(held)))
        t += step
    return "".join(out)


def figures(runs: list[Result], slo_ttft_ms: float, slo_tpot_ms: float, window_s: float) -> dict[str, Any]:
    sums = [summary(r, slo_ttft_ms, slo_tpot_ms) for r in runs]
    met = sum(s["slo"]["attainment"] * s["requests"] for s in sums)
    n = sum(s["requests"] for s in sums)
    bins = [misses_by_bin(r, slo_ttft_ms, slo_tpot_ms, window_s) for r in runs]
    return {
        "slo": met / n,
        "slo_by_seed": [s["slo"]["attainment"] for s in sums],
        "instance_s": statistics.fmean(s["instance_seconds"] for s in sums),
        "ups": statistics.fmean(s["scale_up_events"] for s in sums),
        "downs": statistics.fmean(s["scale_down_events"] for s in sums),
        "ttft_p99": statistics.fmean(s["ttft_ms"]["p99"] for s in sums),
        "misses_by_bin": [statistics.fmean(b[i] for b in bins) for i in range(len(bins[0]))],
    }


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    real = json.loads(a.burst_json.read_text())
    params = dict(real["parameters"])
    if a.load is not None:
        params["load"] = a.load
    ba, plan, emu, unit_real = burst_setup(params)
    fit = fitted_setup(raw_runs(real, None), emu.link_s, emu.disk_s)
    stage_s = stage_latency_s(json.loads((RESULTS / "scaleup.json").read_text()))
    window = plan.window_s
    slo = (ba.slo_ttft_ms, ba.slo_tbt_ms)
    keys = ["cascade", "static-peak"]
    scen = {
        s: {c.key: sc for c, sc in burst_scenarios(ba, plan, emu, unit_real, fit, stage_s, keys, s)}
        for s in range(a.seeds)
    }
    out: dict[str, Any] = {}
    t = time.monotonic()
    ref = figures([run(scen[s]["static-peak"]) for s in range(a.seeds)], *slo, window)
    out["static-peak"] = ref
    print(f"static at peak: SLO {ref['slo']:.1%}, {ref['instance_s']:.0f} instance-s ({time.monotonic() - t:.0f} s)")
    print(f"  misses/10s {' '.join(f'{x:.0f}' for x in ref['misses_by_bin'])}")
    variants = [parse_variant(v) for v in (a.variant or ["committed="])]
    for name, policy, knobs, drop in variants:
        t = time.monotonic()
        runs = [run(with_knobs(scen[s]["cascade"], policy, knobs, drop)) for s in range(a.seeds)]
        f = figures(runs, *slo, window)
        f["policy"], f["knobs"], f["drop"] = policy, knobs, drop
        out[name] = f
        print(
            f"{name}: SLO {f['slo']:.1%} ({(f['slo'] - ref['slo']) * 100:+.1f} pt), "
            f"{f['instance_s']:.0f} instance-s ({f['instance_s'] / ref['instance_s']:.0%}), "
            f"{f['ups']:.0f} up / {f['downs']:.0f} down, p99 TTFT {f['ttft_p99']:.0f} ms "
            f"({time.monotonic() - t:.0f} s)"
        )
        print(f"  misses/10s {' '.join(f'{x:.0f}' for x in f['misses_by_bin'])}")
        if a.timeline:
            print(f"  instances  {timeline(runs[0], window)}")
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
