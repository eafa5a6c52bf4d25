"""Scenarios at scale: a cluster of hosts of accelerators, a model profile, a workload set to
fill the cluster, and one of the systems (sim/systems.py). `cascade sim` and bench/sim_scale.py
build their runs here.

The level: a workload "fills" the cluster when its busiest 10 s (arrivals, on the trace's own
time axis after compression) carry `fill` times what every instance together serves, one
instance serving `capacity_req_s` on the workload's mean prompt and output (bench/scaleup.py's
`capacity_req_s`, the figure bench/burst.py sets its level with). The SLO is set the way
bench/burst.py sets its own: TTFT about 6x the profile's unloaded prefill of a mean prompt, time
per output token about 8x its decode step (for the 7B profile on an A100 these are burst's 1 s
and 100 ms).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.scaleup import capacity_req_s
from bench.tracelib import DEFAULT_TRACE
from sim.hardware import Topology, device_links, model_shape
from sim.mesh import Arrival, Scenario
from sim.settings import MeshSettings
from sim.systems import SYSTEM_KEYS, System, make_systems, need
from sim.workload import Conversation, conversation_arrivals, describe, trace_arrivals, trace_peak_rate, zipf_models

WORKLOADS = ("code", "conversation")
PEAK_BIN_S = 10.0


@dataclass(frozen=True, slots=True)
class ScaleSpec:
    accelerators: int = 128
    per_host: int = 8
    profile: str = "llama2-7b-a100-80gb"
    workload: str = "code"
    trace: Path = DEFAULT_TRACE
    start_s: float = 0.0
    duration_s: float = 0.0  # 0: the whole trace (code) or an hour (conversation)
    compress: float = 1.0
    fill: float = 1.0
    models: int = 1
    zipf: float = 1.0
    max_batch: int = 32
    max_prefill_tokens: int = 512
    nic_gbps: float = 200.0
    nics_per_host: int = 8
    ssd_gb_s: float = 0.0  # 0: the profile's disk_mb_s
    cv: float = 2.0  # conversation: inter-arrival burstiness
    activation_scale: int = 0  # Cascade's; 0: every instance (bench/burst.py's rule)
    # A mesh this size runs several gateways behind a load balancer: one per this many instances
    # (at 1,000 7B instances, 8 gateways of about 600 req/s each at the peak), each with the
    # service's own queue bound (256 requests per model).
    instances_per_gateway: int = 128
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["trace"] = str(self.trace)
        return d


@dataclass(frozen=True, slots=True)
class Built:
    scenario: Scenario
    system: System
    info: dict[str, Any]


def build(spec: ScaleSpec, system: str) -> Built:
    if system not in SYSTEM_KEYS:
        raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEM_KEYS)}")
    if spec.workload not in WORKLOADS:
        raise ValueError(f"unknown workload {spec.workload!r}; choose from {', '.join(WORKLOADS)}")
    if spec.accelerators % spec.per_host:
        raise ValueError(f"{spec.accelerators} accelerators are not whole hosts of {spec.per_host}")
    shape = model_shape(spec.profile)
    hosts = spec.accelerators // spec.per_host
    instances = hosts * (spec.per_host // shape.accelerators)
    names = [f"model-{i}" for i in range(spec.models)] if spec.models > 1 else ["model"]
    # ---- the workload, at unit rate first, to measure its mix and its peak
    if spec.workload == "code":
        duration = spec.duration_s or None
        mean0, peak0 = trace_peak_rate(spec.trace, spec.start_s, duration, PEAK_BIN_S * spec.compress)
        probe = trace_arrivals(
            names[0],
            trace=spec.trace,
            start_s=spec.start_s,
            duration_s=duration,
            compress=spec.compress,
            seed=spec.seed,
        )
        prompt = sum(a.prompt for a in probe) / len(probe)
        out = sum(a.out for a in probe) / len(probe)
        cap = capacity_req_s(spec.profile, spec.max_batch, round(prompt), round(out))
        # Peak of the replay = peak0 × rate_scale × compress: set to fill × the cluster's capacity.
        rate_scale = spec.fill * instances * cap / (peak0 * spec.compress)
        arrivals = trace_arrivals(
            names[0],
            trace=spec.trace,
            start_s=spec.start_s,
            duration_s=duration,
            compress=spec.compress,
            rate_scale=rate_scale,
            seed=spec.seed,
        )
        level = {"trace_mean_req_s": mean0, "trace_peak_10s_req_s": peak0, "rate_scale": rate_scale}
    else:
        duration_c = spec.duration_s or 3600.0
        w0 = Conversation(mean_rate=1.0, duration_s=duration_c, cv=spec.cv, seed=spec.seed)
        prompt = w0.prompt_median * math.exp(w0.prompt_sigma**2 / 2)
        out = w0.output_median * math.exp(w0.output_sigma**2 / 2)
        cap = capacity_req_s(spec.profile, spec.max_batch, round(prompt), round(out))
        peak = spec.fill * instances * cap
        w = replace(w0, mean_rate=peak * (1 + w0.level_lo) / 2)
        arrivals = conversation_arrivals(names[0], w)
        level = {
            "envelope_peak_req_s": peak,
            "mean_req_s_target": w.mean_rate,
            "cv": spec.cv,
            "level_s": w.level_s,
            "level_lo": w.level_lo,
        }
    if spec.models > 1:
        arrivals = zipf_models(arrivals, names, spec.zipf, spec.seed)
    stats = describe(arrivals, PEAK_BIN_S)
    prompt_m, out_m = stats["prompt_mean"], stats["output_mean"]
    cap = capacity_req_s(spec.profile, spec.max_batch, round(prompt_m), round(out_m))
    peak_need = need(stats["peak_req_s"], cap)
    mean_need = need(stats["mean_req_s"], cap)
    window = max(a.t for a in arrivals)
    systems = make_systems(
        instances,
        peak_need,
        mean_need,
        capacity_tps=cap * out_m,
        tokens_per_request=out_m,
        cascade_rate_window_s=2.0 / spec.compress,
        activation_scale=spec.activation_scale or None,
    )
    sys_ = systems[system]
    if spec.models > 1 and system in ("static-peak", "static-mean"):
        # Each model's static share: its part of the load, at least one instance, within the cluster.
        share = max(1, sys_.min_replicas // spec.models)
        sys_ = replace(sys_, min_replicas=share, max_replicas=share)
    links = device_links(spec.profile)
    topo = Topology(
        hosts=hosts,
        accelerators_per_host=spec.per_host,
        nvlink_gb_s=(links["nvlink_gb_s"] or 600.0) / 2,  # stated bidirectional; one way
        pcie_gb_s=links["pcie_gb_s"] or 25.0,
        nic_gbps=spec.nic_gbps,
        nics_per_host=spec.nics_per_host,
        ssd_gb_s=spec.ssd_gb_s or shape.profile.disk_mb_s / 1000,
    )
    settings = MeshSettings(
        heartbeat_s=1.0,
        metrics_s=1.0 / spec.compress,
        scaler_tick_s=1.0 / spec.compress,
        rate_window_s=sys_.rate_window_s or 10.0 / spec.compress,
        max_batch=spec.max_batch,
        max_prefill_tokens=spec.max_prefill_tokens,
        gateways=max(1, math.ceil(instances / spec.instances_per_gateway)),
        # A serving holder sends at the link's pace (bench/burst.py sets it so too): the
        # simulator does not model a send slowing the holder's steps.
        serving_send_bps=0.0,
        host_cache=sys_.host_cache,
        local_cache=sys_.local_cache,
    )
    dep = sys_.deployment(names)
    shapes = {m: replace(shape, name=m) for m in names}
    preload = {m: sys_.min_replicas for m in names}
    if sum(preload.values()) > instances:
        raise ValueError(f"{system} wants {sum(preload.values())} instances; the cluster has {instances}")
    prof = shape.profile
    slo_ttft_ms = round(6 * prof.step_ms(0, round(prompt_m)), -1)
    slo_tpot_ms = round(8 * prof.step_ms(1, 0, round(prompt_m)), -1)
    sc = Scenario(
        name=f"{spec.workload}-{spec.profile}-{spec.accelerators}-{system}",
        topology=topo,
        settings=settings,
        deployment=dep,
        models=shapes,
        arrivals=arrivals,
        preload=preload,
        fill_host_cache=tuple(names) if sys_.fill_host_cache else (),
        window_s=window,
        seed=spec.seed,
    )
    info = {
        "spec": spec.describe(),
        "system": asdict(sys_),
        "instances": instances,
        "accelerators_per_instance": shape.accelerators,
        "hosts": hosts,
        "capacity_req_s_per_instance": cap,
        "peak_need": peak_need,
        "mean_need": mean_need,
        "workload": {**stats, **level},
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "model_bytes": shape.nbytes,
        "topology": topo.describe(),
        "settings": settings.describe(),
    }
    return Built(sc, sys_, info)


def arrivals_only(spec: ScaleSpec) -> list[Arrival]:
    """The workload a spec makes (for dry runs)."""
    return list(build(spec, "static-peak").scenario.arrivals)
