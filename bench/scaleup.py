"""Live scale-up benchmark: one instance under a steady overload is scaled to 2 (and to 3)
with `scaling = live` and with `stop-the-world`, under the same open-loop load, in one run.

    python bench/scaleup.py            (or: cascade bench scaleup)
    python bench/scaleup.py --quick

Each instance is an emulated accelerator (real torch on a small model, every step padded to a
device profile's time) so that instances have capacities of their own on a 2-core machine; a
load is paced to an emulated disk bandwidth so it takes seconds, as a real model's does. Both
are recorded in the result. Reports, from the scale decision: the first request served through
a new instance, all layers loaded, throughput back to 90 % of the new steady state, and TTFT
p50/p99 inside the loading window. Writes bench/results/scaleup.{json,md,png}: the JSON is a
summary (every figure of the table, per run); `--raw DIR` also writes the per-request timelines,
gzip-compressed, to DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, add_raw_option, md_table, percentile, raw_path, result_header, write_result
from bench.mesh import Mesh, worker_details
from bench.tracelib import prompt_ids
from cascade.config import GenerateSpec
from cascade.device_profile import load_profile
from cascade.messages import (
    Heartbeat,
    LayerReady,
    ScaleDecision,
    ScaleRequest,
    TokenEvents,
    decode,
    encode,
)
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.subjects import Subjects

MODEL = "scaleup-model"
HEARTBEAT_S = 0.25  # also the resolution of "first request through the new instance"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cascade bench scaleup", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="2,3", help="replica counts to scale to from 1 (default 2,3)")
    p.add_argument("--modes", default="live,stop-the-world", help="scaling modes to compare")
    p.add_argument("--profile", default="llama2-7b-a100-80gb", help="device profile to emulate")
    p.add_argument("--max-batch", type=int, default=32, help="per-instance batch limit (default 32)")
    # Long prompts and short outputs, like the Azure code trace (about 2k context, 20-30 generated):
    # an overloaded instance is prefill-bound there, which is what live scaling relieves.
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="real prompt length in tokens (default 128)")
    p.add_argument(
        "--token-scale",
        type=float,
        default=8.0,
        help="each real prompt/context token is priced as this many on the emulated device (default 8: "
        "128-token prompts stand for 1024-token ones)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=2048,
        help="each worker's prefill budget per step, in emulated tokens (default 2048: two prompts a step)",
    )
    p.add_argument("--overload", type=float, default=1.6, help="arrival rate over one instance's capacity")
    p.add_argument("--load-s", type=float, default=8.0, help="emulated time to load the model on one instance")
    p.add_argument(
        "--before-s", type=float, default=2.0, help="overload before the scale decision (a reactive scaler's delay)"
    )
    p.add_argument("--after-s", type=float, default=15.0, help="run time after the load completes")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the real (small) model")
    p.add_argument("--seed", type=int, default=7, help="arrival process seed")
    p.add_argument("--quick", action="store_true", help="one short configuration, to check the benchmark runs")
    p.add_argument("--from-zero", action="store_true", help="scale up from zero instead (bench/scaleup_zero.py)")
    p.add_argument("--no-write", action="store_true")
    add_raw_option(p, "scaleup", "every request's timeline")
    a = p.parse_args(argv)
    if a.raw is not None and a.no_write:
        p.error("--raw and --no-write exclude each other")
    return a


@dataclass
class Req:
    arrival: float
    rid: str = ""
    first: float = float("nan")
    end: float = float("nan")
    ok: bool = False
    status: int = 0


@dataclass
class RunLog:
    t0: float  # monotonic time of the run's start (arrival times are relative to it)
    reqs: list[Req] = field(default_factory=list)
    decision_at: float = float("nan")
    ready: list[tuple[float, str, int]] = field(default_factory=list)  # (time, worker, unit)
    served_by: dict[str, str] = field(default_factory=dict)  # request id → driving worker
    first_event: dict[str, float] = field(default_factory=dict)  # request id → its first token event
    # worker → first heartbeat that shows it working for a request (driving routes, or running some)
    first_work: dict[str, float] = field(default_factory=dict)
    # (time, worker, routes it drives, layers it runs for them in all), from heartbeats with routes
    driving: list[tuple[float, str, int, int]] = field(default_factory=list)
    # (time, worker, relayed stage sequences it computes for routes other workers drive), from
    # heartbeats: a new instance loaded from the back ends routes (docs/live-scaling.md)
    relaying: list[tuple[float, str, int]] = field(default_factory=list)


def capacity_req_s(profile_name: str, max_batch: int, prompt: int, out: int) -> float:
    """One instance's request throughput from the profile (what --overload scales): prompts are
    prefilled one step's worth at a time, decode steps are shared by a batch of half the limit."""
    p = load_profile(profile_name)
    b = max(1, max_batch // 2)
    decode_step_s = p.step_ms(b, 0, b * (prompt + out // 2)) / 1000
    prefill_s = (p.step_ms(0, prompt) - p.step_overhead_ms - p.head_ms) / 1000
    return 1.0 / (prefill_s + out * decode_step_s / b)


async def one(session: aiohttp.ClientSession, url: str, r: Req, t0: float, prompt: str, max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    try:
        async with session.post(f"{url}/completions", json=body) as resp:
            r.status = resp.status
            if resp.status != 200:
                await resp.read()
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                        continue
                    obj = orjson.loads(ev[6:])
                    r.rid = obj.get("id", r.rid)
                    if r.first != r.first and obj.get("choices"):  # NaN check: first chunk
                        r.first = time.monotonic() - t0
            r.end = time.monotonic() - t0
            r.ok = True
    except (TimeoutError, aiohttp.ClientError):
        r.status = -1


async def run_config(a: argparse.Namespace, mode: str, target: int, model_dir: Path) -> dict[str, Any]:
    deploy = (
        f'[[models]]\nname = "{MODEL}"\npath = "{model_dir}"\nmin_replicas = 1\nmax_replicas = {target}\n'
        f'loading = "disk"\nscaling = "{mode}"\npolicy = "manual"\n'
    )
    ck = Checkpoint(model_dir)
    load_mb_s = ck.total_nbytes() / 1e6 / a.load_s
    ck.close()
    mesh = Mesh(
        ["--workers", str(target)],
        {
            "CASCADE_DEVICE_PROFILE": a.profile,
            "CASCADE_LOAD_MB_S": f"{load_mb_s:.6f}",
            "CASCADE_MAX_BATCH": str(a.max_batch),
            "CASCADE_MAX_PREFILL_TOKENS": str(a.max_prefill_tokens),
            "CASCADE_HEARTBEAT_S": str(HEARTBEAT_S),
            "CASCADE_LOG_LEVEL": "warning",
            "CASCADE_EMULATED_TOKEN_SCALE": str(a.token_scale),
            # Tokens through nats-server, where this benchmark taps them to tell which instance
            # served each request ("first token via new"); the direct link would hide them. A
            # fraction of a millisecond a token, against scale-window TTFTs of seconds.
            "CASCADE_GATEWAY_DIRECT_TOKENS": "0",
        },
        deploy_toml=deploy,
    )
    url = mesh.start()
    try:
        return await drive(a, mesh, url, mode, target)
    finally:
        mesh.stop()


async def drive(a: argparse.Namespace, mesh: Mesh, url: str, mode: str, target: int) -> dict[str, Any]:
    subjects = Subjects(str(mesh.info.get("prefix", "cascade")))
    nc = await mesh.connect("bench-scaleup")
    t0 = time.monotonic()
    log = RunLog(t0=t0)
    initial: set[str] = set()

    async def on_decision(m: Any) -> None:
        d = decode(m.data, ScaleDecision)
        if d.model == MODEL and d.action == "up" and log.decision_at != log.decision_at:
            log.decision_at = time.monotonic() - t0

    async def on_ready(m: Any) -> None:
        ev = decode(m.data, LayerReady)
        if not ev.reset:
            log.ready.append((time.monotonic() - t0, ev.worker_id, ev.unit))

    async def on_tokens(m: Any) -> None:
        te = decode(m.data, TokenEvents)
        now = time.monotonic() - t0
        for e in te.events:
            log.served_by.setdefault(e.request_id, te.worker_id)
            log.first_event.setdefault(e.request_id, now)

    async def on_heartbeat(m: Any) -> None:
        hb = decode(m.data, Heartbeat)
        if hb.model == MODEL and (hb.driven_layers > 0 or hb.running > 0) and hb.worker_id not in log.first_work:
            log.first_work[hb.worker_id] = time.monotonic() - t0
        if hb.model == MODEL and hb.driven > 0:
            log.driving.append((time.monotonic() - t0, hb.worker_id, hb.driven, hb.driven_layers))
        if hb.model == MODEL:
            log.relaying.append((time.monotonic() - t0, hb.worker_id, hb.stage_running))

    await nc.subscribe(subjects.heartbeat_all(), cb=on_heartbeat)
    await nc.subscribe(subjects.scale_decision(), cb=on_decision)
    await nc.subscribe(subjects.ready_all(), cb=on_ready)
    await nc.subscribe(subjects.tokens_all(), cb=on_tokens)

    cap = capacity_req_s(a.profile, a.max_batch, int(a.prompt_tokens * a.token_scale), a.max_tokens)
    rate = a.overload * cap
    rng = random.Random(a.seed)

    def prompt(i: int) -> str:
        # Bytes = tokens (with BOS). Each request its own text: one prompt sent again and again is
        # served from the prefix cache after the first, which would make an instance look far
        # faster than under a real trace's distinct prompts.
        return "".join(chr(c) for c in prompt_ids(a.prompt_tokens - 1, a.seed, i))

    total_s = a.before_s + a.load_s * 1.3 + a.after_s
    tasks: list[asyncio.Task[None]] = []
    scaled = False
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        t_next = 0.0
        while t_next < total_s:
            now = time.monotonic() - t0
            if not scaled and now >= a.before_s:
                scaled = True
                initial = {w for _, w, _ in log.ready}  # units seen so far: the first instance's
                await nc.request(subjects.scale_request(), encode(ScaleRequest(MODEL, target)), timeout=10)
            if t_next > now:
                await asyncio.sleep(t_next - now)  # open-loop arrivals on their schedule
            r = Req(arrival=time.monotonic() - t0)
            log.reqs.append(r)
            tasks.append(asyncio.create_task(one(s, url, r, t0, prompt(len(log.reqs)), a.max_tokens)))
            t_next += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    hops = await worker_details(nc, subjects, "stage_link", 1.0)
    device = await worker_details(nc, subjects, "emulated_device", 1.0)
    await nc.drain()
    out = analyse(a, log, initial, mode, target, rate, cap)
    out["stage_links"] = hops
    # Steps whose real compute took longer than the emulated device's time: the emulation holds
    # only while these stay few.
    out["emulated_steps"] = {
        w: {k: d.get(k) for k in ("steps", "padded_s", "overrun_steps", "overrun_s")} for w, d in device.items() if d
    }
    return out


def analyse(
    a: argparse.Namespace, log: RunLog, initial: set[str], mode: str, target: int, rate: float, cap: float
) -> dict[str, Any]:
    dec = log.decision_at
    new_ready = [(t, w, u) for t, w, u in log.ready if w not in initial and t >= dec]
    workers = sorted({w for _, w, _ in new_ready})
    all_loaded = max((t for t, _, _ in new_ready), default=float("nan"))
    first_unit = min((t for t, _, _ in new_ready), default=float("nan"))
    served_new = sorted(
        r.first for r in log.reqs if r.ok and log.served_by.get(r.rid) in workers and r.first == r.first
    )
    first_new = served_new[0] if served_new else float("nan")
    # When a new instance first works for a request (its heartbeat shows routes it drives, or
    # requests it runs): it takes the front layers' work off the busy one from then on, even
    # though that request's first token waits its turn in the busy instance's queue.
    first_work = min((t for w, t in log.first_work.items() if w in workers and t >= dec), default=float("nan"))
    ok = [r for r in log.reqs if r.ok]
    window = [r for r in ok if dec <= r.arrival <= all_loaded]
    ttft_window = [(r.first - r.arrival) * 1e3 for r in window]
    # Throughput: completed requests' tokens per 1 s bin; the new steady state is the mean of the
    # last third of the time after everything loaded.
    end_t = max((r.end for r in ok), default=0.0)
    bins = int(end_t) + 1
    tput = [0.0] * bins
    for r in ok:
        tput[int(r.end)] += a.max_tokens
    arrivals_end = max(r.arrival for r in log.reqs)
    steady_from = all_loaded + (arrivals_end - all_loaded) * 2 / 3
    steady_bins = [tput[i] for i in range(int(steady_from), int(arrivals_end))] or [0.0]
    steady = statistics.fmean(steady_bins)
    t90 = float("nan")
    for i in range(int(dec), bins - 2):
        if all(tput[j] >= 0.9 * steady for j in range(i, i + 3)):
            t90 = i - dec
            break
    full_load_s = all_loaded - dec
    # How deep the new instances' routes split, on average over the window's heartbeats: the share
    # of each routed request the busy instance is spared is this over the model's layers.
    driving = [(n, k) for t, w, n, k in log.driving if w in workers and dec <= t <= all_loaded]
    depth = sum(k for _, k in driving) / sum(n for n, _ in driving) if driving else float("nan")
    # Relayed stages the new instances run for routes others drive (a route's later stages), per
    # new instance and heartbeat in the window: 0 when every route ends on the busy instance.
    relayed = [n for t, w, n in log.relaying if w in workers and dec <= t <= all_loaded]
    relayed_mean = statistics.fmean(relayed) if relayed else float("nan")
    return {
        "mode": mode,
        "target_replicas": target,
        "arrival_rate_req_s": rate,
        "one_instance_capacity_req_s": cap,
        "requests": len(log.reqs),
        "ok": len(ok),
        "errors": len(log.reqs) - len(ok),
        "decision_at_s": dec,
        "new_workers": workers,
        "first_unit_ready_s": first_unit - dec,
        "all_loaded_s": full_load_s,
        "first_request_via_new_s": first_work - dec,
        "first_via_new_over_full_load": (first_work - dec) / full_load_s if full_load_s > 0 else float("nan"),
        "heartbeat_s": HEARTBEAT_S,
        "first_token_via_new_s": first_new - dec,
        "throughput_90pct_s": t90,
        "steady_tokens_per_s": steady,
        "window_requests": len(window),
        "ttft_window_ms": {"p50": percentile(ttft_window, 50), "p99": percentile(ttft_window, 99)},
        "ttft_all_ms": {
            "p50": percentile([(r.first - r.arrival) * 1e3 for r in ok], 50),
            "p99": percentile([(r.first - r.arrival) * 1e3 for r in ok], 99),
        },
        "route_layers_window": depth,
        "relayed_stages_on_new_window": relayed_mean,
        "layers": a.layers,
        "served_by_new_during_window": sum(1 for r in window if log.served_by.get(r.rid) in workers),
        "timeline": {
            "arrival": [round(r.arrival, 4) for r in ok],
            "ttft_ms": [round((r.first - r.arrival) * 1e3, 2) for r in ok],
            "via_new": [log.served_by.get(r.rid) in workers for r in ok],
            # Seen on the bus: where a late first SSE chunk lost its time (worker or gateway/client).
            "first_event_ms": [round((log.first_event.get(r.rid, float("nan")) - r.arrival) * 1e3, 2) for r in ok],
            "ready": [(round(t, 4), w, u) for t, w, u in new_ready],
            "throughput": tput,
        },
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 3.2 * len(rows)), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        tl = r["timeline"]
        dec = r["decision_at_s"]
        xs = [x - dec for x in tl["arrival"]]
        colors = ["tab:green" if v else "tab:blue" for v in tl["via_new"]]
        ax.scatter(xs, tl["ttft_ms"], s=6, c=colors)
        ax.axvline(0, color="red", lw=1.5, label="scale decision")
        for t, _, _ in tl["ready"]:
            ax.axvline(t - dec, color="gray", lw=0.5, alpha=0.6)
        ax.axvline(r["all_loaded_s"], color="black", lw=1, ls="--", label="all layers loaded")
        ax.set_yscale("log")
        ax.set_ylabel("TTFT ms")
        ax.set_title(
            f"{r['mode']}, 1 → {r['target_replicas']} instances: window p99 TTFT "
            f"{r['ttft_window_ms']['p99']:.0f} ms (green: served via a new instance; gray: layer ready)",
            fontsize=9,
        )
        ax2 = ax.twinx()
        ax2.plot([i - dec for i in range(len(tl["throughput"]))], tl["throughput"], color="tab:orange", lw=1)
        ax2.set_ylabel("tokens/s", color="tab:orange")
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("seconds from the scale decision (by request arrival)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def live_over_stw(rows: list[dict[str, Any]], targets: list[int]) -> list[dict[str, Any]]:
    """For each target with both modes: live's window p99 TTFT over stop-the-world's."""
    out = []
    for target in targets:
        by = {r["mode"]: r for r in rows if r["target_replicas"] == target}
        if "live" in by and "stop-the-world" in by:
            ratio = by["live"]["ttft_window_ms"]["p99"] / by["stop-the-world"]["ttft_window_ms"]["p99"]
            out.append({"target": target, "live_over_stw_p99_ttft": ratio})
    return out


def markdown(rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    """The report, from result rows with or without their timelines (a summary's rows render it)."""
    text = md_table(
        ["mode", "1→N", "first unit s", "first req via new s", "all loaded s", "first/full",
         "first token via new s", "tput 90% s", "window TTFT p50 ms", "window TTFT p99 ms", "ok/n"],
        [
            [r["mode"], r["target_replicas"], r["first_unit_ready_s"], r["first_request_via_new_s"],
             r["all_loaded_s"], r["first_via_new_over_full_load"], r["first_token_via_new_s"], r["throughput_90pct_s"],
             r["ttft_window_ms"]["p50"], r["ttft_window_ms"]["p99"], f"{r['ok']}/{r['requests']}"]
            for r in rows
        ],
    )  # fmt: skip
    for x in ratios:
        ratio = x["live_over_stw_p99_ttft"]
        text += (
            f"\n1→{x['target']}: live window p99 TTFT is {ratio:.2f}× stop-the-world's "
            f"({(1 - ratio) * 100:.0f} % lower; target ≥ 40 % lower)."
        )
    text += (
        "\nTarget: first request through the new instance within 25 % of the full-load time (live). "
        f'"First req via new": the first heartbeat (every {HEARTBEAT_S} s) in which a new instance drives '
        'a route or runs a request, i.e. computes its layers for it. "First token via new": that request\'s '
        "first token, later by its wait in the busy instance's queue, which every request takes in arrival "
        "order (services/worker/engine.py, `_admit`).\n"
    )
    for r in rows:
        depth = r.get("route_layers_window")  # absent in results written before it was measured
        if r["mode"] == "live" and depth is not None and depth == depth:  # (NaN: no route in the window)
            text += (
                f"\nRoutes through the new instances during the window (live, 1→{r['target_replicas']}): "
                f"{depth:.2f} layers each there on average (heartbeats), of {r.get('layers', '?')}."
            )
        relayed = r.get("relayed_stages_on_new_window")
        if r["mode"] == "live" and relayed is not None and relayed == relayed:
            text += (
                f" Later stages of routes run on the new instances (ending there): {relayed:.1f} per new "
                "instance and heartbeat on average."
            )
    for r in rows:
        if r["mode"] != "live":
            continue
        for wid, st in sorted((r.get("stage_links") or {}).items()):
            if st and st.get("frames_in") and st.get("latency_ms_p50") is not None:
                text += (
                    f"\nStage link into {wid} (live, 1→{r['target_replicas']}): {st['frames_in']} frames, "
                    f"{st['bytes_in'] / 1e6:.1f} MB in, one-way latency p50 {st['latency_ms_p50']} ms, "
                    f"p99 {st['latency_ms_p99']} ms."
                )
    for r in rows:
        for wid, st in sorted((r.get("emulated_steps") or {}).items()):
            if st.get("steps"):
                text += (
                    f"\n{wid} ({r['mode']}, 1→{r['target_replicas']}): {st['steps']} steps, "
                    f"{st['overrun_steps']} over the emulated time by {st['overrun_s']} s in all."
                )
    return text + "\n"


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """The summary of a raw result: each row without its per-request timeline (the plot's data)."""
    return {**raw, "rows": [{k: v for k, v in r.items() if k != "timeline"} for r in raw["rows"]]}


def main(argv: list[str] | None = None) -> int:
    if "--from-zero" in (sys.argv[1:] if argv is None else argv):
        # Scale-up from zero (execute-while-load across loading instances): its own benchmark.
        from bench.scaleup_zero import main as from_zero

        return from_zero(argv)
    a = parse(argv)
    targets = [int(x) for x in a.targets.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    if a.quick:
        targets, a.after_s, a.load_s = targets[:1], 6.0, 4.0
    spec = GenerateSpec(layers=a.layers, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=2048, seed=3)
    rows: list[dict[str, Any]] = []
    with __import__("tempfile").TemporaryDirectory(prefix="cascade-scaleup-") as tmp:
        model_dir = Path(tmp) / MODEL
        generate_model(model_dir, spec)
        for target in targets:
            for mode in modes:
                print(f"{mode}: 1 → {target} instances …", flush=True)
                r = asyncio.run(run_config(a, mode, target, model_dir))
                rows.append(r)
                print(
                    f"  first via new {r['first_request_via_new_s']:.2f} s, all loaded {r['all_loaded_s']:.2f} s, "
                    f"window TTFT p99 {r['ttft_window_ms']['p99']:.0f} ms",
                    flush=True,
                )
    ratios = live_over_stw(rows, targets)
    text = markdown(rows, ratios)
    print()
    print(text)
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        png = RESULTS / "scaleup.png"
        prof = load_profile(a.profile)
        raw = {
            **result_header("scaleup"),
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "model_spec": {k: getattr(spec, k) for k in GenerateSpec.__slots__},
            "emulated": {
                "device": prof.describe(),
                "load": f"disk loads paced to {a.load_s} s per instance for the whole model (CASCADE_LOAD_MB_S)",
                "tokens": f"{a.prompt_tokens}-token real prompts priced as {a.prompt_tokens * a.token_scale:.0f} "
                "on the device (CASCADE_EMULATED_TOKEN_SCALE)",
                "note": "real torch on the small model; each step padded to the profile's time",
                "token_path": "tokens through nats-server (CASCADE_GATEWAY_DIRECT_TOKENS=0), tapped by the benchmark",
            },
            "rows": rows,
            "ratios": ratios,
            "plot": str(png.relative_to(RESULTS.parent.parent)),
        }
        # Plotted after the header is read: a plot written first made every run's commit "+dirty".
        plot(rows, png)
        doc = summarise(raw)
        doc["raw"] = (
            f"per-request timelines in {raw_path(a.raw, 'scaleup')}"
            if a.raw is not None
            else "per-request timelines not kept (python bench/scaleup.py --raw DIR writes them)"
        )
        written = write_result("scaleup", doc, text + f"\n![latency over time]({png.name})\n", raw, a.raw)
        print(f"wrote {', '.join(map(str, written))} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
