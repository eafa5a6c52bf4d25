"""Scaling policies: pure functions from a load snapshot and a state to a target and a state.

    target, state = policy.decide(signals, knobs, state)

No clock, no I/O: time is `signals.now`, and everything a policy remembers between ticks (delay
timers, fitted models, the batch limit it set) is in the frozen state it returns. The scaler
core calls `decide` once per tick per model (through `controls.Controls`): a `Target`'s replicas
and reason become the model's target in `replicas.ReplicaBook`, which makes the `ScaleDecision`;
a vertical action becomes a `SetBatchLimit` to the model's instances. While
`signals.decision_in_flight` is set, policies never return a horizontal decision.

Four policies (`POLICIES`):

- `manual`: no load policy. The model keeps `min_replicas`, or what an operator sets with
  `cascade scale`; benchmarks use it to hold a configuration fixed.
- `concurrency`: Ray Serve / KServe / ServerlessLLM. desired = ceil(ongoing / target), one
  instance per tick, upscale/downscale delays, keep-alive before zero.
- `rate`: BlitzScale-style. Instances = token demand / measured per-instance capacity, several
  per tick, a utilisation band for hysteresis, quick scale-down.
- `two-stage`: Themis-style. A fitted step-latency model and an M/M/c queue pick the smallest
  (instances, batch limit) meeting the TTFT/TBT SLO; a surge first raises the batch limit in place,
  then adds instances if it persists, and the limit shrinks back when they serve.

Common guarantees, tested tick by tick: the target stays within [min_replicas, max_replicas];
zero only after `keep_alive_s` without requests (and only when min_replicas is 0); a model at zero
with requests scales up at once, ignoring delays, since someone is waiting.

Each policy also says what a model *needs* now (`Policy.need`): the fewest instances that carry
its current load, without the delays that keep a policy from shrinking at once. When the idle pool
is empty, the scaler may take instances a model holds above that need for a model that waits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cascade.config import ConfigError, ModelDeployment
from services.scaler.signals import LoadSignals, StepSample


class KnobError(ConfigError):
    """A policy name or knob that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a policy wants now: `target_replicas` counts serving + loading instances (the
    scaler's replica book turns a gap into a `ScaleDecision`); `batch_limit`, when set, is a new
    per-instance batch limit for the model's serving instances (vertical, in place). `figures`
    are the numbers behind `reason`; the decision that closes the gap carries both."""

    target_replicas: int
    current_replicas: int
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    batch_limit: int | None = None

    @property
    def delta(self) -> int:
        return self.target_replicas - self.current_replicas

    @property
    def action(self) -> Literal["up", "down"] | None:
        """The horizontal part (None: vertical only)."""
        return "up" if self.delta > 0 else "down" if self.delta < 0 else None


# --------------------------------------------------------------------------- shared pieces


def _parse_knobs(cls: type[Any], policy: str, raw: Mapping[str, float], min_replicas: int, max_replicas: int) -> Any:
    tunable = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("min_replicas", "max_replicas")}
    unknown = sorted(set(raw) - set(tunable))
    if unknown:
        raise KnobError(f"policy {policy}: unknown knobs {unknown}; it takes {sorted(tunable)}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        v = float(value)
        if tunable[name].type == "int":
            if v != int(v):
                raise KnobError(f"policy {policy}: knob {name} must be a whole number, got {value}")
            kwargs[name] = int(v)
        else:
            kwargs[name] = v
    try:
        return cls(min_replicas=min_replicas, max_replicas=max_replicas, **kwargs)
    except ValueError as e:
        raise KnobError(f"policy {policy}: {e}") from None


def _check_bounds(min_replicas: int, max_replicas: int, keep_alive_s: float) -> None:
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise ValueError(
            f"need 0 <= min_replicas <= max_replicas, max_replicas >= 1 (got {min_replicas}, {max_replicas})"
        )
    if keep_alive_s < 0:
        raise ValueError("keep_alive_s must be >= 0")


def _last_busy(s: LoadSignals, prev: float | None) -> float:
    """When the model last had work: now while requests are in the system, else the latest
    arrival. The first tick counts as activity, so a freshly started model is not dropped to zero
    before anyone had the chance to use it. The windowed arrival rate is not used once the last
    arrival time is known: it lingers for a whole window after the last request and would stretch
    keep-alive by that much."""
    if prev is None or s.ongoing > 0 or (s.arrival_rate > 0 and s.last_arrival is None):
        return s.now
    return max(prev, s.last_arrival) if s.last_arrival is not None else prev


def _floor(s: LoadSignals, min_replicas: int, keep_alive_s: float, last_busy: float) -> tuple[int, bool]:
    """The fewest replicas allowed now, and whether keep-alive has expired.

    With requests in the system, at least one. Idle, keep what is there (at least one) until
    keep-alive expires; only then may a model with min_replicas 0 go to zero. An idle model at
    zero stays there: only a request waiting for it brings it back (not a lingering rate figure)."""
    expired = s.ongoing == 0 and s.now - last_busy >= keep_alive_s
    if expired:
        return min_replicas, True
    if s.ongoing > 0:
        return max(min_replicas, 1), False
    return max(min_replicas, min(1, s.replicas)), False


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def _since(cond: bool, start: float | None, now: float) -> float | None:
    """Delay timer: when `cond` began holding continuously (None while it does not hold)."""
    if not cond:
        return None
    return now if start is None else start


# --------------------------------------------------------------------------- concurrency

# KV usage an instance is kept under on average (vLLM's gpu_memory_utilization default, taken as
# the share of its KV cache a replica should hold): more, summed over the serving instances,
# wants another instance.
KV_TARGET_USAGE = 0.9


@dataclass(frozen=True, slots=True)
class ConcurrencyKnobs:
    min_replicas: int = 1
    max_replicas: int = 8
    # Ray Serve's default target is 2 ongoing requests per replica.
    target_ongoing_requests: float = 2.0
    # Shorter than Ray Serve's defaults (30 s / 600 s): benchmarks replay minutes, not hours.
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    keep_alive_s: float = 60.0

    def __post_init__(self) -> None:
        _check_bounds(self.min_replicas, self.max_replicas, self.keep_alive_s)
        if self.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be > 0")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("delays must be >= 0")


@dataclass(frozen=True, slots=True)
class ConcurrencyState:
    up_since: float | None = None
    down_since: float | None = None
    last_busy: float | None = None


def decide_concurrency(
    s: LoadSignals, k: ConcurrencyKnobs, st: ConcurrencyState
) -> tuple[Target | None, ConcurrencyState]:
    """desired = ceil(ongoing / target_ongoing_requests), bounded; move one instance per tick
    once the wish has held for the delay. The delay timer is not reset by a decision: while the
    condition keeps holding, each tick (with no decision in flight) moves one more instance."""
    now, cur = s.now, s.replicas
    last_busy = _last_busy(s, st.last_busy)
    floor, expired = _floor(s, k.min_replicas, k.keep_alive_s, last_busy)
    # Beside the requests: the KV held. Few requests with long contexts fill instances' KV caches
    # (and then queue or get preempted there) long before they count as many requests.
    raw = max(math.ceil(s.ongoing / k.target_ongoing_requests), math.ceil(s.kv_held / KV_TARGET_USAGE))
    desired = _clamp(raw, floor, k.max_replicas)
    up_since = _since(desired > cur, st.up_since, now)
    down_since = _since(desired < cur, st.down_since, now)
    new = ConcurrencyState(up_since=up_since, down_since=down_since, last_busy=last_busy)
    figures = {
        "ongoing": float(s.ongoing),
        "kv_held": round(s.kv_held, 3),
        "target_ongoing_requests": k.target_ongoing_requests,
        "desired": float(desired),
        "current": float(cur),
    }
    if s.decision_in_flight or desired == cur:
        return None, new
    if cur == 0:
        return Target(1, 0, f"scale from zero: {s.ongoing} request(s) waiting", figures), new
    if cur > k.max_replicas or cur < floor:
        return Target(
            _clamp(cur, floor, k.max_replicas), cur, f"bounds: {cur} outside [{floor}, {k.max_replicas}]", figures
        ), new
    if desired == 0 and expired:
        return Target(0, cur, f"keep-alive: no requests for {now - last_busy:.0f}s", figures), new
    if up_since is not None and now - up_since >= k.upscale_delay_s:
        reason = f"{s.ongoing} ongoing / {k.target_ongoing_requests:g} per replica wants {desired}"
        return Target(cur + 1, cur, reason, figures), new
    if down_since is not None and now - down_since >= k.downscale_delay_s:
        reason = f"{s.ongoing} ongoing wants {desired} for {now - down_since:.0f}s"
        return Target(cur - 1, cur, reason, figures), new
    return None, new


# --------------------------------------------------------------------------- rate


@dataclass(frozen=True, slots=True)
class RateKnobs:
    min_replicas: int = 1
    max_replicas: int = 8
    # Prior per-instance capacity (generated tokens/s), used until a saturated instance is
    # measured; for an emulated device take it from its profile.
    capacity_tps: float = 200.0
    target_util: float = 0.7
    upper_util: float = 0.85
    lower_util: float = 0.45
    # Quick: scaling back up is cheap when parameters come from live instances.
    downscale_delay_s: float = 5.0
    keep_alive_s: float = 60.0
    max_step: int = 0  # most instances added per tick; 0 = no limit
    # Queued requests count as demand spread over this long. Shorter drains the queue faster but
    # overshoots: the queue that built up while instances loaded is drained by them anyway.
    backlog_drain_s: float = 10.0
    tokens_per_request: float = 64.0  # prior until completions are measured
    # An instance at or above this load (requests per batch slot), or with a queue of its own,
    # is saturated: its measured tokens/s is its capacity.
    saturation: float = 0.9
    capacity_alpha: float = 0.3  # EWMA weight of a new capacity measurement
    # 1: learn capacity from measurements. 0: trust `capacity_tps` (a device profile's figure, or
    # a benchmark of the deployment). A metrics interval's tokens/s is a poor reading of capacity
    # when prompts are long: an interval of decode-only steps yields many times the mean rate, and
    # "an instance seen doing X can do X" then ratchets the estimate up (seen in bench/burst.py at
    # 0.5 s intervals: 268 tok/s learnt against the profile's 128, which held back scale-ups).
    learn_capacity: float = 1.0
    # Utilisation a scale-up aims for (0: `target_util`). Lower leaves headroom on the way up: the
    # demand measured over the rate window still trails a burst that is rising, and an instance
    # that is not needed is handed back after `downscale_delay_s`.
    up_target_util: float = 0.0
    # Scale-down reads demand smoothed over about this long (an exponential average; 0: off), as
    # Knative reads a stable window for it: an arrival process that is bursty at the scale of the
    # rate window keeps crossing the band for moments, so an instance the mean does not need is
    # never handed back. Scale-ups still read the rate window, at once.
    down_smoothing_s: float = 0.0
    # Instances a model at zero comes back with, at least (Knative's activation-scale). The first
    # request of a burst says little about its size, and a second decision waits for the first
    # one's load: on a bursty trace the wave arrives while one instance loads alone.
    activation_scale: int = 1
    # With nothing in the system (no request running or queued, none arriving) for this long, go
    # down to the keep-alive floor (one warm instance, or min_replicas) at once (0: off). The
    # downscale delay guards against dips of a demand that is still there; an idle model has none,
    # and until keep-alive takes it to zero the instances above the first only wait. A request in
    # that time is served by the warm instance while a scale-up (cheap under live scaling) follows.
    # Keep it above the gaps that occur inside a wave of arrivals, or the wave pays a scale-up.
    idle_down_s: float = 0.0
    # Most instances one scale-down removes (0: no limit, down to what the demand needed over the
    # delay). 1 walks down a wave's tail an instance at a time, each step after its own delay:
    # the demand is measured again on the instances that remain before the next one goes.
    down_step: int = 0

    def __post_init__(self) -> None:
        _check_bounds(self.min_replicas, self.max_replicas, self.keep_alive_s)
        if self.down_step < 0:
            raise ValueError("down_step must be >= 0")
        if self.idle_down_s < 0:
            raise ValueError("idle_down_s must be >= 0")
        if self.activation_scale < 1:
            raise ValueError("activation_scale must be at least 1")
        if self.learn_capacity not in (0.0, 1.0):
            raise ValueError("learn_capacity must be 0 or 1")
        if self.down_smoothing_s < 0:
            raise ValueError("down_smoothing_s must be >= 0")
        if self.up_target_util and not 0 < self.up_target_util <= self.target_util:
            raise ValueError("need 0 < up_target_util <= target_util (or 0: target_util)")
        if not 0 < self.lower_util < self.target_util < self.upper_util:
            raise ValueError("need 0 < lower_util < target_util < upper_util")
        if self.capacity_tps <= 0 or self.tokens_per_request <= 0 or self.backlog_drain_s <= 0:
            raise ValueError("capacity_tps, tokens_per_request and backlog_drain_s must be > 0")
        if self.max_step < 0 or self.downscale_delay_s < 0 or not 0 < self.capacity_alpha <= 1:
            raise ValueError("need max_step >= 0, downscale_delay_s >= 0, 0 < capacity_alpha <= 1")


@dataclass(frozen=True, slots=True)
class RateState:
    capacity_tps: float | None = None
    tokens_per_request: float | None = None
    down_since: float | None = None
    # The most instances the demand needed since `down_since` (Kubernetes' HPA scales down to the
    # highest recommendation over its stabilisation window): a scale-down that lands in a gap of
    # the arrivals would otherwise cut to what the gap needs, just before the next burst.
    down_peak: int = 0
    down_replicas: int = -1  # the instances when `down_since` began: a change restarts the timer
    last_busy: float | None = None
    smooth_demand: float | None = None  # demand averaged for scale-down (down_smoothing_s)
    smooth_at: float | None = None


def _replicas_for(demand: float, cap: float, util: float, floor: int, k: RateKnobs) -> int:
    """Instances that carry `demand` tokens/s at `util` of `cap` each, within the bounds."""
    need = math.ceil(demand / (cap * util)) if demand > 0 else 0
    return _clamp(max(need, floor), floor, k.max_replicas)


def _smooth(prev: float | None, at: float | None, value: float, now: float, tau: float) -> float:
    if prev is None or at is None or tau <= 0:
        return value
    a = 1.0 - math.exp(-max(now - at, 0.0) / tau)
    return prev + a * (value - prev)


def _capacity(s: LoadSignals, k: RateKnobs, prev: float | None) -> float:
    if not k.learn_capacity:
        return k.capacity_tps
    cap = prev if prev is not None else k.capacity_tps
    serving = [i for i in s.instances if i.state == "serving" and i.tokens_per_s > 0]
    saturated = [i.tokens_per_s for i in serving if i.load >= k.saturation or i.waiting > 0]
    if saturated:
        measured = sum(saturated) / len(saturated)
        cap = (1 - k.capacity_alpha) * cap + k.capacity_alpha * measured
    # An instance seen doing X tokens/s can do at least X, saturated or not.
    best = max((i.tokens_per_s for i in serving), default=0.0)
    return max(cap, best)


def _rate_demand(s: LoadSignals, k: RateKnobs, tpr: float) -> float:
    """Generated tokens/s wanted. Arrivals, not served tokens: while a queue drains, served
    tokens/s counts the backlog a second time. Served tokens only stand in when no arrival rate is
    known (long requests still running after arrivals stopped)."""
    served = s.generated_tps if s.arrival_rate == 0 else 0.0
    return max(served, s.arrival_rate * tpr) + s.waiting * tpr / k.backlog_drain_s


def decide_rate(s: LoadSignals, k: RateKnobs, st: RateState) -> tuple[Target | None, RateState]:
    """Instances needed = demand / (capacity × target_util). Up as soon as utilisation passes
    `upper_util`, by as many instances as needed; down once it has stayed under `lower_util` for
    `downscale_delay_s` and fewer instances would do, again all at once.

    Demand (generated tokens/s) = arrival rate × tokens per request + the gateway queue drained
    over `backlog_drain_s`: served tokens under-read demand while requests queue (exactly when
    scaling matters) and over-read it while a queue drains."""
    now, cur = s.now, s.replicas
    last_busy = _last_busy(s, st.last_busy)
    floor, expired = _floor(s, k.min_replicas, k.keep_alive_s, last_busy)
    tpr = st.tokens_per_request or k.tokens_per_request
    if s.tokens_per_request > 0:
        tpr = 0.7 * tpr + 0.3 * s.tokens_per_request
    cap = _capacity(s, k, st.capacity_tps)
    demand = _rate_demand(s, k, tpr)
    need = math.ceil(demand / (cap * k.target_util)) if demand > 0 else 0
    util = demand / (cur * cap) if cur > 0 else (math.inf if demand > 0 else 0.0)
    want = _clamp(max(need, floor), floor, k.max_replicas)
    smooth = _smooth(st.smooth_demand, st.smooth_at, demand, now, k.down_smoothing_s)
    if k.down_smoothing_s > 0:
        down_util = smooth / (cur * cap) if cur > 0 else 0.0
        down_want = _replicas_for(smooth, cap, k.target_util, floor, k)
    else:
        down_util, down_want = util, want
    down_cond = down_util < k.lower_util and down_want < cur
    # A scale (either way) carried out since the timer began restarts it: the demand seen before
    # was measured against other instances, and a second step down waits its own delay.
    down_since = _since(down_cond, st.down_since if st.down_replicas == cur else None, now)
    down_peak = 0
    if down_since is not None:
        down_peak = max(down_want, st.down_peak if st.down_since == down_since else 0)
    new = RateState(
        capacity_tps=cap,
        tokens_per_request=tpr,
        down_since=down_since,
        down_peak=down_peak,
        down_replicas=cur,
        last_busy=last_busy,
        smooth_demand=smooth,
        smooth_at=now,
    )
    figures = {
        "demand_tps": round(demand, 3),
        "capacity_tps": round(cap, 3),
        "tokens_per_request": round(tpr, 3),
        "utilisation": round(util, 4) if math.isfinite(util) else -1.0,
        "needed": float(need),
        "current": float(cur),
    }
    if k.down_smoothing_s > 0:
        figures["smoothed_demand_tps"] = round(smooth, 3)
    if s.decision_in_flight:
        return None, new
    step_cap = cur + k.max_step if k.max_step > 0 else k.max_replicas
    # A scale-up, from zero too, aims lower than target_util when up_target_util says so.
    up_want = _replicas_for(demand, cap, k.up_target_util, floor, k) if k.up_target_util else want
    if cur == 0:
        if s.ongoing == 0:
            return None, new
        target = max(1, min(up_want, step_cap), min(k.activation_scale, k.max_replicas))
        return Target(target, 0, f"scale from zero: demand {demand:.0f} tok/s", figures), new
    if cur > k.max_replicas or cur < floor:
        target = _clamp(cur, floor, k.max_replicas)
        return Target(target, cur, f"bounds: {cur} outside [{floor}, {k.max_replicas}]", figures), new
    if expired and floor == 0:
        return Target(0, cur, f"keep-alive: no requests for {now - last_busy:.0f}s", figures), new
    if k.idle_down_s > 0 and s.ongoing == 0 and cur > floor and now - last_busy >= k.idle_down_s:
        reason = f"idle for {now - last_busy:.1f}s: {floor} kept warm until keep-alive"
        return Target(floor, cur, reason, figures), new
    if util > k.upper_util and want > cur:
        target = min(up_want, step_cap)
        reason = f"utilisation {util:.2f} > {k.upper_util:g}: demand {demand:.0f} tok/s over {cap:.0f} per instance"
        return Target(target, cur, reason, figures), new
    if down_since is not None and now - down_since >= k.downscale_delay_s:
        reason = (
            f"utilisation {down_util:.2f} < {k.lower_util:g} for {now - down_since:.0f}s: "
            f"{down_peak} suffice (the most needed in that time)"
        )
        target = max(down_peak, cur - k.down_step) if k.down_step else down_peak
        return Target(target, cur, reason, figures), new
    return None, new


# --------------------------------------------------------------------------- two-stage


@dataclass(frozen=True, slots=True)
class TwoStageKnobs:
    min_replicas: int = 1
    max_replicas: int = 8
    ttft_slo_ms: float = 1000.0
    tbt_slo_ms: float = 100.0
    base_batch: int = 8  # the batch limit in steady state; raised only to ride a surge
    max_batch: int = 64  # the most a worker can batch (KV cache slots)
    # Utilisation of batch slots: above rho_max (or past the latency SLO) is a surge; instances
    # are planned, and raised limits shrunk, to reach rho_target at base batch. The gap between
    # the two is the hysteresis band that keeps noise from flipping a plan back and forth.
    rho_max: float = 0.85
    rho_target: float = 0.6
    horizontal_delay_s: float = 10.0  # a surge must outlast this before instances are added
    downscale_delay_s: float = 30.0
    shrink_delay_s: float = 3.0  # a raised batch limit comes back down after this long unneeded
    keep_alive_s: float = 60.0
    backlog_drain_s: float = 10.0
    tokens_per_request: float = 64.0  # prior until completions are measured
    prefill_steps: float = 1.0  # a prompt's prefill counted as this many decode steps
    # Prior step-latency model, step_ms(b) = step_ms_base + step_ms_per_seq * b, until fitted.
    step_ms_base: float = 20.0
    step_ms_per_seq: float = 0.5

    def __post_init__(self) -> None:
        _check_bounds(self.min_replicas, self.max_replicas, self.keep_alive_s)
        if not 1 <= self.base_batch <= self.max_batch:
            raise ValueError("need 1 <= base_batch <= max_batch")
        if not 0 < self.rho_target < self.rho_max < 1:
            raise ValueError("need 0 < rho_target < rho_max < 1")
        if self.ttft_slo_ms <= 0 or self.tbt_slo_ms <= 0:
            raise ValueError("SLOs must be > 0")
        if self.step_ms_base < 0 or self.step_ms_per_seq < 0 or self.step_ms_base + self.step_ms_per_seq <= 0:
            raise ValueError("the prior step latency must be positive")


@dataclass(frozen=True, slots=True)
class StepModel:
    """Step latency as a function of batch size: base_ms + per_seq_ms × batch."""

    base_ms: float
    per_seq_ms: float

    def step_ms(self, batch: int) -> float:
        return self.base_ms + self.per_seq_ms * batch


def fit_step_model(samples: Sequence[StepSample], prior: StepModel) -> StepModel:
    """Least squares of step time on batch size, each sample weighted by its step count.

    One distinct batch size cannot give a slope: keep the prior slope and fit the intercept. A fit
    that comes out with a negative slope or intercept (noise, too narrow a range) is not a
    latency model; fall back the same way, so the planner never believes bigger batches are free."""
    pts = [(float(x.batch), x.mean_ms, float(x.steps)) for x in samples if x.steps > 0 and x.batch > 0]
    if not pts:
        return prior
    w = sum(p[2] for p in pts)
    mx = sum(p[0] * p[2] for p in pts) / w
    my = sum(p[1] * p[2] for p in pts) / w
    sxx = sum(p[2] * (p[0] - mx) ** 2 for p in pts)
    if sxx > 0:
        slope = sum(p[2] * (p[0] - mx) * (p[1] - my) for p in pts) / sxx
        base = my - slope * mx
        if slope >= 0 and base >= 0:
            return StepModel(base, slope)
    base = my - prior.per_seq_ms * mx
    if base < 0:
        return StepModel(0.0, my / mx)
    return StepModel(base, prior.per_seq_ms)


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with `servers` servers and offered
    load `offered` = λ/μ (Erlangs). 1 when the queue is unstable."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0  # Erlang B by its recursion: stable for hundreds of servers, unlike the factorial form.
    for i in range(1, servers + 1):
        b = offered * b / (i + offered * b)
    return servers * b / (servers - offered * (1 - b))


@dataclass(frozen=True, slots=True)
class Plan:
    """Predicted behaviour of `instances` at `batch` limit under arrival rate λ."""

    instances: int
    batch: int
    rho: float
    wait_ms: float
    ttft_ms: float
    tbt_ms: float


def predict(
    model: StepModel, instances: int, batch: int, lam: float, tokens_per_request: float, prefill_steps: float
) -> Plan:
    """Queueing model: every batch slot of every instance is one server of an M/M/c queue
    (c = instances × batch), a request holds its slot for (tokens + prefill steps) steps of
    step_ms(batch). TTFT = queueing wait + the prefill steps.

    An approximation, and which way it errs: real slots are not one pool (a request waits at
    the instance the router picked), which makes waits longer than predicted when load is
    uneven; real service times are far less variable than exponential, which makes them
    shorter. The rho bound keeps plans away from the knee of the curve, where both errors grow."""
    step = model.step_ms(batch)
    service_s = (tokens_per_request + prefill_steps) * step / 1000
    c = instances * batch
    offered = lam * service_s
    rho = offered / c if c else math.inf
    if lam <= 0:
        wait = 0.0
    elif rho >= 1:
        wait = math.inf
    else:
        wait = erlang_c(c, offered) / (c / service_s - lam) * 1000
    return Plan(instances, batch, rho, wait, wait + prefill_steps * step, step)


def tbt_bound(model: StepModel, k: TwoStageKnobs) -> int:
    """The largest batch limit whose step time meets the TBT SLO (0: not even batch 1 does)."""
    return max((b for b in range(1, k.max_batch + 1) if model.step_ms(b) <= k.tbt_slo_ms), default=0)


def plan_grid(model: StepModel, k: TwoStageKnobs, lam: float, tpr: float, rho_limit: float) -> list[int | None]:
    """For each instance count n = 0..max_replicas, the smallest batch limit meeting the SLO at
    utilisation <= rho_limit (None: no batch limit does).

    The dynamic programme over (instances, batch limit): more instances never need a larger
    batch, so b*(n) is non-increasing in n. Walking n downward from max_replicas, each row's
    search starts at the previous row's answer, visiting O(max_replicas + max_batch) cells
    instead of the whole grid. A row stops at the largest batch whose step meets the TBT SLO."""
    b_tbt = tbt_bound(model, k)
    best: list[int | None] = [None] * (k.max_replicas + 1)
    b = 1
    for n in range(k.max_replicas, 0, -1):
        while b <= b_tbt:
            p = predict(model, n, b, lam, tpr, k.prefill_steps)
            if p.rho <= rho_limit and p.ttft_ms <= k.ttft_slo_ms:
                best[n] = b
                break
            b += 1
        if best[n] is None:
            break  # fewer instances cannot do better
    return best


@dataclass(frozen=True, slots=True)
class TwoStageState:
    batch_limit: int | None = None  # the limit this policy last set (None: base_batch)
    model: StepModel | None = None
    tokens_per_request: float | None = None
    surge_since: float | None = None
    down_since: float | None = None
    shrink_since: float | None = None
    last_busy: float | None = None


def decide_two_stage(s: LoadSignals, k: TwoStageKnobs, st: TwoStageState) -> tuple[Target | None, TwoStageState]:
    """Stage 1 (vertical, immediate): if the serving instances cannot meet the SLO at the batch
    limit in force, raise the limit to the smallest one that can (up to the TBT bound).
    Stage 2 (horizontal): if the surge outlasts `horizontal_delay_s`, or no batch limit suffices,
    add instances up to the fewest that meet the SLO at `base_batch` and `rho_target`; when they
    serve, the needed limit falls and is shrunk back to base. Scale-down to the same plan once it
    needs fewer instances for `downscale_delay_s`."""
    now, cur = s.now, s.replicas
    last_busy = _last_busy(s, st.last_busy)
    floor, expired = _floor(s, k.min_replicas, k.keep_alive_s, last_busy)
    model = fit_step_model(s.step_samples, st.model or StepModel(k.step_ms_base, k.step_ms_per_seq))
    tpr = st.tokens_per_request or k.tokens_per_request
    if s.tokens_per_request > 0:
        tpr = 0.7 * tpr + 0.3 * s.tokens_per_request
    lam = s.arrival_rate + s.waiting / k.backlog_drain_s
    limit = st.batch_limit if st.batch_limit is not None else k.base_batch

    edge = plan_grid(model, k, lam, tpr, k.rho_max)
    calm = plan_grid(model, k, lam, tpr, k.rho_target)
    n_now = min(s.serving, k.max_replicas)
    need_now = edge[n_now] if n_now > 0 else None  # smallest limit the serving instances need
    # Fewest instances that carry the load calmly at base batch (so a vertical boost can be undone).
    n_plan = next(
        (n for n in range(1, k.max_replicas + 1) if (b := calm[n]) is not None and b <= k.base_batch), k.max_replicas
    )
    surge = n_now > 0 and (need_now is None or need_now > k.base_batch)
    surge_since = _since(surge, st.surge_since, now)

    # ---- vertical ---------------------------------------------------------
    new_limit = limit
    if n_now > 0 and need_now is not None and need_now > limit:
        new_limit = need_now  # immediate: in place, no instance has to move
    elif n_now > 0 and need_now is None:
        new_limit = max(limit, tbt_bound(model, k))  # the most the SLO allows; instances follow
    keep = calm[n_now] if n_now > 0 else None
    shrink_to = max(k.base_batch, keep) if keep is not None else None
    shrink_cond = new_limit == limit and shrink_to is not None and shrink_to < limit
    shrink_since = _since(shrink_cond, st.shrink_since, now)
    if shrink_to is not None and shrink_since is not None and now - shrink_since >= k.shrink_delay_s:
        new_limit = shrink_to
        shrink_since = None

    # ---- horizontal -------------------------------------------------------
    want = _clamp(max(n_plan, floor), floor, k.max_replicas)
    down_cond = not surge and want < cur
    down_since = _since(down_cond, st.down_since, now)

    new = TwoStageState(
        batch_limit=new_limit,
        model=model,
        tokens_per_request=tpr,
        surge_since=surge_since,
        down_since=down_since,
        shrink_since=shrink_since,
        last_busy=last_busy,
    )
    p = predict(model, max(n_now, 1), new_limit, lam, tpr, k.prefill_steps)
    figures = {
        "arrival_rate": round(lam, 4),
        "tokens_per_request": round(tpr, 3),
        "step_ms_base": round(model.base_ms, 4),
        "step_ms_per_seq": round(model.per_seq_ms, 5),
        "serving": float(n_now),
        "current": float(cur),
        "batch_limit": float(new_limit),
        "needed_batch": float(need_now) if need_now is not None else -1.0,
        "planned_instances": float(n_plan),
        "predicted_ttft_ms": round(p.ttft_ms, 2) if math.isfinite(p.ttft_ms) else -1.0,
        "predicted_tbt_ms": round(p.tbt_ms, 3),
        "rho": round(p.rho, 4) if math.isfinite(p.rho) else -1.0,
    }
    vertical = new_limit if new_limit != limit else None
    vreason = (
        f"batch limit {limit} -> {new_limit}" + (" (surge)" if new_limit > limit else " (load carried)")
        if vertical is not None
        else ""
    )

    def out(target: int, reason: str) -> tuple[Target | None, TwoStageState]:
        if target == cur and vertical is None:
            return None, new
        text = "; ".join(r for r in (reason, vreason) if r)
        return Target(target, cur, text, figures, vertical), new

    if s.decision_in_flight:
        return out(cur, "")
    if cur == 0:
        if s.ongoing == 0:
            return out(0, "")
        return out(_clamp(n_plan, 1, k.max_replicas), f"scale from zero: {lam:.2f} req/s")
    if cur > k.max_replicas or cur < floor:
        return out(_clamp(cur, floor, k.max_replicas), f"bounds: {cur} outside [{floor}, {k.max_replicas}]")
    if expired and floor == 0:
        return out(0, f"keep-alive: no requests for {now - last_busy:.0f}s")
    persisted = surge_since is not None and now - surge_since >= k.horizontal_delay_s
    if surge and (persisted or need_now is None) and want > cur:
        held = now - surge_since if surge_since is not None else 0.0
        why = "no batch limit meets the SLO" if need_now is None else f"surge held {held:.0f}s"
        return out(want, f"{why}: {n_plan} instance(s) at batch {k.base_batch} meet the SLO")
    if down_since is not None and now - down_since >= k.downscale_delay_s:
        return out(want, f"{want} instance(s) carry {lam:.2f} req/s at rho <= {k.rho_target:g}")
    return out(cur, "")


# --------------------------------------------------------------------------- manual


@dataclass(frozen=True, slots=True)
class ManualKnobs:
    min_replicas: int = 1
    max_replicas: int = 8

    def __post_init__(self) -> None:
        _check_bounds(self.min_replicas, self.max_replicas, 0.0)


@dataclass(frozen=True, slots=True)
class ManualState:
    pass


def decide_manual(s: LoadSignals, k: ManualKnobs, st: ManualState) -> tuple[Target | None, ManualState]:
    """Never decides: the scaler keeps min_replicas, or the operator's target."""
    return None, st


# --------------------------------------------------------------------------- needs


def _need_floor(s: LoadSignals, min_replicas: int) -> int:
    """A model with requests in the system, or arrivals within the rate window, needs an
    instance; an unused one needs only its min_replicas (keep-alive is a preference that an
    idle pool shortage overrides)."""
    return max(min_replicas, 1 if s.ongoing > 0 or s.arrival_rate > 0 else 0)


def need_concurrency(s: LoadSignals, k: ConcurrencyKnobs, st: ConcurrencyState) -> int:
    return _clamp(math.ceil(s.ongoing / k.target_ongoing_requests), _need_floor(s, k.min_replicas), k.max_replicas)


def need_rate(s: LoadSignals, k: RateKnobs, st: RateState) -> int:
    cap = st.capacity_tps or k.capacity_tps
    demand = _rate_demand(s, k, st.tokens_per_request or k.tokens_per_request)
    need = math.ceil(demand / (cap * k.target_util)) if demand > 0 else 0
    return _clamp(need, _need_floor(s, k.min_replicas), k.max_replicas)


def need_two_stage(s: LoadSignals, k: TwoStageKnobs, st: TwoStageState) -> int:
    floor = _need_floor(s, k.min_replicas)
    if floor == 0:
        return 0
    model = st.model or StepModel(k.step_ms_base, k.step_ms_per_seq)
    tpr = st.tokens_per_request or k.tokens_per_request
    lam = s.arrival_rate + s.waiting / k.backlog_drain_s
    calm = plan_grid(model, k, lam, tpr, k.rho_target)
    n_plan = next(
        (n for n in range(1, k.max_replicas + 1) if (b := calm[n]) is not None and b <= k.base_batch), k.max_replicas
    )
    return _clamp(n_plan, floor, k.max_replicas)


# --------------------------------------------------------------------------- registry


def _no_limit(knobs: Any) -> int | None:
    return None


def _base_batch(knobs: Any) -> int | None:
    return int(knobs.base_batch)


@dataclass(frozen=True, slots=True)
class Policy:
    """A named policy: parses its knobs, makes its initial state, decides. `decide` is the pure
    function of its module-level `decide_*` with a type check on what it is handed.

    `need_fn` says how many instances the load needs now (None: the model never lends instances
    to another); `limit_fn` the batch limit its instances run at before any vertical action (None:
    the policy leaves each worker's own limit alone)."""

    name: str
    knobs_type: type[Any]
    state_type: type[Any]
    fn: Any
    need_fn: Any = None
    limit_fn: Any = _no_limit

    def knobs(self, raw: Mapping[str, float], min_replicas: int, max_replicas: int) -> Any:
        return _parse_knobs(self.knobs_type, self.name, raw, min_replicas, max_replicas)

    def initial_state(self) -> Any:
        return self.state_type()

    def decide(self, signals: LoadSignals, knobs: Any, state: Any) -> tuple[Target | None, Any]:
        if not isinstance(knobs, self.knobs_type) or not isinstance(state, self.state_type):
            raise TypeError(f"policy {self.name} needs {self.knobs_type.__name__} and {self.state_type.__name__}")
        result: tuple[Target | None, Any] = self.fn(signals, knobs, state)
        return result

    def need(self, signals: LoadSignals, knobs: Any, state: Any) -> int | None:
        """Instances the load needs now (state: as `decide` returned it this tick); None when the
        policy never lends instances."""
        return None if self.need_fn is None else int(self.need_fn(signals, knobs, state))

    def base_batch_limit(self, knobs: Any) -> int | None:
        result: int | None = self.limit_fn(knobs)
        return result

    @property
    def vertical(self) -> bool:
        """Whether this policy sets its instances' batch limits."""
        return self.limit_fn is not _no_limit

    def effective_knobs(self, knobs: Any) -> dict[str, float]:
        """Every knob the policy reads, defaults filled in (bounds come from the deployment)."""
        return {
            f.name: float(getattr(knobs, f.name))
            for f in dataclasses.fields(knobs)
            if f.name not in ("min_replicas", "max_replicas")
        }


POLICIES: dict[str, Policy] = {
    "manual": Policy("manual", ManualKnobs, ManualState, decide_manual),
    "concurrency": Policy("concurrency", ConcurrencyKnobs, ConcurrencyState, decide_concurrency, need_concurrency),
    "rate": Policy("rate", RateKnobs, RateState, decide_rate, need_rate),
    "two-stage": Policy("two-stage", TwoStageKnobs, TwoStageState, decide_two_stage, need_two_stage, _base_batch),
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise KnobError(f"unknown scaling policy {name!r}; choose one of {sorted(POLICIES)}") from None


def policy_for(dep: ModelDeployment) -> tuple[Policy, Any]:
    """The policy and parsed knobs a deployment entry asks for (KnobError if it cannot be used)."""
    pol = get_policy(dep.policy)
    return pol, pol.knobs(dep.knobs, dep.min_replicas, dep.max_replicas)
