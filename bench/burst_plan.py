"""What bench/burst.py replays and what it emulates, fixed before the first configuration runs:
the schedule cut from the trace with the figures derived from it and the device profile (`Plan`),
and how each worker stands for the profiled GPU and its model's loads (`Emulation`)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.scaleup import capacity_req_s
from bench.tracelib import Arrival, ScheduleSpec, build_schedule, load_trace, rate_bins, window
from cascade.config import GenerateSpec
from cascade.device_profile import PROFILES_DIR, DeviceProfile, load_profile
from cascade.framing import DEFAULT_CHUNK
from cascade.models.checkpoint import Checkpoint

MODEL = "burst-model"
# The real model: narrow (hidden 64) so its CPU step stays well under the emulated device's time on a
# shared 2-core machine, with a 4096-entry vocabulary so the checkpoint (4 MB) is large next to the
# data plane's 1 MiB token-bucket burst (a paced transfer's start), at little compute. Ids past the
# byte range decode to no text: few SSE chunks carry text, so client-side latency figures come
# from the first chunk (TTFT: the gateway always sends it), the stream's end and the usage count.
SPEC = GenerateSpec(layers=8, hidden=64, heads=4, kv_heads=2, vocab=4096, max_position=2048, seed=11)


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
            "disk_mb_s": self.profile.disk_mb_s,
            "disk_load_s": self.disk_s,
            "link_load_s": self.link_s,
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
