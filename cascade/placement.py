"""Placing many models on one pool of workers (AlpaServe's greedy placement, docs/placement.md).

    plan = place(models, pool, score)

The pool is cut into groups of equal size g; a model placed in a group is served there as one
pipelined instance of S = g stages (contiguous layer ranges, one per worker of the group), and
every model a group holds shares the group's workers. For each candidate g the placer starts from
empty groups and repeatedly adds the (model, group) pair that most raises the score — simulated
SLO attainment on the workload, with a tie-break on latency — while the group's memory allows
and the score still rises; the best plan over all g wins. `max_models_per_group=1, group_sizes
=(1,)` is AlpaServe's "selective replication" baseline (whole models, one per worker, replicas by
popularity).

Pure arithmetic: the score is a function the caller passes (the simulator's `sim.multimodel`
in `cascade place` and the benchmark), so this module needs neither the simulator nor a clock.
The cost of a request's stages comes from the device profile (`DeviceProfile.layer_step_ms`,
the engine's own pricing), so the placer, the simulator and an emulated worker agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cascade.config import ConfigError
from cascade.device_profile import PROFILES_DIR, DeviceProfile, load_profile

PLAN_FORMAT = "cascade-placement-plan"
PLAN_VERSION = 1
GB = 1e9
# The least starting quota a plan gives a model on a shared worker (a fraction of the worker).
MIN_QUOTA = 0.05


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model to place: the profile that prices its layers, how many of the profile's layers
    it has (a model of another size on the same device: its layers scale the cost and the
    bytes), its request shape and its latency SLO."""

    name: str
    profile: DeviceProfile
    layers: int
    bytes_per_layer: int
    bytes_embedding: int
    bytes_head: int
    slo_s: float
    prompt_tokens: int = 128
    output_tokens: int = 16

    @property
    def nbytes(self) -> int:
        return self.bytes_embedding + self.layers * self.bytes_per_layer + self.bytes_head

    def split(self, stages: int) -> list[tuple[int, int]]:
        """Contiguous layer ranges for `stages` stages, as even as the count allows (the first
        stages take the remainder: the last one also runs the head)."""
        if not 1 <= stages <= self.layers:
            raise ValueError(f"model {self.name}: {stages} stages for {self.layers} layers")
        base, extra = divmod(self.layers, stages)
        out, start = [], 0
        for i in range(stages):
            n = base + (1 if i < extra else 0)
            out.append((start, start + n))
            start += n
        return out

    def stage_bytes(self, stages: int) -> list[int]:
        """Parameter bytes each stage holds (embedding with the first, head with the last)."""
        out = []
        for i, (a, b) in enumerate(self.split(stages)):
            nb = (b - a) * self.bytes_per_layer
            if i == 0:
                nb += self.bytes_embedding
            if i == stages - 1:
                nb += self.bytes_head
            out.append(nb)
        return out

    def layer_request_ms(self, prompt: int, output: int) -> float:
        """One layer's work for a whole request at batch 1: the prompt's prefill, then one
        decode pass per further output token reading a growing KV cache."""
        p = self.profile
        ms = p.layer_step_ms(0, prompt, 0)
        for i in range(1, output):
            ms += p.layer_step_ms(1, 0, prompt + i)
        return ms

    def stage_seconds(self, stages: int, prompt: int | None = None, output: int | None = None) -> list[float]:
        """Each stage's busy time for one request: its layers' work, a step overhead per pass
        (prefill plus each decode), and the head on the last stage."""
        prompt = self.prompt_tokens if prompt is None else prompt
        output = self.output_tokens if output is None else output
        per_layer = self.layer_request_ms(prompt, output)
        passes = max(1, output)
        p = self.profile
        out = []
        for i, (a, b) in enumerate(self.split(stages)):
            ms = (b - a) * per_layer + passes * p.step_overhead_ms
            if i == stages - 1:
                ms += passes * p.head_ms
            out.append(ms / 1000)
        return out

    def latency_s(self, stages: int = 1, hop_s: float = 0.0) -> float:
        """One request alone on an instance of `stages` stages: every pass crosses every link."""
        return sum(self.stage_seconds(stages)) + (stages - 1) * max(1, self.output_tokens) * hop_s


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The workers: how many, the bytes each gives to parameters (the rest is KV cache and
    runtime), and one stage-link hop's latency."""

    workers: int
    memory_bytes: int
    hop_s: float = 50e-6

    def names(self) -> list[str]:
        return [f"w{i}" for i in range(self.workers)]


@dataclass(frozen=True, slots=True)
class Group:
    """Workers `workers` (indices into the pool) serving `models`, each as a pipeline of
    `stages` = len(workers) stages, stage i on workers[i]."""

    workers: tuple[int, ...]
    models: tuple[str, ...] = ()

    @property
    def stages(self) -> int:
        return len(self.workers)


@dataclass(frozen=True, slots=True)
class Plan:
    groups: tuple[Group, ...]
    attainment: float = math.nan  # the score's attainment for this plan on the workload it was placed for
    group_size: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    def models_in(self, name: str) -> list[int]:
        return [i for i, g in enumerate(self.groups) if name in g.models]


# A score: (attainment in [0, 1], tie-break) of a candidate set of groups; larger is better.
Score = Callable[[Sequence[Group]], tuple[float, float]]


def fits(group: Group, model: ModelSpec, models: Mapping[str, ModelSpec], memory_bytes: int) -> bool:
    """Whether `model` joins `group` without any worker's parameters exceeding its memory."""
    if group.stages > model.layers:
        return False
    used = [0] * group.stages
    for name in (*group.models, model.name):
        for i, nb in enumerate(models[name].stage_bytes(group.stages)):
            used[i] += nb
    return max(used) <= memory_bytes


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def place(
    models: Sequence[ModelSpec],
    pool: PoolSpec,
    score: Score,
    *,
    group_sizes: Sequence[int] | None = None,
    max_models_per_group: int = 0,
    eps: float = 1e-9,
) -> Plan:
    """AlpaServe's enumeration + greedy placement (module docstring). Raises ConfigError when no
    group size lets any model fit."""
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ConfigError("model names must be unique")
    sizes = [g for g in (group_sizes or divisors(pool.workers)) if pool.workers % g == 0]
    if not sizes:
        raise ConfigError(f"no group size divides the pool of {pool.workers} workers")
    best: Plan | None = None
    best_key = (-math.inf, -math.inf)
    tried: dict[int, float] = {}
    for g in sizes:
        groups = [Group(workers=tuple(range(i * g, (i + 1) * g))) for i in range(pool.workers // g)]
        key = score(groups)
        while True:
            cands: list[tuple[tuple[float, float], int, str]] = []
            seen: set[tuple[str, ...]] = set()
            for gi, grp in enumerate(groups):
                # Groups holding the same models are interchangeable: try one of each kind.
                sig = tuple(sorted(grp.models))
                if sig in seen:
                    continue
                seen.add(sig)
                if max_models_per_group and len(grp.models) >= max_models_per_group:
                    continue
                for m in models:
                    if m.name in grp.models or not fits(grp, m, by_name, pool.memory_bytes):
                        continue
                    trial = list(groups)
                    trial[gi] = Group(grp.workers, (*grp.models, m.name))
                    cands.append((score(trial), gi, m.name))
            if not cands:
                break
            k, gi, name = max(cands, key=lambda c: c[0])
            if not (k[0] > key[0] + eps or (k[0] >= key[0] - eps and k[1] > key[1] + eps)):
                break
            groups[gi] = Group(groups[gi].workers, (*groups[gi].models, name))
            key = k
        tried[g] = key[0]
        if any(grp.models for grp in groups) and key > best_key:
            best_key = key
            best = Plan(groups=tuple(groups), attainment=key[0], group_size=g)
    if best is None:
        raise ConfigError("no model fits any group of the pool (memory too small for every stage count)")
    return Plan(best.groups, best.attainment, best.group_size, {"attainment_by_group_size": tried})


# --------------------------------------------------------------------------- files


def profile_bytes(profile_name: str) -> tuple[int, int, int]:
    """(bytes per layer, embedding, head) a profile states (docs/device-profiles)."""
    path = Path(profile_name)
    if not path.is_file():
        path = PROFILES_DIR / f"{profile_name}.json"
    m = orjson.loads(path.read_bytes()).get("model", {})
    try:
        return int(m["bytes_per_layer"]), int(m["bytes_embedding"]), int(m["bytes_head"])
    except KeyError:
        raise ConfigError(f"device profile {profile_name} states no model bytes (model.bytes_*)") from None


def model_spec(
    name: str,
    profile: str,
    *,
    layers: int = 0,
    slo_ms: float = 0.0,
    slo_scale: float = 5.0,
    prompt_tokens: int = 128,
    output_tokens: int = 16,
) -> ModelSpec:
    """A model on a device profile; `layers` other than the profile's stands for a model of
    another size (bytes and cost scale with it). Without `slo_ms`, the SLO is `slo_scale` times
    the request's latency on one worker (AlpaServe's SLO scale)."""
    prof = load_profile(profile)
    per_layer, emb, head = profile_bytes(profile)
    m = ModelSpec(
        name=name,
        profile=prof,
        layers=layers or prof.layers,
        bytes_per_layer=per_layer,
        bytes_embedding=emb,
        bytes_head=head,
        slo_s=1.0,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
    )
    slo_s = slo_ms / 1000 if slo_ms > 0 else slo_scale * m.latency_s(1)
    return ModelSpec(**{**_fields(m), "slo_s": slo_s})


def _fields(m: ModelSpec) -> dict[str, Any]:
    return {f: getattr(m, f) for f in ModelSpec.__slots__}


@dataclass(frozen=True, slots=True)
class Workload:
    """Per-model mean request rates (req/s), the inter-arrival CV (1: Poisson; larger: burstier)
    and how many seconds the placer simulates."""

    rates: dict[str, float]
    cv: float = 1.0
    duration_s: float = 60.0
    seed: int = 0


def workload_from_dict(data: Mapping[str, Any], where: str) -> Workload:
    rates = data.get("rates")
    if not isinstance(rates, Mapping) or not rates:
        raise ConfigError(f"{where}: needs a [rates] table of model = requests per second")
    out: dict[str, float] = {}
    for k, v in rates.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"{where}: rate of {k} must be a number >= 0 (got {v!r})")
        out[str(k)] = float(v)
    cv = data.get("cv", data.get("burstiness", 1.0))
    dur = data.get("duration_s", 60.0)
    for key, v in (("cv", cv), ("duration_s", dur)):
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ConfigError(f"{where}: {key} must be a number > 0 (got {v!r})")
    return Workload(rates=out, cv=float(cv), duration_s=float(dur), seed=int(data.get("seed", 0)))


def group_quotas(plan: Plan, rates: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """Per group, each model's compute quota on the group's workers (fractions summing to 1):
    in proportion to the rate each model sends that group (its rate split evenly over the groups
    holding it), at least `MIN_QUOTA`; even shares without rates. What `cascade apply` sets as the
    instances' starting quotas; the co-scaling policy moves them from there."""
    held: dict[str, int] = {}
    for g in plan.groups:
        for m in g.models:
            held[m] = held.get(m, 0) + 1
    out: list[dict[str, float]] = []
    for g in plan.groups:
        if not g.models:
            out.append({})
            continue
        load = {m: max(0.0, float((rates or {}).get(m, 0.0))) / held[m] for m in g.models}
        total = sum(load.values())
        raw = {m: (load[m] / total if total > 0 else 1.0 / len(g.models)) for m in g.models}
        raw = {m: max(MIN_QUOTA, q) for m, q in raw.items()}
        norm = sum(raw.values())
        out.append({m: round(q / norm, 3) for m, q in raw.items()})
    return out


def plan_json(
    plan: Plan, models: Mapping[str, ModelSpec], pool: PoolSpec, rates: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """The plan file (docs/placement.md): groups of named workers, each model's stages with
    their layer ranges and its starting quota there (`group_quotas`), and the predicted
    attainment."""
    names = pool.names()
    quotas = group_quotas(plan, rates)
    groups = []
    for i, g in enumerate(plan.groups):
        groups.append(
            {
                "group": i,
                "workers": [names[w] for w in g.workers],
                "stages": g.stages,
                "models": [
                    {
                        "model": name,
                        "quota": quotas[i][name],
                        "stages": [
                            {"worker": names[w], "layers": [a, b]}
                            for w, (a, b) in zip(g.workers, models[name].split(g.stages), strict=True)
                        ],
                    }
                    for name in g.models
                ],
            }
        )
    return {
        "type": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "pool": {"workers": pool.workers, "memory_gb": pool.memory_bytes / GB},
        "group_size": plan.group_size,
        "predicted_attainment": plan.attainment,
        "groups": groups,
        "notes": plan.notes,
    }


def plan_from_json(data: Mapping[str, Any]) -> Plan:
    """Read a plan file back (what a loader applies); ConfigError on anything it cannot use."""
    if data.get("type") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
        raise ConfigError(f"not a {PLAN_FORMAT} v{PLAN_VERSION} document")
    try:
        groups = []
        for g in data["groups"]:
            workers = tuple(int(str(w).lstrip("w")) for w in g["workers"])
            groups.append(Group(workers=workers, models=tuple(str(m["model"]) for m in g["models"])))
        return Plan(
            groups=tuple(groups),
            attainment=float(data.get("predicted_attainment", math.nan)),
            group_size=int(data.get("group_size", 0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"plan file does not parse: {e}") from None


# --------------------------------------------------------------------------- when to plan again


def replan_reason(
    planned: Mapping[str, float], now: Mapping[str, float], *, mix_tol: float = 0.2, rate_tol: float = 0.3
) -> str:
    """Why a plan made for the rates `planned` no longer fits the rates `now` ('' if it does):
    the mix of models moved (total variation distance between the two popularity shares above
    `mix_tol`), or the total rate moved by more than `rate_tol` of the planned one. A scaler
    calls this each tick and asks the placer again when it says so; quotas and instances absorb
    what stays within the tolerances."""
    tot_p, tot_n = sum(planned.values()), sum(now.values())
    if tot_p <= 0:
        return "no rates were planned for" if tot_n > 0 else ""
    if abs(tot_n - tot_p) > rate_tol * tot_p:
        return f"total rate {tot_n:.2f} req/s against {tot_p:.2f} planned"
    if tot_n <= 0:
        return ""
    names = set(planned) | set(now)
    tvd = 0.5 * sum(abs(planned.get(n, 0.0) / tot_p - now.get(n, 0.0) / tot_n) for n in names)
    if tvd > mix_tol:
        return f"the mix of models moved by {tvd:.2f} (total variation)"
    return ""
