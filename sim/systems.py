"""The systems compared, each a configuration of the same simulated mesh, as bench/burst.py
configures the real one (`make_configs`): the same policies, knobs and loading modes, sized to
the cluster at hand.

- cascade: `rate` policy, chain multicast, live (partial-layer) scaling, the O(1) host cache
  (one host copy per model), to zero in lulls and back on `activation_scale` instances;
- serverlessllm: `concurrency` policy, every new instance reads its host's SSD (or the host's
  DRAM copy, kept after a first read: ServerlessLLM's checkpoint cache), stop-the-world;
- allcache: `concurrency` policy, every host holds every model in memory (loads from it),
  stop-the-world;
- static-peak / static-mean: `manual`, the instances the peak (the mean) needs, always.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cascade.config import Deployment, ModelDeployment
from sim.settings import HostCachePlacement

SYSTEM_KEYS = ("cascade", "serverlessllm", "allcache", "static-peak", "static-mean")
LABELS = {
    "cascade": "Cascade",
    "serverlessllm": "ServerlessLLM-style",
    "allcache": "AllCache",
    "static-peak": "static at peak",
    "static-mean": "static at mean",
}


@dataclass(frozen=True, slots=True)
class System:
    key: str
    label: str
    policy: str
    loading: str
    scaling: str
    min_replicas: int
    max_replicas: int
    knobs: dict[str, float] = field(default_factory=dict)
    fill_host_cache: bool = False
    host_cache: HostCachePlacement = "one"
    local_cache: bool = False
    rate_window_s: float | None = None  # None: the mesh's default

    def deployment(self, models: list[str]) -> Deployment:
        return Deployment(
            tuple(
                ModelDeployment(
                    m,
                    Path("/sim") / m,
                    min_replicas=self.min_replicas,
                    max_replicas=self.max_replicas,
                    policy=self.policy,
                    knobs=dict(self.knobs),
                    loading=self.loading,
                    scaling=self.scaling,
                )
                for m in models
            )
        )


def rate_knobs(capacity_tps: float, tokens_per_request: float, activation_scale: int) -> dict[str, float]:
    """Cascade's `rate` knobs as bench/burst.py sets them (the reasons are written there and in
    docs/burst-window.md): capacity from the profile and kept, a 2 s backlog drain, scale-ups
    aiming at half the capacity, to zero 4 s into a lull, scale-downs 10 s after demand fell."""
    return {
        "capacity_tps": round(capacity_tps, 1),
        "tokens_per_request": round(tokens_per_request, 1),
        "backlog_drain_s": 2.0,
        "learn_capacity": 0.0,
        "up_target_util": 0.5,
        "lower_util": 0.6,
        "keep_alive_s": 4.0,
        "downscale_delay_s": 10.0,
        "activation_scale": activation_scale,
    }


# bench/burst.py: Ray Serve's default target, one tick of upscale delay, the policy's defaults.
CONCURRENCY_KNOBS = {
    "target_ongoing_requests": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 30.0,
    "keep_alive_s": 60.0,
}


def make_systems(
    instances: int,
    peak_need: int,
    mean_need: int,
    capacity_tps: float,
    tokens_per_request: float,
    cascade_rate_window_s: float,
    activation_scale: int | None = None,
) -> dict[str, System]:
    """The five systems for a mesh of `instances` instances per model. `activation_scale`
    defaults to every instance, as bench/burst.py's (its waves need 3 or 4 of its 4)."""
    n = instances
    act = activation_scale or n
    peak = max(1, min(peak_need, n))
    mean = max(1, min(mean_need, n))
    return {
        "cascade": System(
            "cascade",
            LABELS["cascade"],
            "rate",
            "multicast",
            "live",
            0,
            n,
            rate_knobs(capacity_tps, tokens_per_request, act),
            fill_host_cache=True,
            host_cache="one",
            rate_window_s=cascade_rate_window_s,
        ),
        "serverlessllm": System(
            "serverlessllm",
            LABELS["serverlessllm"],
            "concurrency",
            "disk",
            "stop-the-world",
            1,
            n,
            dict(CONCURRENCY_KNOBS),
            host_cache="off",
            local_cache=True,
        ),
        "allcache": System(
            "allcache",
            LABELS["allcache"],
            "concurrency",
            "host-cache",
            "stop-the-world",
            1,
            n,
            dict(CONCURRENCY_KNOBS),
            fill_host_cache=True,
            host_cache="every-host",
        ),
        "static-peak": System(
            "static-peak",
            f"{LABELS['static-peak']} ({peak})",
            "manual",
            "multicast",
            "live",
            peak,
            peak,
            host_cache="off",
        ),
        "static-mean": System(
            "static-mean",
            f"{LABELS['static-mean']} ({mean})",
            "manual",
            "multicast",
            "live",
            mean,
            mean,
            host_cache="off",
        ),
    }


def need(rate: float, capacity_req_s: float) -> int:
    return max(1, math.ceil(rate / capacity_req_s))
