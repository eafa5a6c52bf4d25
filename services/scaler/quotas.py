"""The scaler's co-scaling loop: the 2-D policy (coscale.py) fed from what the scaler hears, and its
decisions turned into quota orders and replica targets. Pure, like the core that calls it (no I/O,
time passed in).

    cs = CoScaler(deployment.models)
    cs.fold(instance_metrics)                       # as metrics arrive
    plan = cs.tick(shared, instances, loading, in_flight, mono, wall)

Inputs per tick: the serving instances on shared workers (the worker table's heartbeats: which
process each shares and its quota there) and each one's demand, measured from its engine steps.
A slot's demand is the share of its process's compute its steps took in the last metrics interval
(steps of one process run one at a time on its engine thread, so this is a time share), scaled up
by the work waiting behind its batch: offered load, not only what the quota let through, so a
starved instance still shows its pressure. A slot with no recent figure counts as sitting at the
policy's target (nothing moves for it). A model whose p95 latency is r > 1 times its SLO (its
policy's `ttft_slo_ms` / `tbt_slo_ms`, for the two-stage policy) counts each of its slots as at
least `r q high_util` busy, so the quota rises to about r q even when the step times
alone would not ask for it.

Quotas on a worker are relative shares (docs/pipelined-and-shared.md); the policy works in
fractions of a worker that sum to at most 1. Heartbeat quotas are read as `q / max(1, sum)`, and a
process whose quotas sum above 1 (every instance starts at 1.0) gets all its quotas rewritten as
those fractions the first time one of them changes, so that the new fraction means what the
policy meant. A quota asked for counts as in force until a heartbeat shows it or `pending_s` pass;
an order that failed is then decided again by a later tick.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cascade.config import ModelDeployment
from cascade.messages import InstanceMetrics
from services.scaler.coscale import (
    AddInstance,
    CoScaleKnobs,
    CoScaleSignals,
    CoScaleState,
    ModelView,
    QuotaChange,
    RemoveInstance,
    Slot,
    decide_coscale,
)

# Offered load is at most this many times a whole worker: past it the figure says "far too much"
# and a larger one would only slow the release that follows.
MAX_DEMAND = 4.0


@dataclass(frozen=True, slots=True)
class SharedSlot:
    """One serving instance (or stage of one) on a shared worker, as its heartbeats show it."""

    worker: str  # its id in the mesh: where its SetQuota goes
    device: str  # the worker process it shares
    model: str
    instance: str  # the instance it is (part of): itself, or its pipelined group
    quota: float  # as applied on that process (relative to the others there)


@dataclass(frozen=True, slots=True)
class QuotaOrder:
    worker: str
    model: str
    quota: float
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    quotas: tuple[QuotaOrder, ...] = ()
    add: tuple[AddInstance, ...] = ()
    remove: tuple[RemoveInstance, ...] = ()


@dataclass
class CoScaler:
    """Which models co-scale, and what the loop remembers between ticks."""

    models: dict[str, ModelDeployment]
    knobs: CoScaleKnobs = field(default_factory=lambda: CoScaleKnobs(short_past_worker=True))
    stale_s: float = 5.0  # a demand figure counts for this long after its report (wall clock)
    pending_s: float = 5.0  # a quota asked for counts as in force this long unless a heartbeat shows it
    state: CoScaleState = field(default_factory=CoScaleState)
    demand: dict[str, tuple[float, float]] = field(default_factory=dict)  # worker -> (demand, ts)
    pending: dict[str, tuple[float, float]] = field(default_factory=dict)  # worker -> (quota, asked at)
    first_seen: dict[str, float] = field(default_factory=dict)  # instance -> when (mono)
    last_tick: float = 0.0

    @classmethod
    def of(cls, models: Iterable[ModelDeployment], stale_s: float = 5.0) -> CoScaler:
        return cls({m.name: m for m in models if m.coscale}, stale_s=stale_s)

    def add_model(self, m: ModelDeployment) -> None:
        if m.coscale:
            self.models[m.name] = m

    def describe(self) -> dict[str, Any]:
        """For `cascade status`: the co-scaled models, quotas asked for and not shown yet, and how
        long each model had been short of quota (toward an instance) or calm (toward a release) at
        the last tick."""
        mono = self.last_tick
        return {
            "models": sorted(self.models),
            "pending_quotas": {w: q for w, (q, _) in sorted(self.pending.items())},
            "short_for_s": {m: round(mono - t, 1) for m, t in sorted(self.state.pressure_since.items())},
            "calm_for_s": {m: round(mono - t, 1) for m, t in sorted(self.state.calm_since.items())},
        }

    def fold(self, m: InstanceMetrics) -> None:
        busy = sum(s.total_ms for s in m.steps) / 1000.0 / max(m.interval_s, 1e-3)
        if m.waiting > 0:
            busy *= (m.running + m.waiting) / max(m.running, 1)
        self.demand[m.worker_id] = (min(busy, MAX_DEMAND), m.ts)

    def governed(self, shared: Iterable[SharedSlot]) -> set[str]:
        """Co-scaled models with an instance on a shared worker: their instance counts are this
        loop's, not their policy's."""
        return {s.model for s in shared if s.model in self.models}

    def tick(
        self,
        shared: Collection[SharedSlot],
        instances: Mapping[str, Collection[str]],
        loading: Mapping[str, int],
        in_flight: Collection[str],
        mono: float,
        wall: float,
        slo_ratio: Mapping[str, float] | None = None,
    ) -> Plan:
        self.last_tick = mono
        models = self.governed(shared)
        devices = {s.device for s in shared if s.model in models}
        slots = [s for s in shared if s.device in devices]
        for inst in {i for m in models for i in instances.get(m, ())}:
            self.first_seen.setdefault(inst, mono)
        live = {i for m in instances.values() for i in m}
        self.first_seen = {i: t for i, t in self.first_seen.items() if i in live}
        if not models:
            self.pending.clear()
            return Plan()

        # The quota each slot has (an order not shown by a heartbeat yet counts as applied).
        raw: dict[str, float] = {}
        for s in slots:
            p = self.pending.get(s.worker)
            if p is not None and (abs(p[0] - s.quota) < 1e-6 or mono - p[1] >= self.pending_s):
                del self.pending[s.worker]
                p = None
            raw[s.worker] = p[0] if p is not None else s.quota
        total: dict[str, float] = {}
        for s in slots:
            total[s.device] = total.get(s.device, 0.0) + raw[s.worker]
        frac = {s.worker: raw[s.worker] / max(1.0, total[s.device]) for s in slots}

        k = self.knobs
        by_key: dict[tuple[str, str], SharedSlot] = {}
        views: list[Slot] = []
        for s in slots:
            d = self.demand.get(s.worker)
            q = frac[s.worker]
            demand = d[0] if d is not None and wall - d[1] <= self.stale_s else q * k.target_util
            # A model past its latency SLO is at risk whatever its step time says: at quota q a
            # slot runs about 1/q as fast as alone, so its latency r times the SLO asks for about r q.
            r = (slo_ratio or {}).get(s.model, 0.0)
            if r > 1.0:
                demand = max(demand, q * r * k.high_util)
            by_key[(s.instance, s.device)] = s
            views.append(Slot(s.model, s.instance, s.device, q, demand))
        model_views = []
        for name in sorted(models):
            dep = self.models[name]
            mine = sorted(instances.get(name, ()), key=lambda i: (self.first_seen.get(i, mono), i))
            planned = dep.min_replicas
            model_views.append(
                ModelView(
                    name=name,
                    planned=planned,
                    instances=tuple(mine),
                    loading=loading.get(name, 0) + (1 if name in in_flight else 0),
                    added=tuple(mine[planned:]),
                    max_instances=dep.max_replicas,
                )
            )
        decisions, self.state = decide_coscale(CoScaleSignals(mono, tuple(views), tuple(model_views)), k, self.state)

        orders: dict[str, QuotaOrder] = {}
        for c in decisions:
            if isinstance(c, QuotaChange):
                s = by_key[(c.instance, c.worker)]
                orders[s.worker] = QuotaOrder(s.worker, s.model, c.quota, c.reason)
        # A process whose quotas are not fractions yet: the others' fractions are written too.
        for dev in {x.device for x in slots if x.worker in orders}:
            if total[dev] > 1.0 + 1e-6:
                for s in slots:
                    if s.device == dev and s.worker not in orders:
                        q = round(frac[s.worker], 4)
                        orders[s.worker] = QuotaOrder(s.worker, s.model, q, "quotas as fractions of the worker")
        for o in orders.values():
            self.pending[o.worker] = (o.quota, mono)
        return Plan(
            quotas=tuple(orders[w] for w in sorted(orders)),
            add=tuple(d for d in decisions if isinstance(d, AddInstance)),
            remove=tuple(d for d in decisions if isinstance(d, RemoveInstance)),
        )
