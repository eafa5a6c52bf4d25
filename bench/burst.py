"""Burst-trace benchmark: the bursty window of the Azure code trace replayed open-loop against five
scaling configurations of the same mesh, each on the same number of emulated-GPU workers, in one run.

    python bench/burst.py            (or: cascade bench burst)
    python bench/burst.py --quick    (a 2-3 minute sanity run: a short window, three configurations)
    python bench/burst.py --repeats 3   (each configuration three times, in rounds; the table pools them)

Configurations (docs/deployment.md):
  cascade        loading = "multicast", scaling = "live", policy `rate`, min_replicas 0: to zero in the
                 lulls, back from the loader's host copy on every worker (activation_scale)
  serverlessllm  loading = "disk", scaling = "stop-the-world", policy `concurrency` with keep-alive; each
                 worker keeps the checkpoints it read in its own host memory (CASCADE_LOCAL_CACHE_MB), so a
                 later load on a worker that held the model installs from DRAM at the emulated link's pace
  allcache       loading = "host-cache", scaling = "stop-the-world", policy `concurrency`
  static-peak    policy `manual`, min_replicas = the peak's need (at most the workers there are)
  static-mean    policy `manual`, min_replicas = the mean's need

The window and the level are those of docs/burst-window.md: trace seconds 1060-1390, compressed, with
the mean load at 0.3 of the cluster's capacity, so that its busiest 10 s fill the cluster (the trace is
on-off: at half, no static cluster holds its bursts), as the device profile computes it (bench/scaleup.py's
`capacity_req_s`). Each worker is an emulated accelerator (real torch on a small model, each step
padded to the profile's time; short real prompts priced as long ones); parameter loads are paced to
what the emulated model would take: the disk at the profile's `disk_mb_s`, data-plane transfers
(host cache or peer) and loads from a worker's local host-memory cache at an emulated link.
Reports TTFT and inter-token latency percentiles, SLO attainment, instance-seconds (instances
holding the model, loading or serving, integrated from worker heartbeats) and scale events, beside
the issue's targets. Writes bench/results/burst.{json,md,png}.

Trace: Azure LLM inference trace 2023 (code service), ../shared/traces/, CC BY 4.0, Patel et al.,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024; read in place.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, md_table, write_result
from bench.mesh import Mesh
from bench.scaleup import capacity_req_s
from bench.trace import LICENCE, replay
from bench.tracelib import (
    DEFAULT_TRACE,
    Arrival,
    RequestRecord,
    ScheduleSpec,
    build_schedule,
    load_trace,
    percentile,
    rate_bins,
    summarise,
    window,
)
from cascade.cli.statusview import to_json
from cascade.config import GenerateSpec
from cascade.device_profile import PROFILES_DIR, DeviceProfile, load_profile
from cascade.framing import DEFAULT_CHUNK
from cascade.messages import Heartbeat, HostCacheRequest, Ok, ScaleAck, ScaleDecision, decode
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.natsutil import connect, gather_status, request
from cascade.subjects import Subjects

MODEL = "burst-model"
CASCADE_RATE_WINDOW_S = 2.0  # trace seconds: Cascade's rate window, so a burst is seen within a tick or two
CONFIG_KEYS = ("cascade", "serverlessllm", "allcache", "static-peak", "static-mean")
HOLDING = ("loading", "serving", "draining")  # states in which a worker holds the model (GPU memory)
# The real model: narrow (hidden 64) so its CPU step stays well under the emulated device's time on a
# shared 2-core machine, with a 4096-entry vocabulary so the checkpoint (4 MB) is large next to the
# data plane's 1 MiB token-bucket burst (a paced transfer's start), at little compute. Ids past the
# byte range decode to no text: few SSE chunks carry text, so client-side latency figures come
# from the first chunk (TTFT: the gateway always sends it), the stream's end and the usage count.
SPEC = GenerateSpec(layers=8, hidden=64, heads=4, kv_heads=2, vocab=4096, max_position=2048, seed=11)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cascade bench burst",
        description="Replay the burst window of the Azure code trace against Cascade, ServerlessLLM-style, "
        "AllCache and static provisioning on emulated GPUs; writes bench/results/burst.{json,md,png}.",
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace CSV (default: the shared Azure trace)")
    p.add_argument("--start", type=float, default=1060.0, help="window start, trace seconds (default 1060)")
    p.add_argument("--duration", type=float, default=330.0, help="window length, trace seconds (default 330)")
    p.add_argument("--compress", type=float, default=2.0, help="time compression (default 2: 330 s in 165 s)")
    p.add_argument(
        "--load",
        type=float,
        default=0.3,
        help="mean load over the cluster's capacity (default 0.3: the window's busiest 10 s then fill the "
        "cluster; docs/burst-window.md says why not 0.5)",
    )
    p.add_argument("--workers", type=int, default=4, help="workers (emulated GPUs) in every configuration (default 4)")
    p.add_argument("--configs", default=",".join(CONFIG_KEYS), help=f"configurations to run (default {CONFIG_KEYS})")
    p.add_argument("--profile", default="llama2-7b-a100-80gb", help="device profile to emulate")
    p.add_argument("--max-batch", type=int, default=32, help="per-instance batch limit (default 32)")
    p.add_argument(
        "--token-scale",
        type=float,
        default=16.0,
        help="each real prompt/context token is priced as this many on the emulated device; prompts are "
        "scaled by its inverse, so the device sees the trace's lengths (default 16)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=512,
        help="each worker's prefill budget per step, in emulated tokens: longer prompts are prefilled in "
        "chunks, so a step lasts at most about 50 ms on the profile (default 512; 4096 fits two mean prompts "
        "whole)",
    )
    p.add_argument("--link-gb-s", type=float, default=25.0, help="emulated data-plane link, GB/s (default 25)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="TTFT SLO (default 1000 ms)")
    p.add_argument("--slo-tbt-ms", type=float, default=100.0, help="mean time-between-tokens SLO (default 100 ms)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of rate scaling and prompt ids (default 0)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, in rounds (each round runs them all in order); the "
        "table pools a configuration's runs and lists each run's SLO attainment and instance-seconds "
        "(default 1). One run's SLO attainment moves by a few points from the next on this machine",
    )
    p.add_argument("--quick", action="store_true", help="a 2-3 minute sanity run: trace 840-900 s at 4x, 3 configs")
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    a = p.parse_args(argv)
    if a.quick:
        a.start, a.duration, a.compress = 840.0, 60.0, 4.0
        if a.configs == ",".join(CONFIG_KEYS):
            a.configs = "cascade,serverlessllm,static-peak"
    unknown = [c for c in a.configs.split(",") if c not in CONFIG_KEYS]
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIG_KEYS)}")
    if a.workers < 2:
        p.error("--workers must be at least 2")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    return a


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Plan:
    """The schedule and the figures derived from it and the profile."""

    arrivals: list[Arrival]
    spec: ScheduleSpec
    window_s: float  # replay seconds
    capacity_req_s: float  # one instance, from the profile, on this token mix
    capacity_sim_req_s: float  # the same, by stepping the engine's schedule on the profile (cross-check)
    prefill_ms_mean: float  # the profile's prefill of a mean prompt, unloaded
    decode_ms_b1: float  # the profile's decode step for one sequence of a mean context
    trace_mean_rate: float  # req/s of the window in trace time, before rate scaling
    mean_rate: float  # req/s in the replay
    peak_rate: float  # req/s in the busiest 10-trace-second bin of the replay
    mean_need: int
    peak_need: int  # ceil(peak / capacity), before the cap at the number of workers
    prompt_real_mean: float
    prompt_emulated_mean: float
    output_mean: float


def make_plan(a: argparse.Namespace, profile_name: str) -> Plan:
    rows = load_trace(a.trace)
    in_window = window(rows, a.start, a.duration)
    trace_mean = len(in_window) / a.duration
    # Real prompts: the trace's scaled by 1/token_scale (the device prices them back up); outputs as traced.
    pscale, pmax = 1 / a.token_scale, SPEC.max_position // 4
    probe = build_schedule(
        rows,
        ScheduleSpec(start_s=a.start, duration_s=a.duration, compress=a.compress, prompt_scale=pscale, max_prompt=pmax),
    )
    prompt_real = sum(x.prompt_tokens for x in probe) / len(probe)
    out = sum(x.output_tokens for x in probe) / len(probe)
    cap = capacity_req_s(profile_name, a.max_batch, round(prompt_real * a.token_scale), round(out))
    # docs/burst-window.md: rate_scale = load × N × C / (trace mean × compress).
    rate_scale = a.load * a.workers * cap / (trace_mean * a.compress)
    spec = ScheduleSpec(
        start_s=a.start,
        duration_s=a.duration,
        compress=a.compress,
        rate_scale=rate_scale,
        seed=a.seed,
        prompt_scale=pscale,
        max_prompt=pmax,
    )
    arrivals = build_schedule(rows, spec)
    window_s = a.duration / a.compress
    bin_s = 10.0 / a.compress
    peak = max(rate_bins((x.t for x in arrivals), bin_s, window_s)) / bin_s
    mean = len(arrivals) / window_s
    profile = load_profile(profile_name)
    mix = [(x.prompt_tokens, x.output_tokens) for x in arrivals]
    prompt_em = sum(x.prompt_tokens for x in arrivals) / len(arrivals) * a.token_scale
    return Plan(
        arrivals=arrivals,
        spec=spec,
        window_s=window_s,
        capacity_req_s=cap,
        capacity_sim_req_s=simulated_capacity_req_s(profile, mix, a.token_scale, a.max_batch, a.max_prefill_tokens),
        prefill_ms_mean=profile.step_ms(0, round(prompt_em)),
        decode_ms_b1=profile.step_ms(1, 0, round(prompt_em)),
        trace_mean_rate=trace_mean,
        mean_rate=mean,
        peak_rate=peak,
        mean_need=max(1, math.ceil(mean / cap)),
        peak_need=math.ceil(peak / cap),
        prompt_real_mean=sum(x.prompt_tokens for x in arrivals) / len(arrivals),
        prompt_emulated_mean=prompt_em,
        output_mean=sum(x.output_tokens for x in arrivals) / len(arrivals),
    )


def simulated_capacity_req_s(
    profile: DeviceProfile, mix: list[tuple[int, int]], token_scale: float, max_batch: int, budget: float = 4096
) -> float:
    """A cross-check of `capacity_req_s`: one saturated instance stepped as the worker's engine steps
    (every step decodes the running batch and spends the prefill budget on prompts oldest first,
    continuing the ones under way and cutting the last one it starts into a chunk, within the free
    slots; a mixed step costs both), timed by the profile as the engine pads, on the schedule's own
    (prompt, output) mix in a loop. Completed requests per second after a warm-up."""
    running: list[list[int]] = []  # decoding: [real prompt tokens, output tokens, generated]
    started: list[list[int]] = []  # prompts under way: [real prompt tokens, output tokens, computed]
    i, t, done, warm = 0, 0.0, 0, (0.0, 0)
    while done < 3000:
        b = len(running)
        ctx = sum(p + g for p, _, g in running) * token_scale
        left = budget / token_scale
        pre, prev_ctx = 0.0, 0.0
        for x in started:
            n = min(x[0] - x[2], left)
            if n < 1:
                break
            prev_ctx += x[2] * token_scale
            x[2] += int(n)
            left -= int(n)
            pre += int(n)
        while left >= 1 and b + len(started) < max_batch:
            p, o = mix[i % len(mix)]
            i += 1
            n = int(min(p, left))
            started.append([p, o, n])
            left -= n
            pre += n
        t += profile.step_ms(b, int(pre * token_scale), int(ctx + prev_ctx)) / 1000
        for x in running:
            x[2] += 1
        ready = [x for x in started if x[2] >= x[0]]
        started = [x for x in started if x[2] < x[0]]
        done += sum(1 for x in running if x[2] >= x[1]) + sum(1 for _, o, _ in ready if o <= 1)
        running = [x for x in running if x[2] < x[1]] + [[p, o, 1] for p, o, _ in ready if o > 1]
        if warm == (0.0, 0) and done >= 300:
            warm = (t, done)
    return (done - warm[1]) / (t - warm[0])


@dataclass(frozen=True, slots=True)
class Emulation:
    profile: DeviceProfile
    emulated_bytes: int  # the profiled model's parameters, fp16
    real_bytes: int  # the small model's checkpoint
    disk_s: float  # one load from disk at the profile's disk_mb_s
    link_s: float  # one data-plane transfer at --link-gb-s
    load_mb_s: float  # CASCADE_LOAD_MB_S: real bytes paced to take disk_s
    send_mb_s: float  # CASCADE_LOADER_SEND_MB_S: real bytes paced to take link_s
    # CASCADE_LOCAL_CACHE_MB_S: the same link, real bytes paced to take link_s. Not send_mb_s: that one
    # is net of the token bucket's first-chunk burst, and the worker's own pace starts with none.
    cache_mb_s: float

    def describe(self, a: argparse.Namespace) -> dict[str, Any]:
        return {
            "device": self.profile.describe(),
            "steps": "real torch on the small model; each step padded to the profile's time for the full "
            f"{self.profile.layers}-layer model (CASCADE_DEVICE_PROFILE={self.profile.name})",
            "tokens": f"real prompts are the trace's scaled by 1/{a.token_scale:g}; every real prompt and "
            f"context token is priced as {a.token_scale:g} on the device (CASCADE_EMULATED_TOKEN_SCALE), so the "
            "device sees the trace's prompt lengths; output tokens are the trace's, generated for real",
            "emulated_model_bytes": self.emulated_bytes,
            "real_model_bytes": self.real_bytes,
            "disk": f"every disk read (initial loads, `disk` scale-ups) paced to {self.disk_s:.2f} s per instance: "
            f"{self.emulated_bytes / 1e9:.2f} GB at the profile's {self.profile.disk_mb_s:g} MB/s "
            f"(CASCADE_LOAD_MB_S={self.load_mb_s:.4f}, real bytes / emulated seconds)",
            "data_plane": f"every parameter send on the data plane (host cache or a peer as chain head) paced to "
            f"{self.link_s:.3f} s per model: {self.emulated_bytes / 1e9:.2f} GB at {a.link_gb_s:g} GB/s, a PCIe 4.0 "
            f"x16 link's practical rate and the order of a 200 Gb/s RDMA NIC (CASCADE_LOADER_SEND_MB_S="
            f"{self.send_mb_s:.4f} and the same for a serving holder, net of the 1 MiB token-bucket burst the "
            "send starts with); chain forwards follow the head's pace",
            "local_cache": "serverlessllm only: each worker keeps a host-memory copy of the checkpoint after its "
            f"first disk read (CASCADE_LOCAL_CACHE_MB={local_cache_mb(self)}, more than the model; it outlives "
            f"scale-down), and a later load on that worker installs from it in {self.link_s:.3f} s per model, "
            f"the data plane's emulated link (CASCADE_LOCAL_CACHE_MB_S={self.cache_mb_s:.4f}, real bytes / "
            "emulated seconds)",
            "not_emulated": "process start-up, NATS control messages and engine creation take their real "
            "(small) time; GPU memory allocation is not modelled",
        }


def make_emulation(a: argparse.Namespace, model_dir: Path) -> Emulation:
    profile = load_profile(a.profile)
    raw = orjson.loads((PROFILES_DIR / f"{profile.name}.json").read_bytes()).get("model", {})
    if {"bytes_per_layer", "bytes_embedding", "bytes_head"} <= set(raw):
        emulated = int(raw["bytes_embedding"] + raw["bytes_head"] + profile.layers * raw["bytes_per_layer"])
    elif "params" in raw:
        emulated = int(raw["params"]) * 2
    else:
        raise SystemExit(f"profile {profile.name} states no model size (model.params or bytes_*)")
    if profile.disk_mb_s <= 0:
        raise SystemExit(f"profile {profile.name} states no disk_mb_s")
    ck = Checkpoint(model_dir)
    real = ck.total_nbytes()
    ck.close()
    disk_s = emulated / (profile.disk_mb_s * 1e6)
    link_s = emulated / (a.link_gb_s * 1e9)
    # A send's token bucket starts full with one chunk: that much goes at once, the rest at the rate.
    send_mb_s = (real - DEFAULT_CHUNK) / 1e6 / link_s
    return Emulation(profile, emulated, real, disk_s, link_s, real / 1e6 / disk_s, send_mb_s, real / 1e6 / link_s)


def local_cache_mb(emu: Emulation) -> int:
    """The serverlessllm workers' local cache budget: room for the model (twice over), so it stays."""
    return math.ceil(2 * emu.real_bytes / 1e6)


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True, slots=True)
class Config:
    key: str
    label: str
    policy: str
    loading: str
    scaling: str
    min_replicas: int
    max_replicas: int
    knobs: dict[str, float] = field(default_factory=dict)
    fill_host_cache: bool = False
    env: dict[str, str] = field(default_factory=dict)  # on top of mesh_env, for this configuration's mesh

    def toml(self, model_dir: Path) -> str:
        lines = [
            "[[models]]",
            f'name = "{MODEL}"',
            f'path = "{model_dir}"',
            f"min_replicas = {self.min_replicas}",
            f"max_replicas = {self.max_replicas}",
            f'policy = "{self.policy}"',
            f'loading = "{self.loading}"',
            f'scaling = "{self.scaling}"',
        ]
        if self.knobs:
            lines.append("[models.knobs]")
            lines += [f"{k} = {v:g}" for k, v in self.knobs.items()]
        return "\n".join(lines) + "\n"


def rate_window(a: argparse.Namespace, trace_s: float) -> dict[str, str]:
    """The scaler's rate window for one configuration, given in trace seconds."""
    return {"CASCADE_SCALER_RATE_WINDOW_S": f"{trace_s / a.compress:g}"}


def make_configs(a: argparse.Namespace, plan: Plan, emu: Emulation) -> list[Config]:
    n = a.workers
    rate_knobs = {
        # From the profile: the capacity (kept, see learn_capacity) and tokens per request (a prior
        # until completions are measured).
        "capacity_tps": round(plan.capacity_req_s * plan.output_mean, 1),
        "tokens_per_request": round(plan.output_mean, 1),
        # A scale-up takes about a second here (multicast, then live routes from the first layer), so
        # a queue is worth draining within 2 s rather than the default 10.
        "backlog_drain_s": 2.0,
        # Every worker is the profile's device: its capacity is known, and the 0.5 s metrics intervals
        # make tokens/s a poor reading of it (docs/deployment.md, `learn_capacity`).
        "learn_capacity": 0.0,
        # The trace's waves rise for seconds: demand over the rate window trails them, so a scale-up
        # aims at half the capacity and the band lets an instance go again once 0.6 of it would do.
        # Measured on this window against the policy's 0.7/0.45 (Cascade only, one run each): SLO
        # 81.0 % vs 77.6 %, 469 vs 458 instance-s; docs/burst-window.md has the variants.
        "up_target_util": 0.5,
        "lower_util": 0.6,
        # The window's waves are separated by lulls of 5-30 s (replay time) with no request at all,
        # and its waves dip for a few seconds inside. Cascade goes to zero 4 s into a lull (a model
        # comes back from the loader's host copy in 0.54 s, and an instance in a lull serves
        # nothing), holds what a wave took through its dips (a scale-down 10 s after the demand
        # fell, not 5: the dips are shorter), and a wave from zero starts on every worker, since its
        # first request says nothing of its size and this window's waves need 3-4 of the 4 within a
        # second or two; what it does not need goes back 10 s later. docs/burst-window.md has the
        # variants measured.
        "keep_alive_s": 4.0,
        "downscale_delay_s": 10.0,
        "activation_scale": n,
    }
    # Ray Serve's default target (2 ongoing per replica); one tick of upscale delay, as ServerlessLLM
    # starts an instance when requests queue; keep-alive and downscale delay at the policy's defaults.
    conc_knobs = {
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 30.0,
        "keep_alive_s": 60.0,
    }
    peak = min(plan.peak_need, n)
    mean = min(plan.mean_need, n)
    # ServerlessLLM keeps loaded models in each server's DRAM: a worker's second load skips the disk.
    local_cache = {
        "CASCADE_LOCAL_CACHE_MB": str(local_cache_mb(emu)),
        "CASCADE_LOCAL_CACHE_MB_S": f"{emu.cache_mb_s:.6f}",
    }
    all_configs = {
        "cascade": Config(
            "cascade",
            "Cascade",
            "rate",
            "multicast",
            "live",
            0,
            n,
            rate_knobs,
            True,
            env=rate_window(a, CASCADE_RATE_WINDOW_S),
        ),
        "serverlessllm": Config(
            "serverlessllm",
            "ServerlessLLM-style",
            "concurrency",
            "disk",
            "stop-the-world",
            1,
            n,
            conc_knobs,
            env=local_cache,
        ),
        "allcache": Config(
            "allcache", "AllCache", "concurrency", "host-cache", "stop-the-world", 1, n, conc_knobs, True
        ),
        "static-peak": Config("static-peak", f"static at peak ({peak})", "manual", "multicast", "live", peak, peak),
        "static-mean": Config("static-mean", f"static at mean ({mean})", "manual", "multicast", "live", mean, mean),
    }
    return [all_configs[k] for k in a.configs.split(",")]


# --------------------------------------------------------------------------- one configuration


@dataclass
class Recorder:
    """What the mesh says while a configuration runs: heartbeats (who holds the model, when),
    scale decisions and their acks. Times are the event loop's clock."""

    clock: Any
    beats: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)

    async def on_heartbeat(self, m: Any) -> None:
        hb = decode(m.data, Heartbeat)
        holding = hb.model == MODEL and hb.state in HOLDING
        seq = self.beats.setdefault(hb.worker_id, [])
        if not seq or seq[-1][1] != holding:
            seq.append((self.clock(), holding))

    async def on_decision(self, m: Any) -> None:
        d = decode(m.data, ScaleDecision)
        if d.model == MODEL:
            self.decisions.append({"t": self.clock(), "id": d.decision_id, "action": d.action, "count": d.count,
                                   "target": d.target_replicas, "reason": d.reason})  # fmt: skip

    async def on_ack(self, m: Any) -> None:
        ack = decode(m.data, ScaleAck)
        if ack.model == MODEL:
            self.acks.append({"t": self.clock(), "id": ack.decision_id, "ok": ack.ok, "error": ack.error})

    def holding_at(self, t: float) -> int:
        n = 0
        for seq in self.beats.values():
            state = False
            for ts, h in seq:
                if ts > t:
                    break
                state = h
            n += state
        return n

    def instance_seconds(self, t0: float, t1: float) -> float:
        """The integral of the number of workers holding the model over [t0, t1]."""
        total = 0.0
        for seq in self.beats.values():
            state, since = False, t0
            for ts, h in seq:
                if ts <= t0:
                    state = h
                    continue
                if ts >= t1:
                    break
                if state:
                    total += ts - since
                state, since = h, ts
            if state:
                total += t1 - since
        return total


def mesh_env(a: argparse.Namespace, emu: Emulation) -> dict[str, str]:
    return {
        "CASCADE_DEVICE_PROFILE": a.profile,
        "CASCADE_EMULATED_TOKEN_SCALE": f"{a.token_scale:g}",
        "CASCADE_MAX_BATCH": str(a.max_batch),
        "CASCADE_MAX_PREFILL_TOKENS": str(a.max_prefill_tokens),
        "CASCADE_LOAD_MB_S": f"{emu.load_mb_s:.6f}",
        "CASCADE_LOADER_SEND_MB_S": f"{emu.send_mb_s:.6f}",
        "CASCADE_LOADER_SERVING_SEND_MB_S": f"{emu.send_mb_s:.6f}",
        # The scaler's rate window spans the trace-time the default (10 s) would in a real deployment.
        "CASCADE_SCALER_RATE_WINDOW_S": f"{10.0 / a.compress:g}",
        # Likewise the scaler's tick and the load reports (1 s by default, in trace time).
        "CASCADE_SCALER_TICK_S": f"{1.0 / a.compress:g}",
        "CASCADE_METRICS_S": f"{1.0 / a.compress:g}",
        "CASCADE_HEARTBEAT_S": "0.5",
        # Quiet unless asked: CASCADE_LOG_LEVEL=debug with CASCADE_BENCH_KEEP_LOGS=DIR keeps the services' logs,
        # the gateway's `dispatch` lines among them (which instance got which requests, and when).
        "CASCADE_LOG_LEVEL": os.environ.get("CASCADE_LOG_LEVEL", "warning"),
    }


async def run_config(a: argparse.Namespace, cfg: Config, plan: Plan, emu: Emulation, model_dir: Path) -> dict[str, Any]:
    mesh = Mesh(["--workers", str(a.workers), "--config", "DEPLOY"], {**mesh_env(a, emu), **cfg.env})
    deploy = mesh.home / "deploy.toml"
    deploy.write_text(cfg.toml(model_dir))
    mesh.args[mesh.args.index("DEPLOY")] = str(deploy)
    t_start = time.monotonic()
    try:
        url = mesh.start(timeout_s=300.0)
        print(f"  mesh up in {time.monotonic() - t_start:.0f} s ({cfg.min_replicas} instance(s) loaded)", flush=True)
        return await drive(a, cfg, plan, mesh, url)
    finally:
        mesh.stop()


async def drive(a: argparse.Namespace, cfg: Config, plan: Plan, mesh: Mesh, url: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    subjects = Subjects(str(mesh.info.get("prefix", "cascade")))
    nats_url = str(mesh.info["nats_url"])
    nc = await connect(nats_url, "bench-burst")
    rec = Recorder(loop.time)
    await nc.subscribe(subjects.heartbeat_all(), cb=rec.on_heartbeat)
    await nc.subscribe(subjects.scale_decision(), cb=rec.on_decision)
    await nc.subscribe(subjects.scale_ack(), cb=rec.on_ack)
    try:
        if cfg.fill_host_cache:
            await request(nc, subjects.host_cache(), HostCacheRequest("load", MODEL), Ok, 60.0)
        # Warm-up: two short requests per initial instance, or for the first one a model at zero
        # scales up for (first-call costs), not recorded.
        warm = [Arrival(i, 0.0, 16, 4, 0.0) for i in range(2 * max(1, cfg.min_replicas))]
        await replay(url, MODEL, warm, timeout_s=30.0, seed=a.seed + 1)
        await asyncio.sleep(1.0)
        # The workers' emulation counters before the replay: the figures reported are the difference.
        before = emulation_counters(to_json(await gather_status(nc, subjects, 1.0), nats_url, subjects.prefix))
        done = [0]
        t0 = loop.time()

        async def progress() -> None:
            while True:
                await asyncio.sleep(20.0)
                t = loop.time() - t0
                sent = sum(1 for x in plan.arrivals if x.t <= t)
                print(f"    t={t:5.0f} s: {sent}/{len(plan.arrivals)} sent, {done[0]} done, "
                      f"{rec.holding_at(loop.time())} instance(s)", flush=True)  # fmt: skip

        def on_record(_: RequestRecord) -> None:
            done[0] += 1

        ticker = asyncio.create_task(progress())
        try:
            records = await replay(url, MODEL, plan.arrivals, timeout_s=a.timeout, seed=a.seed, on_record=on_record)
        finally:
            ticker.cancel()
        t_end = loop.time()
        await asyncio.sleep(1.0)  # the last heartbeats and acks
        after = emulation_counters(to_json(await gather_status(nc, subjects, 2.0), nats_url, subjects.prefix))
    finally:
        await nc.drain()
    return analyse(a, cfg, plan, rec, records, t0, t_end, before, after)


def tpot_s(r: RequestRecord) -> float | None:
    """Time per output token after the first (vLLM's TPOT), from the first token, the stream's end
    and the usage count. SSE chunks are not tokens here: the random model's ids mostly decode to no
    text, and the gateway sends a chunk only for text (and always the first)."""
    if r.status != "ok" or r.first_token is None or r.end is None or r.completion_tokens < 2:
        return None
    return (r.end - r.first_token) / (r.completion_tokens - 1)


def dist_ms(xs: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "mean": sum(ms) / len(ms) if ms else float("nan"), "p50": percentile(ms, 50),
            "p95": percentile(ms, 95), "p99": percentile(ms, 99), "max": max(ms) if ms else float("nan")}  # fmt: skip


def slo_share(
    tl: list[tuple[float | None, float | None, str]], slo_ttft_ms: float, slo_tbt_ms: float, ttft: bool, tbt: bool
) -> float:
    """The share of requests, given as (TTFT ms, time per output token ms, status), that completed
    within the TTFT limit and/or the time-per-output-token limit; a failure is a miss."""

    def meets(t: float | None, p: float | None, st: str) -> bool:
        if st != "ok" or t is None:
            return False
        return (not ttft or t <= slo_ttft_ms) and (not tbt or p is None or p <= slo_tbt_ms)

    return sum(1 for t, p, st in tl if meets(t, p, st)) / len(tl) if tl else float("nan")


def summary(records: list[RequestRecord], slo_ttft_ms: float, slo_tbt_ms: float) -> dict[str, Any]:
    """Counts, TTFT and inter-token latency, SLO attainment. A request meets the SLO when it
    completed, its TTFT is within the limit and its time per output token too; every scheduled
    request counts (a failure is a miss)."""
    base = summarise(records, slo_ttft_ms, slo_tbt_ms)  # statuses, throughput, SSE chunk gaps
    n = len(records)
    tl = [(None if r.ttft is None else r.ttft * 1000, None if (t := tpot_s(r)) is None else t * 1000, r.status)
          for r in records]  # fmt: skip

    def share(ttft: bool, tbt: bool) -> float:
        return slo_share(tl, slo_ttft_ms, slo_tbt_ms, ttft, tbt)

    return {
        "requests": n,
        "status": base["status"],
        "ok": base["ok"],
        "span_s": base["span_s"],
        "tokens_per_s": base["tokens_per_s"],
        "ttft_ms": dist_ms([x for r in records if (x := r.ttft) is not None]),
        "itl_ms": dist_ms([x for r in records if (x := tpot_s(r)) is not None]),
        "itl_definition": "per request, time per output token after the first: (end - first token) / "
        "(completion tokens - 1); percentiles over requests",
        "sse_chunk_gap_ms": base["itl_ms"],
        "send_lag_ms": base["send_lag_ms"],
        "slo": {
            "ttft_ms": slo_ttft_ms,
            "tbt_ms": slo_tbt_ms,
            "definition": "completed, TTFT <= ttft_ms and time per output token <= tbt_ms; failures are misses",
            "attainment": share(True, True),
            "ttft_attainment": share(True, False),
            "tbt_attainment": share(False, True),
        },
    }


EMU_KEYS = ("steps", "overrun_steps", "overrun_s", "padded_s")


def emulation_counters(status: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per worker, the emulated device's counters as `cascade status --json` shows them."""
    out = {}
    for x in status["services"]:
        e = x["detail"].get("emulated_device") if x["service"] == "worker" else None
        if e:
            out[str(x["instance"])] = {k: float(e.get(k, 0.0)) for k in EMU_KEYS}
    return out


def analyse(
    a: argparse.Namespace,
    cfg: Config,
    plan: Plan,
    rec: Recorder,
    records: list[RequestRecord],
    t0: float,
    t_end: float,
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
) -> dict[str, Any]:
    s = summary(records, a.slo_ttft_ms, a.slo_tbt_ms)
    span = t_end - t0
    decisions = [d for d in rec.decisions if t0 <= d["t"] <= t_end]
    zero = dict.fromkeys(EMU_KEYS, 0.0)
    per_worker = {w: {k: round(c[k] - before.get(w, zero)[k], 3) for k in EMU_KEYS} for w, c in after.items()}
    steps, overrun_steps, overrun_s, padded_s = (sum(c[k] for c in per_worker.values()) for k in EMU_KEYS)
    # Significant: the time real compute lost over the device exceeds 1 % of the time padded to it
    # (the device time is at least the padding), i.e. the emulated instances ran >1 % slow.
    significant = overrun_s > 0.01 * padded_s
    step = 0.5
    grid = [i * step for i in range(int(span / step) + 2)]

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 1)

    return {
        "key": cfg.key,
        "label": cfg.label,
        "deployment": {
            "policy": cfg.policy,
            "loading": cfg.loading,
            "scaling": cfg.scaling,
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "knobs": cfg.knobs,
            "host_cache_filled_at_start": cfg.fill_host_cache,
            "env": cfg.env,
        },
        "summary": s,
        "instance_seconds": rec.instance_seconds(t0, t0 + plan.window_s),
        "instance_seconds_to_last_answer": rec.instance_seconds(t0, t_end),
        "span_s": span,
        "scale_events": len(decisions),
        "scale_up_events": sum(1 for d in decisions if d["action"] == "up"),
        "scale_down_events": sum(1 for d in decisions if d["action"] == "down"),
        "instances_added": sum(d["count"] for d in decisions if d["action"] == "up"),
        "decisions": [{**d, "t": round(d["t"] - t0, 3)} for d in decisions],
        "acks": [{**k, "t": round(k["t"] - t0, 3)} for k in rec.acks if t0 <= k["t"] <= t_end + 1],
        "emulated_device": {
            "during": "the replay (counters after it minus counters before it)",
            "steps": int(steps),
            "overrun_steps": int(overrun_steps),
            "overrun_s": round(overrun_s, 3),
            "padded_s": round(padded_s, 3),
            "significant": significant,
            "significance_rule": "overrun_s > 1 % of padded_s",
            "per_worker": per_worker,
        },
        "timeline": {
            "scheduled": [round(r.scheduled, 3) for r in records],
            "ttft_ms": [ms(r.ttft) for r in records],
            "tpot_ms": [ms(tpot_s(r)) for r in records],
            "status": [r.status for r in records],
            "t": grid,
            "instances": [rec.holding_at(t0 + t) for t in grid],
        },
    }


# --------------------------------------------------------------------------- report


def pooled_rows(a: argparse.Namespace, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration over its runs: latency percentiles and SLO attainment over all
    their requests (each run replays the same schedule, so this is the mean attainment), the
    other figures averaged; the emulation's counters summed."""
    out: list[dict[str, Any]] = []
    for key in dict.fromkeys(r["key"] for r in runs):
        rs = [r for r in runs if r["key"] == key]
        tl = [(t, p, st) for r in rs for t, p, st in zip(r["timeline"]["ttft_ms"], r["timeline"]["tpot_ms"],
                                                          r["timeline"]["status"], strict=True)]  # fmt: skip

        emu = [r["emulated_device"] for r in rs]
        summ = {
            "requests": len(tl),
            "ok": sum(r["summary"]["ok"] for r in rs),
            "ttft_ms": dist_ms([t / 1000 for t, _, _ in tl if t is not None]),
            "itl_ms": dist_ms([p / 1000 for _, p, _ in tl if p is not None]),
            "itl_definition": rs[0]["summary"]["itl_definition"],
            "slo": {
                **rs[0]["summary"]["slo"],
                "attainment": slo_share(tl, a.slo_ttft_ms, a.slo_tbt_ms, True, True),
                "ttft_attainment": slo_share(tl, a.slo_ttft_ms, a.slo_tbt_ms, True, False),
                "tbt_attainment": slo_share(tl, a.slo_ttft_ms, a.slo_tbt_ms, False, True),
            },
        }
        out.append({
            "key": key,
            "label": rs[0]["label"],
            "deployment": rs[0]["deployment"],
            "runs": len(rs),
            "summary": summ,
            "instance_seconds": sum(r["instance_seconds"] for r in rs) / len(rs),
            "scale_events": round(sum(r["scale_events"] for r in rs) / len(rs), 1),
            "scale_up_events": round(sum(r["scale_up_events"] for r in rs) / len(rs), 1),
            "scale_down_events": round(sum(r["scale_down_events"] for r in rs) / len(rs), 1),
            "emulated_device": {
                "steps": sum(e["steps"] for e in emu),
                "overrun_steps": sum(e["overrun_steps"] for e in emu),
                "overrun_s": round(sum(e["overrun_s"] for e in emu), 3),
                "padded_s": round(sum(e["padded_s"] for e in emu), 3),
                "significant": any(e["significant"] for e in emu),
                "significance_rule": "any run's overrun_s > 1 % of its padded_s",
            },
        })  # fmt: skip
    return out


def runs_table(rows: list[dict[str, Any]], runs: list[dict[str, Any]], repeats: int) -> str:
    body = []
    for p in rows:
        by_round = {r["round"]: r for r in runs if r["key"] == p["key"]}
        cells = []
        for k in range(1, repeats + 1):
            r = by_round.get(k)
            if r is None:
                cells.append("failed")
            else:
                cells.append(f"{100 * r['summary']['slo']['attainment']:.1f} / {r['instance_seconds']:.0f}")
        body.append([p["label"], *cells])
    return md_table(["configuration", *(f"round {k}: SLO % / instance-s" for k in range(1, repeats + 1))], body)


def verdicts_by_round(runs: list[dict[str, Any]], repeats: int) -> list[list[dict[str, Any]]]:
    return [verdicts({r["key"]: r for r in runs if r["round"] == k}) for k in range(1, repeats + 1)]


def verdicts(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    c, sl, sp = rows.get("cascade"), rows.get("serverlessllm"), rows.get("static-peak")
    if c and sl:
        cp, sp99 = c["summary"]["ttft_ms"]["p99"], sl["summary"]["ttft_ms"]["p99"]
        lower = 1 - cp / sp99 if sp99 > 0 else float("nan")
        fig = f"{cp:.0f} ms vs {sp99:.0f} ms: {100 * lower:.0f} % lower"
        out.append({"target": "Cascade p99 TTFT at least 50 % lower than ServerlessLLM-style", "figure": fig,
                    "met": bool(lower >= 0.5)})  # fmt: skip
    if c and sp:
        ratio = c["instance_seconds"] / sp["instance_seconds"] if sp["instance_seconds"] > 0 else float("nan")
        out.append({"target": "Cascade instance-seconds at most 70 % of static at peak",
                    "figure": f"{c['instance_seconds']:.0f} vs {sp['instance_seconds']:.0f}: {100 * ratio:.0f} %",
                    "met": bool(ratio <= 0.7)})  # fmt: skip
        ca, pa = 100 * c["summary"]["slo"]["attainment"], 100 * sp["summary"]["slo"]["attainment"]
        fig = f"{ca:.1f} % vs {pa:.1f} %: {ca - pa:+.1f} points"
        out.append({"target": "Cascade SLO attainment within 2 points of static at peak", "figure": fig,
                    "met": bool(ca >= pa - 2)})  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        s, d, e = r["summary"], r["deployment"], r["emulated_device"]
        over = f"{e['overrun_steps']}/{e['steps']}, {e['overrun_s']:.2f} s" + (
            " **significant**" if e["significant"] else ""
        )
        body.append([
            r["label"], f"{d['loading']} / {d['scaling']} / {d['policy']}",
            s["ttft_ms"]["p50"], s["ttft_ms"]["p95"], s["ttft_ms"]["p99"],
            s["itl_ms"]["p50"], s["itl_ms"]["p95"], s["itl_ms"]["p99"],
            f"{100 * s['slo']['attainment']:.1f}", f"{r['instance_seconds']:.0f}",
            f"{r['scale_events']} ({r['scale_up_events']} up, {r['scale_down_events']} down)",
            f"{s['ok']}/{s['requests']}", over,
        ])  # fmt: skip
    return md_table(
        ["configuration", "loading / scaling / policy", "TTFT p50 ms", "TTFT p95 ms", "TTFT p99 ms",
         "ITL p50 ms", "ITL p95 ms", "ITL p99 ms", "SLO %", "instance-s", "scale events", "ok/n",
         "emulation overruns (steps, time)"],
        body,
    )  # fmt: skip


def report(
    a: argparse.Namespace,
    plan: Plan,
    emu: Emulation,
    rows: list[dict[str, Any]],
    argv: list[str],
    runs: list[dict[str, Any]] | None = None,
    per_round: list[list[dict[str, Any]]] | None = None,
) -> str:
    """The markdown report. With repeats, `runs` are every run's rows and `per_round` each round's
    verdicts (`verdicts_by_round`)."""
    by = {r["key"]: r for r in rows}
    lines = [table(rows)]
    if a.repeats > 1 and runs:
        lines.append(
            f"Each configuration ran {a.repeats} times, in rounds; the table pools its runs (percentiles and SLO "
            "attainment over all their requests, instance-seconds and scale events averaged). Each run:"
        )
        lines.append("")
        lines.append(runs_table(rows, runs, a.repeats))
    lines.append(
        f"SLO: a request meets it when it completes, its TTFT is at most {a.slo_ttft_ms:g} ms and its time per "
        f"output token at most {a.slo_tbt_ms:g} ms; failed requests count as misses (about "
        f"{a.slo_ttft_ms / plan.prefill_ms_mean:.0f}x and "
        f"{a.slo_tbt_ms / plan.decode_ms_b1:.0f}x the profile's unloaded prefill of a mean prompt, "
        f"{plan.prefill_ms_mean:.0f} ms, and decode step, {plan.decode_ms_b1:.1f} ms). TTFT and ITL percentiles are "
        "over the requests that got a first token; ITL is each request's time per output token after the first."
    )
    lines.append(
        f"Instance-seconds: workers holding the model (loading, serving or draining), from their heartbeats, "
        f"integrated over the {plan.window_s:.0f} s replay window. Scale events: the scaler's ScaleDecisions "
        "during the replay."
    )
    lines.append("")
    pooled = f" (pooled over the {a.repeats} rounds; each round's own verdict after it)" if a.repeats > 1 else ""
    lines.append(f"Targets{pooled}:")
    for i, v in enumerate(verdicts(by)):
        line = f"- {v['target']}: {v['figure']} — {'met' if v['met'] else 'NOT met'}"
        if a.repeats > 1:
            got = [vs[i] for vs in per_round or [] if i < len(vs) and vs[i]["target"] == v["target"]]
            line += (
                f" (met in {sum(1 for g in got if g['met'])} of {len(got)} rounds: "
                + "; ".join(g["figure"] for g in got)
                + ")"
            )
        lines.append(line)
    lines.append("")
    lines.append(
        f"Workload: {len(plan.arrivals)} requests, trace {a.start:g}-{a.start + a.duration:g} s compressed "
        f"{a.compress:g}x into {plan.window_s:.0f} s; mean {plan.mean_rate:.2f} req/s, peak "
        f"{plan.peak_rate:.1f} req/s (10 trace-second bins); one instance serves {plan.capacity_req_s:.2f} req/s "
        f"by the profile (prompt {plan.prompt_emulated_mean:.0f} emulated tokens, {plan.output_mean:.1f} output "
        f"tokens on average; stepping the engine's schedule on the profile gives {plan.capacity_sim_req_s:.2f}), "
        f"so {a.workers} workers hold {a.workers * plan.capacity_req_s:.1f} req/s and the mean "
        f"is {plan.mean_rate / (a.workers * plan.capacity_req_s):.2f} of it; the peak needs {plan.peak_need} "
        f"instances (capped at {a.workers}), the mean {plan.mean_need}. Rate scale {plan.spec.rate_scale:.3f}."
    )
    lines.append(
        f"Emulated: {emu.profile.name} (approximate, derived) on every worker; a disk load takes {emu.disk_s:.2f} s, "
        f"a data-plane transfer or a ServerlessLLM-style worker's load from its own host-memory cache "
        f"{emu.link_s:.3f} s ({emu.emulated_bytes / 1e9:.2f} GB at {emu.profile.disk_mb_s:g} "
        f"MB/s and {a.link_gb_s:g} GB/s); prompts priced x{a.token_scale:g}. The scaler's rate window is "
        f"{10.0 / a.compress:g} s (its default 10 s of trace time) except where a configuration sets its own "
        f"(Cascade: {CASCADE_RATE_WINDOW_S / a.compress:g} s, {CASCADE_RATE_WINDOW_S:g} s of trace time); "
        "policy delays are in replay time. "
        "Details in burst.json."
    )
    flagged = [r["label"] for r in rows if r["emulated_device"]["significant"]]
    if flagged:
        lines.append(
            f"Emulation overran significantly in: {', '.join(flagged)} (real compute overran the device time by more "
            "than 1 % of the time padded to it): those figures are slower than the emulated device would give."
        )
    lines.append("")
    lines.append(f"Reproduce: `{' '.join(['python bench/burst.py', *argv])}`")
    lines.append("")
    lines.append(f"Trace: {LICENCE}")
    return "\n".join(lines) + "\n"


def plot(a: argparse.Namespace, plan: Plan, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows) + 1
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.6 * n), sharex=True, squeeze=False)
    ax0 = axes[0, 0]
    bins = rate_bins((x.t for x in plan.arrivals), 1.0, plan.window_s)
    ax0.bar(range(len(bins)), bins, width=1.0, align="edge", color="tab:gray")
    ax0.axhline(a.workers * plan.capacity_req_s, color="black", lw=1, ls="--", label=f"{a.workers} instances' capacity")
    ax0.set_ylabel("arrivals req/s")
    ax0.set_title(
        f"offered load: Azure code trace {a.start:g}-{a.start + a.duration:g} s, {a.compress:g}x compressed "
        f"(CC BY 4.0, Patel et al., Splitwise, ISCA 2024)",
        fontsize=9,
    )
    ax0.legend(loc="upper right", fontsize=7)
    ymax = max((x for r in rows for x in r["timeline"]["ttft_ms"] if x is not None), default=a.slo_ttft_ms) / 1000 * 1.5
    for ax, r in zip(axes[1:, 0], rows, strict=True):
        tl = r["timeline"]
        ok_x, ok_y, miss_x, miss_y, fail_x = [], [], [], [], []
        for t, ttft, tpot, st in zip(tl["scheduled"], tl["ttft_ms"], tl["tpot_ms"], tl["status"], strict=True):
            if st != "ok" or ttft is None:
                fail_x.append(t)
            elif ttft <= a.slo_ttft_ms and (tpot is None or tpot <= a.slo_tbt_ms):
                ok_x.append(t)
                ok_y.append(ttft / 1000)
            else:
                miss_x.append(t)
                miss_y.append(ttft / 1000)
        ax.scatter(ok_x, ok_y, s=4, c="tab:green", label="met SLO")
        ax.scatter(miss_x, miss_y, s=4, c="tab:red", label="missed SLO")
        if fail_x:
            ax.scatter(fail_x, [ymax] * len(fail_x), s=10, marker="x", c="black", label="failed")
        ax.axhline(a.slo_ttft_ms / 1000, color="tab:red", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(0.02, ymax * 1.3)  # the same scale in every panel
        ax.set_ylabel("TTFT s (by arrival)")
        ax2 = ax.twinx()
        ax2.step(tl["t"], tl["instances"], where="post", color="tab:blue", lw=1.5)
        ax2.set_ylim(0, a.workers + 0.5)
        ax2.set_ylabel("instances", color="tab:blue")
        s = r["summary"]
        ax.set_title(
            f"{r['label']} ({r['deployment']['loading']} / {r['deployment']['scaling']} / {r['deployment']['policy']}):"
            f" TTFT p99 {s['ttft_ms']['p99']:.0f} ms, SLO {100 * s['slo']['attainment']:.1f} %, "
            f"{r['instance_seconds']:.0f} instance-s, {r['scale_events']} scale events",
            fontsize=9,
        )
        ax.legend(loc="upper right", fontsize=7, markerscale=2)
    axes[-1, 0].set_xlabel("replay seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    t_begin = time.monotonic()
    plan = make_plan(a, a.profile)
    rows: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cascade-burst-") as tmp:
        model_dir = Path(tmp) / MODEL
        generate_model(model_dir, SPEC)
        emu = make_emulation(a, model_dir)
        configs = make_configs(a, plan, emu)
        print(
            f"{len(plan.arrivals)} requests over {plan.window_s:.0f} s (mean {plan.mean_rate:.1f} req/s, peak "
            f"{plan.peak_rate:.1f}); one instance {plan.capacity_req_s:.2f} req/s; {a.workers} workers; "
            f"disk load {emu.disk_s:.2f} s, data-plane load {emu.link_s:.3f} s (emulated)",
            flush=True,
        )
        runs = [(rnd, cfg) for rnd in range(1, a.repeats + 1) for cfg in configs]
        for i, (rnd, cfg) in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {cfg.label}: {cfg.loading} / {cfg.scaling} / {cfg.policy} "
                  f"(replicas {cfg.min_replicas}-{cfg.max_replicas})"
                  f"{f', round {rnd} of {a.repeats}' if a.repeats > 1 else ''} …", flush=True)  # fmt: skip
            try:
                r = asyncio.run(run_config(a, cfg, plan, emu, model_dir))
            except Exception as e:  # one configuration failing must not lose the others' results
                print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
                failed.append({"key": cfg.key, "round": rnd, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            r["round"] = rnd
            rows.append(r)
            s = r["summary"]
            print(
                f"  TTFT p50/p99 {s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms, SLO "
                f"{100 * s['slo']['attainment']:.1f} %, {r['instance_seconds']:.0f} instance-s, "
                f"{r['scale_events']} scale events, {s['ok']}/{s['requests']} ok, overruns "
                f"{r['emulated_device']['overrun_steps']}/{r['emulated_device']['steps']} steps "
                f"({time.monotonic() - t_begin:.0f} s elapsed)",
                flush=True,
            )
    runs_rows = rows
    rows = pooled_rows(a, runs_rows) if a.repeats > 1 else runs_rows
    by_round = verdicts_by_round(runs_rows, a.repeats) if a.repeats > 1 else []
    text = report(a, plan, emu, rows, argv, runs_rows, by_round)
    if failed:
        text += "\nConfigurations that failed to run: " + "; ".join(f"{f['key']}: {f['error'][:300]}" for f in failed)
        text += "\n"
    print()
    print(text)
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        png = RESULTS / "burst.png"
        plot(a, plan, [r for r in runs_rows if r["round"] == 1] or runs_rows, png)
        payload = {
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "command": "python bench/burst.py " + " ".join(argv),
            "trace": {"file": str(a.trace), "licence": LICENCE},
            "workload": {
                "requests": len(plan.arrivals),
                "window_s": plan.window_s,
                "schedule": {k: getattr(plan.spec, k) for k in ScheduleSpec.__dataclass_fields__},
                "trace_mean_req_s": plan.trace_mean_rate,
                "mean_req_s": plan.mean_rate,
                "peak_req_s_10_trace_s_bins": plan.peak_rate,
                "instance_capacity_req_s": plan.capacity_req_s,
                "instance_capacity_how": "bench/scaleup.py capacity_req_s: the profile's prefill of the mean prompt "
                "plus the mean output's decode steps shared by a batch of max_batch/2",
                "instance_capacity_simulated_req_s": plan.capacity_sim_req_s,
                "unloaded_prefill_ms_mean_prompt": plan.prefill_ms_mean,
                "unloaded_decode_step_ms_b1": plan.decode_ms_b1,
                "mean_load_over_cluster_capacity": plan.mean_rate / (a.workers * plan.capacity_req_s),
                "mean_need": plan.mean_need,
                "peak_need_uncapped": plan.peak_need,
                "prompt_real_tokens_mean": plan.prompt_real_mean,
                "prompt_emulated_tokens_mean": plan.prompt_emulated_mean,
                "output_tokens_mean": plan.output_mean,
            },
            "model_spec": {k: getattr(SPEC, k) for k in GenerateSpec.__slots__},
            "emulated": emu.describe(a),
            "mesh": {
                "env": mesh_env(a, emu),
                "gateway": "defaults (max queue 256 per model, queue timeout 30 s)",
                "scaler": f"tick 1 s, rate window {10.0 / a.compress:g} s (10 s of trace time), latency window 30 s",
            },
            "slo": {"ttft_ms": a.slo_ttft_ms, "tbt_ms": a.slo_tbt_ms},
            "targets": verdicts({r["key"]: r for r in rows}),
            "targets_by_round": by_round,
            "rows": rows,
            # With --repeats above 1, `rows` pools each configuration's runs (no timeline), and every
            # run's own row, timeline included, is here.
            "runs": runs_rows if a.repeats > 1 else [],
            "failed": failed,
            "total_run_s": time.monotonic() - t_begin,
            "plot": "bench/results/burst.png" + (" (round 1)" if a.repeats > 1 else ""),
        }
        caption = "latency and instances over time" + (f", round 1 of {a.repeats}" if a.repeats > 1 else "")
        jp, mp = write_result("burst", payload, text + f"\n![{caption}]({png.name})\n")
        print(f"wrote {jp}, {mp} and {png}")
    print(f"total {time.monotonic() - t_begin:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
