"""bench/burst.py's figure: the offered load, and per configuration each request's TTFT by its
arrival (met, missed, failed) with the instances holding the model over time. It needs the
per-request timelines, so it is drawn from the raw rows before they are summarised."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.burst_plan import Plan
from bench.tracelib import rate_bins


def plot(a: argparse.Namespace, plan: Plan, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows) + 1
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.6 * n), sharex=True, squeeze=False)
    ax0 = axes[0, 0]
    bins = rate_bins((x.t for x in plan.arrivals), 1.0, plan.window_s)
    ax0.bar(range(len(bins)), bins, width=1.0, align="edge", color="tab:gray")
    ax0.axhline(a.workers * plan.capacity_req_s, color="black", lw=1, ls="--", label=f"{a.workers} instances' capacity")
    ax0.set_ylabel("arrivals req/s")
    ax0.set_title(
        f"offered load: Azure code trace {a.start:g}-{a.start + a.duration:g} s, {a.compress:g}x compressed "
        f"(CC BY 4.0, Patel et al., Splitwise, ISCA 2024)",
        fontsize=9,
    )
    ax0.legend(loc="upper right", fontsize=7)
    ymax = max((x for r in rows for x in r["timeline"]["ttft_ms"] if x is not None), default=a.slo_ttft_ms) / 1000 * 1.5
    for ax, r in zip(axes[1:, 0], rows, strict=True):
        tl = r["timeline"]
        ok_x, ok_y, miss_x, miss_y, fail_x = [], [], [], [], []
        for t, ttft, tpot, st in zip(tl["scheduled"], tl["ttft_ms"], tl["tpot_ms"], tl["status"], strict=True):
            if st != "ok" or ttft is None:
                fail_x.append(t)
            elif ttft <= a.slo_ttft_ms and (tpot is None or tpot <= a.slo_tbt_ms):
                ok_x.append(t)
                ok_y.append(ttft / 1000)
            else:
                miss_x.append(t)
                miss_y.append(ttft / 1000)
        ax.scatter(ok_x, ok_y, s=4, c="tab:green", label="met SLO")
        ax.scatter(miss_x, miss_y, s=4, c="tab:red", label="missed SLO")
        if fail_x:
            ax.scatter(fail_x, [ymax] * len(fail_x), s=10, marker="x", c="black", label="failed")
        ax.axhline(a.slo_ttft_ms / 1000, color="tab:red", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(0.02, ymax * 1.3)  # the same scale in every panel
        ax.set_ylabel("TTFT s (by arrival)")
        ax2 = ax.twinx()
        ax2.step(tl["t"], tl["instances"], where="post", color="tab:blue", lw=1.5)
        ax2.set_ylim(0, a.workers + 0.5)
        ax2.set_ylabel("instances", color="tab:blue")
        s = r["summary"]
        ax.set_title(
            f"{r['label']} ({r['deployment']['loading']} / {r['deployment']['scaling']} / {r['deployment']['policy']}):"
            f" TTFT p99 {s['ttft_ms']['p99']:.0f} ms, SLO {100 * s['slo']['attainment']:.1f} %, "
            f"{r['instance_seconds']:.0f} instance-s, {r['scale_events']} scale events",
            fontsize=9,
        )
        ax.legend(loc="upper right", fontsize=7, markerscale=2)
    axes[-1, 0].set_xlabel("replay seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
