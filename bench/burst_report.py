"""bench/burst.py's report: repeated runs pooled per configuration, the issue's targets judged,
and the markdown table and text, all pure functions of result rows and documents."""

from __future__ import annotations

import argparse
from typing import Any

from bench.burst_configs import CASCADE_RATE_WINDOW_S
from bench.burst_metrics import slo_share
from bench.common import dist_ms, md_table


def pooled_rows(a: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration over its runs: latency percentiles and SLO attainment over all
    their requests (each run replays the same schedule, so this is the mean attainment), the
    other figures averaged; the emulation's counters summed."""
    out: list[dict[str, Any]] = []
    for key in dict.fromkeys(r["key"] for r in runs):
        rs = [r for r in runs if r["key"] == key]
        tl = [(t, p, st) for r in rs for t, p, st in zip(r["timeline"]["ttft_ms"], r["timeline"]["tpot_ms"],
                                                          r["timeline"]["status"], strict=True)]  # fmt: skip

        emu = [r["emulated_device"] for r in rs]
        summ = {
            "requests": len(tl),
            "ok": sum(r["summary"]["ok"] for r in rs),
            "ttft_ms": dist_ms([t / 1000 for t, _, _ in tl if t is not None]),
            "itl_ms": dist_ms([p / 1000 for _, p, _ in tl if p is not None]),
            "itl_definition": rs[0]["summary"]["itl_definition"],
            "slo": {
                **rs[0]["summary"]["slo"],
                "attainment": slo_share(tl, a.slo_ttft_ms, a.slo_tbt_ms, True, True),
                "ttft_attainment": slo_share(tl, a.slo_ttft_ms, a.slo_tbt_ms, True, False),
                "tbt_attainment": slo_share(tl, a.slo_ttft_ms, a.slo_tbt_ms, False, True),
            },
        }
        out.append({
            "key": key,
            "label": rs[0]["label"],
            "deployment": rs[0]["deployment"],
            "runs": len(rs),
            "summary": summ,
            "instance_seconds": sum(r["instance_seconds"] for r in rs) / len(rs),
            "scale_events": round(sum(r["scale_events"] for r in rs) / len(rs), 1),
            "scale_up_events": round(sum(r["scale_up_events"] for r in rs) / len(rs), 1),
            "scale_down_events": round(sum(r["scale_down_events"] for r in rs) / len(rs), 1),
            "emulated_device": {
                "steps": sum(e["steps"] for e in emu),
                "overrun_steps": sum(e["overrun_steps"] for e in emu),
                "overrun_s": round(sum(e["overrun_s"] for e in emu), 3),
                "padded_s": round(sum(e["padded_s"] for e in emu), 3),
                "significant": any(e["significant"] for e in emu),
                "significance_rule": "any run's overrun_s > 1 % of its padded_s",
            },
        })  # fmt: skip
    return out


def runs_table(rows: list[dict[str, Any]], runs: list[dict[str, Any]], repeats: int) -> str:
    body = []
    for p in rows:
        by_round = {r["round"]: r for r in runs if r["key"] == p["key"]}
        cells = []
        for k in range(1, repeats + 1):
            r = by_round.get(k)
            if r is None:
                cells.append("failed")
            else:
                cells.append(f"{100 * r['summary']['slo']['attainment']:.1f} / {r['instance_seconds']:.0f}")
        body.append([p["label"], *cells])
    return md_table(["configuration", *(f"round {k}: SLO % / instance-s" for k in range(1, repeats + 1))], body)


def verdicts_by_round(runs: list[dict[str, Any]], repeats: int) -> list[list[dict[str, Any]]]:
    return [verdicts({r["key"]: r for r in runs if r["round"] == k}) for k in range(1, repeats + 1)]


def verdicts(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    c, sl, sp = rows.get("cascade"), rows.get("serverlessllm"), rows.get("static-peak")
    if c and sl:
        cp, sp99 = c["summary"]["ttft_ms"]["p99"], sl["summary"]["ttft_ms"]["p99"]
        lower = 1 - cp / sp99 if sp99 > 0 else float("nan")
        fig = f"{cp:.0f} ms vs {sp99:.0f} ms: {100 * lower:.0f} % lower"
        out.append({"target": "Cascade p99 TTFT at least 50 % lower than ServerlessLLM-style", "figure": fig,
                    "met": bool(lower >= 0.5)})  # fmt: skip
    if c and sp:
        ratio = c["instance_seconds"] / sp["instance_seconds"] if sp["instance_seconds"] > 0 else float("nan")
        out.append({"target": "Cascade instance-seconds at most 70 % of static at peak",
                    "figure": f"{c['instance_seconds']:.0f} vs {sp['instance_seconds']:.0f}: {100 * ratio:.0f} %",
                    "met": bool(ratio <= 0.7)})  # fmt: skip
        ca, pa = 100 * c["summary"]["slo"]["attainment"], 100 * sp["summary"]["slo"]["attainment"]
        fig = f"{ca:.1f} % vs {pa:.1f} %: {ca - pa:+.1f} points"
        out.append({"target": "Cascade SLO attainment within 2 points of static at peak", "figure": fig,
                    "met": bool(ca >= pa - 2)})  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        s, d, e = r["summary"], r["deployment"], r["emulated_device"]
        over = f"{e['overrun_steps']}/{e['steps']}, {e['overrun_s']:.2f} s" + (
            " **significant**" if e["significant"] else ""
        )
        body.append([
            r["label"], f"{d['loading']} / {d['scaling']} / {d['policy']}",
            s["ttft_ms"]["p50"], s["ttft_ms"]["p95"], s["ttft_ms"]["p99"],
            s["itl_ms"]["p50"], s["itl_ms"]["p95"], s["itl_ms"]["p99"],
            f"{100 * s['slo']['attainment']:.1f}", f"{r['instance_seconds']:.0f}",
            f"{r['scale_events']} ({r['scale_up_events']} up, {r['scale_down_events']} down)",
            f"{s['ok']}/{s['requests']}", over,
        ])  # fmt: skip
    return md_table(
        ["configuration", "loading / scaling / policy", "TTFT p50 ms", "TTFT p95 ms", "TTFT p99 ms",
         "ITL p50 ms", "ITL p95 ms", "ITL p99 ms", "SLO %", "instance-s", "scale events", "ok/n",
         "emulation overruns (steps, time)"],
        body,
    )  # fmt: skip


def report(doc: dict[str, Any]) -> str:
    """The markdown report of a result document. It reads only what the summary keeps
    (`burst_results.summarise`), so the committed bench/results/burst.json renders its burst.md."""
    p, w, emu = doc["parameters"], doc["workload"], doc["emulated"]
    rows, runs, repeats = doc["rows"], doc["runs"], p["repeats"]
    lines = [table(rows)]
    if repeats > 1 and runs:
        lines.append(
            f"Each configuration ran {repeats} times, in rounds; the table pools its runs (percentiles and SLO "
            "attainment over all their requests, instance-seconds and scale events averaged). Each run:"
        )
        lines.append("")
        lines.append(runs_table(rows, runs, repeats))
    prefill_ms, decode_ms = w["unloaded_prefill_ms_mean_prompt"], w["unloaded_decode_step_ms_b1"]
    lines.append(
        f"SLO: a request meets it when it completes, its TTFT is at most {p['slo_ttft_ms']:g} ms and its time per "
        f"output token at most {p['slo_tbt_ms']:g} ms; failed requests count as misses (about "
        f"{p['slo_ttft_ms'] / prefill_ms:.0f}x and "
        f"{p['slo_tbt_ms'] / decode_ms:.0f}x the profile's unloaded prefill of a mean prompt, "
        f"{prefill_ms:.0f} ms, and decode step, {decode_ms:.1f} ms). TTFT and ITL percentiles are "
        "over the requests that got a first token; ITL is each request's time per output token after the first."
    )
    lines.append(
        f"Instance-seconds: workers holding the model (loading, serving or draining), from their heartbeats, "
        f"integrated over the {w['window_s']:.0f} s replay window. Scale events: the scaler's ScaleDecisions "
        "during the replay."
    )
    lines.append("")
    pooled = f" (pooled over the {repeats} rounds; each round's own verdict after it)" if repeats > 1 else ""
    lines.append(f"Targets{pooled}:")
    for i, v in enumerate(doc["targets"]):
        line = f"- {v['target']}: {v['figure']} — {'met' if v['met'] else 'NOT met'}"
        if repeats > 1:
            got = [vs[i] for vs in doc["targets_by_round"] if i < len(vs) and vs[i]["target"] == v["target"]]
            line += (
                f" (met in {sum(1 for g in got if g['met'])} of {len(got)} rounds: "
                + "; ".join(g["figure"] for g in got)
                + ")"
            )
        lines.append(line)
    lines.append("")
    cap, workers = w["instance_capacity_req_s"], p["workers"]
    lines.append(
        f"Workload: {w['requests']} requests, trace {p['start']:g}-{p['start'] + p['duration']:g} s compressed "
        f"{p['compress']:g}x into {w['window_s']:.0f} s; mean {w['mean_req_s']:.2f} req/s, peak "
        f"{w['peak_req_s_10_trace_s_bins']:.1f} req/s (10 trace-second bins); one instance serves {cap:.2f} req/s "
        f"by the profile (prompt {w['prompt_emulated_tokens_mean']:.0f} emulated tokens, "
        f"{w['output_tokens_mean']:.1f} output tokens on average; stepping the engine's schedule on the profile "
        f"gives {w['instance_capacity_simulated_req_s']:.2f}), so {workers} workers hold {workers * cap:.1f} req/s "
        f"and the mean is {w['mean_req_s'] / (workers * cap):.2f} of it; the peak needs {w['peak_need_uncapped']} "
        f"instances (capped at {workers}), the mean {w['mean_need']}. Rate scale {w['schedule']['rate_scale']:.3f}."
    )
    lines.append(
        f"Emulated: {emu['device']['profile']} (approximate, derived) on every worker; a disk load takes "
        f"{emu['disk_load_s']:.2f} s, a data-plane transfer or a ServerlessLLM-style worker's load from its own "
        f"host-memory cache {emu['link_load_s']:.3f} s ({emu['emulated_model_bytes'] / 1e9:.2f} GB at "
        f"{emu['disk_mb_s']:g} MB/s and {p['link_gb_s']:g} GB/s); prompts priced x{p['token_scale']:g}. The "
        f"scaler's rate window is {10.0 / p['compress']:g} s (its default 10 s of trace time) except where a "
        f"configuration sets its own (Cascade: {CASCADE_RATE_WINDOW_S / p['compress']:g} s, "
        f"{CASCADE_RATE_WINDOW_S:g} s of trace time); policy delays are in replay time. Details in burst.json."
    )
    flagged = [r["label"] for r in rows if r["emulated_device"]["significant"]]
    if flagged:
        lines.append(
            f"Emulation overran significantly in: {', '.join(flagged)} (real compute overran the device time by more "
            "than 1 % of the time padded to it): those figures are slower than the emulated device would give."
        )
    lines.append("")
    lines.append(f"Reproduce: `{doc['command']}`")
    lines.append("")
    lines.append(f"Trace: {doc['trace']['licence']}")
    text = "\n".join(lines) + "\n"
    if doc["failed"]:
        text += "\nConfigurations that failed to run: "
        text += "; ".join(f"{f['key']}: {f['error'][:300]}" for f in doc["failed"]) + "\n"
    return text
