"""Where a burst run's SLO misses come from: a breakdown of the requests that miss TTFT, per
configuration, read from the raw document `python bench/burst.py --raw DIR` writes.

    python bench/burst_misses.py DIR/burst.raw.json.gz [DIR2/burst.raw.json.gz ...] [--round N]

Each request is put in one phase by where it arrived against the configuration's scale events
(its own decisions, from the raw document) and the instances holding the model (heartbeats):

- `from-zero`: arrived while the model was at zero or within `--settle` seconds of a scale-up
  from zero (a wave's start, while the load and the first prefills run);
- `after-down`: within `--settle` seconds after a scale-down (any, to zero too) that was not
  followed by the scale-up above;
- `growing`: within `--settle` seconds of any other scale-up;
- `steady`: everything else.

Then by prompt length (the plan's, in the trace's tokens) and by 10 s of replay, with the other
configurations' misses on the same requests beside (same trace, seed and schedule, so request i
is the same prompt at the same time in every configuration)."""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

PHASES = ("from-zero", "growing", "after-down", "steady")
PROMPT_BINS = (1024, 2048, 4096, 1 << 30)


def phases(row: dict[str, Any], settle_s: float) -> list[str]:
    """Each request's phase (see the module's docstring), in the timeline's order."""
    tl = row["timeline"]
    decisions = sorted(row.get("decisions", []), key=lambda d: d["t"])
    grid, inst = tl["t"], tl["instances"]
    step = grid[1] - grid[0] if len(grid) > 1 else 0.5

    def holding(t: float) -> int:
        i = min(max(int(t / step), 0), len(inst) - 1)
        return int(inst[i])

    out: list[str] = []
    for t in tl["scheduled"]:
        before = [d for d in decisions if d["t"] <= t]
        last = before[-1] if before else None
        # A request that arrives at zero waits for the next decision (a scale-up from zero).
        if last is None or (last["action"] == "down" and last["target"] == 0):
            nxt = next((d for d in decisions if d["t"] > t), None)
            if nxt is not None and nxt["action"] == "up" and nxt["t"] - t <= settle_s:
                out.append("from-zero")
                continue
            if last is not None and t - last["t"] <= settle_s:
                out.append("after-down")
                continue
            out.append("from-zero" if holding(t) == 0 else "steady")
            continue
        age = t - last["t"]
        if last["action"] == "up":
            prev = before[-2] if len(before) > 1 else None
            from_zero = prev is None or (prev["action"] == "down" and prev["target"] == 0)
            if age <= settle_s:
                out.append("from-zero" if from_zero else "growing")
                continue
        elif age <= settle_s:
            out.append("after-down")
            continue
        out.append("steady")
    return out


def prompt_bin(n: int) -> str:
    lo = 0
    for hi in PROMPT_BINS:
        if n < hi:
            return f"<{hi}" if hi < (1 << 30) else f">={lo}"
        lo = hi
    return "?"


def missed_ttft(row: dict[str, Any], slo_ms: float) -> list[bool]:
    tl = row["timeline"]
    return [s != "ok" or t is None or t > slo_ms for s, t in zip(tl["status"], tl["ttft_ms"], strict=True)]


def missed_tbt(row: dict[str, Any], slo_ms: float) -> list[bool]:
    tl = row["timeline"]
    return [s == "ok" and p is not None and p > slo_ms for s, p in zip(tl["status"], tl["tpot_ms"], strict=True)]


def table(title: str, keys: list[str], counts: dict[str, Counter[str]], totals: Counter[str], cols: list[str]) -> str:
    lines = [f"\n{title}", "| " + " | ".join(["bin", "requests", *cols]) + " |", "|" + " --- |" * (2 + len(cols))]
    for k in keys:
        lines.append("| " + " | ".join([k, str(totals[k]), *(str(counts[c][k]) for c in cols)]) + " |")
    every = [str(sum(totals.values())), *(str(sum(counts[c].values())) for c in cols)]
    lines.append("| " + " | ".join(["all", *every]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("raw", type=Path, nargs="+", help="raw documents of runs with the same schedule")
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--settle", type=float, default=3.0, help="seconds after a scale event a phase lasts (default 3)")
    p.add_argument("--prompts", type=Path, help="JSON list of prompt lengths by request (default: from the plan)")
    a = p.parse_args(argv)
    docs = [json.loads(gzip.open(f).read()) for f in a.raw]
    doc = docs[0]
    rows = []
    for f, d in zip(a.raw, docs, strict=True):
        for r in d["runs"] or d["rows"]:
            if r.get("round", 1) == a.round:
                # Several documents (runs alternated between code versions, say): each run is named
                # by its file too. The schedule must be the same for request i to be the same one.
                if len(a.raw) > 1:
                    r = {**r, "key": f"{f.parent.name}/{r['key']}", "label": f"{f.parent.name}/{r['label']}"}
                rows.append(r)
    if len({len(r["timeline"]["scheduled"]) for r in rows}) > 1:
        p.error("the documents' schedules differ: their requests cannot be compared one by one")
    slo = doc["slo"]
    prompts: list[int] | None = None
    if a.prompts is not None:
        prompts = json.loads(a.prompts.read_text())
    else:
        prompts = plan_prompts(doc)
    by_key = {r["key"]: r for r in rows}
    ttft = {k: missed_ttft(r, slo["ttft_ms"]) for k, r in by_key.items()}
    tbt = {k: missed_tbt(r, slo["tbt_ms"]) for k, r in by_key.items()}
    keys = list(by_key)
    for key, row in by_key.items():
        ph = phases(row, a.settle)
        sched = row["timeline"]["scheduled"]
        print(f"\n## {row['label']}: {sum(ttft[key])} TTFT misses, {sum(tbt[key])} TBT misses of {len(sched)}")
        print("decisions: " + "; ".join(f"{d['t']:.2f} {d['action']}->{d['target']}" for d in row.get("decisions", [])))
        cols = [f"{k} TTFT miss" for k in keys]
        counts = {f"{k} TTFT miss": Counter(p for p, m in zip(ph, ttft[k], strict=True) if m) for k in keys}
        # Time per output token too: the requests a configuration's routes slowed after their first token.
        cols = cols + [f"{k} TBT miss" for k in keys]
        counts |= {f"{k} TBT miss": Counter(p for p, m in zip(ph, tbt[k], strict=True) if m) for k in keys}
        title = f"by phase in {row['label']}'s run (settle {a.settle:g} s)"
        print(table(title, list(PHASES), counts, Counter(ph), cols))
        cols = [f"{k} TTFT miss" for k in keys]
        tens = [f"{int(t // 10) * 10:03d}" for t in sched]
        counts = {f"{k} TTFT miss": Counter(b for b, m in zip(tens, ttft[k], strict=True) if m) for k in keys}
        print(table("by 10 s of replay", sorted(set(tens)), counts, Counter(tens), cols))
        if prompts is not None and len(prompts) == len(sched):
            pb = [prompt_bin(n) for n in prompts]
            counts = {f"{k} TTFT miss": Counter(b for b, m in zip(pb, ttft[k], strict=True) if m) for k in keys}
            order = [prompt_bin(x - 1) for x in PROMPT_BINS]
            print(table("by prompt length (trace tokens)", order, counts, Counter(pb), cols))
        if len(keys) > 1:
            others = [k for k in keys if k != key]
            only = [i for i, m in enumerate(ttft[key]) if m and not any(ttft[o][i] for o in others)]
            c = Counter(ph[i] for i in only)
            print(f"\nTTFT misses only in {key}: {len(only)}, by phase {dict(c)}")
            lat = defaultdict(list)
            for i in only:
                lat[ph[i]].append(row["timeline"]["ttft_ms"][i])
            for k2, v in lat.items():
                v2 = sorted(x for x in v if x is not None)
                if v2:
                    print(f"  {k2}: TTFT ms median {v2[len(v2) // 2]:.0f}, max {v2[-1]:.0f}")
    return 0


def plan_prompts(doc: dict[str, Any]) -> list[int] | None:
    """The schedule's prompt lengths, rebuilt from the run's parameters (None if that fails)."""
    try:
        from bench.burst_plan import make_plan

        a = argparse.Namespace(**doc["parameters"])
        a.trace = Path(a.trace)
        plan = make_plan(a, a.profile)
        return [round(x.prompt_tokens * a.token_scale) for x in plan.arrivals]
    except Exception as e:  # a record from another version: the rest of the breakdown still holds
        print(f"(prompt lengths not rebuilt: {type(e).__name__}: {e})")
        return None


if __name__ == "__main__":
    raise SystemExit(main())
