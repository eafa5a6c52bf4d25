"""2-D co-scaling (Dilu, Themis): compute quotas first, instances second; released the other way.

    decisions, state = decide_coscale(signals, knobs, state)

The shape of the two-stage policy (policies.decide_two_stage): a pure function of a snapshot and
a frozen state, time only as `signals.now`, decisions out. Here the fast dimension is a
*compute quota* — the share of a worker's compute one instance's stage may use — instead of a
batch limit, and the slow one is instances:

1. **Quota up, at once.** A slot (one instance's stage on one worker) whose demand would run it
   above `high_util` of its quota gets the quota `demand / target_util`, from the worker's free
   compute first, then from co-located slots of other models that have slack (quota above their
   own `demand / target_util`, never below `min_quota`). On a worker whose slots together need
   more than all of it, each slot's claim is its share in proportion to need instead.
2. **Instances, if the pressure lasts.** When a model's slots still cannot get the quota they
   need for `horizontal_delay_s`, `AddInstance` (one at a time: none while one is loading).
3. **Release, in the opposite order.** An instance added above the model's planned count is
   removed first, once the rest carry the demand at `target_util` for `release_delay_s`; only then
   does a quota shrink, to what the highest demand of its last `release_delay_s` needs, when that
   is at least `release_band` below it. The window's peak is the hysteresis (a quota that follows
   it cannot be raised again by the noise it has seen); a wide band on top of it (the earlier
   rule: shrink only when the peak ran the quota below `low_util` = 0.6) kept every quota at the
   highest peak of the run, sized for a burst long gone.

`demand` is what a slot would use of a whole worker: compute-seconds per second at full speed
(a slot running at quota q is `demand / q` busy). The adapter measures it from offered load, not
from what was admitted, so a starved model still shows its pressure. A slot's need is
`demand / target_util`, never below `min_quota` nor its `floor`: the quota at which one request
alone still meets its latency SLO (Dilu sizes quotas for the SLO, not only for throughput).

A slot *alone* on its worker needs only that floor. A quota is a guarantee under contention, not a
cap (the worker's stride scheduler lends every unused share to whoever has work), so with no
co-located slot nothing can take compute from it and it runs on the whole worker at any quota;
a quota sized for its demand would only be allocated compute no one else may be guaranteed (an
instance added there would find less free). It is never short of quota (unless, with
`short_past_worker`, its demand needs more than the whole worker); once another slot shares its
worker, its demand runs it above `high_util` of the floor and the next tick raises it (from the
free compute, then from the newcomer's slack) like any hot slot.

Decisions are typed (`QuotaChange`, `AddInstance`, `RemoveInstance`); the adapter turns them into
worker quota messages and loader orders, and chooses where an added instance goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cascade.config import ConfigError


@dataclass(frozen=True, slots=True)
class Slot:
    """One stage of one instance on one worker: its quota in (0, 1] and its demand. `floor` is
    the least quota at which one request still meets its latency SLO on this instance (a stage
    at quota q runs about 1/q times slower under contention), so a quota never follows a light
    load below what a single request needs."""

    model: str
    instance: str
    worker: str
    quota: float
    demand: float
    floor: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelView:
    """A model's instances: `planned` is its floor (the placement's count); `loading` counts
    instances asked for and not serving yet; `added` lists, oldest first, those above the plan."""

    name: str
    planned: int
    instances: tuple[str, ...]
    loading: int = 0
    added: tuple[str, ...] = ()
    max_instances: int = 8


@dataclass(frozen=True, slots=True)
class CoScaleSignals:
    now: float
    slots: tuple[Slot, ...]
    models: tuple[ModelView, ...]


@dataclass(frozen=True, slots=True)
class CoScaleKnobs:
    target_util: float = 0.6  # a slot's demand / quota after a change
    high_util: float = 0.8  # above this a slot is at risk: raise its quota now
    # A quota shrinks (after release_delay_s) when the window's peak demand needs this fraction of
    # it less or more: a band against orders for noise, not a reserve (the peak is the reserve).
    release_band: float = 0.05
    min_quota: float = 0.05
    horizontal_delay_s: float = 3.0
    release_delay_s: float = 10.0
    # Count a slot short when its demand needs more than a whole worker (the scaler's setting; the
    # multimodel simulator's recorded runs were made without it).
    short_past_worker: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.target_util < self.high_util <= 1:
            raise ConfigError("co-scaling needs 0 < target_util < high_util <= 1")
        if not 0 <= self.release_band < 1:
            raise ConfigError("release_band must be in [0, 1)")
        if not 0 < self.min_quota <= 1:
            raise ConfigError("min_quota must be in (0, 1]")
        if self.horizontal_delay_s < 0 or self.release_delay_s < 0:
            raise ConfigError("delays must be >= 0")


@dataclass(frozen=True, slots=True)
class CoScaleState:
    pressure_since: dict[str, float] = field(default_factory=dict)  # model -> first tick short of quota
    calm_since: dict[str, float] = field(default_factory=dict)  # model -> first tick it could release
    # (instance, worker) -> (the highest demand seen since `at`, at): a quota shrinks to what that
    # peak needs, so it follows the load down no faster than `release_delay_s`.
    peak: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QuotaChange:
    model: str
    instance: str
    worker: str
    quota: float
    reason: str


@dataclass(frozen=True, slots=True)
class AddInstance:
    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class RemoveInstance:
    model: str
    instance: str
    reason: str


Decision = QuotaChange | AddInstance | RemoveInstance


def _need(s: Slot, k: CoScaleKnobs, alone: bool = False) -> float:
    """The quota a slot must be guaranteed: its demand at target_util, its SLO floor and
    min_quota; alone on its worker, only the floor and min_quota (module docstring)."""
    if alone:
        return min(1.0, max(k.min_quota, s.floor))
    return min(1.0, max(k.min_quota, s.floor, s.demand / k.target_util))


def decide_coscale(s: CoScaleSignals, k: CoScaleKnobs, st: CoScaleState) -> tuple[list[Decision], CoScaleState]:
    quota = {(x.instance, x.worker): x.quota for x in s.slots}
    by_worker: dict[str, list[Slot]] = {}
    for x in s.slots:
        by_worker.setdefault(x.worker, []).append(x)
    free = {w: max(0.0, 1.0 - sum(x.quota for x in xs)) for w, xs in by_worker.items()}
    alone = {w for w, xs in by_worker.items() if len(xs) == 1}
    out: list[Decision] = []
    changed: dict[tuple[str, str], float] = {}

    def set_quota(x: Slot, q: float, why: str) -> None:
        key = (x.instance, x.worker)
        free[x.worker] += quota[key] - q
        quota[key] = q
        changed[key] = q
        out.append(QuotaChange(x.model, x.instance, x.worker, round(q, 4), why))

    # ---- 1. quota up (the most loaded slots first)
    # A worker whose slots need more than all of it shares it in proportion to need: a slot keeps
    # (and may be raised to) only its fair share there, so the first hot slot cannot starve the rest.
    need_sum = {w: sum(_need(x, k, w in alone) for x in xs) for w, xs in by_worker.items()}

    def keep(d: Slot) -> float:
        n = _need(d, k, d.worker in alone)
        return n if need_sum[d.worker] <= 1.0 else n / need_sum[d.worker]

    short: set[str] = set()
    hot = sorted((x for x in s.slots if x.demand > k.high_util * x.quota), key=lambda x: -x.demand / x.quota)
    for x in hot:
        lone = x.worker in alone
        want = keep(x)
        have = quota[(x.instance, x.worker)]
        gap = want - have - free[x.worker]
        if gap > 1e-9:
            donors = [
                d for d in by_worker[x.worker] if d.model != x.model and quota[(d.instance, d.worker)] > keep(d) + 1e-9
            ]
            for d in sorted(donors, key=lambda d: keep(d) - quota[(d.instance, d.worker)]):
                give = min(gap, quota[(d.instance, d.worker)] - keep(d))
                set_quota(d, quota[(d.instance, d.worker)] - give, f"lends {give:.2f} to {x.model}")
                gap -= give
                if gap <= 1e-9:
                    break
        q = min(want, have + free[x.worker])
        if q > have + 1e-9:
            set_quota(x, q, f"demand {x.demand:.2f} at util {x.demand / have:.2f} > {k.high_util:g}")
        # With `short_past_worker`, a slot that needs more than all of its worker is short too
        # (else a model holding a whole worker never asks for another instance). A slot alone
        # runs on its whole worker whatever its quota, so that is the compute it has.
        has = 1.0 if lone else q
        full = _need(x, k)
        if has < (max(full, x.demand / k.target_util) if k.short_past_worker else full) - 1e-9:
            short.add(x.model)

    # ---- 2. instances if the pressure lasts; 3. release in the opposite order
    # Each slot's highest demand over a window of release_delay_s: a window that is complete
    # (`done`) may shrink the quota; then a new one starts.
    peak: dict[tuple[str, str], tuple[float, float]] = {}
    done: dict[tuple[str, str], float] = {}
    for x in s.slots:
        key = (x.instance, x.worker)
        p, at = st.peak.get(key, (x.demand, s.now))
        p = max(p, x.demand)
        if s.now - at >= k.release_delay_s:
            done[key] = p
            peak[key] = (x.demand, s.now)
        else:
            peak[key] = (p, at)
    pressure = dict(st.pressure_since)
    calm = dict(st.calm_since)
    for mv in s.models:
        mine = [x for x in s.slots if x.model == mv.name]
        if mv.name in short:
            since = pressure.setdefault(mv.name, s.now)
            calm.pop(mv.name, None)
            n = len(mv.instances) + mv.loading
            if s.now - since >= k.horizontal_delay_s and mv.loading == 0 and n < mv.max_instances:
                out.append(AddInstance(mv.name, f"quota short for {s.now - since:.0f}s on {n} instance(s)"))
                pressure[mv.name] = s.now  # the next one only if this one does not relieve it
            continue
        pressure.pop(mv.name, None)
        removable = _removable(mv, mine, k, alone)
        if removable:
            since = calm.setdefault(mv.name, s.now)
            if s.now - since >= k.release_delay_s:
                out.append(RemoveInstance(mv.name, removable, "the other instances carry the demand"))
                calm.pop(mv.name, None)
            continue
        calm.pop(mv.name, None)
        for x in mine:
            key = (x.instance, x.worker)
            held = done.get(key)
            q = quota[key]
            if held is None or key in changed:
                continue
            new_q = _need(Slot(x.model, x.instance, x.worker, q, held, x.floor), k, x.worker in alone)
            if new_q < q * (1 - k.release_band) - 1e-9:
                why = "alone on its worker: its SLO floor" if x.worker in alone else f"needs {new_q:.2f}"
                set_quota(x, new_q, f"peak demand {held:.2f} in {k.release_delay_s:g}s; {why}")
    return out, CoScaleState(pressure_since=pressure, calm_since=calm, peak=peak)


def _removable(mv: ModelView, mine: Sequence[Slot], k: CoScaleKnobs, alone: set[str]) -> str:
    """The newest added instance, if the model's other instances' quotas carry its whole demand
    at target_util (summed over stages as the slowest stage would see it); else ''. A slot alone
    on its worker carries as much as the whole worker, whatever its quota."""
    if not mv.added or mv.loading:
        return ""
    victim = mv.added[-1]
    rest = [x for x in mine if x.instance != victim]
    if not rest:
        return ""
    total = sum(x.demand for x in mine)
    cap = sum(1.0 if x.worker in alone else x.quota for x in rest) * k.target_util
    return victim if total <= cap * 0.9 else ""
