"""Serving benchmark: streamed completions through the mesh at concurrency 1, 8 and 32, beside
the worker's engine called in-process on the same model (and, with --transformers, transformers'
`generate` at the same batch sizes); and the cost of the mesh itself (gateway + NATS + worker)
against the in-process engine, request by request, beside the path's floor on this machine (the
same hops and engine with none of the mesh's code, bench/floor.py; `--no-floor` leaves it out).

    cascade bench serve                       the generated test model (the mesh-overhead figure)
    cascade bench serve --model X --transformers
                                              a real model (folder, .gguf file, hub id)
    cascade bench serve --quick               a short run to check it works
    cascade bench serve --json-schema         structured outputs' cost: tokens/s at 32 streams with a
                                              json_schema on every request against none, in one run

With any of `vllm bench serve`'s load options (--request-rate, --burstiness, --max-concurrency,
--num-prompts, --goodput, --base-url) it runs as vLLM's does instead: one open-loop run,
requests sent at --request-rate with gamma-distributed gaps (--burstiness 1 = Poisson; lower is
burstier), at most --max-concurrency in flight, and prints vLLM's result table:

    cascade bench serve --request-rate 8 --burstiness 0.5 --goodput ttft:500 tpot:100
    cascade bench serve --base-url http://127.0.0.1:8000 --model cascade-tiny --num-prompts 200

Writes bench/results/serve.{json,md} (the test model) or serve-<model>.{json,md}; the vLLM-style
run writes serve-rate.{json,md} (or --result-filename).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import schedstat
from bench.common import md_table, result_header, sse_events, summary, write_result
from bench.mesh import Mesh, worker_details
from bench.rawhttp import RawClient
from cascade.config import DEFAULT_MODEL, GenerateSpec
from cascade.subjects import Subjects

# About 24 tokens with the byte tokenizer: a short chat turn. Long prompts on a CPU make every
# level prefill-bound, which measures the matmul library, not the serving path.
PROMPT = "Tell me how live scaling works."
# The overhead's two clients: the suffix of their figures' keys, and their name in the table.
_CLIENTS = (("", "aiohttp's client"), ("_raw_client", "the minimal client"))
# The worker status entries `overhead` reads before and after each mesh request of the pairs.
ENGINE_TIME_KEYS = ("engine_busy_s", "engine_gap_s", "engine_gaps")
# How long such a reading waits for the worker's status (a scatter-gather ends by its window): an idle
# worker answers in a few ms, and the reading runs before and after every mesh request of the pairs.
# A request whose reading came back without the worker is left out of the figures that need it.
ENGINE_TIME_WINDOW_S = 0.05


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies (default 1,8,32)")
    p.add_argument("--requests", type=int, default=0, help="requests per level (default 4x concurrency, at least 24)")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request (default 64)")
    p.add_argument("--prompt-repeat", type=int, default=1, help="repeat the base prompt N times (default 1)")
    p.add_argument(
        "--overhead-requests", type=int, default=60, help="paired requests per mesh for the mesh-overhead figure"
    )
    p.add_argument(
        "--overhead-meshes",
        type=int,
        default=3,
        help="meshes the overhead pairs run on, each started afresh, pooled (default 3: one mesh's figure is "
        "a sample of the minute it ran in, on a shared host)",
    )
    p.add_argument(
        "--overhead-max-tokens",
        type=int,
        default=16,
        help="tokens per overhead request (default 16: short requests keep compute noise below the mesh's cost)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--max-batch", type=int, default=32, help="worker max batch (default 32)")
    p.add_argument(
        "--engine-cpu",
        default="auto",
        help="the CPU both engines run on, the worker's (its --cpus) and the in-process one, so that the "
        "comparison is not between two cores of different speed on a shared machine: a number, 'none', or "
        "'auto' (the last CPU of this process's when it has 2 or more and there is one worker; default)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a checkpoint folder, .gguf file or hub id (default: the generated test model cascade-tiny)",
    )
    p.add_argument(
        "--transformers", action="store_true", help="also measure transformers' generate at the same batch sizes"
    )
    p.add_argument("--out", default=None, help="result name under bench/results (default serve / serve-<model>)")
    p.add_argument("--quick", action="store_true", help="few requests, to check the benchmark runs")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="leave out the path's floor (bench floor's pairs, run after the mesh stopped, as many as the overhead's)",
    )
    v = p.add_argument_group("vllm bench serve's options (any of them: one open-loop run, vLLM's table)")
    v.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests per second (default inf: every request at once, as vLLM's default)",
    )
    v.add_argument(
        "--burstiness",
        type=float,
        default=None,
        help="gamma shape of the gaps between requests: 1 = Poisson (default), below 1 burstier, above steadier",
    )
    v.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    v.add_argument("--num-prompts", type=int, default=None, help="requests in the run (default 200; --quick 16)")
    v.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="service-level objectives a request must meet to count as good: ttft, tpot, e2el in ms, e.g. "
        "--goodput ttft:500 tpot:100",
    )
    v.add_argument(
        "--percentile-metrics", default="ttft,tpot,itl", help="metrics to report percentiles of (ttft,tpot,itl,e2el)"
    )
    v.add_argument("--metric-percentiles", default="99", help="percentiles to report, e.g. 50,90,99 (default 99)")
    v.add_argument(
        "--save-result",
        action="store_true",
        help="accepted for vLLM's command lines: Cascade's benchmarks always write their result unless --no-write",
    )
    v.add_argument("--result-filename", default=None, help="result name under bench/results (default serve-rate)")
    v.add_argument(
        "--result-dir",
        type=Path,
        default=None,
        help="directory for the result files (vLLM's option; default bench/results)",
    )
    v.add_argument(
        "--base-url",
        default=None,
        help="benchmark this running OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of starting "
        "a mesh; --model is then the served model's name",
    )
    v.add_argument("--seed", type=int, default=0, help="seed of the arrival times and the dataset (default 0)")
    from bench.datasets import add_options

    add_options(v)
    p.add_argument(
        "--json-schema",
        action="store_true",
        help="measure structured outputs: the highest --concurrency level with response_format json_schema on "
        "every request against none, alternating rounds on one mesh (writes serve-json-schema)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds of each variant with --json-schema, and of the mesh and transformers' generate "
        "at each concurrency with --transformers (the ratio of neighbouring runs is what a shared machine can "
        "measure; default 3)",
    )
    return p.parse_args(argv)


def rate_mode(a: argparse.Namespace) -> bool:
    """Any of vllm bench serve's load options asks for its kind of run."""
    return any(
        x is not None
        for x in (a.request_rate, a.burstiness, a.max_concurrency, a.num_prompts, a.goodput, a.base_url, a.dataset_name)
    )


# What --json-schema asks every request for: nested objects, enums, an array long enough that the
# document never closes before max_tokens (so both variants generate the same number of tokens).
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"enum": ["cat", "dog", "bird"]},
                    "n": {"type": "integer", "minimum": 0, "maximum": 999},
                    "tag": {"type": "string", "maxLength": 6},
                },
                "required": ["kind", "n", "tag"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "items"],
    "additionalProperties": False,
}


def completion_body(
    prompt: str, max_tokens: int, model: str = DEFAULT_MODEL, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A streamed greedy completion of exactly `max_tokens` tokens, its usage in the last event."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    prompt: str,
    max_tokens: int,
    model: str = DEFAULT_MODEL,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body = completion_body(prompt, max_tokens, model, extra)
    generated = max_tokens
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with session.post(f"{url}/completions", json=body) as resp:
        if resp.status != 200:
            return {"ok": False, "status": resp.status, "error": (await resp.text())[:200]}
        async for obj in sse_events(resp):
            if obj is None:  # [DONE]: read on to the body's end, so the connection goes back to the pool
                continue
            if obj.get("choices") and obj["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if obj.get("usage"):
                generated = obj["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {
        "ok": True,
        "start": t0,
        "ttft": (stamps[0] - t0) if stamps else float("nan"),
        # Time per output token after the first (vLLM's TPOT): SSE chunks are not tokens (the
        # detokeniser holds incomplete UTF-8, which random models emit plenty of).
        "itl": [(stamps[-1] - stamps[0]) / (max_tokens - 1)] if len(stamps) > 1 and max_tokens > 1 else [],
        "chunk_gaps": [b - a for a, b in itertools.pairwise(stamps)],
        "latency": end - t0,
        "chunks": len(stamps),
        "tokens": generated,
    }


async def load_level(
    url: str,
    concurrency: int,
    n: int,
    prompt: str,
    max_tokens: int,
    model: str = DEFAULT_MODEL,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
        # Warm-up: one request per client so first-use costs are not measured.
        await asyncio.gather(*(one_request(s, url, prompt, 4, model, extra) for _ in range(min(concurrency, 4))))
        queue = list(range(n))
        results: list[dict[str, Any]] = []

        async def client() -> None:
            while queue:
                queue.pop()
                results.append(await one_request(s, url, prompt, max_tokens, model, extra))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r["itl"]]
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(ok),
        "errors": [r for r in results if not r["ok"]][:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "output_tokens": sum(r["tokens"] for r in ok),
        "ttft_ms": summary(ttft),
        "itl_ms": summary(itl),
        "latency_ms": summary([r["latency"] * 1e3 for r in ok]),
    }


def inprocess_engine(path: Path, max_batch: int, threads: int) -> Any:
    import torch

    from cascade.models.checkpoint import Checkpoint
    from cascade.models.tokenizer import load_tokenizer
    from services.worker.engine import Engine
    from services.worker.model import LlamaModel

    torch.set_num_threads(threads)
    ck = Checkpoint(path)
    m = LlamaModel(ck.config)
    for u in range(ck.config.num_units):
        m.load_unit(u, ck.unit_tensors(u))
    # No prefix caching, as in the mesh's workers here: every request sends the same prompt.
    return Engine(m, load_tokenizer(path), max_batch=max_batch, prefix_caching=False), load_tokenizer(path)


def engine_cpu(a: argparse.Namespace) -> frozenset[int]:
    """The CPU `--engine-cpu` names, as a set (empty: no pinning)."""
    from cascade.cpus import available_cpus, check_cpus, parse_cpu_list

    if a.engine_cpu == "none":
        return frozenset()
    if a.engine_cpu == "auto":
        cpus = available_cpus()
        return frozenset({max(cpus)}) if len(cpus) >= 2 and a.workers == 1 else frozenset()
    chosen = parse_cpu_list(a.engine_cpu)
    check_cpus(chosen)
    return chosen


@contextlib.contextmanager
def pinned(cpus: frozenset[int]) -> Iterator[None]:
    """The calling thread on `cpus` for the block (the in-process engine on the mesh engine's CPU),
    then back where it was allowed before."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def inprocess_request(
    engine: Any, tok: Any, prompt: str, max_tokens: int, cpus: frozenset[int] = frozenset()
) -> dict[str, float]:
    with pinned(cpus):
        return _inprocess_request(engine, tok, prompt, max_tokens)


def _inprocess_request(engine: Any, tok: Any, prompt: str, max_tokens: int) -> dict[str, float]:
    from cascade.messages import SamplingParams

    t0 = time.perf_counter()
    engine.submit("r", "bench", tok.encode(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    first = 0.0
    steps_s = 0.0
    while engine.has_work():
        s0 = time.perf_counter()
        res = engine.step()
        steps_s += time.perf_counter() - s0
        # The same mark as the client's through the mesh: the first text it can show (an incomplete
        # UTF-8 sequence is held back until the token that completes it, on both paths).
        if not first and any(ev.text for _, ev in res.events):
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": first - t0, "latency": end - t0, "steps": steps_s}


def inprocess_level(engine: Any, tok: Any, concurrency: int, n: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The engine in this process, closed loop like the mesh's clients: `concurrency` sequences in
    flight, a new one submitted as one ends, `n` in all."""
    from cascade.messages import SamplingParams

    ids = tok.encode(prompt)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    submitted = done = 0
    t0 = time.perf_counter()
    while done < n:
        while submitted < n and submitted - done < concurrency:
            engine.submit(f"r{submitted}", "bench", ids, params)
            submitted += 1
        res = engine.step()
        done += sum(1 for _, ev in res.events if ev.finish_reason is not None)
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "output_tokens_per_s": n * max_tokens / wall, "wall_s": wall}


def _transformers_model(folder: Path, threads: int) -> Any:
    import torch
    import transformers

    torch.set_num_threads(threads)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mesh's run with the median tokens/s, with every round's tokens/s beside it."""
    ranked = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_tokens_per_s": [r["output_tokens_per_s"] for r in runs]}


def _paired(mesh_runs: list[dict[str, Any]], hf_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """transformers' runs at one batch size against the mesh's run just before each: the ratio per
    round, and their median (what the bar is read from)."""
    ratios = [m["output_tokens_per_s"] / h["output_tokens_per_s"] for m, h in zip(mesh_runs, hf_runs, strict=True)]
    tps = sorted(h["output_tokens_per_s"] for h in hf_runs)
    return {
        "batch": hf_runs[0]["batch"],
        "output_tokens_per_s": tps[(len(tps) - 1) // 2],
        "rounds": hf_runs,
        "ratios": ratios,
        "ratio_median": sorted(ratios)[(len(ratios) - 1) // 2],
    }


def transformers_level(model: Any, ids: list[int], batch: int, max_tokens: int) -> dict[str, Any]:
    """transformers' `generate`, greedy, `batch` copies of the prompt (no padding needed), exactly
    `max_tokens` new tokens each (ignore_eos's equivalent)."""
    import torch

    x = torch.tensor([ids] * batch)
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        wall = time.perf_counter() - t0
    return {"batch": batch, "output_tokens_per_s": batch * max_tokens / wall, "wall_s": wall}


async def overhead(
    url: str,
    engine: Any,
    tok: Any,
    n: int,
    prompt: str,
    max_tokens: int,
    model: str = DEFAULT_MODEL,
    cpus: frozenset[int] = frozenset(),
    mesh_pid: int | None = None,
    engine_time: Callable[[], Awaitable[dict[str, float] | None]] | None = None,
) -> dict[str, Any]:
    """Alternate one request through the mesh and one in-process, one at a time, so both see the
    same machine state; the added latency is their difference per pair. With `mesh_pid` (the
    `cascade up` process) on Linux, each request's CPU time and run-queue wait by process
    (bench/schedstat.py): what each part of the mesh spends, and how long the engine thread was
    ready to run and could not, which is latency the in-process engine pays only as its own wait.
    Each pair also sends the same request through the mesh with a minimal client (bench/rawhttp.py),
    the two clients taking turns at going first: the added latency without aiohttp's client
    machinery, about half a millisecond a request of the client's own here, not the mesh's."""
    mesh, local, mesh_raw = [], [], []
    raw = RawClient(url)
    body = completion_body(prompt, max_tokens, model)
    cpu_mesh: list[dict[str, tuple[float, float]]] = []  # per pair: group → (ms run, ms waited)
    cpu_local: list[tuple[float, float]] = []
    group = schedstat.mesh_grouping(cpus) if mesh_pid and schedstat.available() else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for _ in range(3):
            await one_request(s, url, prompt, max_tokens, model)
            inprocess_request(engine, tok, prompt, max_tokens, cpus)
            await raw.stream("/completions", body)

        def reading() -> schedstat.Reading:
            # The mesh's threads by group, and this thread: the bench client during a mesh
            # request, the in-process engine during its own.
            if group is None or not mesh_pid:
                return {}
            return {**schedstat.tree(mesh_pid, group), "this thread": schedstat.this_thread()}

        async def timed(request: Awaitable[dict[str, Any]], r0: schedstat.Reading | None = None) -> dict[str, Any]:
            """One mesh request with the worker's engine time read just before and after it
            (outside its timed span): its steps' time, and its gaps between them."""
            e0 = await engine_time() if engine_time is not None else None
            r = await request
            if r0:
                used = schedstat.delta_ms(r0, reading())
                used["bench client"] = used.pop("this thread")
                cpu_mesh.append(used)
            e1 = await engine_time() if engine_time is not None else None
            if e0 and e1:
                r["steps"] = e1["engine_busy_s"] - e0["engine_busy_s"]
                r["gap_s"] = e1["engine_gap_s"] - e0["engine_gap_s"]
                r["gaps"] = e1["engine_gaps"] - e0["engine_gaps"]
            return r

        for i in range(n):
            # The two clients take turns at going first: the mesh request right after the
            # in-process one reads slower (the in-process engine's weights went through the caches
            # the path's Python runs from), and each client takes that place half the time.
            for client in ("aiohttp", "raw") if i % 2 == 0 else ("raw", "aiohttp"):
                if client == "raw":
                    mesh_raw.append(await timed(raw.stream("/completions", body)))
                else:
                    mesh.append(await timed(one_request(s, url, prompt, max_tokens, model), reading()))
            r1 = reading()
            local.append(inprocess_request(engine, tok, prompt, max_tokens, cpus))
            if r1:
                cpu_local.append(schedstat.delta_ms(r1, {"this thread": schedstat.this_thread()})["this thread"])
    await raw.close()
    pairs = [(m, lo) for m, lo in zip(mesh, local, strict=True) if m["ok"]]
    raw_pairs = [(m, lo) for m, lo in zip(mesh_raw, local, strict=True) if m["ok"]]
    stepped = [m for m in mesh + mesh_raw if m["ok"] and "steps" in m]

    def same_steps(ps: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[float]:
        # Each pair's added latency less its own steps' difference (the worker's engine time in
        # this request's steps against the in-process engine's in its own).
        return [(m["latency"] - lo["latency"] - (m["steps"] - lo["steps"])) * 1e3 for m, lo in ps if "steps" in m]

    return {
        # The worker's engine time inside the timed requests' steps (both clients), and how many;
        # the in-process engine's over its requests.
        "mesh_steps_s": sum(m["steps"] for m in stepped) if stepped else None,
        "mesh_stepped": len(stepped),
        # The worker's engine thread between two back-to-back steps over the same: seconds, count.
        "mesh_gap_s": sum(m["gap_s"] for m in stepped) if stepped else None,
        "mesh_gaps": sum(m["gaps"] for m in stepped) if stepped else None,
        "inprocess_steps_s": sum(lo["steps"] for lo in local),
        "mesh_ms": [m["latency"] * 1e3 for m in mesh if m["ok"]],
        "inprocess_ms": [lo["latency"] * 1e3 for lo in local],
        "added_ms": [(m["latency"] - lo["latency"]) * 1e3 for m, lo in pairs],
        "added_ttft_ms": [(m["ttft"] - lo["ttft"]) * 1e3 for m, lo in pairs],
        "added_same_steps_ms": same_steps(pairs),
        # The same through the minimal client.
        "mesh_raw_ms": [m["latency"] * 1e3 for m in mesh_raw if m["ok"]],
        "added_raw_ms": [(m["latency"] - lo["latency"]) * 1e3 for m, lo in raw_pairs],
        "added_raw_ttft_ms": [(m["ttft"] - lo["ttft"]) * 1e3 for m, lo in raw_pairs],
        "added_raw_same_steps_ms": same_steps(raw_pairs),
        "cpu_mesh": cpu_mesh,
        "cpu_local": cpu_local,
    }


def _mesh_requests(r: dict[str, Any]) -> int:
    """Requests of one mesh's pairs whose steps' time was read: through either client."""
    return int(r.get("mesh_stepped") or (len(r["mesh_ms"]) + len(r.get("mesh_raw_ms", []))))


def summarize_overhead(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One or more meshes' `overhead` pairs, pooled: the figures over every pair, each mesh's p50
    beside them (the path's wake-ups cost what the host makes them cost at that minute, so one
    mesh's figure is a sample of one), and the CPU readings' medians."""
    pool = {k: [x for r in runs for x in r[k]] for k in ("mesh_ms", "inprocess_ms", "added_ms", "added_ttft_ms")}
    out: dict[str, Any] = {
        "pairs": len(pool["added_ms"]),
        "meshes": len(runs),
        "mesh_latency_ms": summary(pool["mesh_ms"]),
        "inprocess_latency_ms": summary(pool["inprocess_ms"]),
        "added_latency_ms": summary(pool["added_ms"]),
        "added_ttft_ms": summary(pool["added_ttft_ms"]),
        "added_latency_p50_by_mesh_ms": [summary(r["added_ms"])["p50"] for r in runs if r["added_ms"]],
        "added_ttft_p50_by_mesh_ms": [summary(r["added_ttft_ms"])["p50"] for r in runs if r["added_ttft_ms"]],
    }
    timed = [r for r in runs if r.get("mesh_steps_s") is not None and r["added_ms"]]
    if timed:
        # The steps themselves run faster or slower in the worker's process than in this one by a
        # few percent, the sign changing from run to run (a host effect, docs/architecture.md):
        # per request that is as large as the mesh's own cost. Their time is known on both sides
        # (the worker's engine time inside steps, from its status), so the mean added latency can
        # be read without it: what the path costs when the same steps take the same time.
        n = sum(_mesh_requests(r) for r in timed)
        mesh_steps = sum(r["mesh_steps_s"] for r in timed) / n * 1e3
        local_steps = sum(r["inprocess_steps_s"] for r in timed) / sum(len(r["inprocess_ms"]) for r in timed) * 1e3
        out["steps_ms_per_request"] = {"mesh": mesh_steps, "inprocess": local_steps}
        out["steps_read"] = {"requests": n, "of": sum(len(r["mesh_ms"]) + len(r.get("mesh_raw_ms", [])) for r in timed)}
        gaps = sum(r.get("mesh_gaps") or 0 for r in timed)
        if gaps:
            out["engine_gap_us"] = sum(r.get("mesh_gap_s") or 0.0 for r in timed) / gaps * 1e6

        def steps_diff_ms(r: dict[str, Any]) -> float:
            return (r["mesh_steps_s"] / _mesh_requests(r) - r["inprocess_steps_s"] / len(r["inprocess_ms"])) * 1e3

        for key, added in (("", "added_ms"), ("_raw_client", "added_raw_ms")):
            with_it = [r for r in timed if r.get(added)]
            if not with_it:
                continue
            mean = statistics.fmean(x for r in with_it for x in r[added])
            out[f"added_latency_mean{key}_ms"] = mean
            out[f"added_latency_mean_same_steps{key}_ms"] = mean - (mesh_steps - local_steps)
            out[f"added_latency_mean_same_steps{key}_by_mesh_ms"] = [
                statistics.fmean(r[added]) - steps_diff_ms(r) for r in with_it
            ]
    # The same pair by pair: each request's own steps' difference taken out of its own added
    # latency, so a few slow requests (a collection, the host) move the median no more than they
    # move the raw p50.
    for key, name in (("", "added_same_steps_ms"), ("_raw_client", "added_raw_same_steps_ms")):
        per_pair = [x for r in runs for x in r.get(name, [])]
        if per_pair:
            out[f"added_latency_same_steps{key}_ms"] = summary(per_pair)
            out[f"added_latency_same_steps{key}_p50_by_mesh_ms"] = [
                summary(r[name])["p50"] for r in runs if r.get(name)
            ]
    raw = [x for r in runs for x in r.get("added_raw_ms", [])]
    if raw:
        out["raw_client"] = {
            "pairs": len(raw),
            "mesh_latency_ms": summary([x for r in runs for x in r["mesh_raw_ms"]]),
            "added_latency_ms": summary(raw),
            "added_ttft_ms": summary([x for r in runs for x in r["added_raw_ttft_ms"]]),
            "added_latency_p50_by_mesh_ms": [summary(r["added_raw_ms"])["p50"] for r in runs if r.get("added_raw_ms")],
        }
    cpu_mesh = [d for r in runs for d in r["cpu_mesh"]]
    cpu_local = [c for r in runs for c in r["cpu_local"]]
    if cpu_mesh and cpu_local:
        groups = sorted({k for d in cpu_mesh for k in d})
        out["cpu_per_request_ms"] = {
            **{
                k: {
                    "run": statistics.median(d.get(k, (0.0, 0.0))[0] for d in cpu_mesh),
                    "runqueue_wait": statistics.median(d.get(k, (0.0, 0.0))[1] for d in cpu_mesh),
                }
                for k in groups
            },
            "engine in-process": {
                "run": statistics.median(c[0] for c in cpu_local),
                "runqueue_wait": statistics.median(c[1] for c in cpu_local),
            },
        }
    return out


def _raw_rows(rc: dict[str, Any] | None) -> list[list[Any]]:
    """The overhead table's rows for the minimal client's requests (none when it did not run)."""
    if not rc:
        return []
    return [
        [f"{name}, minimal client", rc[key]["p50"], rc[key]["p99"]]
        for name, key in (
            ("end-to-end through the mesh", "mesh_latency_ms"),
            ("added latency per request", "added_latency_ms"),
            ("added time to first token", "added_ttft_ms"),
        )
    ]


def cpu_table(ov: dict[str, Any], max_tokens: int) -> str:
    """The medians of `overhead`'s CPU readings, the engines first; "" without them."""
    cpu = ov.get("cpu_per_request_ms")
    if not cpu:
        return ""
    order = sorted(cpu, key=lambda k: (k not in ("worker engine thread", "engine in-process"), -cpu[k]["run"]))
    rows = [[k, cpu[k]["run"], cpu[k]["runqueue_wait"]] for k in order if cpu[k]["run"] or cpu[k]["runqueue_wait"]]
    return md_table([f"per request of {max_tokens} tokens (median)", "CPU ms", "run-queue wait ms"], rows)


def _model_folder(a: argparse.Namespace, scratch: Path) -> tuple[Path, str, dict[str, Any]]:
    """(checkpoint folder, name clients use, what the result records about it)."""
    if a.model is None:
        from cascade.models.generate import generate_model

        folder = scratch / DEFAULT_MODEL
        generate_model(folder, GenerateSpec())
        return folder, DEFAULT_MODEL, {"generated": {k: getattr(GenerateSpec(), k) for k in GenerateSpec.__slots__}}
    from cascade.models.source import resolve_model

    got = resolve_model(a.model)
    return got.path, got.name, {"source": a.model, "kind": got.kind, "revision": got.revision}


def json_schema_main(a: argparse.Namespace) -> int:
    """Structured outputs' cost on one mesh: the same streams with and without a json_schema,
    alternating rounds (the machine is shared: a ratio of neighbouring runs moves less than the
    figures themselves), tokens/s from each response's usage."""
    import tempfile

    c = max(int(x) for x in a.concurrency.split(",") if x)
    n = a.requests or max(2 * c, 24)
    if a.quick:
        n, a.max_tokens, a.rounds = c, 8, 1
    prompt = PROMPT * a.prompt_repeat
    scratch = tempfile.TemporaryDirectory(prefix="cascade-bench-model-")
    folder, name, model_info = _model_folder(a, Path(scratch.name))
    mesh = Mesh(
        ["--workers", str(a.workers), "--threads", str(a.threads), "--model", str(folder), "--served-model-name", name],
        {"CASCADE_MAX_BATCH": str(a.max_batch)},
    )
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": BENCH_SCHEMA}}}
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "json_schema": []}
    print(f"starting the mesh: {' '.join(mesh.args)}", flush=True)
    try:
        url = mesh.start()
        for i in range(a.rounds):
            for variant, extra in (("none", None), ("json_schema", fmt)):
                print(f"round {i + 1}: {variant}, {c} streams, {n} requests of {a.max_tokens} tokens …", flush=True)
                r = asyncio.run(load_level(url, c, n, prompt, a.max_tokens, name, extra))
                runs[variant].append(r)
                print(f"  {r['output_tokens_per_s']:.0f} tok/s ({r['ok']}/{r['requests']} ok)", flush=True)
    finally:
        mesh.stop()
        scratch.cleanup()
    ratios = [
        j["output_tokens_per_s"] / f["output_tokens_per_s"]
        for f, j in zip(runs["none"], runs["json_schema"], strict=True)
    ]
    ratio = sorted(ratios)[len(ratios) // 2]
    rows = []
    for variant, rs in runs.items():
        for i, r in enumerate(rs):
            rows.append(
                [
                    variant, i + 1, r["output_tokens_per_s"], r["output_tokens"], r["ttft_ms"]["p50"],
                    r["itl_ms"]["p50"], f"{r['ok']}/{r['requests']}",
                ]
            )  # fmt: skip
    head = result_header("serve-json-schema")
    table = (
        f"# Structured outputs' cost (`cascade bench serve --json-schema --rounds {a.rounds}`)\n\n"
        f"Commit {head['commit']}; {head['machine']['cores']} cores ({head['machine']['cpu']}), shared; model {name} "
        f"({model_info}); {c} streams of completions, {n} requests of {a.max_tokens} tokens per round (ignore_eos, "
        f"greedy), {a.workers} worker(s) with {a.threads} torch thread(s); the schema (nested objects, enums, an "
        "array of at least 40 items) is in the JSON file. Rounds alternate, none first.\n\n"
    )
    table += md_table(["constraint", "round", "output tok/s", "tokens", "TTFT p50 ms", "ITL p50 ms", "ok/n"], rows)
    table += (
        f"\njson_schema on every request / none, at {c} streams: **{ratio:.2f}x** (median of {len(ratios)} "
        f"alternating rounds: {', '.join(f'{x:.2f}' for x in ratios)}; bar: >= 0.8x)\n"
    )
    print()
    print(table)
    if not a.no_write:
        payload = {
            "parameters": {
                "model": name, "model_info": model_info, "concurrency": c, "requests": n,
                "max_tokens": a.max_tokens, "rounds": a.rounds, "workers": a.workers,
                "threads_per_worker": a.threads, "max_batch": a.max_batch, "schema": BENCH_SCHEMA,
                "prompt_chars": len(prompt), "quick": a.quick,
            },
            "emulated": "nothing: real torch on the CPU (float32), real nats-server, real HTTP over loopback",
            "runs": runs,
            "ratios": ratios,
            "ratio_median": ratio,
        }  # fmt: skip
        jp, mp = write_result(a.out or "serve-json-schema", {**head, **payload}, table, results_dir=a.result_dir)
        print(f"wrote {jp} and {mp}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import tempfile

    a = parse(argv)
    if a.json_schema:
        return json_schema_main(a)
    if rate_mode(a):
        from bench.serve_rate import run as run_rate

        return run_rate(a)
    levels = [int(x) for x in a.concurrency.split(",") if x]
    if a.quick:
        a.overhead_requests, a.max_tokens, a.overhead_max_tokens, a.overhead_meshes = 6, 8, 8, 1
    prompt = PROMPT * a.prompt_repeat
    scratch = tempfile.TemporaryDirectory(prefix="cascade-bench-model-")
    folder, name, model_info = _model_folder(a, Path(scratch.name))
    out_name = a.out or ("serve" if a.model is None else "serve-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name).lower())
    cpus = engine_cpu(a)
    mesh_args = [
        "--workers", str(a.workers), "--threads", str(a.threads), "--model", str(folder), "--served-model-name", name,
    ]  # fmt: skip
    # Every request sends the same prompt: with prefix caching on, all but the first would skip
    # most of their prefill, which transformers' generate (the reference) cannot do.
    mesh_env = {
        "CASCADE_MAX_BATCH": str(a.max_batch),
        "CASCADE_PREFIX_CACHING": "0",
        "CASCADE_WORKER_CPUS": ",".join(map(str, sorted(cpus))),
    }
    mesh = Mesh(mesh_args, mesh_env)
    print(f"starting the mesh: {' '.join(mesh.args)}", flush=True)
    rows: list[dict[str, Any]] = []
    local_rows: list[dict[str, Any]] = []
    hf_rows: list[dict[str, Any]] = []
    try:
        url = mesh.start()
        print(f"mesh up at {url}", flush=True)
        engine, tok = inprocess_engine(folder, a.max_batch, a.threads)
        hf = _transformers_model(folder, a.threads) if a.transformers else None
        rounds = max(1, a.rounds) if hf is not None else 1
        for c in levels:
            n = a.requests or max(4 * c, 24)
            if a.quick:
                n = max(c, 4)
            mesh_runs, hf_runs = [], []
            for i in range(rounds):
                tag = f" (round {i + 1}/{rounds})" if rounds > 1 else ""
                print(f"concurrency {c}: {n} requests of {a.max_tokens} tokens{tag} …", flush=True)
                r = asyncio.run(load_level(url, c, n, prompt, a.max_tokens, name))
                mesh_runs.append(r)
                ttft = r["ttft_ms"]["p50"]
                shown = f"{ttft:.1f} ms" if r["ok"] else f"— ({len(r['errors'])} errors shown of {n - r['ok']})"
                print(f"  {r['output_tokens_per_s']:.0f} tok/s, TTFT p50 {shown}", flush=True)
                if hf is not None:
                    # Right after the mesh's run at the same batch size, with the mesh idle: both see the
                    # machine as it is in these few minutes.
                    hf_runs.append(transformers_level(hf, tok.encode(prompt), c, a.max_tokens))
                    print(
                        f"  transformers generate, batch {c}: {hf_runs[-1]['output_tokens_per_s']:.0f} tok/s",
                        flush=True,
                    )
            rows.append(_median_run(mesh_runs))
            if hf_runs:
                hf_rows.append(_paired(mesh_runs, hf_runs))
        ov_runs = []
        for i in range(max(1, a.overhead_meshes)):
            if i:
                # A fresh mesh: its processes start where the scheduler puts them this time.
                mesh.stop()
                mesh = Mesh(mesh_args, mesh_env)
                url = mesh.start()
            print(
                f"mesh overhead, mesh {i + 1}/{max(1, a.overhead_meshes)}: {a.overhead_requests} paired requests …",
                flush=True,
            )
            mesh_pid = mesh.proc.pid if mesh.proc is not None else None

            async def pairs(m: Mesh = mesh, u: str = url, pid: int | None = mesh_pid) -> dict[str, Any]:
                nc = await m.connect("bench-serve")
                subjects = Subjects(str(m.info.get("prefix", "cascade")))

                async def engine_time() -> dict[str, float] | None:
                    # Every worker's engine time inside steps and between them (only one serves
                    # these requests).
                    got = await worker_details(nc, subjects, ENGINE_TIME_KEYS, ENGINE_TIME_WINDOW_S)
                    if not got or any(v is None for d in got.values() for v in d.values()):
                        return None
                    return {k: sum(float(d[k]) for d in got.values()) for k in ENGINE_TIME_KEYS}

                try:
                    return await overhead(
                        u, engine, tok, a.overhead_requests, prompt, a.overhead_max_tokens, name, cpus, pid, engine_time
                    )
                finally:
                    await nc.close()

            ov_runs.append(asyncio.run(pairs()))
        ov = summarize_overhead(ov_runs)
    finally:
        mesh.stop()
    # With the mesh stopped, the engine in-process has the machine to itself, as the mesh had.
    for r in rows:
        c, n = r["concurrency"], r["requests"]
        print(f"in-process engine, concurrency {c} …", flush=True)
        with pinned(cpus):
            local_rows.append(inprocess_level(engine, tok, c, n, prompt, a.max_tokens))
    floor = None
    if not a.no_floor:
        from bench.floor import measure as measure_floor

        # The same hops with none of the mesh's code, on the same model, engine and CPU, in this
        # run: what the path's cost is read against (docs/architecture.md, "The floor").
        print(f"the path's floor: {a.overhead_requests} pairs …", flush=True)
        floor = measure_floor(
            folder, a.overhead_requests, a.overhead_max_tokens, a.max_batch, a.threads, cpus, (engine, tok)
        )
    scratch.cleanup()

    by_c = {r["concurrency"]: r for r in rows}
    scaling = (
        by_c[max(levels)]["output_tokens_per_s"] / by_c[min(levels)]["output_tokens_per_s"] if len(levels) > 1 else None
    )
    table = md_table(
        [
            "concurrency", "req/s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
            "ITL (per token) p50 ms", "ITL p99 ms", "ok/n",
        ],
        [
            [
                r["concurrency"], r["requests_per_s"], r["output_tokens_per_s"], r["ttft_ms"]["p50"],
                r["ttft_ms"]["p99"], r["itl_ms"]["p50"], r["itl_ms"]["p99"], f"{r['ok']}/{r['requests']}",
            ]
            for r in rows
        ],
    )  # fmt: skip
    head = ["streams", "mesh tok/s", "engine in-process tok/s", "mesh / in-process"]
    if hf_rows:
        head += ["transformers generate tok/s", "mesh / transformers (median)", "mesh / transformers each round"]
    cmp_rows = []
    for i, (r, lo) in enumerate(zip(rows, local_rows, strict=True)):
        row = [r["concurrency"], r["output_tokens_per_s"], lo["output_tokens_per_s"]]
        row.append(f"{r['output_tokens_per_s'] / lo['output_tokens_per_s']:.2f}x")
        if hf_rows:
            h = hf_rows[i]
            row += [h["output_tokens_per_s"], f"{h['ratio_median']:.2f}x"]
            row.append(", ".join(f"{x:.2f}" for x in h["ratios"]))
        cmp_rows.append(row)
    table += "\n" + md_table(head, cmp_rows)
    by_mesh = ""
    if ov["meshes"] > 1:
        by_mesh = (
            f"\nAdded p50 latency by mesh ({ov['meshes']} started afresh, {a.overhead_requests} pairs each): "
            + ", ".join(f"{x:.2f}" for x in ov["added_latency_p50_by_mesh_ms"])
            + " ms; added p50 time to first token: "
            + ", ".join(f"{x:.2f}" for x in ov["added_ttft_p50_by_mesh_ms"])
            + " ms. The table pools every pair.\n"
        )
    table += (
        by_mesh
        + "\n"
        + md_table(
            [f"mesh overhead (concurrency 1, {a.overhead_max_tokens} tokens, {ov['pairs']} pairs)", "p50 ms", "p99 ms"],
            [
                ["end-to-end through the mesh", ov["mesh_latency_ms"]["p50"], ov["mesh_latency_ms"]["p99"]],
                ["engine in-process", ov["inprocess_latency_ms"]["p50"], ov["inprocess_latency_ms"]["p99"]],
                ["added latency per request", ov["added_latency_ms"]["p50"], ov["added_latency_ms"]["p99"]],
                ["added time to first token", ov["added_ttft_ms"]["p50"], ov["added_ttft_ms"]["p99"]],
                *_raw_rows(ov.get("raw_client")),
            ],
        )
    )
    if ov.get("steps_ms_per_request"):
        st = ov["steps_ms_per_request"]
        table += (
            f"\nThe steps alone, per request (mean; the worker's read for {ov['steps_read']['requests']} of "
            f"{ov['steps_read']['of']} mesh requests): {st['mesh']:.2f} ms in the worker, {st['inprocess']:.2f} ms "
            f"in-process ({st['mesh'] - st['inprocess']:+.2f} ms: the host's, not the path's). (The mean added "
            "latency less the mean steps' difference is in the JSON file; a few 40-50 ms slow requests move it "
            "by several ms between meshes, so the median pair by pair below is the figure.)\n"
        )
        if ov.get("added_latency_same_steps_ms"):
            pp = ov["added_latency_same_steps_ms"]
            table += (
                "\n**What the path itself costs a request**, pair by pair: each request's own steps' difference "
                "taken out of its added latency (the worker's engine time read around each mesh request): "
                f"p50 {pp['p50']:.2f} ms (by mesh: "
                + ", ".join(f"{x:.2f}" for x in ov["added_latency_same_steps_p50_by_mesh_ms"])
                + ")"
            )
            if ov.get("added_latency_same_steps_raw_client_ms"):
                table += (
                    f"; through the minimal client p50 {ov['added_latency_same_steps_raw_client_ms']['p50']:.2f} ms "
                    "(by mesh: "
                    + ", ".join(f"{x:.2f}" for x in ov["added_latency_same_steps_raw_client_p50_by_mesh_ms"])
                    + ")"
                )
            table += ".\n"
        if ov.get("engine_gap_us") is not None:
            table += (
                f"\nThe worker's engine thread between two steps (its events sent, the next step picked): "
                f"mean {ov['engine_gap_us']:.0f} µs, against none for the engine in-process.\n"
            )
    if ov.get("cpu_per_request_ms"):
        table += (
            "\nWhere the CPU went, request by request in the same pairs (Linux schedstat: CPU time, and time "
            "ready to run but waiting for a core; the engines' wait is latency):\n\n"
            + cpu_table(ov, a.overhead_max_tokens)
        )
    if scaling is not None:
        hi, lo_c = max(levels), min(levels)
        table += f"\nTokens/s at concurrency {hi} over concurrency {lo_c}: {scaling:.2f}x (target ≥ 4x)\n"
    table += f"Added p50 latency: {ov['added_latency_ms']['p50']:.2f} ms (target ≤ 2 ms); "
    table += f"added p50 time to first token: {ov['added_ttft_ms']['p50']:.2f} ms (target ≤ 5 ms)\n"
    if ov.get("raw_client"):
        rc = ov["raw_client"]
        table += (
            f"Through the minimal client: added p50 latency {rc['added_latency_ms']['p50']:.2f} ms, "
            f"added p50 time to first token {rc['added_ttft_ms']['p50']:.2f} ms\n"
        )
    for key, who in _CLIENTS:
        if ov.get(f"added_latency_same_steps{key}_ms"):
            table += (
                f"Added p50 latency with each request's steps' difference taken out, through {who}: "
                f"{ov[f'added_latency_same_steps{key}_ms']['p50']:.2f} ms\n"
            )
    if floor is not None:
        fl = floor["added_same_steps_ms"]["p50"]
        table += (
            f"The path's floor in this run (`bench floor`: the same hops and engine, none of the mesh's code, "
            f"{floor['pairs']} pairs): {fl:.2f} ms, {floor['last_only_added_same_steps_ms']['p50']:.2f} ms of it "
            "without a send after each step"
        )
        above = [
            f"{ov[f'added_latency_same_steps{key}_ms']['p50'] - fl:.2f} ms through {who}"
            for key, who in _CLIENTS
            if ov.get(f"added_latency_same_steps{key}_ms")
        ]
        table += f"; the mesh's own code above it: {', '.join(above)}\n" if above else "\n"
    if a.transformers:
        table += (
            "\nThe engine runs float32 weights; what bf16 or int8 weights would give on this machine: "
            "`cascade bench dtypes --model <the same model>` (bench/results/dtypes.md).\n"
        )
    print()
    print(table)
    if not a.no_write:
        payload = {
            "parameters": {
                "model": name,
                "model_info": model_info,
                "concurrency": levels,
                "max_tokens": a.max_tokens,
                "prompt_chars": len(prompt),
                "prompt_tokens": len(tok.encode(prompt)),
                "workers": a.workers,
                "threads_per_worker": a.threads,
                "max_batch": a.max_batch,
                "overhead_pairs": a.overhead_requests,
                "overhead_meshes": max(1, a.overhead_meshes),
                "overhead_max_tokens": a.overhead_max_tokens,
                "transformers": a.transformers,
                "rounds": a.rounds if a.transformers else 1,
                "quick": a.quick,
                "prefix_caching": False,
                # Both engines (the worker's engine thread and the in-process one) on this CPU.
                "engine_cpus": sorted(cpus),
            },
            "emulated": "nothing: real torch on the CPU (float32), real nats-server, real HTTP over loopback",
            "levels": rows,
            "inprocess_levels": local_rows,
            "transformers_levels": hf_rows,
            "overhead": ov,
            # bench floor's pairs in this run (None: --no-floor).
            "floor": floor,
            "tokens_per_s_ratio_max_over_min": scaling,
        }
        jp, mp = write_result(out_name, {**result_header("serve"), **payload}, table, results_dir=a.result_dir)
        print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
