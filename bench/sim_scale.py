"""Cascade at scale, in the simulator: the BlitzScale-style comparison of Cascade, ServerlessLLM-
style, AllCache and static provisioning at peak on 32, 128 and 1,000 accelerators (8 per host),
a 7B-class and a 70B-class model, the Azure code trace and a conversation-style synthetic
workload, each set so that its busiest 10 s fill the cluster; the cost of a chain multicast
against a star as the number of targets grows; the host memory the O(1) host cache takes against
AllCache's copy per host. Writes bench/results/sim-scale.{md,json} and its plots.

    python bench/sim_scale.py                  (or: cascade bench sim-scale; about two hours on 2 cores)
    python bench/sim_scale.py --quick          (32 and 128 accelerators, 10 minutes of workload)
    python bench/sim_scale.py --accelerators 1000 --profiles llama2-7b-a100-80gb --workloads code --jobs 1

Every figure comes from a simulated run of the services' own decision code (sim/); runs go in
parallel (`--jobs`), each in its own process. Only the code trace is on disk (../shared/traces/,
CC BY 4.0, Patel et al., Splitwise, ISCA 2024); the conversation workload is synthetic
(sim/workload.py says how).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, md_table, result_header, write_result
from bench.tracelib import LICENCE
from cascade.config import Deployment, ModelDeployment
from sim.hardware import Topology, model_shape
from sim.mesh import Arrival, Scenario, run
from sim.report import summary, timeline
from sim.scenarios import ScaleSpec, build
from sim.settings import MeshSettings
from sim.systems import LABELS

DEFAULT_SYSTEMS = "cascade,serverlessllm,allcache,static-peak"
DEFAULT_PROFILES = "llama2-7b-a100-80gb,llama2-70b-a100-80gb-tp4"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench sim-scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerators", default="32,128,1000", help="cluster sizes (default 32,128,1000)")
    p.add_argument("--profiles", default=DEFAULT_PROFILES, help=f"device profiles (default {DEFAULT_PROFILES})")
    p.add_argument("--workloads", default="code,conversation", help="workloads (default code,conversation)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"systems (default {DEFAULT_SYSTEMS})")
    p.add_argument("--start", type=float, default=0.0, help="code trace: window start, trace seconds (default 0)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds of workload (default: the hour)")
    p.add_argument("--compress", type=float, default=1.0, help="code trace: time compression (default 1)")
    p.add_argument("--fill", type=float, default=1.0, help="busiest 10 s over the cluster's capacity (default 1)")
    p.add_argument("--nic-gbps", type=float, default=200.0, help="RDMA NIC speed, Gb/s (default 200, 8 per host)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2: this machine's cores)")
    p.add_argument("--quick", action="store_true", help="32 and 128 accelerators, 600 s of workload")
    p.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="keep each finished run's row in this JSON-lines file, and take runs already there from it",
    )
    p.add_argument("--report-only", action="store_true", help="run nothing new: report the runs in --rows")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.accelerators, a.duration = "32,128", 600.0
    return a


# --------------------------------------------------------------------------- the comparison


def job_command(spec: ScaleSpec, system: str) -> str:
    """The `cascade sim` command that makes the same run (and the run's key in `--rows`)."""
    return (
        f"cascade sim --system {system} --accelerators {spec.accelerators} --profile {spec.profile} "
        f"--workload {spec.workload}"
        + (f" --start {spec.start_s:g}" if spec.start_s and spec.workload == "code" else "")
        + (f" --duration {spec.duration_s:g}" if spec.duration_s else "")
        + (f" --compress {spec.compress:g}" if spec.compress != 1 and spec.workload == "code" else "")
        + (f" --fill {spec.fill:g}" if spec.fill != 1 else "")
        + (f" --nic-gbps {spec.nic_gbps:g}" if spec.nic_gbps != 200 else "")
        + (f" --seed {spec.seed}" if spec.seed else "")
    )


def load_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return {r["command"]: r for r in rows}


def one(job: tuple[ScaleSpec, str]) -> dict[str, Any]:
    spec, system = job
    built = build(spec, system)
    r = run(built.scenario)
    s = summary(r, built.info["slo"]["ttft_ms"], built.info["slo"]["tpot_ms"])
    return {
        "accelerators": spec.accelerators,
        "profile": spec.profile,
        "workload": spec.workload,
        "system": system,
        "label": built.system.label,
        "info": built.info,
        "summary": s,
        "timeline": timeline(r, 10.0),
        "decisions": len(r.decisions),
        "command": job_command(spec, system),
    }


# --------------------------------------------------------------------------- chain against star


def multicast_sweep(profile: str, ns: list[int], nic_gbps: float) -> list[dict[str, Any]]:
    """Load a model onto N idle workers from the one host copy, as a chain (`multicast`) and as a
    star (`host-cache`: a stream per target), the planner and the loader choosing as they do; the
    time from the decision to the ack."""
    shape = model_shape(profile, name="m")
    out = []
    for n in ns:
        per = 8 // shape.accelerators
        hosts = math.ceil(n / per)
        row: dict[str, Any] = {"targets": n}
        for mode in ("multicast", "host-cache"):
            dep = Deployment((ModelDeployment("m", Path("/sim/m"), 0, n, policy="manual", loading=mode),))
            sc = Scenario(
                f"sweep-{mode}-{n}",
                # The copy on a host of its own (no accelerators): every stream leaves it by its NICs.
                Topology(hosts=hosts, accelerators_per_host=8, nic_gbps=nic_gbps, nics_per_host=8, storage_hosts=1),
                MeshSettings(host_cache="one", heartbeat_s=0.5),
                dep,
                {"m": shape},
                [Arrival(3600.0, "m", 1, 1)],
                fill_host_cache=("m",),
                operator=[(0.0, "m", n)],
                halt_after_acks=1,
            )
            r = run(sc)
            up = [a for a in r.acks if a["workers"] == n]
            row[mode] = up[0]["seconds"] if up else math.nan
        row["star_over_chain"] = row["host-cache"] / row["multicast"]
        out.append(row)
    return out


# --------------------------------------------------------------------------- report


def fmt_ms(x: float) -> str:
    return "n/a" if x != x else f"{x:.0f}"


def comparison_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        s = r["summary"]
        body.append(
            [
                r["accelerators"],
                r["profile"],
                r["workload"],
                r["label"],
                fmt_ms(s["ttft_ms"]["p50"]),
                fmt_ms(s["ttft_ms"]["p99"]),
                f"{s['tpot_ms']['p99']:.0f}",
                f"{100 * s['slo']['attainment']:.1f}",
                f"{s['accelerator_seconds'] / 3600:.1f}",
                f"{s['requests'] - s['ok']}/{s['requests']}",
                f"{s['scale_up_events']} / {s['scale_down_events']}",
                f"{s['routed']['pipelined']}",
                f"{s['events'] / 1e6:.2f} M in {s['cpu_s']:.0f} s",
            ]
        )
    return md_table(
        [
            "accel.",
            "profile",
            "workload",
            "system",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "TPOT p99 ms",
            "SLO %",
            "accel.-hours",
            "failed/n",
            "ups / downs",
            "pipelined",
            "simulated (events, CPU)",
        ],
        body,
    )


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """Cascade against each other system, per cluster, profile and workload."""
    out = []
    groups: dict[tuple[int, str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["accelerators"], r["profile"], r["workload"]), {})[r["system"]] = r
    for (acc, prof, wl), g in sorted(groups.items()):
        c = g.get("cascade")
        if c is None:
            continue
        cs = c["summary"]
        parts = []
        for k in ("serverlessllm", "allcache", "static-peak"):
            o = g.get(k)
            if o is None:
                continue
            os_ = o["summary"]
            parts.append(
                f"{LABELS[k]}: p99 TTFT {fmt_ms(cs['ttft_ms']['p99'])} vs {fmt_ms(os_['ttft_ms']['p99'])} ms, SLO "
                f"{100 * cs['slo']['attainment']:.1f} vs {100 * os_['slo']['attainment']:.1f} %, accelerator-s "
                f"{100 * cs['accelerator_seconds'] / max(os_['accelerator_seconds'], 1):.0f} % of its"
            )
        out.append(f"- {acc} accelerators, {prof}, {wl}: Cascade against " + "; ".join(parts) + ".")
    return out


def memory_table(rows: list[dict[str, Any]]) -> str:
    body = []
    seen = set()
    for r in rows:
        key = (r["accelerators"], r["profile"])
        if key in seen:
            continue
        seen.add(key)
        info = r["info"]
        gb = info["model_bytes"] / 1e9
        hosts = info["hosts"]
        measured = {
            x["system"]: x["summary"]["cache_bytes_peak"] / 1e9
            for x in rows
            if (x["accelerators"], x["profile"]) == key
        }
        body.append(
            [
                r["accelerators"],
                r["profile"],
                hosts,
                f"{gb:.1f}",
                f"{gb:.1f} (1 copy)",
                f"{gb * hosts:.0f} ({hosts} copies)",
                ", ".join(f"{LABELS[k]} {v:.0f}" for k, v in sorted(measured.items()) if k in LABELS),
            ]
        )
    return md_table(
        [
            "accel.",
            "profile",
            "hosts",
            "model GB",
            "Cascade host memory GB",
            "AllCache host memory GB",
            "peak host memory held for parameters in the runs, GB",
        ],
        body,
    )


def plot(rows: list[dict[str, Any]], sweep: dict[str, list[dict[str, Any]]], path: Path, sweep_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["profile"], r["workload"]) for r in rows})
    systems = [s for s in [*DEFAULT_SYSTEMS.split(","), "static-mean"] if any(r["system"] == s for r in rows)]
    sizes = sorted({r["accelerators"] for r in rows})
    colors = {
        "cascade": "tab:green",
        "serverlessllm": "tab:red",
        "allcache": "tab:orange",
        "static-peak": "tab:blue",
        "static-mean": "tab:gray",
    }
    fig, axes = plt.subplots(len(combos), 3, figsize=(14, 3.2 * len(combos)), squeeze=False)
    for i, (prof, wl) in enumerate(combos):
        for j, (metric, title) in enumerate(
            [("p99", "TTFT p99 (s, log)"), ("slo", "SLO attainment (%)"), ("acc", "accelerator-hours")]
        ):
            ax = axes[i, j]
            width = 0.8 / max(len(systems), 1)
            for k, sys_ in enumerate(systems):
                ys = []
                for n in sizes:
                    r = next(
                        (
                            x
                            for x in rows
                            if (x["profile"], x["workload"], x["accelerators"], x["system"]) == (prof, wl, n, sys_)
                        ),
                        None,
                    )
                    if r is None:
                        ys.append(0.0)
                        continue
                    s = r["summary"]
                    ys.append(
                        s["ttft_ms"]["p99"] / 1000
                        if metric == "p99"
                        else 100 * s["slo"]["attainment"]
                        if metric == "slo"
                        else s["accelerator_seconds"] / 3600
                    )
                xs = [p + k * width for p in range(len(sizes))]
                ax.bar(xs, ys, width, color=colors.get(sys_, "black"), label=LABELS.get(sys_, sys_))
            ax.set_xticks([p + width * (len(systems) - 1) / 2 for p in range(len(sizes))])
            ax.set_xticklabels([f"{n} acc." for n in sizes])
            if metric == "p99":
                ax.set_yscale("log")
            ax.set_title(f"{prof}, {wl}: {title}", fontsize=8)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    if sweep:
        fig, ax = plt.subplots(1, 1, figsize=(7, 4))
        for prof, pts in sweep.items():
            ns = [p["targets"] for p in pts]
            ax.plot(ns, [p["multicast"] for p in pts], marker="o", label=f"{prof}: chain multicast")
            ax.plot(ns, [p["host-cache"] for p in pts], marker="s", ls="--", label=f"{prof}: star")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("new instances (targets)")
        ax.set_ylabel("decision to ack, s")
        ax.set_title("loading N instances from one host copy", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(sweep_path, dpi=90)
        plt.close(fig)


def timeline_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Instances over the hour for the largest 7B code run, one line per system."""
    big = [r for r in rows if r["workload"] == "code" and "7b" in r["profile"]]
    if not big:
        return False
    n = max(r["accelerators"] for r in big)
    big = [r for r in big if r["accelerators"] == n]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(11, 3.5))
    for r in big:
        tl = r["timeline"]
        ax.step(tl["t"], tl["instances"], where="post", label=r["label"], lw=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("instances holding the model")
    ax.set_title(f"{n} accelerators, {big[0]['profile']}, code trace: instances over time", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_begin = time.monotonic()
    sizes = [int(x) for x in a.accelerators.split(",")]
    jobs: list[tuple[ScaleSpec, str]] = []
    for n in sorted(sizes, reverse=True):  # the longest first, so the pool ends together
        for prof in a.profiles.split(","):
            for wl in a.workloads.split(","):
                spec = ScaleSpec(
                    accelerators=n,
                    profile=prof,
                    workload=wl,
                    start_s=a.start,
                    # The conversation workload lasts as long as the code trace's replay.
                    duration_s=a.duration if wl == "code" else a.duration / a.compress,
                    compress=a.compress,
                    fill=a.fill,
                    nic_gbps=a.nic_gbps,
                    seed=a.seed,
                )
                jobs += [(spec, s) for s in a.systems.split(",")]
    # The cheapest first: rows are kept as they finish (`--rows`), so a run cut short still has
    # every small cluster, and the report can be written from what is there (`--report-only`).
    jobs.sort(key=lambda j: (j[0].accelerators, j[0].workload != "code"))
    done = load_rows(a.rows) if a.rows else {}
    todo = [j for j in jobs if job_command(*j) not in done]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already in {a.rows}; {a.jobs} at a time", flush=True)
    if todo and not a.report_only:
        with ProcessPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(one, j): j for j in todo}
            for fut in as_completed(futures):
                spec, system = futures[fut]
                r = fut.result()
                done[r["command"]] = r
                if a.rows:
                    with a.rows.open("ab") as f:
                        f.write(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
                s = r["summary"]
                print(
                    f"  {spec.accelerators} {spec.profile} {spec.workload} {system}: "
                    f"SLO {100 * s['slo']['attainment']:.1f} %, TTFT p99 {fmt_ms(s['ttft_ms']['p99'])} ms, "
                    f"{s['accelerator_seconds'] / 3600:.1f} accelerator-h; {s['events']} events in "
                    f"{s['cpu_s']:.0f} s CPU ({time.monotonic() - t_begin:.0f} s elapsed)",
                    flush=True,
                )
    rows = [done[job_command(*j)] for j in jobs if job_command(*j) in done]
    missing = [job_command(*j) for j in jobs if job_command(*j) not in done]
    ns = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    sweep = {
        p: multicast_sweep(p, ns if "70b" not in p else [n for n in ns if n <= 128], a.nic_gbps)
        for p in a.profiles.split(",")
    }
    text = report(a, argv, rows, sweep, missing)
    print(text)
    if not a.no_write:
        png, sweep_png, tl_png = RESULTS / "sim-scale.png", RESULTS / "sim-multicast.png", RESULTS / "sim-timeline.png"
        plot(rows, sweep, png, sweep_png)
        has_tl = timeline_plot(rows, tl_png)
        text += f"\n![p99 TTFT, SLO attainment and accelerator-hours]({png.name})\n"
        text += f"\n![chain against star]({sweep_png.name})\n"
        if has_tl:
            text += f"\n![instances over time]({tl_png.name})\n"
        payload = {
            **result_header("sim-scale"),
            "command": "python bench/sim_scale.py " + " ".join(argv),
            "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "not_run": missing,
            # A report written from kept rows: the runs themselves were made by an earlier
            # invocation, whose commit each row does not record; this file's commit is the report's.
            "rows_from": str(a.rows) if a.report_only else None,
            "rows": [{k: v for k, v in r.items() if k != "timeline"} for r in rows],
            "timelines": {
                f"{r['accelerators']}-{r['profile']}-{r['workload']}-{r['system']}": r["timeline"] for r in rows
            },
            "multicast_sweep": sweep,
            "total_run_s": time.monotonic() - t_begin,
        }
        jp, mp = write_result("sim-scale", payload, text)
        print(f"wrote {jp}, {mp}, {png}, {sweep_png}")
    return 0


def workload_sentence(a: argparse.Namespace) -> str:
    span = f"trace seconds {a.start:g}-{a.start + a.duration:g}" if a.duration else f"from trace second {a.start:g}"
    code = f"Code: the Azure code trace, {span}" + (f", compressed {a.compress:g}x" if a.compress != 1 else "")
    conv = (
        f"conversation: synthetic (sim/workload.py), {a.duration / a.compress if a.duration else 3600:g} s; no "
        "conversation trace is in ../shared/traces"
    )
    return f"{code}; {conv}."


def report(
    a: argparse.Namespace,
    argv: list[str],
    rows: list[dict[str, Any]],
    sweep: dict[str, list[dict[str, Any]]],
    missing: list[str],
) -> str:
    lines = [
        "# Cascade at scale, simulated",
        "",
        "Every row is one run of the simulator (sim/): the services' own scaler core, loader assignment and "
        "planner, gateway batcher and router, and worker admission rule and step pricing, on modelled hosts of 8 "
        f"accelerators with NVLink, PCIe, {a.nic_gbps:g} Gb/s RDMA NICs (8 per host) and an SSD each. "
        + workload_sentence(a)
        + " The workload's "
        f"busiest 10 s carry {a.fill:g} times what the cluster serves (sim/scenarios.py); the SLO is set per profile "
        "as bench/burst.py sets its own (TTFT about 6x an unloaded prefill of a mean prompt, time per output token "
        "about 8x a decode step). Accelerator-hours: workers holding the model (loading, serving, draining), by "
        "their heartbeats, times the accelerators per instance.",
        "",
        comparison_table(rows),
        "Each row's own command is in sim-scale.json (`cascade sim ...`).",
        "",
        *(
            ["Not run (the grid was cut short; these rows are missing):", "", *(f"- `{c}`" for c in missing), ""]
            if missing
            else []
        ),
        "## Headline",
        "",
        *headline(rows),
        "",
        "How to read the baselines at scale: ServerlessLLM-style and AllCache run the `concurrency` policy with "
        "bench/burst.py's Ray Serve-like knobs, which adds one instance per tick and none while a decision is in "
        "flight (services/scaler/policies.py, `decide_concurrency`). On 4 workers that is no limit; on hundreds "
        "it is the limit: their rows at 128 and 1,000 accelerators measure that stepping as much as their loading "
        "(their scale-ups in the table are many, of one instance each). Cascade's `rate` policy adds as many as "
        "the demand needs in one decision. A fairer baseline at scale would step by the deficit; it has not been "
        "run here.",
        "",
        "## Chain multicast against a star, as N grows",
        "",
        "Loading N idle instances from the one host copy (on a host of its own), chosen by the real planner: "
        "`multicast` makes one chain through every target, `host-cache` a stream per target (a star), whose "
        "streams share the copy's host NICs. Seconds from the decision to the ack:",
        "",
    ]
    for prof, pts in sweep.items():
        lines.append(
            md_table(
                ["targets", f"{prof}: chain s", "star s", "star / chain"],
                [
                    [p["targets"], f"{p['multicast']:.2f}", f"{p['host-cache']:.2f}", f"{p['star_over_chain']:.1f}"]
                    for p in pts
                ],
            )
        )
    lines += [
        "## Host memory: the O(1) host cache against AllCache",
        "",
        memory_table(rows),
        "Cascade keeps one host copy of each model in the mesh; AllCache one per host; ServerlessLLM-style keeps in "
        "each host's DRAM every checkpoint that host read (its measured peak above).",
        "",
        "## Speed",
        "",
        "Each run in one process on one core of this 2-core machine (two at a time, beside other work, so the "
        "figures are the process's CPU time, not its wall time): events and CPU seconds per run are in the "
        "table; the largest runs: "
        + "; ".join(
            f"{r['accelerators']} accelerators, {r['profile']}, {r['workload']}, {r['label']}: "
            f"{r['summary']['events'] / 1e6:.1f} M events in {r['summary']['cpu_s']:.0f} s of CPU "
            f"({r['summary']['events_per_cpu_s'] / 1e3:.0f} k events per CPU second)"
            for r in rows
            if r["accelerators"] == max(x["accelerators"] for x in rows) and r["workload"] == "code"
        )
        + ".",
        "",
        "Reproduce: `" + " ".join(["python bench/sim_scale.py", *(x for x in argv if x != "--report-only")]) + "`",
        "",
        f"Trace (code workload): {LICENCE}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
