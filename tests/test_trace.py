"""Trace replay: the pure schedule and summary (bench/tracelib.py), and the load generator itself
(bench/trace.py) against a small aiohttp server that speaks the OpenAI streaming format."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from bench import trace as trace_cli
from bench.trace import completions_url, replay
from bench.tracelib import (
    DEFAULT_TRACE,
    Arrival,
    RequestRecord,
    ScheduleSpec,
    TraceError,
    TraceRow,
    build_schedule,
    bursty_windows,
    format_summary,
    load_trace,
    parse_timestamp,
    prompt_ids,
    rate_bins,
    scale_count,
    scale_rate,
    summarise,
    window,
    window_stat,
)

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.5000000,100,10
2023-11-16 18:17:03.0000000,4000,3
2023-11-16 18:17:05.2500000,50,200
2023-11-16 18:17:13.0000000,7,1
"""


@pytest.fixture
def small_trace(tmp_path: Path) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(CSV)
    return p


# --------------------------------------------------------------------------- pure parts


def test_parse_timestamp_keeps_seven_digit_fractions() -> None:
    a = parse_timestamp("2023-11-16 18:17:03.9799600")
    b = parse_timestamp("2023-11-16 18:17:04")
    assert b - a == pytest.approx(0.02004, abs=1e-6)
    with pytest.raises(TraceError):
        parse_timestamp("yesterday")


def test_load_sorts_and_rebases(small_trace: Path, tmp_path: Path) -> None:
    rows = load_trace(small_trace)
    assert [r.t for r in rows] == [0.0, 0.5, 2.25, 10.0]
    assert rows[0] == TraceRow(0.0, 4000, 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(TraceError, match="columns"):
        load_trace(bad)
    with pytest.raises(TraceError, match=r"no trace at .*missing\.csv: pass --trace FILE"):
        load_trace(tmp_path / "missing.csv")


def test_window_and_schedule(small_trace: Path) -> None:
    rows = load_trace(small_trace)
    w = window(rows, 0.5, 5.0)
    assert [r.t for r in w] == [0.0, 1.75]
    spec = ScheduleSpec(start_s=0.5, duration_s=5.0, compress=2.0, prompt_scale=0.5, max_prompt=40, max_output=150)
    sched = build_schedule(rows, spec)
    assert [(a.t, a.prompt_tokens, a.output_tokens, a.trace_t) for a in sched] == [
        (0.0, 40, 10, 0.5),  # 100 * 0.5 = 50 → capped at 40
        (0.875, 25, 150, 2.25),  # 1.75 s compressed 2x; 200 capped at 150
    ]
    assert [a.index for a in sched] == [0, 1]
    with pytest.raises(TraceError):
        build_schedule(rows, ScheduleSpec(max_prompt=0, min_prompt=0))
    with pytest.raises(TraceError, match="below the minimum"):
        build_schedule(rows, ScheduleSpec(max_output=2, min_output=5))
    with pytest.raises(TraceError):
        build_schedule(rows, ScheduleSpec(compress=0))


def test_scale_count_clamps() -> None:
    assert scale_count(7, 0.1, 1, 0) == 1
    assert scale_count(4000, 0.25, 1, 512) == 512
    assert scale_count(10, 2.0, 1, 0) == 20


def test_rate_scaling_is_deterministic_and_proportional() -> None:
    rows = [TraceRow(float(i), 10, 10) for i in range(2000)]
    half = scale_rate(rows, 0.5, seed=7)
    assert half == scale_rate(rows, 0.5, seed=7)
    assert half != scale_rate(rows, 0.5, seed=8)
    assert 900 < len(half) < 1100
    triple = scale_rate(rows, 3.0, seed=1)
    assert len(triple) == 6000
    # Copies spread over the gap to the next arrival, in time order, not stacked.
    assert [r.t for r in triple[:4]] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert all(a.t <= b.t for a, b in pairwise(triple))
    assert len(scale_rate(rows, 2.5, seed=3)) == pytest.approx(5000, rel=0.03)
    with pytest.raises(TraceError):
        scale_rate(rows, 0, seed=0)


def test_rate_bins_and_bursty_windows() -> None:
    assert rate_bins([0.0, 1.0, 9.9, 10.0, 25.0], 10.0) == [3, 1, 1]
    assert rate_bins([0.0, 35.0], 10.0, duration_s=30.0) == [1, 0, 0]
    # A flat trace with one burst at 300-310 s: the window holding it ranks first.
    rows = [TraceRow(float(t), 1, 1) for t in range(0, 600, 2)]
    rows += [TraceRow(300 + i / 20, 1, 1) for i in range(200)]
    rows.sort(key=lambda r: r.t)
    best = bursty_windows(rows, 120.0, bin_s=10.0, step_s=30.0)
    assert best[0].start_s <= 300 < best[0].start_s + 120
    assert best[0].peak_rate == pytest.approx(20.5)
    st = window_stat(rows, 0.0, 120.0, 10.0)
    assert st.peak_to_mean == pytest.approx(1.0) and st.idle_bins == 0
    # Listed windows are distinct stretches, not the same burst seen from 4 starts.
    starts = [w.start_s for w in best]
    assert all(abs(a - b) >= 60 for i, a in enumerate(starts) for b in starts[i + 1 :])


def test_prompt_ids_deterministic_and_printable() -> None:
    a = prompt_ids(50, seed=1, index=3)
    assert a == prompt_ids(50, seed=1, index=3) and a != prompt_ids(50, seed=1, index=4)
    assert len(a) == 50 and all(32 <= i < 127 for i in a)


def _rec(i: int, status: str, sent: float, tokens: list[float]) -> RequestRecord:
    r = RequestRecord(index=i, scheduled=sent, prompt_tokens=10, output_tokens=len(tokens), sent=sent)
    r.status = status
    r.token_times = tokens
    r.first_token = tokens[0] if tokens else None
    r.end = tokens[-1] if tokens else sent + 1
    r.completion_tokens = len(tokens)
    return r


def test_summary_counts_failures_as_misses() -> None:
    recs = [
        _rec(0, "ok", 0.0, [0.1, 0.15, 0.2]),  # TTFT 100 ms, gaps 50 ms: meets both
        _rec(1, "ok", 1.0, [1.5, 1.58]),  # TTFT 500 ms: misses TTFT
        _rec(2, "ok", 2.0, [2.05, 2.35]),  # gap 300 ms: misses TBT
        _rec(3, "timeout", 3.0, []),
    ]
    s = summarise(recs, slo_ttft_ms=200, slo_tbt_ms=100)
    assert s["requests"] == 4 and s["ok"] == 3 and s["status"] == {"ok": 3, "timeout": 1}
    assert s["slo"]["attainment"] == pytest.approx(0.25)
    assert s["slo"]["ttft_attainment"] == pytest.approx(0.5)
    assert s["slo"]["tbt_attainment"] == pytest.approx(0.5)
    assert s["ttft_ms"]["p50"] == pytest.approx(100)
    assert s["itl_ms"]["n"] == 4 and s["itl_ms"]["max"] == pytest.approx(300)
    assert s["completion_tokens"] == 7
    text = format_summary(s)
    assert "TTFT <= 200 ms" in text and "25.0 % attained" in text
    empty = summarise([], 1, 1)
    assert empty["requests"] == 0 and math.isnan(empty["slo"]["attainment"])


def test_default_trace_path_points_at_shared_traces() -> None:
    assert DEFAULT_TRACE.parent.name == "traces" and DEFAULT_TRACE.parent.parent.name == "shared"
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"


@pytest.mark.skipif(not DEFAULT_TRACE.is_file(), reason="shared trace not present")
def test_shared_trace_loads() -> None:
    rows = load_trace(DEFAULT_TRACE)
    assert len(rows) == 8819  # the README says 8,818; the file has 8,819 data rows
    assert rows[-1].t == pytest.approx(3435.9, abs=0.5)


# --------------------------------------------------------------------------- the load generator


@dataclass
class FakeServer:
    """An OpenAI-style streaming endpoint whose behaviour each test picks by request order."""

    mode: str = "ok"
    hold_until: int = 0  # hold every answer until this many requests have arrived
    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if len(self.bodies) >= self.hold_until:
            self.arrived.set()
        if self.hold_until:
            await self.arrived.wait()
        if self.mode == "hang":
            await self.release.wait()
            return web.Response(status=200)
        if self.mode == "503":
            return web.json_response({"error": {"message": "no capacity", "type": "overloaded"}}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n")

        n = int(body["max_tokens"])
        for i in range(n):
            if self.mode == "midway" and i == 1:
                await send({"error": {"message": "worker died", "type": "server_error"}})
                return resp
            await send({"choices": [{"index": 0, "text": "x", "finish_reason": None}], "usage": None})
        await send({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": None})
        await send({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
        if self.mode != "no-done":
            await send(b"[DONE]")
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[FakeServer, str]]:
    fake = FakeServer()
    app = web.Application()
    app.router.add_post("/v1/completions", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.release.set()  # let held handlers finish so cleanup does not wait on them
        fake.arrived.set()
        await runner.cleanup()


def arrivals(n: int, out: int = 3, gap: float = 0.0) -> list[Arrival]:
    return [Arrival(index=i, t=i * gap, prompt_tokens=5 + i, output_tokens=out, trace_t=float(i)) for i in range(n)]


async def test_replay_streams_and_records(server: tuple[FakeServer, str]) -> None:
    fake, url = server
    seen: list[int] = []
    recs = await replay(url, "m", arrivals(3, out=4), timeout_s=10, seed=5, on_record=lambda r: seen.append(r.index))
    assert sorted(seen) == [0, 1, 2]
    for r in recs:
        assert r.status == "ok" and r.http_status == 200 and r.error is None
        assert len(r.token_times) == 4 and r.completion_tokens == 4 and r.finish_reason == "length"
        assert r.sent is not None and r.first_token is not None and r.end is not None
        assert r.sent <= r.first_token <= r.token_times[-1] <= r.end
    b = sorted(fake.bodies, key=lambda x: len(x["prompt"]))[0]
    assert b["stream"] is True and b["ignore_eos"] is True and b["max_tokens"] == 4 and b["model"] == "m"
    assert b["prompt"] == prompt_ids(5, 5, 0)


async def test_replay_is_open_loop(server: tuple[FakeServer, str]) -> None:
    # The server answers nobody until all 20 requests have arrived: a generator that waited for
    # answers before sending more (or capped its connections) would time out here.
    fake, url = server
    fake.hold_until = 20
    recs = await replay(url, "m", arrivals(20, out=2, gap=0.001), timeout_s=10)
    assert [r.status for r in recs] == ["ok"] * 20


@pytest.mark.parametrize(
    ("mode", "status", "error"),
    [
        ("503", "http_error", "no capacity"),
        ("midway", "stream_error", "worker died"),
        ("no-done", "ok", None),  # a finish reason is enough to call it complete
    ],
)
async def test_replay_records_failures(
    server: tuple[FakeServer, str], mode: str, status: str, error: str | None
) -> None:
    fake, url = server
    fake.mode = mode
    (r,) = await replay(url, "m", arrivals(1), timeout_s=10)
    assert r.status == status
    assert (r.error is None) if error is None else (error in (r.error or ""))
    if mode == "midway":
        assert len(r.token_times) == 1 and r.completion_tokens == 1


async def test_replay_timeout_and_refused(server: tuple[FakeServer, str], unused_tcp_port: int) -> None:
    fake, url = server
    fake.mode = "hang"
    (r,) = await replay(url, "m", arrivals(1), timeout_s=0.2)
    assert r.status == "timeout" and r.end is not None
    (r,) = await replay(f"http://127.0.0.1:{unused_tcp_port}", "m", arrivals(1), timeout_s=5)
    assert r.status == "error" and r.error


async def test_cli_writes_json_lines(server: tuple[FakeServer, str], small_trace: Path, tmp_path: Path) -> None:
    _, url = server
    out = tmp_path / "run.jsonl"
    summary = tmp_path / "summary.json"
    argv = ["--trace", str(small_trace), "--url", url, "--model", "m", "--compress", "1000"]
    argv += ["--max-output", "5", "--out", str(out), "--summary-json", str(summary), "--slo-ttft-ms", "5000"]
    assert await trace_cli.amain(argv) == 0
    lines = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert lines[0]["kind"] == "meta" and lines[0]["spec"]["compress"] == 1000.0
    reqs = [x for x in lines if x["kind"] == "request"]
    assert len(reqs) == 4 and all(x["status"] == "ok" for x in reqs)
    assert sorted(x["output_tokens"] for x in reqs) == [1, 3, 5, 5]
    assert lines[-1]["kind"] == "summary" and lines[-1]["ok"] == 4
    assert orjson.loads(summary.read_bytes())["summary"]["requests"] == 4


async def test_cli_dry_run_and_errors(small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await trace_cli.amain(["--trace", str(small_trace), "--dry-run"]) == 0
    assert "4 requests over 10.0 s" in capsys.readouterr().out
    assert await trace_cli.amain(["--trace", str(tmp_path / "nope.csv"), "--dry-run"]) == 2
    assert await trace_cli.amain(["--trace", str(small_trace), "--start", "100", "--dry-run"]) == 2
    assert await trace_cli.amain(["--trace", str(small_trace), "--analyse", "--duration", "5"]) == 0


# --------------------------------------------------------------------------- a missing trace


def test_a_missing_default_trace_says_what_is_missing_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import tracelib

    traces = tmp_path / "shared" / "traces"
    monkeypatch.setattr(tracelib, "TRACES_DIR", traces)
    monkeypatch.setattr(tracelib, "DEFAULT_TRACE", traces / "azure_llm_2023_code.csv")
    with pytest.raises(tracelib.TraceError) as e:
        tracelib.load_trace(traces / "azure_llm_2023_code.csv")
    msg = str(e.value)
    assert "no shared/traces/" in msg and str(traces / "azure_llm_2023_code.csv") in msg and "--trace FILE" in msg
    traces.mkdir(parents=True)
    with pytest.raises(tracelib.TraceError, match=f"{traces} has no azure_llm_2023_code.csv"):
        tracelib.load_trace(traces / "azure_llm_2023_code.csv")


@pytest.mark.parametrize("name", ["burst", "trace", "multimodel"])
def test_bench_commands_answer_a_missing_trace_without_a_traceback(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cascade import cli

    missing = tmp_path / "none.csv"
    rc = cli.main(["bench", name, "--trace", str(missing), *(["--dry-run"] if name == "trace" else [])])
    err = capsys.readouterr().err
    assert rc != 0
    assert f"no trace at {missing}" in err and "TIMESTAMP,ContextTokens,GeneratedTokens" in err
    assert "Traceback" not in err
