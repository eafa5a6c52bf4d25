"""What every benchmark records beside its figures, so a result can be reproduced and
compared later: the commit, the machine, every parameter and what was emulated; and the few
statistics every benchmark reports.

A result in bench/results is a summary: the figures its markdown shows and the headline figures of
each run, small enough to read and to keep in git. Per-request records (timelines, every decision
and ack) go to `--raw DIR` when asked, compressed, outside the repository by default."""

from __future__ import annotations

import argparse
import gzip
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    import aiohttp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def percentile(xs: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (NaN for no samples)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs) if xs else float("nan"),
        "p50": percentile(xs, 50),
        "p95": percentile(xs, 95),
        "p99": percentile(xs, 99),
    }


def dist_ms(xs: Sequence[float]) -> dict[str, float]:
    """A latency distribution: samples in seconds, figures in milliseconds, the worst one too."""
    ms = [x * 1000 for x in xs]
    return {**summary(ms), "max": max(ms) if ms else float("nan")}


def add_raw_option(p: argparse.ArgumentParser, name: str, records: str) -> None:
    """`--raw DIR`: where the raw result goes, beside the summary bench/results keeps."""
    p.add_argument(
        "--raw",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"also write the raw result ({records}) to DIR/{name}.raw.json.gz; bench/results keeps the summary "
        "only. Not with --no-write",
    )


def result_header(name: str) -> dict[str, Any]:
    """What identifies a run: the benchmark, the commit, the machine and when it finished."""
    return {
        "benchmark": name,
        "commit": commit(),
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def raw_path(raw_dir: Path, name: str) -> Path:
    return raw_dir / f"{name}.raw.json.gz"


def write_result(
    name: str,
    doc: dict[str, Any],
    table_md: str,
    raw: dict[str, Any] | None = None,
    raw_dir: Path | None = None,
    results_dir: Path | None = None,
) -> list[Path]:
    """Write `doc` (a summary with its header) as NAME.json in `results_dir` (default
    bench/results) and the markdown beside it; with `raw_dir`, also the raw document (per-request
    records), gzip-compressed, there."""
    where = results_dir if results_dir is not None else RESULTS
    where.mkdir(parents=True, exist_ok=True)
    jp = where / f"{name}.json"
    jp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    mp = where / f"{name}.md"
    mp.write_text(table_md)
    out = [jp, mp]
    if raw is not None and raw_dir is not None:
        raw_dir.mkdir(parents=True, exist_ok=True)
        rp = raw_path(raw_dir, name)
        rp.write_bytes(gzip.compress(orjson.dumps(raw, option=orjson.OPT_SERIALIZE_NUMPY)))
        out.append(rp)
    return out


def shown(path: Path) -> str:
    """A written file's path for a benchmark's last lines: relative to the working directory
    when under it."""
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


# What a table shows for a figure with no samples (a level where every request failed, a metric a
# run did not measure): a dash, never "nan" or "None".
MISSING = "—"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return MISSING
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM every process still running (they drain at once, together), then wait for each,
    killing one that outlasts `timeout_s`."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)
    for p in live:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any] | None]:
    """The `data:` events of an OpenAI-style SSE stream as they arrive, parsed; `None` for the
    closing `[DONE]` (a client that checks the stream ended cleanly needs to see it)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: "):
                continue
            yield None if event == b"data: [DONE]" else orjson.loads(event[6:])
