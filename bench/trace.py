"""Trace replay load generator: open-loop replay of a request trace against an OpenAI-compatible
server, recording every request.

    cascade bench trace --trace FILE [--start S --duration S --compress X --rate-scale X ...]
    python bench/trace.py --analyse --duration 600       (the burstiest windows of the trace)
    python bench/trace.py --dry-run --start 780 --duration 600 --compress 3

Open loop: each request is sent at its scheduled time whether or not earlier ones have answered
(unlimited connections), so a slow server sees the queue a real one would, instead of a politely
waiting client. Requests go to `/v1/completions` with `stream: true` and `ignore_eos: true` (the
trace's output length is what is generated), the prompt as token ids of the scheduled length.

Writes one JSON line per request (kind "request": scheduled, sent, first_token, token_times, end,
status, error, ...; times in seconds since the replay started; token times are the arrival times
of the stream chunks) after a "meta" line with every option, and prints a summary (counts,
TTFT / inter-token latency percentiles, SLO attainment for --slo-ttft-ms / --slo-tbt-ms).

Default trace: the Azure LLM inference trace 2023 (code service) in ../shared/traces/, licensed
CC BY 4.0: Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting",
ISCA 2024. Keep its notice with any copy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS
from bench.tracelib import (
    DEFAULT_TRACE,
    LICENCE,
    Arrival,
    RequestRecord,
    ScheduleSpec,
    TraceError,
    build_schedule,
    bursty_windows,
    format_summary,
    load_trace,
    prompt_ids,
    rate_bins,
    summarise,
)
from cascade.config import DEFAULT_MODEL, read_mesh_file


def completions_url(base: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/v1/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/completions"
    return base + "/v1/completions"


def default_url() -> str:
    env = os.environ.get("CASCADE_GATEWAY_URL")
    if env:
        return env
    info = read_mesh_file()
    if info and isinstance(info.get("gateway_url"), str):
        return str(info["gateway_url"])
    return "http://127.0.0.1:8000"


# --------------------------------------------------------------------------- network


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    rec: RequestRecord,
    timeout_s: float,
    now: Callable[[], float],
) -> None:
    """Send one request and stream its answer into `rec`. Every failure ends up in the record
    (status + error); nothing escapes but cancellation."""
    rec.sent = now()
    done = False
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body) as resp:
                rec.http_status = resp.status
                if resp.status != 200:
                    rec.status = "http_error"
                    rec.error = (await resp.text())[:500]
                    return
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    obj = orjson.loads(data)
                    if not isinstance(obj, dict):
                        continue
                    if obj.get("error"):
                        err = obj["error"]
                        rec.status = "stream_error"
                        rec.error = str(err.get("message", err) if isinstance(err, dict) else err)[:500]
                        return
                    usage = obj.get("usage")
                    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                        rec.completion_tokens = usage["completion_tokens"]
                    for choice in obj.get("choices") or []:
                        reason = choice.get("finish_reason")
                        # The closing chunk (empty text, a finish reason) carries no token.
                        if reason is None or choice.get("text"):
                            t = now()
                            if rec.first_token is None:
                                rec.first_token = t
                            rec.token_times.append(t)
                        if reason is not None:
                            rec.finish_reason = reason
                            done = True
        if done:
            rec.status = "ok"
        else:
            rec.status = "stream_error"
            rec.error = "stream ended without [DONE] or a finish reason"
    except TimeoutError:
        rec.status = "timeout"
        rec.error = f"no complete answer within {timeout_s:g} s"
    except aiohttp.ClientError as e:
        rec.status = "error"
        rec.error = f"{type(e).__name__}: {e}"[:500]
    except (orjson.JSONDecodeError, UnicodeDecodeError) as e:
        rec.status = "stream_error"
        rec.error = f"bad stream chunk: {e}"[:500]
    finally:
        rec.end = now()
        if rec.completion_tokens == 0:
            rec.completion_tokens = len(rec.token_times)


def request_body(model: str, a: Arrival, seed: int, prompt_mode: str) -> dict[str, Any]:
    ids = prompt_ids(a.prompt_tokens, seed, a.index)
    prompt: Any = ids if prompt_mode == "ids" else "".join(chr(i) for i in ids)
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": a.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }


async def replay(
    url: str,
    model: str,
    arrivals: Sequence[Arrival],
    *,
    timeout_s: float = 60.0,
    seed: int = 0,
    prompt_mode: str = "ids",
    on_record: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send every arrival at its time after the start, open loop; return the records in
    schedule order. `on_record` sees each record as its request ends."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def now() -> float:
        return loop.time() - t0

    endpoint = completions_url(url)
    records = [
        RequestRecord(
            index=a.index,
            scheduled=a.t,
            prompt_tokens=a.prompt_tokens,
            output_tokens=a.output_tokens,
            trace_t=a.trace_t,
        )
        for a in arrivals
    ]

    async def run_one(a: Arrival, rec: RequestRecord) -> None:
        await _one(session, endpoint, request_body(model, a, seed, prompt_mode), rec, timeout_s, now)
        if on_record is not None:
            on_record(rec)

    # No connection limit: a pool cap would make late arrivals wait for earlier answers, which is
    # a closed loop by another name. Our own per-request timeout governs, not the session's.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        # The TaskGroup keeps every request task and waits for all of them; `_one` records its
        # own failures, so one bad request never cancels the others.
        async with asyncio.TaskGroup() as tg:
            for a, rec in zip(arrivals, records, strict=True):
                delay = a.t - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                tg.create_task(run_one(a, rec))
    return records


# --------------------------------------------------------------------------- CLI


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cascade bench trace",
        description="Open-loop replay of a request trace (TIMESTAMP,ContextTokens,GeneratedTokens CSV) "
        "against an OpenAI-compatible /v1/completions endpoint.",
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help=f"trace CSV (default {DEFAULT_TRACE})")
    p.add_argument("--url", default=None, help="server base URL (default: the running mesh's gateway)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    w = p.add_argument_group("window and scaling (in trace time)")
    w.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace (default 0)")
    w.add_argument("--duration", type=float, default=None, help="window length, trace seconds (default: to the end)")
    w.add_argument("--compress", type=float, default=1.0, help="time compression: 3 replays 3x faster (default 1)")
    w.add_argument("--rate-scale", type=float, default=1.0, help="multiply (or thin) arrivals by this (default 1)")
    w.add_argument("--seed", type=int, default=0, help="seed for rate scaling and prompt ids (default 0)")
    t = p.add_argument_group("token counts")
    t.add_argument("--prompt-scale", type=float, default=1.0, help="multiply prompt lengths (default 1)")
    t.add_argument("--output-scale", type=float, default=1.0, help="multiply output lengths (default 1)")
    t.add_argument("--max-prompt", type=int, default=0, help="cap prompt tokens after scaling (0 = none)")
    t.add_argument("--max-output", type=int, default=0, help="cap output tokens after scaling (0 = none)")
    t.add_argument("--min-output", type=int, default=1, help="floor for output tokens (default 1)")
    t.add_argument(
        "--prompt-mode",
        choices=("ids", "text"),
        default="ids",
        help="send prompts as token ids (exact length) or as ASCII text (default ids)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds (default 60)")
    r.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="TTFT SLO for attainment (default 1000)")
    r.add_argument("--slo-tbt-ms", type=float, default=100.0, help="mean time-between-tokens SLO (default 100)")
    r.add_argument("--out", type=Path, default=None, help="JSON lines file (default bench/results/trace-<time>.jsonl)")
    r.add_argument("--summary-json", type=Path, default=None, help="also write the summary as JSON here")
    r.add_argument("--dry-run", action="store_true", help="print the schedule (rate at 10 s bins), send nothing")
    r.add_argument(
        "--analyse",
        action="store_true",
        help="print the burstiest windows of --duration (default 600) trace seconds, send nothing",
    )
    return p.parse_args(argv)


def _spec(a: argparse.Namespace) -> ScheduleSpec:
    return ScheduleSpec(
        start_s=a.start,
        duration_s=a.duration,
        compress=a.compress,
        rate_scale=a.rate_scale,
        seed=a.seed,
        prompt_scale=a.prompt_scale,
        output_scale=a.output_scale,
        max_prompt=a.max_prompt,
        max_output=a.max_output,
        min_output=a.min_output,
    )


def _print_bins(bins: Sequence[int], bin_s: float) -> None:
    peak = max(bins) if bins else 0
    for i, b in enumerate(bins):
        bar = "#" * (round(40 * b / peak) if peak else 0)
        print(f"  {i * bin_s:7.0f}s {b / bin_s:7.2f} req/s {bar}")


def _analyse(args: argparse.Namespace) -> int:
    rows = load_trace(args.trace)
    duration = args.duration or 600.0
    print(f"{args.trace}: {len(rows)} requests over {rows[-1].t:.0f} s ({len(rows) / rows[-1].t:.2f} req/s)")
    print(f"burstiest {duration:g} s windows (10 s bins, starts every 30 s, mean >= 1 req/s):")
    for s in bursty_windows(rows, duration, bin_s=10.0, step_s=30.0, min_rate=1.0):
        print(
            f"  start {s.start_s:6.0f}s  {s.requests:5d} req  mean {s.mean_rate:5.2f}/s  peak {s.peak_rate:5.1f}/s  "
            f"peak/mean {s.peak_to_mean:4.1f}  idle bins {s.idle_bins}"
        )
    return 0


async def amain(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.analyse:
            return _analyse(args)
        rows = load_trace(args.trace)
        arrivals = build_schedule(rows, _spec(args))
    except TraceError as e:
        print(f"cascade bench trace: {e}", file=sys.stderr)
        return 2
    if not arrivals:
        print("cascade bench trace: the window holds no requests", file=sys.stderr)
        return 2
    span = arrivals[-1].t
    prompt = sum(a.prompt_tokens for a in arrivals)
    output = sum(a.output_tokens for a in arrivals)
    print(
        f"{len(arrivals)} requests over {span:.1f} s ({len(arrivals) / max(span, 1e-9):.2f} req/s), "
        f"{prompt / len(arrivals):.0f} prompt / {output / len(arrivals):.0f} output tokens on average"
    )
    if args.dry_run:
        _print_bins(rate_bins((a.t for a in arrivals), 10.0), 10.0)
        return 0

    url = args.url or default_url()
    out = args.out or RESULTS / f"trace-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "meta",
        "trace": str(args.trace),
        "licence": LICENCE if args.trace.resolve() == DEFAULT_TRACE.resolve() else None,
        "url": completions_url(url),
        "model": args.model,
        "spec": {k: getattr(_spec(args), k) for k in ScheduleSpec.__dataclass_fields__},
        "timeout_s": args.timeout,
        "prompt_mode": args.prompt_mode,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tbt_ms": args.slo_tbt_ms,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"replaying against {completions_url(url)} (model {args.model}); records to {out}", flush=True)
    with out.open("wb") as f:
        f.write(orjson.dumps(meta) + b"\n")

        def write(rec: RequestRecord) -> None:
            _write_line(f, {"kind": "request", **rec.to_json()})

        records = await replay(
            url,
            args.model,
            arrivals,
            timeout_s=args.timeout,
            seed=args.seed,
            prompt_mode=args.prompt_mode,
            on_record=write,
        )
        summary = summarise(records, args.slo_ttft_ms, args.slo_tbt_ms)
        _write_line(f, {"kind": "summary", **summary})
    print(format_summary(summary))
    if args.summary_json is not None:
        args.summary_json.write_bytes(orjson.dumps({**meta, "kind": "summary", "summary": summary}))
    return 0 if summary["ok"] else 1


def _write_line(f: IO[bytes], obj: dict[str, Any]) -> None:
    # NaN is not JSON: orjson writes null for it, which readers take as "no samples".
    f.write(orjson.dumps(obj) + b"\n")
    f.flush()


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
