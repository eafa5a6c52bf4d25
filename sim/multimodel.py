"""Many models on one pool, estimated request by request: the scorer of `cascade.placement` and
the engine of `cascade bench multimodel`.

The mesh simulator (sim/mesh.py) runs one model's instances token by token with the services'
own batcher, router and scaler; it has no notion of a group of workers holding stages of several
models, nor of compute quotas. This is the smaller estimate AlpaServe scores its placements with,
priced by the same device profiles (`ModelSpec.stage_seconds`):

- a request is one job per stage: stage i of its instance is busy `stage_seconds[i]` (its layers'
  prefill and decode passes at batch 1, step overheads, the head on the last stage), stage i+1
  starts when stage i ends and its worker is free, plus one link hop per pass;
- *shared* mode (a group's workers are shared by every model it holds, AlpaServe): each worker
  is one FIFO server; a request goes to the instance that would finish it first, its slots
  reserved at dispatch in arrival order (no backfilling into earlier gaps: pessimistic under
  load), and it is rejected at once — an SLO miss — when even that instance would finish late;
- *quota* mode (Dilu): each instance's stage on a worker is its own FIFO server running at its
  compute quota (a fraction of the worker) plus, as of dispatch, the quota of co-located
  instances with nothing queued and the worker's unallocated compute (a quota is a guarantee,
  not a cap); the 2-D co-scaling policy (`services.scaler.coscale`) moves quotas and adds or
  removes instances every tick on the discrete-event core (`sim.engine.Sim`). A quota change
  applies to jobs dispatched after it. Compute a job runs on beyond allocated quota is counted
  as borrowed, not as allocated.

No batching (every system alike): the figures compare placements, not absolute throughput.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cascade.placement import Group, ModelSpec, PoolSpec, Workload
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
from sim.engine import Sim


class Req(NamedTuple):
    t: float
    model: str


# --------------------------------------------------------------------------- workloads


def gamma_arrivals(rates: Mapping[str, float], duration_s: float, cv: float, seed: int = 0) -> list[Req]:
    """Each model's requests a gamma renewal process of its rate and CV `cv`, merged in time."""
    out: list[Req] = []
    shape = 1 / (cv * cv)
    for i, (name, rate) in enumerate(sorted(rates.items())):
        if rate <= 0:
            continue
        rng = random.Random(seed * 1000 + i)
        t = rng.uniform(0, 1 / rate)  # a random phase, so models do not all start together
        while t < duration_s:
            out.append(Req(t, name))
            t += rng.gammavariate(shape, 1 / (rate * shape))
    out.sort()
    return out


def zipf_rates(names: Sequence[str], total: float, s: float = 1.0) -> dict[str, float]:
    """`total` req/s over `names`, the i-th with weight 1 / (i + 1)^s."""
    w = [1 / (i + 1) ** s for i in range(len(names))]
    tot = sum(w)
    return {n: total * x / tot for n, x in zip(names, w, strict=True)}


def workload_arrivals(w: Workload) -> list[Req]:
    return gamma_arrivals(w.rates, w.duration_s, w.cv, w.seed)


def assign_models(times: Sequence[float], rates: Mapping[str, float], seed: int = 0) -> list[Req]:
    """Trace timestamps, each request to a model drawn by the models' rate shares."""
    rng = random.Random(seed)
    names = sorted(rates)
    cum, acc = [], 0.0
    for n in names:
        acc += rates[n]
        cum.append(acc)
    return [Req(t, names[min(len(names) - 1, bisect.bisect_left(cum, rng.random() * acc))]) for t in times]


# --------------------------------------------------------------------------- shared mode


@dataclass(slots=True)
class Stats:
    requests: int = 0
    met: int = 0
    rejected: int = 0
    norm_latency: float = 0.0  # sum of latency / SLO over admitted requests (1.0 per rejected one)
    busy_s: float = 0.0  # worker-seconds of allocated compute the admitted requests used
    borrowed_s: float = 0.0  # quota mode: worker-seconds run on unallocated compute beyond a quota
    allocated_s: float = 0.0  # worker-seconds allocated to instances (whole workers in shared mode)
    span_s: float = 0.0
    per_model: dict[str, list[int]] = field(default_factory=dict)  # name -> [requests, met]
    events: list[dict[str, Any]] = field(default_factory=list)  # quota mode: decisions applied

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 1.0

    @property
    def idle_allocated_s(self) -> float:
        return max(0.0, self.allocated_s - self.busy_s)

    def key(self) -> tuple[float, float]:
        return self.attainment, -(self.norm_latency / self.requests if self.requests else 0.0)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "attainment": self.attainment,
            "rejected": self.rejected,
            "busy_worker_s": self.busy_s,
            "borrowed_worker_s": self.borrowed_s,
            "allocated_worker_s": self.allocated_s,
            "idle_allocated_worker_s": self.idle_allocated_s,
            "idle_allocated_fraction": self.idle_allocated_s / self.allocated_s if self.allocated_s else 0.0,
            "span_s": self.span_s,
            "per_model_attainment": {k: (v[1] / v[0] if v[0] else 1.0) for k, v in sorted(self.per_model.items())},
        }


def _count(st: Stats, model: str, met: bool) -> None:
    row = st.per_model.setdefault(model, [0, 0])
    row[0] += 1
    st.requests += 1
    if met:
        row[1] += 1
        st.met += 1


def simulate_shared(
    groups: Sequence[Group], models: Mapping[str, ModelSpec], pool: PoolSpec, arrivals: Sequence[Req]
) -> Stats:
    """Shared mode (module docstring): every worker in a group a FIFO server for all its models."""
    holders: dict[str, list[tuple[tuple[int, ...], list[float]]]] = {}
    for g in groups:
        for name in g.models:
            m = models[name]
            holders.setdefault(name, []).append((g.workers, m.stage_seconds(g.stages)))
    free = [0.0] * pool.workers
    st = Stats()
    for t0, name in arrivals:
        m = models[name]
        hop = max(1, m.output_tokens) * pool.hop_s
        best, pick = math.inf, None
        for inst in holders.get(name, ()):
            t = t0 - hop
            for w, s in zip(inst[0], inst[1], strict=True):
                t = max(t + hop, free[w]) + s
            if t < best:
                best, pick = t, inst
        lat = best - t0
        if pick is None or lat > m.slo_s:
            st.rejected += 1
            st.norm_latency += 1.0
            _count(st, name, False)
            continue
        t = t0 - hop
        for w, s in zip(pick[0], pick[1], strict=True):
            t = max(t + hop, free[w]) + s
            free[w] = t
            st.busy_s += s
        st.norm_latency += lat / m.slo_s
        _count(st, name, True)
    st.span_s = arrivals[-1].t if arrivals else 0.0
    st.allocated_s = pool.workers * st.span_s
    return st


def scorer(models: Mapping[str, ModelSpec], pool: PoolSpec, arrivals: Sequence[Req]) -> Any:
    """The placer's score: shared-mode attainment on `arrivals`, mean latency / SLO to break ties."""

    def score(groups: Sequence[Group]) -> tuple[float, float]:
        return simulate_shared(groups, models, pool, arrivals).key()

    return score


# --------------------------------------------------------------------------- quota mode


@dataclass(slots=True)
class _Inst:
    id: str
    model: str
    workers: tuple[int, ...]
    stage_s: list[float]
    quota: list[float]
    free: list[float]
    ready_at: float
    added: bool = False
    removed: bool = False
    speed: list[float] = field(default_factory=list)  # per stage: the speed its last job was given


@dataclass(frozen=True, slots=True)
class QuotaRun:
    """The co-scaled run's knobs: policy tick and the window its demand is measured over, and how
    long an added instance takes to load (fixed setup plus its bytes at `load_gb_s`)."""

    knobs: CoScaleKnobs = field(default_factory=CoScaleKnobs)
    tick_s: float = 0.5
    window_s: float = 2.0
    load_setup_s: float = 1.0
    load_gb_s: float = 10.0
    # Whether a stage may also run on its worker's unallocated compute (a quota as a guarantee
    # with a limit above it) or only on its own and co-located idle quota (a quota as a cap).
    borrow_unallocated: bool = True
    # A slot's quota floor is this many times the quota at which one request alone just meets
    # its SLO (0: no floor, quotas follow demand alone).
    slo_margin: float = 1.0


def initial_quotas(
    groups: Sequence[Group],
    models: Mapping[str, ModelSpec],
    rates: Mapping[str, float],
    k: CoScaleKnobs,
    slo_margin: float = 0.0,
) -> dict[tuple[int, str], list[float]]:
    """(group index, model) -> quota per stage: each slot's expected demand / target_util (the
    model's rate split evenly over the groups holding it), scaled down where a worker's sum
    would pass 1."""
    holders = {name: sum(1 for g in groups if name in g.models) for name in models}
    out: dict[tuple[int, str], list[float]] = {}
    for gi, g in enumerate(groups):
        for name in g.models:
            r = rates.get(name, 0.0) / max(1, holders[name])
            stages = models[name].stage_seconds(g.stages)
            floor = slo_margin * sum(stages) / models[name].slo_s
            out[(gi, name)] = [min(1.0, max(k.min_quota, floor, r * s / k.target_util)) for s in stages]
        for stage in range(g.stages):
            tot = sum(out[(gi, n)][stage] for n in g.models)
            if tot > 1.0:
                for n in g.models:
                    out[(gi, n)][stage] /= tot
    return out


def simulate_quota(
    groups: Sequence[Group],
    models: Mapping[str, ModelSpec],
    pool: PoolSpec,
    arrivals: Sequence[Req],
    rates: Mapping[str, float],
    run: QuotaRun = QuotaRun(),
) -> Stats:
    """Quota mode (module docstring): the placement's instances, each stage at its own quota,
    co-scaled in two dimensions by `decide_coscale` every `run.tick_s`."""
    sim = Sim()
    k = run.knobs
    st = Stats()
    insts: list[_Inst] = []
    group_models: list[list[str]] = [list(g.models) for g in groups]
    planned = {name: sum(1 for g in groups if name in g.models) for name in models}
    q0 = initial_quotas(groups, models, rates, k, run.slo_margin)
    for gi, g in enumerate(groups):
        for name in g.models:
            insts.append(
                _Inst(
                    f"{name}@g{gi}",
                    name,
                    g.workers,
                    models[name].stage_seconds(g.stages),
                    q0[(gi, name)],
                    [0.0] * g.stages,
                    0.0,
                )
            )
    alloc = {"total": sum(sum(i.quota) for i in insts), "since": 0.0}
    recent: dict[str, list[float]] = {name: [] for name in models}
    state = CoScaleState()
    seq = [0]

    def account() -> None:
        st.allocated_s += alloc["total"] * (sim.now - alloc["since"])
        alloc["since"] = sim.now

    wq = [0.0] * pool.workers  # each worker's allocated quota
    for i in insts:
        for s, w in enumerate(i.workers):
            wq[w] += i.quota[s]

    def set_q(inst: _Inst, stage: int, q: float) -> None:
        account()
        alloc["total"] += q - inst.quota[stage]
        wq[inst.workers[stage]] += q - inst.quota[stage]
        inst.quota[stage] = q

    def speed(inst: _Inst, stage: int, w: int, at: float) -> tuple[float, float]:
        """(speed, of which allocated) for a job on `inst`'s stage starting at `at`: at least its
        quota; beyond it, what the worker's other slots with work are not using — their quota
        when they are idle (Dilu lends idle quota) and, unless quotas are caps, the worker's
        unallocated compute. Compute already given to running jobs is not given twice."""
        q = inst.quota[stage]
        others_use = 0.0  # speed of the jobs other slots on this worker hold now
        others_q = 0.0
        for j in insts:
            if j is inst:
                continue
            for s2, x in enumerate(j.workers):
                if x == w:
                    others_q += j.quota[s2]
                    if j.free[s2] > at and j.speed:
                        others_use += j.speed[s2]
        spare = 1.0 - others_use
        if not run.borrow_unallocated:
            spare = min(spare, q + others_q - others_use)  # the allocated compute no one is using
        v = min(1.0, max(q, spare))
        # What of it is allocated compute: the worker's allocation not in use by the others.
        own = min(v, max(q, q + others_q - others_use))
        return v, own

    def arrive(r: Req) -> None:
        m = models[r.model]
        recent[r.model].append(r.t)
        hop = max(1, m.output_tokens) * pool.hop_s
        best, pick = math.inf, None
        for inst in insts:
            if inst.model != r.model or inst.removed or inst.ready_at > r.t:
                continue
            t = r.t - hop
            for s, w in enumerate(inst.workers):
                start = max(t + hop, inst.free[s])
                t = start + inst.stage_s[s] / speed(inst, s, w, start)[0]
            if t < best:
                best, pick = t, inst
        lat = best - r.t
        if pick is None or lat > m.slo_s:
            st.rejected += 1
            st.norm_latency += 1.0
            _count(st, r.model, False)
            return
        t = r.t - hop
        for s, w in enumerate(pick.workers):
            start = max(t + hop, pick.free[s])
            v, own = speed(pick, s, w, start)
            t = start + pick.stage_s[s] / v
            pick.free[s] = t
            if not pick.speed:
                pick.speed = [0.0] * len(pick.workers)
            pick.speed[s] = v
            # Only the part run on allocated quota (its own or lent) is allocated compute put to
            # use; the rest came from the worker's unallocated share.
            st.busy_s += pick.stage_s[s] * own / v
            st.borrowed_s += pick.stage_s[s] * (1 - own / v)
        st.norm_latency += lat / m.slo_s
        _count(st, r.model, True)

    def signals() -> CoScaleSignals:
        now = sim.now
        slots: list[Slot] = []
        views: list[ModelView] = []
        for name in models:
            ts = recent[name]
            while ts and ts[0] < now - run.window_s:
                ts.pop(0)
            rate = len(ts) / run.window_s
            mine = [i for i in insts if i.model == name and not i.removed]
            ready = [i for i in mine if i.ready_at <= now]
            caps = {i.id: min(q / s for q, s in zip(i.quota, i.stage_s, strict=True)) for i in ready}
            tot = sum(caps.values()) or 1.0
            for i in mine:
                for s, w in enumerate(i.workers):
                    if i.ready_at > now:
                        # A loading instance holds its quota but has no demand yet: shown at its
                        # target so the policy neither lends nor shrinks it.
                        d = i.quota[s] * k.target_util
                    else:
                        d = rate * caps[i.id] / tot * i.stage_s[s]
                    # A request alone at quota q takes about sum(stage_s) / q: keep it within
                    # the SLO with `slo_margin` to spare for queueing.
                    floor = min(1.0, run.slo_margin * sum(i.stage_s) / models[name].slo_s)
                    slots.append(Slot(name, i.id, f"w{w}", i.quota[s], d, floor))
            views.append(
                ModelView(
                    name=name,
                    planned=planned[name],
                    instances=tuple(i.id for i in ready),
                    loading=sum(1 for i in mine if i.ready_at > now),
                    added=tuple(i.id for i in mine if i.added),
                    max_instances=len(groups),
                )
            )
        return CoScaleSignals(now=now, slots=tuple(slots), models=tuple(views))

    def add_instance(name: str) -> bool:
        m = models[name]
        best: tuple[float, int] | None = None
        for gi, g in enumerate(groups):
            if name in group_models[gi]:
                continue
            used = [0] * g.stages
            for n in (*group_models[gi], name):
                for s, nb in enumerate(models[n].stage_bytes(g.stages)):
                    used[s] += nb
            if max(used) > pool.memory_bytes:
                continue
            room = min(1.0 - wq[w] for w in g.workers)
            if room >= 2 * k.min_quota and (best is None or room > best[0]):
                best = (room, gi)
        if best is None:
            return False
        room, gi = best
        g = groups[gi]
        seq[0] += 1
        load = run.load_setup_s + m.nbytes / (run.load_gb_s * 1e9)
        inst = _Inst(
            f"{name}@g{gi}+{seq[0]}",
            name,
            g.workers,
            m.stage_seconds(g.stages),
            [0.0] * g.stages,
            [sim.now + load] * g.stages,
            sim.now + load,
            added=True,
        )
        insts.append(inst)
        group_models[gi].append(name)
        for s in range(g.stages):
            set_q(inst, s, min(room, 0.5))
        return True

    def drop(inst: _Inst) -> None:
        for s in range(len(inst.workers)):
            set_q(inst, s, 0.0)
        insts.remove(inst)
        for gi, g in enumerate(groups):
            if g.workers == inst.workers and inst.model in group_models[gi]:
                group_models[gi].remove(inst.model)
                break

    def tick() -> None:
        nonlocal state
        decisions, state = decide_coscale(signals(), k, state)
        byid = {i.id: i for i in insts}
        for d in decisions:
            if isinstance(d, QuotaChange):
                inst = byid.get(d.instance)
                if inst is not None:
                    w = int(d.worker[1:])
                    for s, x in enumerate(inst.workers):
                        if x == w:
                            set_q(inst, s, d.quota)
            elif isinstance(d, AddInstance):
                ok = add_instance(d.model)
                st.events.append({"t": round(sim.now, 2), "add": d.model, "placed": ok})
            elif isinstance(d, RemoveInstance):
                inst = byid.get(d.instance)
                if inst is not None and not inst.removed:
                    inst.removed = True
                    st.events.append({"t": round(sim.now, 2), "remove": d.instance})
                    sim.at(max(inst.free), drop, inst)
        if sim.now < end:
            sim.after(run.tick_s, tick)

    end = arrivals[-1].t if arrivals else 0.0
    for r in arrivals:
        sim.at(r.t, arrive, r)
    sim.after(run.tick_s, tick)
    sim.run(until=end)
    account()
    st.span_s = end
    return st
