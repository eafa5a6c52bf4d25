"""Many models on one fixed pool: one-model-per-worker replication against AlpaServe placement
and against placement with Dilu-style sharing and 2-D co-scaling. Writes
bench/results/multimodel.{json,md} and multimodel.png.

    python bench/multimodel.py             (or: cascade bench multimodel; a few minutes)
    python bench/multimodel.py --quick     (coarser grids, shorter runs)

Six models of mixed size (7B-, 10B-, 13B- and 17B-class: the llama2-7b profile on an emulated
A100 with 32 to 80 layers) share 8 workers that each give 40 GB to parameters. Popularity is
Zipf-like; arrivals are gamma with a CV knob (burstiness), and one run replays the Azure code
trace's timestamps (../shared/traces/, CC BY 4.0, Patel et al., Splitwise, ISCA 2024). Systems:

- (a) `replication`: whole models, one per worker, replicas chosen by the same greedy placer
  (AlpaServe's selective replication);
- (b) `alpaserve`: groups of any size, pipelined stages, several models per group;
- (c) `coscale`: (b)'s placement, each instance's stage with its own compute quota on its
  worker, co-scaled by services/scaler/coscale.py (quota first, instances second).

Each point places on one draw of the workload and scores the plan on another, longer one. All
figures come from sim/multimodel.py's request-level estimate (its docstring says what it models
and what not: no batching, reservations at dispatch).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, md_table, result_header, write_result
from bench.tracelib import DEFAULT_TRACE, LICENCE, load_trace
from cascade.placement import GB, ModelSpec, Plan, PoolSpec, model_spec, place
from services.scaler.coscale import CoScaleKnobs
from sim.multimodel import (
    QuotaRun,
    Req,
    Stats,
    assign_models,
    gamma_arrivals,
    scorer,
    simulate_quota,
    simulate_shared,
    zipf_rates,
)

PROFILE = "llama2-7b-a100-80gb"
# (name, layers of the profile's model): in popularity order, so the skew falls on mixed sizes.
MODELS = (("chat-7b", 32), ("chat-13b", 64), ("code-10b", 48), ("code-7b", 32), ("sum-17b", 80), ("chat-10b", 48))
SYSTEMS = ("replication", "alpaserve", "coscale")
TARGET = 0.99


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench multimodel", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=8, help="workers in the pool (default 8)")
    p.add_argument("--memory-gb", type=float, default=40.0, help="parameter memory per worker, GB (default 40)")
    p.add_argument("--zipf", type=float, default=1.0, help="popularity of the i-th model ~ 1/i^zipf (default 1)")
    p.add_argument("--rates", default="2,4,6,8,10,12,14,16,20,24,28,32", help="total req/s of the rate sweep")
    p.add_argument("--rate-cv", type=float, default=2.0, help="burstiness (CV) of the rate sweep (default 2)")
    p.add_argument(
        "--poisson-rates", default="8,12,16,18,20,22,24,28,32", help="total req/s of the second rate sweep, at cv 1"
    )
    p.add_argument("--cvs", default="1,1.5,2,2.5,3,3.5,4,5,6,8", help="CVs of the burstiness sweep")
    p.add_argument("--cv-rate", type=float, default=10.0, help="total req/s of the burstiness sweep (default 10)")
    p.add_argument("--trace-rates", default="3,5,8", help="mean req/s the Azure trace is scaled to")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace CSV (default: the Azure code trace)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of workload each plan is scored on")
    p.add_argument("--place-duration", type=float, default=60.0, help="seconds of workload the placer sees")
    p.add_argument("--target-util", type=float, default=0.9, help="co-scaling: a slot's demand/quota after a change")
    p.add_argument(
        "--window",
        type=float,
        default=30.0,
        help="co-scaling: seconds of offered load a slot's demand is measured on (default 30, the scaler's window)",
    )
    p.add_argument(
        "--slo-margin",
        type=float,
        default=1.5,
        help="co-scaling: a quota never falls below this many times the quota at which one request alone just "
        "meets its SLO (default 1.5; 0: quotas follow demand alone)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the workload draws (default 1)")
    p.add_argument("--quick", action="store_true", help="coarser grids and shorter runs")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/results alone")
    a = p.parse_args(argv)
    for flag in ("rates", "poisson_rates", "cvs", "trace_rates"):
        try:
            xs = [float(x) for x in getattr(a, flag).split(",")]
        except ValueError:
            p.error(f"--{flag.replace('_', '-')} must be comma-separated numbers (got {getattr(a, flag)!r})")
        if not xs or min(xs) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be numbers > 0")
    if a.workers < 1 or a.memory_gb <= 0 or a.duration <= 0 or a.place_duration <= 0 or not 0 < a.target_util < 1:
        p.error("need --workers >= 1, --memory-gb, --duration, --place-duration > 0 and 0 < --target-util < 1")
    if a.quick:
        a.rates, a.cvs, a.trace_rates = "2,4,8,12,16,24", "1,2,3,4,6", "5"
        a.poisson_rates = "12,16,20,24,28"
        a.duration, a.place_duration = 120.0, 30.0
    return a


def specs() -> list[ModelSpec]:
    return [model_spec(n, PROFILE, layers=layers) for n, layers in MODELS]


def knobs(a: argparse.Namespace) -> CoScaleKnobs:
    t = a.target_util
    return CoScaleKnobs(target_util=t, high_util=min(1.0, t + 0.15))


def plans(models: list[ModelSpec], pool: PoolSpec, arrivals: list[Req]) -> dict[str, Plan]:
    by = {m.name: m for m in models}
    score = scorer(by, pool, arrivals)
    return {
        "replication": place(models, pool, score, group_sizes=(1,), max_models_per_group=1),
        "alpaserve": place(models, pool, score),
    }


def point(
    models: list[ModelSpec],
    pool: PoolSpec,
    rates: dict[str, float],
    place_arr: list[Req],
    eval_arr: list[Req],
    run: QuotaRun,
) -> dict[str, Any]:
    by = {m.name: m for m in models}
    pl = plans(models, pool, place_arr)
    stats: dict[str, Stats] = {
        "replication": simulate_shared(pl["replication"].groups, by, pool, eval_arr),
        "alpaserve": simulate_shared(pl["alpaserve"].groups, by, pool, eval_arr),
        "coscale": simulate_quota(pl["alpaserve"].groups, by, pool, eval_arr, rates, run),
    }
    out: dict[str, Any] = {}
    for name, st in stats.items():
        plan = pl["alpaserve" if name == "coscale" else name]
        d = st.summary()
        d["group_size"] = plan.group_size
        # Against the whole pool's compute, so systems that allocate less compare on one scale.
        span = pool.workers * st.span_s
        d["idle_allocated_pool_fraction"] = st.idle_allocated_s / span if span else 0.0
        d["groups"] = [list(g.models) for g in plan.groups]
        if name == "coscale":
            d["scale_events"] = st.events
        out[name] = d
    return out


def sustained(xs: Sequence[float], att: Sequence[float]) -> float:
    """The largest x of the sweep at or below which every point meets the target (0: none)."""
    best = 0.0
    for x, a in zip(xs, att, strict=True):
        if a < TARGET:
            break
        best = x
    return best


def main(argv: list[str] | None = None) -> int:
    a = parse(list(sys.argv[1:] if argv is None else argv))
    t0 = time.monotonic()
    rows = load_trace(a.trace)  # first: a missing trace is an error before minutes of sweeps
    models = specs()
    names = [m.name for m in models]
    pool = PoolSpec(workers=a.workers, memory_bytes=int(a.memory_gb * GB))
    run = QuotaRun(knobs=knobs(a), window_s=a.window, slo_margin=a.slo_margin)

    def gamma_point(total: float, cv: float) -> dict[str, Any]:
        rates = zipf_rates(names, total, a.zipf)
        pa = gamma_arrivals(rates, a.place_duration, cv, seed=a.seed)
        ev = gamma_arrivals(rates, a.duration, cv, seed=a.seed + 1000)
        r = point(models, pool, rates, pa, ev, run)
        line = "  ".join(f"{s} {100 * r[s]['attainment']:6.2f}%" for s in SYSTEMS)
        print(f"rate {total:5.1f} cv {cv:4.1f}: {line}", flush=True)
        return {"rate": total, "cv": cv, "results": r}

    rate_xs = [float(x) for x in a.rates.split(",")]
    cv_xs = [float(x) for x in a.cvs.split(",")]
    rate_sweep = [gamma_point(x, a.rate_cv) for x in rate_xs]
    poisson_xs = [float(x) for x in a.poisson_rates.split(",")]
    poisson_sweep = [gamma_point(x, 1.0) for x in poisson_xs]
    cv_sweep = [gamma_point(a.cv_rate, x) for x in cv_xs]

    # The trace: its timestamps (first 20 minutes), time-compressed to each mean rate, each
    # request to a model by the Zipf shares. The placer sees the first fifth, the rest scores.
    window = [r.t for r in rows if r.t < 1200.0]
    trace_runs = []
    for total in [float(x) for x in a.trace_rates.split(",")]:
        native = len(window) / 1200.0
        k = total / native  # compress time by this factor
        span = (a.place_duration + a.duration) * 1.0
        ts = [t / k for t in window if t / k < span]
        rates = zipf_rates(names, total, a.zipf)
        arr = assign_models(ts, rates, seed=a.seed)
        cut = a.place_duration
        pa = [r for r in arr if r.t < cut]
        ev = [Req(r.t - cut, r.model) for r in arr if r.t >= cut]
        res = point(models, pool, rates, pa, ev, run)
        line = "  ".join(f"{s} {100 * res[s]['attainment']:6.2f}%" for s in SYSTEMS)
        print(f"trace at {total:5.1f} req/s (x{k:.2f} compressed): {line}", flush=True)
        trace_runs.append({"rate": total, "compress": k, "requests": len(ev), "results": res})

    def att(sweep: list[dict[str, Any]], s: str) -> list[float]:
        return [p["results"][s]["attainment"] for p in sweep]

    sus_rate = {s: sustained(rate_xs, att(rate_sweep, s)) for s in SYSTEMS}
    sus_poisson = {s: sustained(poisson_xs, att(poisson_sweep, s)) for s in SYSTEMS}
    sus_cv = {s: sustained(cv_xs, att(cv_sweep, s)) for s in SYSTEMS}

    def idle_at(sweep: list[dict[str, Any]], x: float) -> dict[str, Any]:
        """Idle allocated compute where replication last meets the target (its highest sustained rate)."""
        ref = next((p for p in sweep if p["rate"] == x), sweep[0])
        r = ref["results"]
        base = r["replication"]["idle_allocated_worker_s"]
        return {
            "rate": ref["rate"],
            "cv": ref["cv"],
            "idle_allocated_worker_s": {s: r[s]["idle_allocated_worker_s"] for s in SYSTEMS},
            "borrowed_worker_s": {s: r[s]["borrowed_worker_s"] for s in SYSTEMS},
            "attainment": {s: r[s]["attainment"] for s in SYSTEMS},
            "coscale_idle_cut": 1 - r["coscale"]["idle_allocated_worker_s"] / base if base else math.nan,
        }

    # The busier reference (Poisson, replication near its limit) is the target's; the bursty one
    # (replication sustains little) is shown beside it.
    idle_ref = [idle_at(poisson_sweep, sus_poisson["replication"]), idle_at(rate_sweep, sus_rate["replication"])]

    # How much the co-scaled figure at the target's reference owes to the demand window.
    sensitivity = []
    ref_pt = next((pt for pt in poisson_sweep if pt["rate"] == idle_ref[0]["rate"]), poisson_sweep[0])
    ref_rates = zipf_rates(names, ref_pt["rate"], a.zipf)
    ref_place = gamma_arrivals(ref_rates, a.place_duration, 1.0, seed=a.seed)
    ref_eval = gamma_arrivals(ref_rates, a.duration, 1.0, seed=a.seed + 1000)
    by = {m.name: m for m in models}
    ref_plan = plans(models, pool, ref_place)["alpaserve"]
    base_idle = ref_pt["results"]["replication"]["idle_allocated_worker_s"]

    def variant(label: str, t: float, **kw: Any) -> tuple[str, float, QuotaRun]:
        kt = argparse.Namespace(**{**vars(a), "target_util": t})
        args = {"window_s": a.window, "slo_margin": a.slo_margin} | kw
        return label, t, QuotaRun(knobs=knobs(kt), **args)

    tu = a.target_util
    variants = [
        variant(f"as run: window {a.window:g} s, SLO floor x{a.slo_margin:g}", tu),
        *[variant(f"window {w:g} s", tu, window_s=w) for w in (10.0, 60.0) if w != a.window],
        *[variant(f"SLO floor x{m:g}", tu, slo_margin=m) for m in (0.0, 1.0, 2.0) if m != a.slo_margin],
        # A quota as a hard cap (no unallocated compute lent): the policy must leave headroom.
        *[variant("quotas as caps", t, borrow_unallocated=False) for t in (tu, 0.7)],
    ]
    for label, t, qr in variants:
        st = simulate_quota(ref_plan.groups, by, pool, ref_eval, ref_rates, qr)
        sensitivity.append(
            {
                "variant": label,
                "window_s": qr.window_s,
                "target_util": t,
                "borrow_unallocated": qr.borrow_unallocated,
                "slo_margin": qr.slo_margin,
                "attainment": st.attainment,
                "allocated_worker_s": st.allocated_s,
                "idle_allocated_worker_s": st.idle_allocated_s,
                "borrowed_worker_s": st.borrowed_s,
                "idle_cut": 1 - st.idle_allocated_s / base_idle if base_idle else math.nan,
            }
        )

    def gain(sus: dict[str, float]) -> float:
        return sus["alpaserve"] / sus["replication"] if sus["replication"] else math.inf

    main_ref = idle_ref[0]
    targets = {
        "alpaserve_rate_gain": gain(sus_rate),
        "alpaserve_rate_gain_poisson": gain(sus_poisson),
        "alpaserve_burstiness_gain": gain(sus_cv),
        "alpaserve_target_met": max(gain(sus_rate), gain(sus_poisson), gain(sus_cv)) >= 2,
        "coscale_idle_cut": main_ref["coscale_idle_cut"],
        "coscale_attainment_at_reference": main_ref["attainment"]["coscale"],
        "coscale_target_met": main_ref["coscale_idle_cut"] >= 0.3
        and main_ref["attainment"]["coscale"] >= min(TARGET, main_ref["attainment"]["replication"]),
    }
    doc = {
        **result_header("multimodel"),
        "emulated": f"{PROFILE} (docs/device-profiles): an A100-80GB's step times for a Llama-2-7B-shaped model; "
        "10B/13B/17B-class models are the same layers, 48/64/80 of them; request-level estimate of sim/multimodel.py",
        "parameters": {k: v for k, v in vars(a).items() if k != "trace"} | {"trace": str(a.trace)},
        "models": [
            {
                "name": m.name,
                "layers": m.layers,
                "gb": round(m.nbytes / GB, 1),
                "slo_s": round(m.slo_s, 3),
                "latency_1_worker_s": round(m.latency_s(1), 3),
            }
            for m in models
        ],
        "pool": {"workers": pool.workers, "memory_gb": a.memory_gb, "hop_us": pool.hop_s * 1e6},
        "coscale_knobs": {k: getattr(run.knobs, k) for k in run.knobs.__slots__},
        "quota_run": {
            "tick_s": run.tick_s,
            "window_s": run.window_s,
            "load_setup_s": run.load_setup_s,
            "load_gb_s": run.load_gb_s,
        },
        "rate_sweep": rate_sweep,
        "poisson_rate_sweep": poisson_sweep,
        "cv_sweep": cv_sweep,
        "trace_runs": trace_runs,
        "sustained_rate": sus_rate,
        "sustained_rate_poisson": sus_poisson,
        "sustained_cv": sus_cv,
        "idle_at_reference": idle_ref,
        "coscale_window_sensitivity": sensitivity,
        "targets": targets,
        "trace_licence": LICENCE,
        "wall_s": round(time.monotonic() - t0, 1),
        # The machine is shared: its load says how much the wall time means (the figures are a
        # deterministic estimate and do not depend on it).
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    md = report(doc, rate_xs, cv_xs)
    print(md)
    if not a.no_write:
        paths = write_result("multimodel", doc, md)
        png = RESULTS / "multimodel.png"
        if plot(doc, png):
            paths.append(png)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def report(doc: dict[str, Any], rate_xs: list[float], cv_xs: list[float]) -> str:
    p = doc["parameters"]
    t = doc["targets"]
    lines = [
        "# Many models on one pool: replication vs AlpaServe placement vs placement + 2-D co-scaling",
        "",
        f"Command: `python bench/multimodel.py{' --quick' if p['quick'] else ''}` (commit {doc['commit']}, "
        f"{doc['wall_s']} s, load average {doc['load_average_1_5_15'][0]:g} at the end). Simulated: {doc['emulated']}.",
        f"Pool: {doc['pool']['workers']} workers x {doc['pool']['memory_gb']:g} GB of parameters; "
        f"popularity Zipf {p['zipf']:g}; plans placed on {p['place_duration']:g} s of workload, "
        f"scored on another {p['duration']:g} s. SLO = 5x one request's latency on one worker.",
        "",
        md_table(
            ["model", "layers", "GB", "latency on 1 worker, s", "SLO, s"],
            [[m["name"], m["layers"], m["gb"], m["latency_1_worker_s"], m["slo_s"]] for m in doc["models"]],
        ),
        "## What each system sustains at 99 % SLO attainment",
        "",
        md_table(
            [
                "system",
                f"rate (req/s, cv {p['rate_cv']:g})",
                "rate (req/s, cv 1)",
                f"burstiness (cv, at {p['cv_rate']:g} req/s)",
            ],
            [[s, doc["sustained_rate"][s], doc["sustained_rate_poisson"][s], doc["sustained_cv"][s]] for s in SYSTEMS],
        ),
        "(the largest point of each sweep at or below which every point meets 99 %; 0: none does)",
        "",
        f"AlpaServe placement over replication: {t['alpaserve_rate_gain']:.2f}x the rate at cv {p['rate_cv']:g}, "
        f"{t['alpaserve_rate_gain_poisson']:.2f}x at cv 1, {t['alpaserve_burstiness_gain']:.2f}x the burstiness "
        f"— target (>= 2x the rate or the burstiness) {'met' if t['alpaserve_target_met'] else 'NOT met'}.",
        "",
        "Reading: with whole models on single workers, a model's burst queues behind itself on the one or two "
        "workers that hold it, so replication loses its 99 % early when arrivals are bursty "
        f"(cv {p['rate_cv']:g}: {doc['sustained_rate']['replication']:g} req/s) while groups of pipelined stages "
        "spread each burst over the whole group; with Poisson arrivals the two are close (the popular models get "
        "replicas either way, and a pipeline adds a step overhead per stage). The gain is burstiness, as in "
        "AlpaServe, not raw capacity.",
        "",
        "Idle allocated compute (worker-seconds allocated to an instance and not used by it) where replication "
        "still meets 99 % (its highest sustained rate); `borrowed` is compute co-scaled instances ran beyond "
        "their quotas on the worker's unallocated share (not allocated, so not idle either):",
        "",
        md_table(
            ["reference", "system", "idle allocated, worker-s", "borrowed, worker-s", "attainment %"],
            [
                [
                    f"{r['rate']:g} req/s, cv {r['cv']:g}",
                    s,
                    r["idle_allocated_worker_s"][s],
                    r["borrowed_worker_s"][s],
                    100 * r["attainment"][s],
                ]
                for r in doc["idle_at_reference"]
                for s in SYSTEMS
            ],
        ),
        f"Co-scaling cuts idle allocated compute by {100 * t['coscale_idle_cut']:.0f} % against replication at "
        f"{doc['idle_at_reference'][0]['rate']:g} req/s, cv 1, at {100 * t['coscale_attainment_at_reference']:.2f} % "
        f"attainment — target (>= 30 % at the same attainment) {'met' if t['coscale_target_met'] else 'NOT met'} "
        f"({100 * doc['idle_at_reference'][1]['coscale_idle_cut']:.0f} % at the bursty reference).",
        "",
        "The co-scaled figure at the first reference under other co-scaling settings (the run uses quotas as "
        f"guarantees, target_util {p['target_util']:g}, demand over {p['window']:g} s, a quota floor "
        f"{p['slo_margin']:g}x what one request alone needs to meet its SLO): another demand window, another "
        "floor (0: quotas follow demand alone, and a small quota makes a lone request miss its SLO under "
        "contention), and quotas as hard caps (no unallocated compute lent), where the policy needs headroom "
        "and where a model alone on its worker, held at its SLO floor by the policy (a guarantee against no one), "
        "is slowed to that floor: the policy assumes guarantees, as the real worker's stride scheduler gives:",
        "",
        md_table(
            [
                "variant",
                "target_util",
                "attainment %",
                "allocated, worker-s",
                "idle allocated, worker-s",
                "borrowed, worker-s",
                "idle cut vs replication",
            ],
            [
                [
                    r["variant"],
                    r["target_util"],
                    100 * r["attainment"],
                    r["allocated_worker_s"],
                    r["idle_allocated_worker_s"],
                    r["borrowed_worker_s"],
                    f"{100 * r['idle_cut']:.0f} %",
                ]
                for r in doc["coscale_window_sensitivity"]
            ],
        ),
        f"## Attainment as the rate grows, cv {p['rate_cv']:g}",
        "",
        md_table(
            ["req/s", *[f"{s} %" for s in SYSTEMS], *[f"{s} idle alloc % of pool" for s in SYSTEMS]],
            [
                [
                    pt["rate"],
                    *[100 * pt["results"][s]["attainment"] for s in SYSTEMS],
                    *[100 * pt["results"][s]["idle_allocated_pool_fraction"] for s in SYSTEMS],
                ]
                for pt in doc["rate_sweep"]
            ],
        ),
        "## Attainment as the rate grows, cv 1 (Poisson)",
        "",
        md_table(
            ["req/s", *[f"{s} %" for s in SYSTEMS], *[f"{s} idle alloc % of pool" for s in SYSTEMS]],
            [
                [
                    pt["rate"],
                    *[100 * pt["results"][s]["attainment"] for s in SYSTEMS],
                    *[100 * pt["results"][s]["idle_allocated_pool_fraction"] for s in SYSTEMS],
                ]
                for pt in doc["poisson_rate_sweep"]
            ],
        ),
        "## Attainment as burstiness grows",
        "",
        md_table(
            ["cv", *[f"{s} %" for s in SYSTEMS], "alpaserve group size"],
            [
                [
                    pt["cv"],
                    *[100 * pt["results"][s]["attainment"] for s in SYSTEMS],
                    pt["results"]["alpaserve"]["group_size"],
                ]
                for pt in doc["cv_sweep"]
            ],
        ),
        "## Azure code trace (timestamps), time-compressed",
        "",
        md_table(
            ["mean req/s", "requests scored", *[f"{s} %" for s in SYSTEMS], "coscale idle alloc vs replication"],
            [
                [
                    r["rate"],
                    r["requests"],
                    *[100 * r["results"][s]["attainment"] for s in SYSTEMS],
                    _less(r["results"]),
                ]
                for r in doc["trace_runs"]
            ],
        ),
        "## What this models, and what not",
        "",
        "- Request-level estimate (sim/multimodel.py), not the token-level mesh simulator: a request is one job per "
        "stage priced by the device profile at batch 1; no continuous batching in any system, so absolute rates are "
        "low and only the comparison means something.",
        "- Idle allocated compute: replication and AlpaServe allocate every worker whole to what it holds; with "
        "co-scaling an instance is allocated its quota, and compute it borrows beyond that from the worker's "
        "unallocated share is counted as borrowed, not as allocated.",
        "- Quotas are guarantees, not caps: a stage runs on its quota, the quota of co-located instances with "
        "nothing queued, and the worker's unallocated compute, as of dispatch (Dilu's lending). A job that "
        "runs faster than its quota leaves the quota idle between jobs, so an instance's allocation is never "
        "busier than its share of time with work; the cut comes from allocating less, not from filling it.",
        "- The co-scaler sizes quotas on offered load over a window (`--window`): the longer the window, the "
        "less a quota follows bursts, the smaller the allocation and the more compute is borrowed (see the window "
        "table).",
        "- The policy's two releases (docs/placement.md): a quota follows the peak of its last release window down "
        "(by at least `release_band`), and a slot alone on its worker holds only its SLO floor. What it still "
        "allocates at the Poisson reference is mostly those floors (0.3 of a worker per light slot); a smaller "
        "floor under the worker's relative shares would need a processor-sharing estimate, not this one, which "
        "fixes a job's speed at dispatch.",
        f"- Trace: {doc['trace_licence']}",
        "",
    ]
    return "\n".join(lines)


def _less(res: dict[str, Any]) -> str:
    base = res["replication"]["idle_allocated_worker_s"]
    return f"{100 * (1 - res['coscale']['idle_allocated_worker_s'] / base):.0f} % less" if base else "—"


def plot(doc: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install 'cascade-mesh[bench]'): no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    colors = {"replication": "tab:red", "alpaserve": "tab:blue", "coscale": "tab:green"}
    p = doc["parameters"]
    panels = [
        ("rate_sweep", "rate", "attainment", "total rate, req/s", f"rate sweep (cv {p['rate_cv']:g})"),
        ("poisson_rate_sweep", "rate", "attainment", "total rate, req/s", "rate sweep (cv 1)"),
        ("cv_sweep", "cv", "attainment", "inter-arrival CV", f"burstiness sweep ({p['cv_rate']:g} req/s)"),
        ("poisson_rate_sweep", "rate", "idle_allocated_pool_fraction", "total rate, req/s", "idle allocated (cv 1)"),
    ]
    for x, (sweep, key, metric, xlabel, title) in zip(ax, panels, strict=True):
        for s in SYSTEMS:
            x.plot(
                [pt[key] for pt in doc[sweep]],
                [100 * pt["results"][s][metric] for pt in doc[sweep]],
                "o-",
                color=colors[s],
                label=s,
            )
        ylabel = "SLO attainment %" if metric == "attainment" else "allocated and idle, % of the pool"
        x.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if metric == "attainment":
            x.axhline(99, color="grey", lw=0.8, ls="--")
        x.grid(alpha=0.3)
        x.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
