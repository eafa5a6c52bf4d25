"""Scale-up from zero: time to first token when N instances start loading a model nobody serves.

    python bench/scaleup.py --from-zero        (or: cascade bench scaleup --from-zero)

One mesh (`cascade up --workers N`), the model in the loader's host cache, nothing serving it. A
scale request to N replicas and, at the same moment, a few requests. Two variants of the same
mesh, alternated run by run:

  live            execute-while-load from zero: the loader's ordered plan gives each instance its
                  own block of layers first (services/loader/planner.py, `ordered_units`) and the
                  gateway routes through the loading instances as a pipeline once their blocks
                  cover the model (services/gateway/router.py, `zero_route`);
  stop-the-world  the same mesh waiting for a full load: units front to back, no request before
                  an instance holds every layer.

Every host-cache send is paced to an emulated link (CASCADE_LOADER_SEND_MB_S: one full load takes
--load-s) and every step to a device profile, as in bench/scaleup.py. Reports per run the time to
first token from the scale request, when the ready layers first covered the model, when the first
instance held every layer (one full load), and the ratio TTFT / full load. Writes
bench/results/scaleup-from-zero.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import md_table, result_header, sse_events, write_result
from bench.mesh import Mesh, worker_details
from bench.tracelib import prompt_ids
from cascade.config import GenerateSpec
from cascade.device_profile import load_profile
from cascade.messages import HostCacheRequest, LayerReady, Ok, ScaleRequest, decode, encode
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.natsutil import gather_status, request
from cascade.subjects import Subjects

MODEL = "zero-model"
HEARTBEAT_S = 0.25
VARIANTS = ("live", "stop-the-world")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench scaleup --from-zero", description=__doc__.split("\n\n")[0])
    p.add_argument("--from-zero", action="store_true", help="this benchmark (bench/scaleup.py hands over)")
    p.add_argument("--replicas", type=int, default=3, help="instances loading at once (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, alternated (default 2)")
    p.add_argument("--profile", default="llama2-7b-a100-80gb", help="device profile to emulate")
    p.add_argument("--load-s", type=float, default=8.0, help="emulated time of one full load from the host cache")
    p.add_argument("--requests", type=int, default=4, help="requests sent with the scale request (default 4)")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="real prompt length in tokens (default 128)")
    p.add_argument("--token-scale", type=float, default=8.0, help="emulated tokens per real one (default 8)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers of the real (small) model (default 12)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="one run per variant, a short load")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    if a.replicas < 2:
        p.error("--replicas must be at least 2")
    return a


@dataclass
class Req:
    sent: float
    first: float = float("nan")
    ok: bool = False
    status: int = 0
    text: str = ""


@dataclass
class ZeroLog:
    t0: float
    ready: list[tuple[float, str, int]] = field(default_factory=list)  # (s from t0, worker, unit)
    num_units: int = 0


async def one(s: aiohttp.ClientSession, url: str, r: Req, t0: float, prompt: str, max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    async with s.post(f"{url}/completions", json=body) as resp:
        r.status = resp.status
        if resp.status != 200:
            r.text = (await resp.read()).decode(errors="replace")[:300]
            return
        async for ev in sse_events(resp):
            if ev is None:
                continue
            if ev.get("choices") and r.first != r.first:
                r.first = time.monotonic() - t0
            for c in ev.get("choices", []):
                r.text += c.get("text", "")
        r.ok = r.first == r.first


def coverage(log: ZeroLog) -> tuple[float, float, float]:
    """(ready layers of all instances first cover every unit, first instance holds every unit,
    last instance holds every unit), in seconds from t0."""
    held: dict[str, set[int]] = {}
    union: set[int] = set()
    covered = first_full = float("nan")
    for t, w, u in sorted(log.ready):
        held.setdefault(w, set()).add(u)
        union.add(u)
        if covered != covered and len(union) == log.num_units:
            covered = t
        if first_full != first_full and len(held[w]) == log.num_units:
            first_full = t
    full_times = []
    for w in held:
        ts = sorted(t for t, ww, _ in log.ready if ww == w)
        if len(set(u for _, ww, u in log.ready if ww == w)) == log.num_units:
            full_times.append(ts[-1])
    return covered, first_full, max(full_times, default=float("nan"))


async def run_once(a: argparse.Namespace, variant: str, model_dir: Path, send_mb_s: float) -> dict[str, Any]:
    deploy = (
        f'[[models]]\nname = "{MODEL}"\npath = "{model_dir}"\nmin_replicas = 0\nmax_replicas = {a.replicas}\n'
        f'loading = "host-cache"\nscaling = "{variant}"\npolicy = "manual"\n'
    )
    mesh = Mesh(
        ["--workers", str(a.replicas)],
        {
            "CASCADE_DEVICE_PROFILE": a.profile,
            "CASCADE_LOADER_SEND_MB_S": f"{send_mb_s:.6f}",
            "CASCADE_HEARTBEAT_S": str(HEARTBEAT_S),
            "CASCADE_LOG_LEVEL": "warning",
            "CASCADE_EMULATED_TOKEN_SCALE": str(a.token_scale),
        },
        deploy_toml=deploy,
    )
    url = mesh.start()
    try:
        return await drive(a, mesh, url, variant)
    finally:
        mesh.stop()


async def drive(a: argparse.Namespace, mesh: Mesh, url: str, variant: str) -> dict[str, Any]:
    subjects = Subjects(str(mesh.info.get("prefix", "cascade")))
    nc = await mesh.connect("bench-scaleup-zero")
    # The model in the host cache before the clock starts: what the scale-up loads from.
    deadline = time.monotonic() + 60
    while True:
        try:
            await request(nc, subjects.host_cache(), HostCacheRequest("load", MODEL), Ok, 30)
            break
        except Exception as e:  # the loader may not have its subscriptions yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"host cache load: {e!r}") from None
        await asyncio.sleep(0.5)  # retrying the loader with a deadline
    log = ZeroLog(t0=0.0)

    async def on_ready(m: Any) -> None:
        ev = decode(m.data, LayerReady)
        if ev.model == MODEL and not ev.reset and log.t0:
            log.num_units = ev.num_units
            log.ready.append((time.monotonic() - log.t0, ev.worker_id, ev.unit))

    await nc.subscribe(subjects.ready_all(), cb=on_ready)
    await nc.flush()
    reqs = [Req(sent=0.0) for _ in range(a.requests)]
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        log.t0 = time.monotonic()
        await nc.request(subjects.scale_request(), encode(ScaleRequest(MODEL, a.replicas)), timeout=10)
        tasks = []
        for i, r in enumerate(reqs):
            prompt = "".join(chr(c) for c in prompt_ids(a.prompt_tokens - 1, a.seed, i))
            r.sent = time.monotonic() - log.t0
            tasks.append(asyncio.create_task(one(s, url, r, log.t0, prompt, a.max_tokens)))
        await asyncio.gather(*tasks)
        # Every load done (for the full-load time) before the mesh goes.
        end = time.monotonic() + 4 * a.load_s + 30
        while time.monotonic() < end:
            _, _, last = coverage(log)
            if last == last and len({w for _, w, _ in log.ready}) >= a.replicas:
                break
            await asyncio.sleep(0.2)  # polling what the subscription collected, with a deadline
    hops = await worker_details(nc, subjects, "stage_link", 1.0)
    # The loader's own account of the loads: every target done (not given up), from which source.
    status = await gather_status(nc, subjects, 1.0, requester="bench")
    loads = [
        {k: t.get(k) for k in ("worker", "source", "state", "units_ready", "error")}
        for st in status.services
        if st.service == "loader"
        for t in st.detail.get("transfers") or []
        if t.get("model") == MODEL
    ]
    await nc.drain()
    covered, first_full, last_full = coverage(log)
    firsts = sorted(r.first for r in reqs if r.ok)
    first_units = {
        w: [u for _, ww, u in sorted(log.ready) if ww == w][: max(1, log.num_units // a.replicas)]
        for w in sorted({w for _, w, _ in log.ready})
    }
    first_unit = min((t for t, _, _ in log.ready), default=float("nan"))
    return {
        "variant": variant,
        # From the scale request to the first unit ready anywhere: the scaler's decision, the plan,
        # the orders and the first unit's own transfer, paid alike by both variants.
        "first_unit_s": first_unit,
        "requests": len(reqs),
        "ok": sum(r.ok for r in reqs),
        "errors": [r.text for r in reqs if not r.ok][:3],
        "ttft_first_s": firsts[0] if firsts else float("nan"),
        "ttft_median_s": statistics.median(firsts) if firsts else float("nan"),
        "ttft_last_s": firsts[-1] if firsts else float("nan"),
        "layers_covered_s": covered,
        "first_full_load_s": first_full,
        "all_loaded_s": last_full,
        "ttft_over_full_load": (firsts[0] / first_full) if firsts and first_full > 0 else float("nan"),
        "first_units": first_units,
        "texts": [r.text for r in reqs],
        "loader_transfers": loads,
        "loads_done": len(loads) == a.replicas and all(t["state"] == "done" for t in loads),
        "stage_links": {w: st for w, st in hops.items() if st and st.get("frames_in")},
    }


def markdown(a: argparse.Namespace, rows: list[dict[str, Any]], summary: dict[str, Any], load: dict[str, str]) -> str:
    text = md_table(
        ["variant", "run", "first unit s", "TTFT first s", "TTFT median s", "layers covered s",
         "first full load s", "all loaded s", "TTFT / full load", "loader: loads done", "ok/n"],
        [
            [r["variant"], r["run"], r["first_unit_s"], r["ttft_first_s"], r["ttft_median_s"], r["layers_covered_s"],
             r["first_full_load_s"], r["all_loaded_s"], r["ttft_over_full_load"], r["loads_done"],
             f"{r['ok']}/{r['requests']}"]
            for r in rows
        ],
    )  # fmt: skip
    n = a.replicas
    text += (
        f"\nN = {n} instances loading from the host cache, one full load paced to {a.load_s} s per instance. "
        f"Live TTFT over one full load (median of runs): {summary['live_ttft_over_full_load']:.2f} "
        f"(bar ≤ 0.5, goal ≤ 1/N + 10 % = {1 / n + 0.1:.2f}). "
        f"Live TTFT over stop-the-world TTFT (same mesh, waiting for a full load): "
        f"{summary['live_over_stw_ttft']:.2f}. Every request's greedy text was the same in every run of both "
        f"variants: {summary['same_tokens_across_runs']}.\n"
        '\nTimes are from the scale request. "Layers covered": the instances\' ready units first held every '
        'unit between them; "first full load": the first instance held every unit (one full load, in the same '
        "run); TTFT / full load divides the first request's first token by it. Requests are sent with the "
        'scale request, so their TTFT includes the scaler\'s decision and the plan ("first unit").\n'
        f"\nLoad average before / after the runs: {load['before']} / {load['after']}{_shared(load)}.\n"
    )
    for r in rows:
        if r["variant"] == "live":
            text += f"\nFirst units announced per worker (live, run {r['run']}): {r['first_units']}"
    return text + "\n"


def _shared(load: dict[str, str]) -> str:
    """A word on other jobs only when the 1-minute load average says the machine was not ours:
    the mesh itself keeps about one core busy while it runs."""
    busiest = max(float(load[k].split()[0]) for k in ("before", "after"))
    cores = os.cpu_count() or 1
    return f" (other jobs shared the {cores}-core machine)" if busiest > cores else ""


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.quick:
        a.repeats, a.load_s = 1, 5.0
    spec = GenerateSpec(layers=a.layers, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=2048, seed=3)
    rows: list[dict[str, Any]] = []
    load = {"before": _loadavg()}
    with __import__("tempfile").TemporaryDirectory(prefix="cascade-scaleup-zero-") as tmp:
        model_dir = Path(tmp) / MODEL
        generate_model(model_dir, spec)
        ck = Checkpoint(model_dir)
        send_mb_s = ck.total_nbytes() / 1e6 / a.load_s
        ck.close()
        for run in range(a.repeats):
            # Alternated, so a change in the machine's load touches both variants alike.
            for variant in VARIANTS if run % 2 == 0 else VARIANTS[::-1]:
                print(f"{variant}, run {run + 1}: 0 → {a.replicas} instances …", flush=True)
                r = asyncio.run(run_once(a, variant, model_dir, send_mb_s))
                r["run"] = run + 1
                r["loadavg"] = _loadavg()
                rows.append(r)
                print(
                    f"  TTFT {r['ttft_first_s']:.2f} s, layers covered {r['layers_covered_s']:.2f} s, first full "
                    f"load {r['first_full_load_s']:.2f} s, ok {r['ok']}/{r['requests']}",
                    flush=True,
                )
    load["after"] = _loadavg()

    def med(variant: str, key: str) -> float:
        xs = [r[key] for r in rows if r["variant"] == variant and r[key] == r[key]]
        return statistics.median(xs) if xs else float("nan")

    summary = {
        "live_ttft_over_full_load": med("live", "ttft_over_full_load"),
        "live_over_stw_ttft": med("live", "ttft_first_s") / med("stop-the-world", "ttft_first_s"),
        "live_ttft_first_s": med("live", "ttft_first_s"),
        "stw_ttft_first_s": med("stop-the-world", "ttft_first_s"),
        "full_load_s": med("stop-the-world", "first_full_load_s"),
        # Request i has the same prompt in every run: greedy, it must get the same text in all.
        "same_tokens_across_runs": all(len({r["texts"][i] for r in rows}) == 1 for i in range(a.requests)),
    }
    text = markdown(a, rows, summary, load)
    print()
    print(text)
    if not a.no_write:
        prof = load_profile(a.profile)
        doc = {
            **result_header("scaleup-from-zero"),
            "parameters": {k: v for k, v in vars(a).items()},
            "model_spec": {k: getattr(spec, k) for k in GenerateSpec.__slots__},
            "emulated": {
                "device": prof.describe(),
                "load": f"every host-cache send paced to {send_mb_s:.3f} MB/s (CASCADE_LOADER_SEND_MB_S): one full "
                f"load of the {a.layers}-layer model takes {a.load_s} s, each instance over its own link",
                "tokens": f"{a.prompt_tokens}-token real prompts priced as {a.prompt_tokens * a.token_scale:.0f} "
                "on the device (CASCADE_EMULATED_TOKEN_SCALE)",
                "note": "real torch on the small model; each step padded to the profile's time",
            },
            "loadavg": load,
            "summary": summary,
            "rows": rows,
        }
        written = write_result("scaleup-from-zero", doc, text)
        print(f"wrote {', '.join(map(str, written))}")
    return 0
