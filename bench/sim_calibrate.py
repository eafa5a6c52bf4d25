"""Calibration of the simulator: bench/burst.py's exact configuration, and bench/scaleup.py's,
run in the simulator and set beside the committed real results (bench/results/burst.json,
scaleup.json).

    python bench/sim_calibrate.py              (or: cascade bench sim-calibrate)
    python bench/sim_calibrate.py --seeds 1 --no-write

The burst part builds its plan, emulation and configurations with the burst benchmark's own
functions (`parse`, `make_plan`, `make_emulation`, `make_configs`, `mesh_env`), so the simulated
mesh gets the same window, rate, token scaling, device profile, loads and knobs as the real one.
The machine the real runs had is modelled as they emulated it: one accelerator per worker, each
send paced to the emulated link, each disk read to the profile's disk, the stage link's latency
as bench/scaleup.py measured it. Two figures are fitted, from the committed burst run: the fixed
time a data-plane load and a disk load take beyond their bytes (orders, buffer reservation,
connections), from its decision-to-ack gaps. Writes bench/results/sim-calibration.{md,json,png}.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import burst, scaleup
from bench.burst_configs import CONFIG_KEYS, Config, make_configs, mesh_env
from bench.burst_plan import MODEL, SPEC, Emulation, Plan, make_emulation, make_plan
from bench.common import RESULTS, ROOT, md_table, result_header, write_result
from bench.tracelib import LICENCE
from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.device_profile import load_profile
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from sim.hardware import Topology, model_shape
from sim.mesh import Arrival, Result, Scenario, run
from sim.report import request_arrays, summary
from sim.settings import MeshSettings

CONTROL_LATENCY_S = 0.5e-3  # one NATS message on this machine's loopback, one way (assumed)
HUGE_GB_S = 1e6  # links the emulation did not limit (loopback, the loader's memory)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench sim-calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="simulated runs per configuration, pooled (default 3)")
    p.add_argument("--burst-json", type=Path, default=RESULTS / "burst.json", help="the committed real burst result")
    p.add_argument("--scaleup-json", type=Path, default=RESULTS / "scaleup.json", help="the committed scaleup result")
    p.add_argument(
        "--burst-raw",
        type=Path,
        default=None,
        help="the burst run's raw result (.json or .json.gz, with its decisions and acks; default: the commit "
        "the summary's `raw` field names, read with git show)",
    )
    p.add_argument("--configs", default=",".join(CONFIG_KEYS), help="burst configurations to simulate")
    p.add_argument("--no-scaleup", action="store_true", help="skip the scaleup timeline")
    p.add_argument("--no-write", action="store_true", help="print, write nothing")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- fitted figures


def raw_runs(real: dict[str, Any], raw_file: Path | None) -> list[dict[str, Any]]:
    """The committed burst run's runs with their scale decisions and acks. The summary in
    bench/results keeps neither (bench/burst_results.py), so they come from the raw document:
    `raw_file`, or the one its `raw` field names ("... git show COMMIT:PATH")."""
    if raw_file is not None:
        data = raw_file.read_bytes()
        doc = json.loads(gzip.decompress(data) if raw_file.suffix == ".gz" else data)
    elif any("acks" in r for r in real.get("runs", [])):
        doc = real
    else:
        m = re.search(r"git show (\w+):(\S+)", str(real.get("raw", "")))
        if m is None:
            raise SystemExit("the burst summary names no raw result; pass --burst-raw")
        out = subprocess.run(["git", "show", f"{m[1]}:{m[2]}"], cwd=ROOT, capture_output=True, check=True)
        doc = json.loads(out.stdout)
    runs: list[dict[str, Any]] = doc.get("runs") or doc["rows"]
    return runs


def fitted_setup(runs: list[dict[str, Any]], link_s: float, disk_s: float) -> dict[str, float]:
    """Time a load took beyond its bytes in the committed run (median over its scale-ups), less
    the messages the simulator already counts (decision, orders there and back, the ack)."""
    loads, disks = [], []
    for r in runs:
        acks = {k["id"]: k["t"] for k in r.get("acks", [])}
        for d in r.get("decisions", []):
            if d["action"] != "up" or d["id"] not in acks:
                continue
            gap = acks[d["id"]] - d["t"]
            if r["key"] in ("cascade", "allcache") or (r["key"] == "serverlessllm" and gap < disk_s / 2):
                loads.append(gap - link_s)
            elif r["key"] == "serverlessllm":
                disks.append(gap - disk_s)
    fixed = 5 * CONTROL_LATENCY_S
    return {
        "transfer_setup_s": max(0.0, statistics.median(loads) - fixed) if loads else 0.0,
        "disk_setup_s": max(0.0, statistics.median(disks) - fixed) if disks else 0.0,
        "loads_seen": len(loads),
        "disk_reads_seen": len(disks),
    }


def stage_latency_s(scaleup_json: dict[str, Any]) -> float:
    """The stage link's one-way frame latency bench/scaleup.py measured (mean of its p50s)."""
    p50s = [
        st["latency_ms_p50"]
        for r in scaleup_json.get("rows", [])
        for st in (r.get("stage_links") or {}).values()
        if st and st.get("latency_ms_p50")
    ]
    return statistics.fmean(p50s) / 1000 if p50s else 0.005


# --------------------------------------------------------------------------- the burst benchmark


def burst_scenarios(
    ba: argparse.Namespace,
    plan: Plan,
    emu: Emulation,
    unit_real: list[int],
    fit: dict[str, float],
    stage_s: float,
    keys: list[str],
    seed: int,
) -> list[tuple[Config, Scenario]]:
    profile = emu.profile
    scale = emu.emulated_bytes / sum(unit_real)
    units = [round(b * scale) for b in unit_real]
    shape = model_shape(ba.profile, name=MODEL, layers=SPEC.layers, unit_nbytes=units)
    # The real model's activations cross the stage link: hidden 64 in float32.
    shape = type(shape)(**{**{f: getattr(shape, f) for f in shape.__dataclass_fields__}, "hidden": 64, "act_bytes": 4})
    link_bps = emu.emulated_bytes / emu.link_s
    topo = Topology(
        hosts=ba.workers,
        accelerators_per_host=1,
        nvlink_gb_s=HUGE_GB_S,
        pcie_gb_s=link_bps / 1e9,  # a load from a worker's own host-memory cache: the emulated link
        nic_gbps=HUGE_GB_S,
        nics_per_host=1,
        ssd_gb_s=profile.disk_mb_s / 1000,
    )
    out = []
    arrivals = [Arrival(x.t, MODEL, x.prompt_tokens, x.output_tokens) for x in plan.arrivals]
    for cfg in make_configs(ba, plan, emu):
        if cfg.key not in keys:
            continue
        env = {**mesh_env(ba, emu), **cfg.env}
        settings = MeshSettings(
            heartbeat_s=float(env["CASCADE_HEARTBEAT_S"]),
            metrics_s=float(env["CASCADE_METRICS_S"]),
            max_batch=int(env["CASCADE_MAX_BATCH"]),
            max_prefill_tokens=int(env["CASCADE_MAX_PREFILL_TOKENS"]),
            token_scale=float(env["CASCADE_EMULATED_TOKEN_SCALE"]),
            scaler_tick_s=float(env["CASCADE_SCALER_TICK_S"]),
            rate_window_s=float(env["CASCADE_SCALER_RATE_WINDOW_S"]),
            send_cap_bps=link_bps,  # CASCADE_LOADER_SEND_MB_S: every send paced to the emulated link
            serving_send_bps=link_bps,  # CASCADE_LOADER_SERVING_SEND_MB_S, the same
            host_cache="one",
            local_cache="CASCADE_LOCAL_CACHE_MB" in env,
            control_latency_s=CONTROL_LATENCY_S,
            stage_latency_s=stage_s,
            transfer_setup_s=fit["transfer_setup_s"],
            disk_setup_s=fit["disk_setup_s"],
            client_timeout_s=ba.timeout,
        )
        dep = Deployment(
            (
                ModelDeployment(
                    MODEL,
                    Path("/sim") / MODEL,
                    min_replicas=cfg.min_replicas,
                    max_replicas=cfg.max_replicas,
                    policy=cfg.policy,
                    knobs=dict(cfg.knobs),
                    loading=cfg.loading,
                    scaling=cfg.scaling,
                ),
            )
        )
        warm = [Arrival(0.0, MODEL, 16, 4) for _ in range(2 * max(1, cfg.min_replicas))]
        sc = Scenario(
            name=f"burst-{cfg.key}",
            topology=topo,
            settings=settings,
            deployment=dep,
            models={MODEL: shape},
            arrivals=arrivals,
            preload={MODEL: cfg.min_replicas},
            fill_host_cache=(MODEL,) if cfg.fill_host_cache else (),
            warmup=warm,
            window_s=plan.window_s,
            seed=seed,
        )
        out.append((cfg, sc))
    return out


def pooled(results: list[Result], slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    """Several seeds of one configuration as bench/burst.py pools its repeats: percentiles and
    attainment over all their requests, instance-seconds averaged."""
    import numpy as np

    arrays = [request_arrays(r) for r in results]
    ttft = np.concatenate([a["ttft_ms"] for a in arrays])
    tpot = np.concatenate([a["tpot_ms"] for a in arrays])
    ok = np.concatenate([a["ok"] for a in arrays])
    meets = ok & (ttft <= slo_ttft_ms) & ~(tpot > slo_tpot_ms)
    runs = [summary(r, slo_ttft_ms, slo_tpot_ms) for r in results]
    t = ttft[~np.isnan(ttft)]
    p = tpot[~np.isnan(tpot)]
    return {
        "ttft_p50": float(np.percentile(t, 50)),
        "ttft_p99": float(np.percentile(t, 99)),
        "tpot_p50": float(np.percentile(p, 50)),
        "tpot_p99": float(np.percentile(p, 99)),
        "slo": float(meets.sum() / ttft.size),
        "instance_s": statistics.fmean(x["instance_seconds"] for x in runs),
        "per_seed": [
            {
                "slo": x["slo"]["attainment"],
                "instance_s": x["instance_seconds"],
                "ttft_p99": x["ttft_ms"]["p99"],
                "scale_up_events": x["scale_up_events"],
                "scale_down_events": x["scale_down_events"],
                "events": x["events"],
                "wall_s": x["wall_s"],
            }
            for x in runs
        ],
    }


def real_figures(real: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for r in real["rows"]:
        s = r["summary"]
        rounds = [x for x in real.get("runs", []) if x["key"] == r["key"]]
        out[r["key"]] = {
            "label": r["label"],
            "ttft_p50": s["ttft_ms"]["p50"],
            "ttft_p99": s["ttft_ms"]["p99"],
            "tpot_p50": s["itl_ms"]["p50"],
            "tpot_p99": s["itl_ms"]["p99"],
            "slo": s["slo"]["attainment"],
            "instance_s": r["instance_seconds"],
            "slo_rounds": [x["summary"]["slo"]["attainment"] for x in rounds],
            "instance_s_rounds": [x["instance_seconds"] for x in rounds],
            "ttft_p99_rounds": [x["summary"]["ttft_ms"]["p99"] for x in rounds],
        }
    return out


FIGURES = (
    ("ttft_p50", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99", "TTFT p99 ms", "{:.0f}"),
    ("tpot_p50", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99", "TPOT p99 ms", "{:.1f}"),
    ("slo", "SLO %", "{:.1%}"),
    ("instance_s", "instance-s", "{:.0f}"),
)


def within(real: float, sim: float, tol: float = 0.2) -> bool:
    return real > 0 and abs(sim - real) <= tol * abs(real)


def ranking(figs: dict[str, dict[str, Any]], key: str, reverse: bool) -> list[str]:
    return [k for k, _ in sorted(figs.items(), key=lambda kv: kv[1][key], reverse=reverse)]


# The figures whose real value is known per round, so that the real mesh's own spread can say
# whether it told two systems apart at all.
ROUNDS = {"slo": "slo_rounds", "ttft_p99": "ttft_p99_rounds", "instance_s": "instance_s_rounds"}


def swapped_pairs(
    real: dict[str, dict[str, Any]], sim: dict[str, dict[str, Any]], key: str
) -> tuple[list[list[str]], list[list[str]]]:
    """Pairs of systems the simulator puts in the other order from the real mesh: those the real
    rounds separate (their ranges do not overlap), and those they do not (a tie in the real mesh,
    whose order is the rounds' luck)."""
    separated: list[list[str]] = []
    tied: list[list[str]] = []
    keys = [k for k in real if k in sim]
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            dr, ds = real[a][key] - real[b][key], sim[a][key] - sim[b][key]
            if dr * ds >= 0:
                continue
            rounds = ROUNDS.get(key)
            ra, rb = (real[a].get(rounds, []), real[b].get(rounds, [])) if rounds else ([], [])
            overlap = bool(ra and rb) and max(min(ra), min(rb)) <= min(max(ra), max(rb))
            (tied if overlap else separated).append([a, b])
    return separated, tied


# --------------------------------------------------------------------------- the scaleup benchmark


def scaleup_scenario(sa: argparse.Namespace, mode: str, target: int, units_real: list[int], stage_s: float) -> Scenario:
    prof = load_profile(sa.profile)
    shape0 = model_shape(sa.profile, name=scaleup.MODEL)
    scale = shape0.nbytes / sum(units_real)
    shape = model_shape(
        sa.profile, name=scaleup.MODEL, layers=sa.layers, unit_nbytes=[round(b * scale) for b in units_real]
    )
    shape = type(shape)(**{**{f: getattr(shape, f) for f in shape.__dataclass_fields__}, "hidden": 64, "act_bytes": 4})
    cap = scaleup.capacity_req_s(sa.profile, sa.max_batch, int(sa.prompt_tokens * sa.token_scale), sa.max_tokens)
    rate = sa.overload * cap
    rng = random.Random(sa.seed)
    total_s = sa.before_s + sa.load_s * 1.3 + sa.after_s
    arrivals, t = [], 0.0
    while t < total_s:  # bench/scaleup.py's own open-loop schedule, same seed
        arrivals.append(Arrival(t, scaleup.MODEL, sa.prompt_tokens, sa.max_tokens))
        t += rng.expovariate(rate)
    settings = MeshSettings(
        heartbeat_s=scaleup.HEARTBEAT_S,
        metrics_s=1.0,
        max_batch=sa.max_batch,
        max_prefill_tokens=sa.max_prefill_tokens,
        token_scale=sa.token_scale,
        host_cache="off",
        control_latency_s=CONTROL_LATENCY_S,
        stage_latency_s=stage_s,
        client_timeout_s=300.0,
    )
    topo = Topology(
        hosts=target,
        accelerators_per_host=1,
        nvlink_gb_s=HUGE_GB_S,
        pcie_gb_s=HUGE_GB_S,
        nic_gbps=HUGE_GB_S,
        nics_per_host=1,
        ssd_gb_s=shape.nbytes / sa.load_s / 1e9,
    )
    dep = Deployment(
        (
            ModelDeployment(
                scaleup.MODEL,
                Path("/sim") / scaleup.MODEL,
                min_replicas=1,
                max_replicas=target,
                policy="manual",
                loading="disk",
                scaling=mode,
            ),
        )
    )
    del prof
    return Scenario(
        name=f"scaleup-{mode}-{target}",
        topology=topo,
        settings=settings,
        deployment=dep,
        models={scaleup.MODEL: shape},
        arrivals=arrivals,
        preload={scaleup.MODEL: 1},
        operator=[(sa.before_s, scaleup.MODEL, target)],
        trace_beats=True,
        seed=sa.seed,
    )


def scaleup_figures(r: Result) -> dict[str, Any]:
    """bench/scaleup.py's `analyse`, on the simulated run."""
    t0 = r.t0
    dec = next((d["t"] - t0 for d in r.decisions if d["action"] == "up"), math.nan)
    initial = {w for w, seq in r.beats.items() if seq and seq[0][1] and seq[0][0] <= t0}
    new_ready = [(t - t0, w, u) for t, w, u in r.ready_log if w not in initial and t - t0 >= dec]
    workers = sorted({w for _, w, _ in new_ready})
    all_loaded = max((t for t, _, _ in new_ready), default=math.nan)
    first_unit = min((t for t, _, _ in new_ready), default=math.nan)
    first_work = min(
        (
            hb.ts - t0
            for hb in r.beat_log
            if hb.worker_id in workers and (hb.driven_layers > 0 or hb.running > 0) and hb.ts - t0 >= dec
        ),
        default=math.nan,
    )
    served_new = sorted(q.first - t0 for q in r.reqs if q.served_by in workers and q.first == q.first)
    window = [q for q in r.reqs if dec <= q.arrived - t0 <= all_loaded and q.first == q.first]
    import numpy as np

    ttft = np.array([(q.first - q.arrived) * 1000 for q in window]) if window else np.array([math.nan])
    return {
        "decision_at_s": dec,
        "first_unit_ready_s": first_unit - dec,
        "all_loaded_s": all_loaded - dec,
        "first_request_via_new_s": first_work - dec,
        "first_token_via_new_s": (served_new[0] - dec) if served_new else math.nan,
        "window_requests": len(window),
        "ttft_window_ms": {"p50": float(np.percentile(ttft, 50)), "p99": float(np.percentile(ttft, 99))},
        "served_by_new_during_window": sum(1 for q in window if q.served_by in workers),
    }


# --------------------------------------------------------------------------- report


def plot(path: Path, real_runs: list[dict[str, Any]], sims: dict[str, Result], labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["key"]: r for r in real_runs if r.get("round", 1) == 1}
    keys = [k for k in sims if k in runs and "timeline" in runs[k]]
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys, strict=True):
        tl = runs[k]["timeline"]
        xs = [t for t, v in zip(tl["scheduled"], tl["ttft_ms"], strict=True) if v is not None]
        ys = [v / 1000 for v in tl["ttft_ms"] if v is not None]
        ax.scatter(xs, ys, s=3, c="tab:blue", label="real (round 1)")
        a = request_arrays(sims[k])
        ax.scatter(a["t"], a["ttft_ms"] / 1000, s=3, c="tab:orange", label="simulated (seed 0)")
        ax.set_yscale("log")
        ax.set_ylabel("TTFT s")
        ax.set_title(labels.get(k, k), fontsize=9)
        ax.legend(loc="upper right", fontsize=7, markerscale=3)
    axes[-1, 0].set_xlabel("replay seconds (by arrival)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# The burst run's parameters that shape the replay (the rest say how it was run or written).
BURST_SHAPE = (
    "start", "duration", "compress", "load", "workers", "profile", "max_batch", "token_scale",
    "max_prefill_tokens", "link_gb_s", "slo_ttft_ms", "slo_tbt_ms", "timeout", "seed",
)  # fmt: skip


def burst_setup(parameters: dict[str, Any]) -> tuple[argparse.Namespace, Any, Any, list[int]]:
    """A burst run's (arguments, plan, emulation, real bytes per unit of the generated model), from
    the parameters its JSON records."""
    ba = burst.parse([f"--{k.replace('_', '-')}={v}" for k, v in parameters.items() if k in BURST_SHAPE])
    plan = make_plan(ba, ba.profile)
    with tempfile.TemporaryDirectory(prefix="cascade-simcal-") as tmp:
        model_dir = Path(tmp) / MODEL
        generate_model(model_dir, SPEC)
        emu = make_emulation(ba, model_dir)
        ck = Checkpoint(model_dir)
        unit_real = [ck.unit_nbytes(u) for u in range(ck.config.num_units)]
        ck.close()
    return ba, plan, emu, unit_real


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_begin = time.monotonic()
    real = json.loads(a.burst_json.read_text())
    real_scaleup = json.loads(a.scaleup_json.read_text()) if a.scaleup_json.is_file() else {}
    ba, plan, emu, unit_real = burst_setup(real["parameters"])
    real_runs = raw_runs(real, a.burst_raw)
    fit = fitted_setup(real_runs, emu.link_s, emu.disk_s)
    stage_s = stage_latency_s(real_scaleup)
    keys = a.configs.split(",")
    scen = {s: burst_scenarios(ba, plan, emu, unit_real, fit, stage_s, keys, s) for s in range(a.seeds)}
    real_figs = real_figures(real)
    sim_figs: dict[str, dict[str, Any]] = {}
    first_runs: dict[str, Result] = {}
    labels: dict[str, str] = {}
    for i, (cfg, _) in enumerate(scen[0]):
        results = [scen[s][i][1] for s in range(a.seeds)]
        runs = []
        for sc in results:
            t = time.monotonic()
            runs.append(run(sc))
            print(f"  {cfg.key} seed {sc.seed}: {runs[-1].events} events in {time.monotonic() - t:.1f} s", flush=True)
        first_runs[cfg.key] = runs[0]
        labels[cfg.key] = cfg.label
        sim_figs[cfg.key] = pooled(runs, ba.slo_ttft_ms, ba.slo_tbt_ms)
    # ---- the table
    rows, verdicts = [], []
    for k in keys:
        if k not in sim_figs or k not in real_figs:
            continue
        r, s = real_figs[k], sim_figs[k]
        cells: list[Any] = [r["label"]]
        for f, _, fmt in FIGURES:
            ok = within(r[f], s[f])
            verdicts.append({"config": k, "figure": f, "real": r[f], "sim": s[f], "within_20pct": ok})
            cells.append(f"{fmt.format(r[f])} / {fmt.format(s[f])}{'' if ok else ' ✗'}")
        rows.append(cells)
    table = md_table(["configuration (real / simulated)", *(h for _, h, _ in FIGURES)], rows)
    common = [k for k in keys if k in sim_figs and k in real_figs]
    rank = {}
    for f, _, _ in FIGURES:
        rev = f == "slo"
        rr = ranking({k: real_figs[k] for k in common}, f, rev)
        ss = ranking({k: sim_figs[k] for k in common}, f, rev)
        separated, tied = swapped_pairs({k: real_figs[k] for k in common}, {k: sim_figs[k] for k in common}, f)
        rank[f] = {"real": rr, "sim": ss, "same": rr == ss, "swapped": separated, "swapped_within_real_spread": tied}
    n_ok = sum(v["within_20pct"] for v in verdicts)
    # ---- scaleup
    su_rows: list[dict[str, Any]] = []
    if not a.no_scaleup and real_scaleup:
        sa = scaleup.parse(
            [
                f"--{k.replace('_', '-')}={v}"
                for k, v in real_scaleup["parameters"].items()
                if k
                in (
                    "profile",
                    "max_batch",
                    "max_tokens",
                    "prompt_tokens",
                    "token_scale",
                    "max_prefill_tokens",
                    "overload",
                    "load_s",
                    "before_s",
                    "after_s",
                    "layers",
                    "seed",
                )
            ]
        )
        spec = GenerateSpec(**real_scaleup["model_spec"])
        with tempfile.TemporaryDirectory(prefix="cascade-simcal-") as tmp:
            md = Path(tmp) / scaleup.MODEL
            generate_model(md, spec)
            ck = Checkpoint(md)
            su_units = [ck.unit_nbytes(u) for u in range(ck.config.num_units)]
            ck.close()
        for rr in real_scaleup["rows"]:
            res = run(scaleup_scenario(sa, rr["mode"], rr["target_replicas"], su_units, stage_s))
            su_rows.append(
                {
                    "mode": rr["mode"],
                    "target": rr["target_replicas"],
                    "real": {
                        k: rr[k]
                        for k in (
                            "first_unit_ready_s",
                            "all_loaded_s",
                            "first_request_via_new_s",
                            "first_token_via_new_s",
                            "ttft_window_ms",
                            "window_requests",
                            "served_by_new_during_window",
                        )
                    },
                    "sim": scaleup_figures(res),
                }
            )
            print(f"  scaleup {rr['mode']} 1->{rr['target_replicas']}: {res.events} events", flush=True)
    text = report(a, ba, plan, emu, fit, stage_s, table, rank, n_ok, len(verdicts), real_figs, sim_figs, su_rows, argv)
    print()
    print(text)
    if not a.no_write:
        png = RESULTS / "sim-calibration.png"
        plot(png, real_runs, first_runs, labels)
        payload = {
            **result_header("sim-calibration"),
            "command": "python bench/sim_calibrate.py " + " ".join(argv),
            "parameters": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}},
            "burst_parameters": real["parameters"],
            "real_commit": real.get("commit"),
            "emulated": {
                "what": "each worker one simulated accelerator of the profile, steps priced by "
                "DeviceProfile.stage_step_ms at the real run's token scale; loads paced to the real run's emulated "
                "link and disk; the services' decisions by their own code (sim/)",
                "device": emu.profile.describe(),
                "model_bytes": emu.emulated_bytes,
                "link_s_per_model": emu.link_s,
                "disk_s_per_model": emu.disk_s,
            },
            "fitted": fit,
            "assumed": {"control_latency_s": CONTROL_LATENCY_S, "stage_latency_s_from_scaleup_json": stage_s},
            "figures": {"real": real_figs, "sim": sim_figs},
            "verdicts": verdicts,
            "ranking": rank,
            "scaleup": su_rows,
            "total_run_s": time.monotonic() - t_begin,
        }
        jp, mp = write_result("sim-calibration", payload, text + f"\n![real and simulated TTFT]({png.name})\n")
        print(f"wrote {jp}, {mp} and {png}")
    return 0


def differences(real: dict[str, Any], sim: dict[str, Any]) -> list[str]:
    """The simulator's mean signed error per figure over the configurations, and the causes
    known for it."""
    keys = [k for k in real if k in sim]
    out = []
    for f, head, _ in FIGURES:
        errs = [(sim[k][f] - real[k][f]) / real[k][f] for k in keys if real[k][f]]
        if not errs:
            continue
        lo, hi = min(errs), max(errs)
        out.append(
            f"- {head}: simulated minus real, over the real figure: mean {100 * statistics.fmean(errs):+.1f} %, "
            f"from {100 * lo:+.1f} to {100 * hi:+.1f} %."
        )
    slo_gap = max(
        max(0.0, min(real[k]["slo_rounds"]) - sim[k]["slo"], sim[k]["slo"] - max(real[k]["slo_rounds"]))
        for k in keys
        if real[k]["slo_rounds"]
    )
    inst_err = max(abs(sim[k]["instance_s"] - real[k]["instance_s"]) / real[k]["instance_s"] for k in keys)
    out += [
        "",
        "The simulator is a little faster than the real mesh on the latency figures: it runs each engine step for "
        "exactly the profile's time, and messages take a fixed 0.5 ms. The real mesh adds what the profile does not "
        "price: the engine thread's own work between padded steps (sampling, token events, queue bookkeeping), "
        "steps that overran their device time (about 1 % of them, bench/results/burst.md), and the gateway's "
        "stream work under load, on a 2-core machine that the mesh's nine processes (four workers, gateway, "
        "scaler, loader, NATS, the load generator) share. Those costs have not been measured one by one, so the "
        "simulator does not add a fitted constant for them. The largest error on time per output token is at its "
        "median, where a few milliseconds of that overhead are a tenth of a 30 ms step. SLO attainment and "
        "instance-seconds depend mostly on when the scaler decides and how long loads take: simulated SLO "
        f"attainment is at most {100 * slo_gap:.1f} points outside the range of the real rounds, and "
        f"instance-seconds at most {100 * inst_err:.1f} % from the real mean.",
    ]
    return out


def report(
    a: argparse.Namespace,
    ba: argparse.Namespace,
    plan: Plan,
    emu: Emulation,
    fit: dict[str, float],
    stage_s: float,
    table: str,
    rank: dict[str, Any],
    n_ok: int,
    n: int,
    real: dict[str, Any],
    sim: dict[str, Any],
    su: list[dict[str, Any]],
    argv: list[str],
) -> str:
    lines = [
        "# Simulator calibration against the real mesh",
        "",
        f"bench/burst.py's configuration (trace {ba.start:g}-{ba.start + ba.duration:g} s, {ba.compress:g}x, load "
        f"{ba.load:g}, {ba.workers} emulated {emu.profile.name} workers, {len(plan.arrivals)} requests) simulated "
        f"{a.seeds} times per configuration and pooled, beside the committed real result (bench/results/burst.json, "
        f"{len(real.get('cascade', {}).get('slo_rounds', []))} rounds pooled). Each cell: real / simulated; ✗ marks a "
        f"simulated figure more than 20 % off the real one. {n_ok} of {n} figures are within 20 %.",
        "",
        table,
        "Ranking (best first) by each figure, real and simulated:",
        "",
    ]
    for f, head, _ in FIGURES:
        r = rank[f]
        if r["same"] or not (r["swapped"] or r["swapped_within_real_spread"]):
            verdict = "same"
        elif r["swapped"]:
            verdict = "DIFFERENT: " + "; ".join(" and ".join(p) for p in r["swapped"]) + " swapped"
        else:
            verdict = "same but for " + "; ".join(
                f"{' and '.join(p)}, which the real rounds do not separate" for p in r["swapped_within_real_spread"]
            )
        lines.append(f"- {head}: real {', '.join(r['real'])}; simulated {', '.join(r['sim'])} — {verdict}")
    lines.append("")
    lines.append("Run-to-run spread of the real mesh (rounds) and of the simulator (seeds):")
    lines.append("")
    spread = []
    for k in real:
        if k not in sim:
            continue
        rs, ss = real[k]["slo_rounds"], [x["slo"] for x in sim[k]["per_seed"]]
        ri, si = real[k]["instance_s_rounds"], [x["instance_s"] for x in sim[k]["per_seed"]]
        spread.append(
            [
                real[k]["label"],
                ", ".join(f"{100 * x:.1f}" for x in rs),
                ", ".join(f"{100 * x:.1f}" for x in ss),
                ", ".join(f"{x:.0f}" for x in ri),
                ", ".join(f"{x:.0f}" for x in si),
            ]
        )
    lines.append(
        md_table(
            ["configuration", "real SLO % by round", "sim SLO % by seed", "real instance-s", "sim instance-s"], spread
        )
    )
    if su:
        lines.append("## bench/scaleup.py's timeline (1 instance under 1.6x overload, scaled to N by an operator)")
        lines.append("")
        body = []
        for x in su:
            r, s = x["real"], x["sim"]
            body.append(
                [
                    x["mode"],
                    x["target"],
                    f"{r['first_request_via_new_s']:.2f} / {s['first_request_via_new_s']:.2f}",
                    f"{r['first_token_via_new_s']:.2f} / {s['first_token_via_new_s']:.2f}",
                    f"{r['all_loaded_s']:.2f} / {s['all_loaded_s']:.2f}",
                    f"{r['ttft_window_ms']['p50']:.0f} / {s['ttft_window_ms']['p50']:.0f}",
                    f"{r['ttft_window_ms']['p99']:.0f} / {s['ttft_window_ms']['p99']:.0f}",
                    f"{r['served_by_new_during_window']}/{r['window_requests']} / "
                    f"{s['served_by_new_during_window']}/{s['window_requests']}",
                ]
            )
        lines.append(
            md_table(
                [
                    "mode",
                    "1→N",
                    "first request via new s",
                    "first token via new s",
                    "all loaded s",
                    "window TTFT p50 ms",
                    "window TTFT p99 ms",
                    "served by new in window",
                ],
                body,
            )
        )
        for t in sorted({x["target"] for x in su}):
            by = {x["mode"]: x for x in su if x["target"] == t}
            if "live" in by and "stop-the-world" in by:
                rr = by["live"]["real"]["ttft_window_ms"]["p99"] / by["stop-the-world"]["real"]["ttft_window_ms"]["p99"]
                ss = by["live"]["sim"]["ttft_window_ms"]["p99"] / by["stop-the-world"]["sim"]["ttft_window_ms"]["p99"]
                lines.append(f"1→{t}: live's window p99 TTFT over stop-the-world's: real {rr:.2f}, simulated {ss:.2f}.")
        lines.append("")
    lines += [
        "## Where the simulator differs, and why",
        "",
        *differences(real, sim),
        "",
        "## How the real machine is modelled",
        "",
        f"- Steps: the device profile ({emu.profile.name}) priced by the engine's own function, with the same "
        f"token scale ({ba.token_scale:g}) and prefill budget ({ba.max_prefill_tokens} priced tokens); the real "
        "emulation overran its device time on about 1 % of steps (burst.md), which the simulator does not.",
        f"- Loads: every send paced to {ba.link_gb_s:g} GB/s ({emu.link_s:.3f} s a model), disk reads to "
        f"{emu.profile.disk_mb_s:g} MB/s ({emu.disk_s:.2f} s), a ServerlessLLM-style worker's own DRAM copy at the "
        "link's pace; unit sizes in the real checkpoint's proportions.",
        f"- Fitted from the committed run's decision-to-ack gaps: {1000 * fit['transfer_setup_s']:.1f} ms before a "
        f"data-plane send's first byte (median of {fit['loads_seen']} loads) and {1000 * fit['disk_setup_s']:.1f} ms "
        f"before a disk read's (of {fit['disk_reads_seen']}).",
        f"- Assumed: {1000 * CONTROL_LATENCY_S:.1f} ms for one NATS message; the stage link's frame latency "
        f"{1000 * stage_s:.1f} ms (bench/scaleup.py's measured p50, bench/results/scaleup.json).",
        "",
        "Reproduce: `" + " ".join(["python bench/sim_calibrate.py", *argv]) + "`",
        "",
        f"Trace: {LICENCE}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
