"""`cascade bench serve` in `vllm bench serve`'s terms: one open-loop run at a request rate with
gamma-distributed gaps (vLLM's burstiness), an optional cap on requests in flight, goodput
against service-level objectives, and vLLM's result table with the same lines and names, so the
figures can be set beside a vLLM run's. Started from bench/serve.py when any of those options is
given.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench import datasets
from bench.common import percentile, result_header, sse_events, write_result
from bench.datasets import BenchRequest
from bench.mesh import Mesh

GOODPUT_KEYS = ("ttft", "tpot", "e2el")
METRICS = {  # key: (name in the table, header of its block)
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


class UsageError(ValueError):
    pass


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:100` -> {"ttft": 500.0, "tpot": 100.0} (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or ():
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise UsageError(f"--goodput takes KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}; got {item!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise UsageError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if out[key] <= 0:
            raise UsageError(f"--goodput {item!r}: the objective must be above 0 ms")
    return out


def parse_list(text: str, allowed: Sequence[str] | None, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad:
        raise UsageError(f"{what}: {', '.join(bad)} not one of {', '.join(allowed or ())}")
    return items


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps before requests 1..n-1, vLLM's way: gamma with shape `burstiness` and mean 1/rate
    (shape 1 is a Poisson process); all zero at an infinite rate."""
    if math.isinf(rate):
        return [0.0] * max(n - 1, 0)
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(max(n - 1, 0))]


async def one_request(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str | list[int], max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage: dict[str, int] = {}
    error = ""
    try:
        async with session.post(f"{url}/completions", json=body) as resp:
            if resp.status != 200:
                return {"ok": False, "start": t0, "end": time.perf_counter(), "error": f"HTTP {resp.status}"}
            async for obj in sse_events(resp):
                if obj is None:
                    continue
                if "error" in obj:
                    error = str(obj["error"].get("message", obj["error"]))[:200]
                if obj.get("usage"):
                    usage = obj["usage"]
                if obj.get("choices") and obj["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    except (aiohttp.ClientError, TimeoutError) as e:
        error = repr(e)[:200]
    end = time.perf_counter()
    if error or not stamps:
        return {"ok": False, "start": t0, "end": end, "error": error or "no token came back"}
    out_tokens = int(usage.get("completion_tokens", len(stamps)))
    e2el = end - t0
    ttft = stamps[0] - t0
    return {
        "ok": True,
        "start": t0,
        "end": end,
        "ttft": ttft,
        # vLLM's TPOT: the time after the first token over the tokens after it.
        "tpot": (e2el - ttft) / (out_tokens - 1) if out_tokens > 1 else None,
        # vLLM's ITL: gaps between streamed chunks. A chunk may carry several tokens here (the
        # detokeniser holds back incomplete UTF-8, which random test models emit plenty of).
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "e2el": e2el,
        "stamps": stamps,
        "prompt_tokens": int(usage.get("prompt_tokens", 0)),
        "output_tokens": out_tokens,
    }


async def run_load(
    url: str,
    model: str,
    requests: list[BenchRequest],
    gaps: list[float],
    max_concurrency: int | None,
) -> tuple[list[dict[str, Any]], float]:
    """One request per entry of `requests`, the i-th sent `gaps[i-1]` after the one before."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    conn = aiohttp.TCPConnector(limit=(max_concurrency + 4) if max_concurrency else 0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as s:
        await one_request(s, url, model, requests[0].prompt, 4)  # warm-up, as vLLM's initial test request

        async def send(r: BenchRequest) -> dict[str, Any]:
            if limit is None:
                return await one_request(s, url, model, r.prompt, r.output_len)
            async with limit:
                return await one_request(s, url, model, r.prompt, r.output_len)

        tasks: list[asyncio.Task[dict[str, Any]]] = []
        t0 = time.perf_counter()
        for i, req in enumerate(requests):
            tasks.append(asyncio.create_task(send(req)))
            if i < len(gaps) and gaps[i] > 0:
                await asyncio.sleep(gaps[i])  # the arrival process itself, not a wait for a condition
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    for r in results:
        r["start"] -= t0
        r["end"] -= t0
        r["stamps"] = [x - t0 for x in r.get("stamps", [])]
    return results, duration


def compute(
    results: list[dict[str, Any]],
    duration: float,
    goodput: dict[str, float],
    percentiles: list[float],
) -> dict[str, Any]:
    """vLLM's BenchmarkMetrics, by the same names (milliseconds for latencies)."""
    ok = [r for r in results if r["ok"]]
    m: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r["error"] for r in results if not r["ok"]).most_common(5)),
        "duration": duration,
        "total_input_tokens": sum(r["prompt_tokens"] for r in ok),
        "total_output_tokens": sum(r["output_tokens"] for r in ok),
    }
    m["request_throughput"] = len(ok) / duration
    m["output_throughput"] = m["total_output_tokens"] / duration
    m["total_token_throughput"] = (m["total_input_tokens"] + m["total_output_tokens"]) / duration
    samples = {
        "ttft": [r["ttft"] * 1e3 for r in ok],
        "tpot": [r["tpot"] * 1e3 for r in ok if r["tpot"] is not None],
        "itl": [x * 1e3 for r in ok for x in r["itl"]],
        "e2el": [r["e2el"] * 1e3 for r in ok],
    }
    for key, xs in samples.items():
        m[f"mean_{key}_ms"] = statistics.fmean(xs) if xs else None
        m[f"median_{key}_ms"] = statistics.median(xs) if xs else None
        m[f"std_{key}_ms"] = statistics.pstdev(xs) if xs else None
        m[f"percentiles_{key}_ms"] = [[p, percentile(xs, p)] for p in percentiles] if xs else []
    if goodput:
        good = 0
        for r in ok:
            figures = {"ttft": r["ttft"] * 1e3, "e2el": r["e2el"] * 1e3}
            if r["tpot"] is not None:
                figures["tpot"] = r["tpot"] * 1e3
            if all(figures.get(k, 0.0) <= slo for k, slo in goodput.items()):
                good += 1
        m["good_requests"] = good
        m["request_goodput"] = good / duration
    # Peak output tokens/s over one-second windows, and the most requests in flight at once.
    # A chunk stands for its share of the request's tokens (chunks may carry several).
    per_s: Counter[int] = Counter()
    for r in ok:
        weight = r["output_tokens"] / len(r["stamps"])
        for t in r["stamps"]:
            per_s[int(t)] += weight
    m["max_output_tokens_per_s"] = float(max(per_s.values(), default=0))
    events = sorted([(r["start"], 1) for r in results] + [(r["end"], -1) for r in results])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    m["max_concurrent_requests"] = peak
    return m


def table(
    m: dict[str, Any], max_concurrency: int | None, rate: float, metrics: list[str], percentiles: list[float]
) -> str:
    """vLLM's printed result, line for line; "n/a" where a figure has no samples."""

    def num(v: float | None) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:<10.2f}"

    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    row = "{:<40} {:<10}"
    lines.append(row.format("Successful requests:", m["completed"]))
    lines.append(row.format("Failed requests:", m["failed"]))
    if max_concurrency is not None:
        lines.append(row.format("Maximum request concurrency:", max_concurrency))
    if not math.isinf(rate):
        lines.append(row.format("Request rate configured (RPS):", num(rate)))
    lines.append(row.format("Benchmark duration (s):", num(m["duration"])))
    lines.append(row.format("Total input tokens:", m["total_input_tokens"]))
    lines.append(row.format("Total generated tokens:", m["total_output_tokens"]))
    lines.append(row.format("Request throughput (req/s):", num(m["request_throughput"])))
    if "request_goodput" in m:
        lines.append(row.format("Request goodput (req/s):", num(m["request_goodput"])))
    lines.append(row.format("Output token throughput (tok/s):", num(m["output_throughput"])))
    lines.append(row.format("Peak output token throughput (tok/s):", num(m["max_output_tokens_per_s"])))
    lines.append(row.format("Peak concurrent requests:", num(float(m["max_concurrent_requests"]))))
    lines.append(row.format("Total Token throughput (tok/s):", num(m["total_token_throughput"])))
    for key in metrics:
        name, header = METRICS[key]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        lines.append(row.format(f"Mean {name} (ms):", num(m[f"mean_{key}_ms"])))
        lines.append(row.format(f"Median {name} (ms):", num(m[f"median_{key}_ms"])))
        for p, v in m[f"percentiles_{key}_ms"] or [[p, None] for p in percentiles]:
            word = str(int(p)) if int(p) == p else str(p)
            lines.append(row.format(f"P{word} {name} (ms):", num(v)))
    lines.append("=" * 50)
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _percentiles(a: argparse.Namespace) -> list[float]:
    try:
        return [float(x) for x in parse_list(a.metric_percentiles, None, "--metric-percentiles")]
    except ValueError:
        raise UsageError(f"--metric-percentiles takes numbers, e.g. 50,90,99; got {a.metric_percentiles!r}") from None


def _requests(a: argparse.Namespace, n: int, prompt: str, folder: Path | None) -> list[BenchRequest]:
    """The run's requests: the built-in prompt with --max-tokens each, or the dataset's."""
    if not a.dataset_name:
        return [BenchRequest(prompt, 0, a.max_tokens)] * n
    from cascade.models.tokenizer import load_tokenizer

    tok_dir = Path(a.tokenizer) if a.tokenizer else folder
    assert tok_dir is not None  # run() asks for --tokenizer when there is no model folder
    if not tok_dir.is_dir():
        raise datasets.DatasetError(f"--tokenizer {tok_dir}: no such folder")
    tok = load_tokenizer(tok_dir)
    vocab = datasets.vocab_size(tok_dir) if a.dataset_name == "random" else 0
    return datasets.load(a, n, tok, vocab)


def _dataset_params(a: argparse.Namespace, requests: list[BenchRequest]) -> dict[str, Any] | None:
    if not a.dataset_name:
        return None
    picked = {
        "random": ("random_input_len", "random_output_len", "random_range_ratio", "random_prefix_len"),
        "sharegpt": ("dataset_path", "sharegpt_output_len"),
        "custom": ("dataset_path", "custom_output_len"),
    }[a.dataset_name]
    return {
        "name": a.dataset_name,
        **{k: getattr(a, k) for k in picked},
        "prompt_tokens_total": sum(r.prompt_len for r in requests),
        "output_tokens_asked_total": sum(r.output_len for r in requests),
    }


def run(a: argparse.Namespace) -> int:
    from bench.serve import PROMPT, _model_folder

    try:
        goodput = parse_goodput(a.goodput)
        metrics = parse_list(a.percentile_metrics, list(METRICS), "--percentile-metrics")
        percentiles = _percentiles(a)
        if any(not 0 < p < 100 for p in percentiles):
            raise UsageError("--metric-percentiles must lie between 0 and 100")
        rate = math.inf if a.request_rate is None else a.request_rate
        burstiness = 1.0 if a.burstiness is None else a.burstiness
        if rate <= 0 or burstiness <= 0:
            raise UsageError("--request-rate and --burstiness must be above 0")
        if a.max_concurrency is not None and a.max_concurrency < 1:
            raise UsageError("--max-concurrency must be at least 1")
        if a.concurrency != "1,8,32" or a.requests or a.transformers:
            raise UsageError(
                "--concurrency, --requests and --transformers belong to the concurrency sweep; with vllm bench "
                "serve's options use --max-concurrency and --num-prompts"
            )
    except UsageError as e:
        print(f"cascade bench serve: {e}", file=sys.stderr)
        return 2
    n = a.num_prompts or (16 if a.quick else 200)
    prompt = PROMPT * a.prompt_repeat
    gaps = arrival_gaps(n, rate, burstiness, a.seed)
    if a.base_url and a.dataset_name and not a.tokenizer:
        print("cascade bench serve: --dataset-name with --base-url needs --tokenizer", file=sys.stderr)
        return 2
    # The machine may be shared: its load beside the figures says how far to trust them.
    load_before = os.getloadavg()

    mesh: Mesh | None = None
    scratch: tempfile.TemporaryDirectory[str] | None = None
    model_info: dict[str, Any] = {}
    folder: Path | None = None
    if a.base_url:
        url = a.base_url.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        if not a.model:
            print("cascade bench serve: --base-url needs --model, the served model's name", file=sys.stderr)
            return 2
        name = a.model
        model_info = {"served_by": url}
    else:
        scratch = tempfile.TemporaryDirectory(prefix="cascade-bench-model-")
        folder, name, model_info = _model_folder(a, Path(scratch.name))
    try:
        requests = _requests(a, n, prompt, folder)
    except datasets.DatasetError as e:
        print(f"cascade bench serve: {e}", file=sys.stderr)
        if scratch is not None:
            scratch.cleanup()
        return 2
    if folder is not None:
        mesh = Mesh(
            [
                "--workers", str(a.workers), "--threads", str(a.threads), "--model", str(folder),
                "--served-model-name", name,
            ],
            {"CASCADE_MAX_BATCH": str(a.max_batch)},
        )  # fmt: skip
        print(f"starting the mesh: {' '.join(mesh.args)}", flush=True)
    try:
        if mesh is not None:
            url = mesh.start()
            print(f"mesh up at {url}", flush=True)
        what = "all at once" if math.isinf(rate) else f"at {rate:g} req/s, burstiness {burstiness:g}"
        cap = f", at most {a.max_concurrency} in flight" if a.max_concurrency else ""
        print(f"{n} requests of {a.max_tokens} tokens {what}{cap} …", flush=True)
        results, duration = asyncio.run(run_load(url, name, requests, gaps, a.max_concurrency))
    finally:
        if mesh is not None:
            mesh.stop()
        if scratch is not None:
            scratch.cleanup()

    load_after = os.getloadavg()
    m = compute(results, duration, goodput, percentiles)
    text = table(m, a.max_concurrency, rate, metrics, percentiles)
    print()
    print(text, end="")
    if m["failed"]:
        print(f"failures: {m['errors']}")
    if a.no_write:
        return 0
    # The command as a user types it (`cascade ...`, also when run as `python -m cascade.cli`).
    via_cli = Path(sys.argv[0]).name == "cascade" or sys.argv[0].endswith(("cascade/cli/__main__.py", "cascade.cli"))
    command = "cascade " + shlex.join(sys.argv[1:]) if via_cli else shlex.join(sys.argv)
    params = {
        "model": name,
        "model_info": model_info,
        "request_rate": "inf" if math.isinf(rate) else rate,
        "burstiness": burstiness,
        "max_concurrency": a.max_concurrency,
        "num_prompts": n,
        "max_tokens": a.max_tokens if not a.dataset_name else None,
        "prompt_chars": len(prompt) if not a.dataset_name else None,
        "dataset": _dataset_params(a, requests),
        "goodput_ms": goodput,
        "percentile_metrics": metrics,
        "metric_percentiles": percentiles,
        "seed": a.seed,
        "workers": None if a.base_url else a.workers,
        "threads_per_worker": None if a.base_url else a.threads,
        "max_batch": None if a.base_url else a.max_batch,
        "base_url": a.base_url,
        "quick": a.quick,
    }
    out_name = re.sub(r"\.json$", "", a.result_filename or "serve-rate")
    doc = {
        **result_header("serve-rate"),
        "command": command,
        "parameters": params,
        "served_by": "the mesh this run started" if mesh is not None else url,
        "emulated": "nothing: real torch on the CPU (float32), real nats-server, real HTTP over loopback",
        "loadavg_1_5_15": {"before": load_before, "after": load_after},
        "metrics": m,
    }
    md = markdown(doc)
    paths = write_result(out_name, doc, md, results_dir=a.result_dir)
    print("wrote " + " and ".join(str(p) for p in paths))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    """The committed markdown, from the result's JSON alone."""
    p, m = doc["parameters"], doc["metrics"]
    rate = math.inf if p["request_rate"] == "inf" else float(p["request_rate"])
    text = table(m, p["max_concurrency"], rate, p["percentile_metrics"], p["metric_percentiles"])
    load = doc["loadavg_1_5_15"]
    goodput = ", ".join(f"{k} ≤ {v:g} ms" for k, v in p["goodput_ms"].items())
    return (
        f"# cascade bench serve, vLLM-style run\n\n`{doc['command']}`\n\n"
        f"Model {p['model']}; {p['num_prompts']} requests of {p['max_tokens']} generated tokens; served by "
        f"{doc['served_by']}" + (f"; goodput: a request meets {goodput}" if goodput else "") + ". "
        f"Commit {doc['commit'][:12]}; load average (1 min) {load['before'][0]:.1f} before and "
        f"{load['after'][0]:.1f} after the run, on {doc['machine']['cores']} cores.\n\n"
        "```text\n" + text + "```\n\n"
        "ITL is vLLM's: the gap between streamed chunks. A chunk may carry several tokens (the detokeniser "
        "holds back incomplete UTF-8, which the random test model emits often), so ITL reads above TPOT here; "
        "TPOT divides the time after the first token by the tokens after it.\n"
    )
