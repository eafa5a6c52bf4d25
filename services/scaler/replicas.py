"""Replica bookkeeping: targets and the mesh in, scale decisions out. No I/O, no clock.

    book = ReplicaBook(bounds, settings, started_at=now, id_prefix="scaler-1")
    book.set_target(model, n, reason=..., figures=...)   # a load policy's target (reason: why)
    result = book.tick(now, instances, Pool(idle, needs))  # → decisions to publish, expired ones
    book.on_ack(decision_id, ok, workers, now)

A model's *target* is its `min_replicas` until an operator (`cascade scale`) or a load policy
(`policies.py`) sets another, always within [min_replicas, max_replicas]. Its *current* count is
the workers loading or serving it, from heartbeats. Rules, each tested tick by tick:

- at most one decision per model in flight: a second one would race the first for the same idle
  workers and could overshoot; the next tick looks again once the ack is in. A down whose
  workers have left the count (heartbeats show them draining: `park_drains`) races nothing any
  more and waits for its ack aside: a drain lasts as long as the longest request on the worker
  (seconds to tens of seconds), and a model whose load comes back meanwhile must not wait for it
  to scale up again;
- one decision covers the whole gap (`count` may be above 1): loading several instances at once
  costs about as much as one when parameters travel by chain multicast;
- no decision before a loader is known (a decision nobody hears waits out the whole ack timeout)
  nor before `warmup_s` has passed since start (until then the heartbeats heard are not yet the
  whole mesh, and a restarted scaler would re-add instances that already run);
- every model starts from what runs when the warm-up ends (`adopt`, within its bounds), not
  from min_replicas: a restarted scaler must not undo its predecessor's scaling (an operator's
  target included) before a policy has looked at the load; decisions its predecessor left in
  flight at the loader are taken over (`resume`), their targets with them. While a load
  policy is silent, its model's target follows what runs (`follow`): a policy repeats an up
  for as long as it wants it, so a target it no longer wants (the request that woke a model
  at zero timed out meanwhile) must not outlive it. An operator's target (`cascade scale`) is
  carried out once before the policy takes over again;
- an ack's workers count as added (or removed) for `settle_s`, until heartbeats catch up (an added
  one that dies meanwhile stops counting at once, `workers_lost`), so a
  tick right after an ack does not see the old count and decide again;
- a failed or timed-out decision is retried on a later tick, after an exponential back-off (a
  policy re-asserting its target does not cut the back-off short; an operator's target does);
- with the idle pool known (`Pool`), an `up` takes at most the idle workers not yet claimed by
  decisions in flight, so several models share the pool without asking the loader for workers
  that are not there;
- when the pool is empty and nothing in flight will change it, a model that waits for instances
  may take them from models above their need (`Pool.needs`, from their policies), never below
  their `min_replicas`: a `down` for the lender (its worker drains its requests first, then
  returns to the pool), and the waiting model's `up` on a later tick, once the worker is idle.
  Models without a need (policy `manual`) never lend.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cascade.messages import ScaleDecision

Action = Literal["up", "down"]

# Must outlast the loader's own wait for idle workers plus its load deadline: an ack that comes
# after this is only used to settle counts.
DEFAULT_ACK_TIMEOUT_S = 360.0


class TargetError(ValueError):
    """A replica target that cannot be set; `code` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ModelBounds:
    min_replicas: int
    max_replicas: int
    # Workers per instance: a pipelined instance takes one idle worker per stage.
    stages: int = 1


@dataclass(frozen=True, slots=True)
class Settings:
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    warmup_s: float = 3.0
    settle_s: float = 5.0
    retry_base_s: float = 1.0
    retry_max_s: float = 15.0

    def __post_init__(self) -> None:
        for name in ("ack_timeout_s", "retry_base_s", "retry_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be above 0")
        if self.warmup_s < 0 or self.settle_s < 0:
            raise ValueError("warmup_s and settle_s must not be negative")


@dataclass(frozen=True, slots=True)
class Pool:
    """The idle pool as a tick sees it: alive workers holding no model, and what each model
    needs now (from its policy; a model left out never lends an instance)."""

    idle: frozenset[str] = frozenset()
    needs: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InFlight:
    decision: ScaleDecision
    sent_at: float


@dataclass(frozen=True, slots=True)
class TickResult:
    decisions: list[ScaleDecision]
    expired: list[InFlight]  # gave up waiting for their ack this tick; retried later
    held_back: str | None = None  # why no decision could be made at all, if so


@dataclass(frozen=True, slots=True)
class _Settle:
    action: Action
    workers: frozenset[str]
    until: float


def gap(target: int, current: int) -> tuple[Action, int] | None:
    """The one decision that closes the gap between target and current, if any."""
    if current < target:
        return "up", target - current
    if current > target:
        return "down", current - target
    return None


class ReplicaBook:
    def __init__(
        self,
        bounds: Mapping[str, ModelBounds],
        settings: Settings,
        started_at: float,
        id_prefix: str = "scaler",
        adopt: Collection[str] = (),
    ) -> None:
        for name, b in bounds.items():
            if not 0 <= b.min_replicas <= b.max_replicas:
                raise ValueError(f"model {name}: need 0 <= min_replicas <= max_replicas")
        self.bounds = dict(bounds)
        self.settings = settings
        self.started_at = started_at
        self.id_prefix = id_prefix
        self.targets: dict[str, int] = {m: b.min_replicas for m, b in bounds.items()}
        self._adopt = set(adopt) & set(bounds)
        self._operator: set[str] = set()  # models whose operator target has not been decided on yet
        self.in_flight: dict[str, InFlight] = {}
        # Downs whose workers no longer count (draining), by decision id: waiting for their ack
        # without holding their model's next decision back (`park_drains`).
        self.draining: dict[str, InFlight] = {}
        self.loader_known = False
        self._seq = 0
        self._settle: dict[str, list[_Settle]] = {}
        self._failures: dict[str, int] = {}
        self._not_before: dict[str, float] = {}
        # Decisions that timed out, kept a while: a late ack still says which workers changed.
        self._recent: OrderedDict[str, ScaleDecision] = OrderedDict()
        # Acks for ids this book never sent, kept a while: one may answer a decision `resume` is
        # about to take over from the loader (the ack overtook the loader's answer).
        self._orphan_acks: OrderedDict[str, tuple[bool, frozenset[str]]] = OrderedDict()
        # Why a model's target is what it is, when a policy (or a loan) set it: the decision that
        # closes the gap carries this reason and these figures.
        self._why: dict[str, tuple[str, dict[str, float]]] = {}
        self.counters = {"decisions": 0, "acks_ok": 0, "acks_failed": 0, "timeouts": 0, "lent": 0}

    # ---- inputs ------------------------------------------------------------
    def add_model(self, model: str, bounds: ModelBounds, adopt: bool) -> None:
        """A model deployed at run time: its target starts at its min_replicas."""
        if not 0 <= bounds.min_replicas <= bounds.max_replicas:
            raise ValueError(f"model {model}: need 0 <= min_replicas <= max_replicas")
        self.bounds[model] = bounds
        self.targets[model] = bounds.min_replicas
        if adopt:
            self._adopt.add(model)

    def set_target(
        self, model: str, replicas: int, reason: str = "", figures: Mapping[str, float] | None = None
    ) -> int:
        """Set a model's replica target; returns the previous one. Raises TargetError.

        Without `reason` the target is an operator's: it also cuts short the back-off of an
        older failure. With one it is a policy's, and the decision carries reason and figures."""
        b = self.bounds.get(model)
        if b is None:
            known = ", ".join(sorted(self.bounds)) or "none"
            raise TargetError("unknown_model", f"{model!r} is not in the deployment (models: {known})")
        if replicas > b.max_replicas:
            raise TargetError(
                "out_of_bounds",
                f"{model}: {replicas} replicas is above max_replicas {b.max_replicas} (set in the deployment file); "
                f"the target stays {self.targets[model]}. Ask for at most {b.max_replicas}, or raise max_replicas "
                "in the deployment file and restart the mesh",
            )
        if replicas < b.min_replicas:
            raise TargetError(
                "out_of_bounds",
                f"{model}: {replicas} replicas is below min_replicas {b.min_replicas} (set in the deployment file); "
                f"the target stays {self.targets[model]}",
            )
        previous = self.targets[model]
        self.targets[model] = replicas
        if reason:
            self._why[model] = (reason, dict(figures or {}))
            self._operator.discard(model)
            return previous
        self._why.pop(model, None)
        self._operator.add(model)
        self._adopt.discard(model)  # an operator's target, even during the warm-up, beats what runs
        # An operator's new target deserves a prompt try, not the back-off of an older failure.
        self._failures.pop(model, None)
        self._not_before.pop(model, None)
        return previous

    def ready(self, now: float) -> bool:
        """A loader is known and the warm-up is over: decisions may go out."""
        return self.loader_known and now >= self.started_at + self.settings.warmup_s

    def adopt(self, now: float, instances: Mapping[str, Collection[str]]) -> None:
        """Once ready: policy-managed models take what runs now (within bounds) as their target."""
        if not self._adopt or not self.ready(now):
            return
        for model in sorted(self._adopt):
            b = self.bounds[model]
            self.targets[model] = max(b.min_replicas, min(b.max_replicas, self.current(model, instances, now)))
        self._adopt.clear()

    def follow(self, model: str, current: int) -> None:
        """The model's policy is silent: its target becomes what runs (within bounds). Not while a
        decision is in flight or an operator's target waits to be carried out."""
        if model in self.in_flight or model in self._operator:
            return
        b = self.bounds[model]
        target = max(b.min_replicas, min(b.max_replicas, current))
        if target != self.targets[model]:
            self.targets[model] = target
            self._why.pop(model, None)

    def loader_ready(self) -> list[InFlight]:
        """A loader (re)started: decisions it may never have heard are dropped, to be re-decided."""
        self.loader_known = True
        dropped = list(self.in_flight.values())
        for f in dropped + list(self.draining.values()):
            self._remember(f.decision)
        self.draining.clear()
        self.in_flight.clear()
        return dropped

    def resume(self, d: ScaleDecision, now: float) -> bool:
        """Take over a decision the loader is carrying out (a predecessor of this scaler sent it):
        it is in flight, and its target is the model's, so this scaler waits for its ack instead
        of deciding the same gap again, and does not undo it. False if the model is unknown or its
        ack was heard already (then it counts as acked)."""
        b = self.bounds.get(d.model)
        if b is None:
            return False
        self.targets[d.model] = max(b.min_replicas, min(b.max_replicas, d.target_replicas))
        self._adopt.discard(d.model)
        self._operator.discard(d.model)
        self.in_flight[d.model] = InFlight(d, now)
        heard = self._orphan_acks.pop(d.decision_id, None)
        if heard is not None:
            self.on_ack(d.decision_id, heard[0], heard[1], now)
            return False
        return True

    def on_ack(
        self, decision_id: str, ok: bool, workers: Collection[str], now: float, back_off: bool = True
    ) -> ScaleDecision | None:
        """Record an ack; returns the decision it answers (None for an id this scaler never sent).
        `back_off` false: a failure that says nothing about the model (only workers that died
        mid-way), retried at the next tick rather than after the model's retry delay."""
        entry = next((f for f in self.in_flight.values() if f.decision.decision_id == decision_id), None)
        parked = self.draining.pop(decision_id, None)
        if entry is not None:
            decision = entry.decision
            del self.in_flight[decision.model]
        elif parked is not None:
            decision = parked.decision
        else:
            late = self._recent.pop(decision_id, None)
            if late is None:
                self._orphan_acks[decision_id] = (ok, frozenset(workers))
                while len(self._orphan_acks) > 64:
                    self._orphan_acks.popitem(last=False)
                return None
            decision = late
        if workers:
            self._settle.setdefault(decision.model, []).append(
                _Settle(decision.action, frozenset(workers), now + self.settings.settle_s)
            )
        if ok:
            self.counters["acks_ok"] += 1
            self._failures.pop(decision.model, None)
            self._not_before.pop(decision.model, None)
        else:
            self.counters["acks_failed"] += 1
            if back_off:
                self._back_off(decision.model, now)
        return decision

    def workers_lost(self, workers: Collection[str]) -> None:
        """Workers whose process died: an ack's count for them ends now. An instance acked up and
        killed within `settle_s` is gone, not late in the heartbeats; counted on, it would hold
        its replacement back until the settle ran out."""
        gone = frozenset(workers)
        if not gone:
            return
        for model, entries in list(self._settle.items()):
            kept = [_Settle(e.action, e.workers - gone, e.until) if e.action == "up" else e for e in entries]
            kept = [e for e in kept if e.workers]
            if kept:
                self._settle[model] = kept
            else:
                del self._settle[model]

    def park_drains(self, now: float, instances: Mapping[str, Collection[str]]) -> list[InFlight]:
        """Set aside the downs in flight whose workers have left the count (the heartbeats show
        the model at or below the down's target: its workers drain). Their ack only settles
        counts now; the model may have its next decision, an up for load that came back during
        the drain among them (it takes idle workers, which the draining ones are not). Returns
        the downs set aside."""
        parked: list[InFlight] = []
        for model, f in list(self.in_flight.items()):
            d = f.decision
            if d.action == "down" and self.current(model, instances, now) <= d.target_replicas:
                del self.in_flight[model]
                self.draining[d.decision_id] = f
                parked.append(f)
        return parked

    # ---- the tick ----------------------------------------------------------
    def current(self, model: str, instances: Mapping[str, Collection[str]], now: float) -> int:
        """Workers loading or serving `model`, corrected by acks heartbeats have not caught up with."""
        workers = set(instances.get(model, ()))
        live = [s for s in self._settle.get(model, []) if s.until > now]
        if live:
            self._settle[model] = live
        else:
            self._settle.pop(model, None)
        for s in live:
            if s.action == "up":
                workers |= s.workers
            else:
                workers -= s.workers
        return len(workers)

    def tick(
        self, now: float, instances: Mapping[str, Collection[str]], pool: Pool | None = None, wall: float = 0.0
    ) -> TickResult:
        """Decisions that close each model's gap. With `pool`, ups are bounded by the idle workers
        and an empty pool may make a model above its need lend instances (see the module doc).
        `wall` (wall-clock seconds) stamps the decisions; `now` is the book's own clock."""
        expired = [f for f in self.in_flight.values() if now - f.sent_at >= self.settings.ack_timeout_s]
        for f in expired:
            del self.in_flight[f.decision.model]
            self._remember(f.decision)
            self.counters["timeouts"] += 1
            self._back_off(f.decision.model, now)
        for key, f in list(self.draining.items()):
            # Its workers left the count long ago; a lost ack only means no settle.
            if now - f.sent_at >= self.settings.ack_timeout_s:
                del self.draining[key]
                self._remember(f.decision)
        if not self.loader_known:
            return TickResult([], expired, "no loader yet")
        if now < self.started_at + self.settings.warmup_s:
            return TickResult([], expired, "warming up (hearing every worker's heartbeat first)")
        self.adopt(now, instances)
        self.park_drains(now, instances)
        # Nothing in flight: the pool will not change behind this tick's back (a draining worker
        # will come back to it).
        settled = not self.in_flight and not self.draining
        free: int | None = None
        returning: set[str] = set()
        if pool is not None:
            returning = self._returning(now, pool.idle, instances)
            # Workers an up in flight will take may still look idle (heartbeats lag): count them
            # taken. Erring low only delays an up by a tick; erring high would ask for workers
            # that are not there and wait out the loader's idle wait.
            claimed = sum(
                f.decision.count * self._stages(f.decision.model)
                for f in self.in_flight.values()
                if f.decision.action == "up"
            )
            free = len(pool.idle) + len(returning) - claimed
        decisions: list[ScaleDecision] = []
        starved: dict[str, int] = {}
        for model in sorted(self.targets):
            if model in self.in_flight or now < self._not_before.get(model, float("-inf")):
                continue
            target = self.targets[model]
            current = self.current(model, instances, now)
            step = gap(target, current)
            if step is None:
                self._operator.discard(model)
                continue
            action, count = step
            extra: dict[str, float] = {}
            if action == "up" and free is not None:
                extra["idle_pool"] = float(max(free, 0))
                per = self._stages(model)
                fits = max(free, 0) // per
                if count > fits:
                    starved[model] = (count - fits) * per
                    count = fits
                if count == 0:
                    continue
                free -= count * per
            decisions.append(self._decide(model, action, count, target, current, now, wall, extra))
        if pool is not None and starved and settled and not decisions and not pool.idle and not returning:
            decisions += self._lend(now, wall, instances, pool, starved)
        return TickResult(decisions, expired)

    def _decide(
        self,
        model: str,
        action: Action,
        count: int,
        target: int,
        current: int,
        now: float,
        wall: float,
        extra: Mapping[str, float] | None = None,
        trigger: str = "",
    ) -> ScaleDecision:
        b = self.bounds[model]
        retry = self._failures.get(model, 0)
        why = self._why.get(model)
        if why is None:
            reason = f"{'below' if action == 'up' else 'above'} target: {current} of {target} replicas"
            figures: dict[str, float] = {}
        else:
            reason, figures = why[0], dict(why[1])
            if retry:
                reason = f"{reason} (retry {retry})"
        figures.update(
            current=float(current),
            target=float(target),
            min_replicas=float(b.min_replicas),
            max_replicas=float(b.max_replicas),
            retry=float(retry),
            **(extra or {}),
        )
        self._seq += 1
        d = ScaleDecision(
            decision_id=f"{self.id_prefix}-{self._seq}",
            model=model,
            action=action,
            count=count,
            target_replicas=target,
            reason=reason,
            figures=figures,
            ts=wall,
            trigger=trigger or ("target" if why is None else "load"),
        )
        self.in_flight[model] = InFlight(d, now)
        self._operator.discard(model)
        self.counters["decisions"] += 1
        return d

    def _stages(self, model: str) -> int:
        b = self.bounds.get(model)
        return b.stages if b is not None else 1

    def _returning(self, now: float, idle: frozenset[str], instances: Mapping[str, Collection[str]]) -> set[str]:
        """Workers a down acked moments ago that heartbeats show neither idle nor holding a model
        yet: they are on their way back to the pool."""
        held = {w for ws in instances.values() for w in ws}
        out: set[str] = set()
        for entries in self._settle.values():
            for st in entries:
                if st.action == "down" and st.until > now:
                    out |= st.workers
        return out - idle - held

    def _lend(
        self,
        now: float,
        wall: float,
        instances: Mapping[str, Collection[str]],
        pool: Pool,
        starved: Mapping[str, int],
    ) -> list[ScaleDecision]:
        """Downs for models above their need, for models that wait on an empty pool. A lender
        keeps max(need, min_replicas) and lends to one model per tick (one decision in flight)."""
        lenders: list[tuple[int, str, int, int]] = []  # (spare, model, current, need)
        for m in sorted(self.targets):
            need = pool.needs.get(m)
            if need is None or m in starved or m in self.in_flight:
                continue
            if now < self._not_before.get(m, float("-inf")):
                continue
            cur = self.current(m, instances, now)
            keep = max(need, self.bounds[m].min_replicas, 0)
            if cur > keep and self.targets[m] <= cur:
                lenders.append((cur - keep, m, cur, need))
        lenders.sort(key=lambda x: (-x[0], x[1]))
        out: list[ScaleDecision] = []
        for model, short in sorted(starved.items(), key=lambda x: (-x[1], x[0])):
            while short > 0 and lenders:
                spare, m, cur, need = lenders.pop(0)
                n = min(spare, short)
                short -= n
                reason = (
                    f"lend {n} to {model}: no idle worker and {model} waits for {starved[model]}; "
                    f"{m} needs {need} of its {cur}"
                )
                figures = {"need": float(need), "borrower_waits_for": float(starved[model])}
                self.targets[m] = cur - n
                self._why[m] = (reason, figures)
                out.append(self._decide(m, "down", n, cur - n, cur, now, wall, trigger="lend"))
                self.counters["lent"] += n
        return out

    # ---- internals ---------------------------------------------------------
    def _back_off(self, model: str, now: float) -> None:
        n = self._failures.get(model, 0) + 1
        self._failures[model] = n
        delay = min(self.settings.retry_base_s * 2 ** (n - 1), self.settings.retry_max_s)
        self._not_before[model] = now + delay

    def _remember(self, d: ScaleDecision) -> None:
        self._recent[d.decision_id] = d
        while len(self._recent) > 64:
            self._recent.popitem(last=False)

    def hold(self, model: str, until: float) -> None:
        """No decision for `model` before `until` (every idle worker is in back-off for it)."""
        self._not_before[model] = max(self._not_before.get(model, until), until)

    def retry_at(self, model: str) -> float | None:
        return self._not_before.get(model)

    def reason(self, model: str) -> str:
        """Why the model's target is what it is ("" when it is min_replicas or an operator's)."""
        why = self._why.get(model)
        return why[0] if why else ""

    def status(self) -> dict[str, Any]:
        return {
            "targets": dict(self.targets),
            "in_flight": {m: f.decision.decision_id for m, f in self.in_flight.items()},
            "draining": sorted(self.draining),
            "loader_known": self.loader_known,
            **self.counters,
        }
