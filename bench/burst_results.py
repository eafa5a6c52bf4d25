"""bench/burst.py's result document, raw and summarised.

The raw document holds every run's row with its per-request timeline, decisions and acks (about a
megabyte for a three-round run): it goes to `--raw DIR`, gzip-compressed, only when asked. The
summary is what bench/results/burst.json keeps: the run's identity and parameters, the workload and
the emulation, the table's rows, each run's headline figures and scale decisions, the targets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.burst_configs import mesh_env
from bench.burst_plan import SPEC, Emulation, Plan
from bench.burst_report import verdicts
from bench.tracelib import LICENCE, ScheduleSpec
from cascade.config import GenerateSpec

# Kept out of the summary: per request or per message, and the per-worker split of the emulation's
# counters (their sum stays).
RAW_ONLY = ("timeline", "decisions", "acks")


def result_doc(
    a: argparse.Namespace,
    plan: Plan,
    emu: Emulation,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    by_round: list[list[dict[str, Any]]],
    failed: list[dict[str, Any]],
    argv: list[str],
    total_run_s: float,
) -> dict[str, Any]:
    """The raw document (without the header `bench.common.result_header` adds). `rows` are the
    table's rows: each run's with one round, pooled with several; `runs` every run's row then."""
    return {
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "command": " ".join(["python bench/burst.py", *argv]),
        "trace": {"file": str(a.trace), "licence": LICENCE},
        "workload": {
            "requests": len(plan.arrivals),
            "window_s": plan.window_s,
            "schedule": {k: getattr(plan.spec, k) for k in ScheduleSpec.__dataclass_fields__},
            "trace_mean_req_s": plan.trace_mean_rate,
            "mean_req_s": plan.mean_rate,
            "peak_req_s_10_trace_s_bins": plan.peak_rate,
            "instance_capacity_req_s": plan.capacity_req_s,
            "instance_capacity_how": "bench/scaleup.py capacity_req_s: the profile's prefill of the mean prompt "
            "plus the mean output's decode steps shared by a batch of max_batch/2",
            "instance_capacity_simulated_req_s": plan.capacity_sim_req_s,
            "unloaded_prefill_ms_mean_prompt": plan.prefill_ms_mean,
            "unloaded_decode_step_ms_b1": plan.decode_ms_b1,
            "mean_load_over_cluster_capacity": plan.mean_rate / (a.workers * plan.capacity_req_s),
            "mean_need": plan.mean_need,
            "peak_need_uncapped": plan.peak_need,
            "prompt_real_tokens_mean": plan.prompt_real_mean,
            "prompt_emulated_tokens_mean": plan.prompt_emulated_mean,
            "output_tokens_mean": plan.output_mean,
        },
        "model_spec": {k: getattr(SPEC, k) for k in GenerateSpec.__slots__},
        "emulated": emu.describe(a),
        "mesh": {
            "env": mesh_env(a, emu),
            "gateway": "defaults (max queue 256 per model, queue timeout 30 s)",
            "scaler": f"tick 1 s, rate window {10.0 / a.compress:g} s (10 s of trace time), latency window 30 s",
        },
        "slo": {"ttft_ms": a.slo_ttft_ms, "tbt_ms": a.slo_tbt_ms},
        "targets": verdicts({r["key"]: r for r in rows}),
        "targets_by_round": by_round,
        "rows": rows,
        # With --repeats above 1, `rows` pools each configuration's runs (no timeline), and every
        # run's own row, timeline included, is here.
        "runs": runs if a.repeats > 1 else [],
        "failed": failed,
        "total_run_s": total_run_s,
        "plot": "bench/results/burst.png" + (" (round 1)" if a.repeats > 1 else ""),
    }


def decision_line(d: dict[str, Any]) -> str:
    """One scale decision, as a line to read: replay time, action, new target, the scaler's reason."""
    return f"{d['t']:.2f} s {d['action']} {d['count']} to {d['target']}: {d['reason']}"


def headline(row: dict[str, Any]) -> dict[str, Any]:
    """A result row without its per-request and per-message records: every figure the table, the
    runs table and the targets read, the run's other aggregates, and its scale decisions as lines."""
    out = {k: v for k, v in row.items() if k not in RAW_ONLY}
    if "decisions" in row:
        out["scale_decisions"] = [decision_line(d) for d in row["decisions"]]
    out["emulated_device"] = {k: v for k, v in row["emulated_device"].items() if k != "per_worker"}
    return out


def run_headline(run: dict[str, Any]) -> dict[str, Any]:
    """One of several runs of a configuration, beside the pooled row that states its deployment and
    the definitions: its figures only. The SSE chunk gaps go too: here chunks are not tokens (the
    random model's ids mostly decode to no text), so they say little once the run is judged."""
    out = {k: v for k, v in headline(run).items() if k != "deployment"}
    s = run["summary"]
    out["summary"] = {k: v for k, v in s.items() if k not in ("itl_definition", "sse_chunk_gap_ms", "slo")}
    out["summary"]["slo"] = {k: v for k, v in s["slo"].items() if k.endswith("attainment")}
    return out


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """The summary of a raw document: the same keys, rows and runs as headlines."""
    doc = {k: v for k, v in raw.items() if k not in ("rows", "runs")}
    doc["rows"] = [headline(r) for r in raw["rows"]]
    doc["runs"] = [run_headline(r) for r in raw["runs"]]
    return doc
