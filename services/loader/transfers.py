"""Following one scale-up's transfers: each target's progress, what broke, what to re-plan.

A pure core (no I/O, no clocks): the loader feeds it readiness events, transfer events, worker
views from heartbeats and the time; it answers which targets are done or failed and which chains
broke, and where (`TransferSession.breaks`). The loader does the talking: it sends the re-plan's
orders and tells the session (`repaired`), so the same logic can be replayed in tests event by
event.

A chain breaks at the member `planner.first_break` names: a dead member, a member that refused
its order or could not send (`broken`), or the upstream hop of a target that reported its
receive failed. The break splits the chain: the part upstream of it goes on untouched (each
chain, and each part, is its own fault domain); the survivors downstream get a new chain from
the re-plan, starting at the fewest units any of them holds verified.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from cascade.messages import TransferEvent
from cascade.workers import WorkerView
from services.loader.planner import Chain, TransferPlan

TargetPhase = Literal["pending", "loading", "done", "failed"]


@dataclass(slots=True)
class TargetState:
    worker_id: str
    transfer_id: str
    source: str  # worker id, "host-cache" or "disk"
    phase: TargetPhase = "pending"
    units: int = 0  # units ready front to back, from its readiness events
    nbytes: int = 0  # bytes of the units ready (front to back or not)
    # Every unit ready: an ordered plan (planner.ordered_units) fills a target's own block first,
    # so its front-to-back count moves only once the blocks before it are in too.
    held: set[int] = field(default_factory=set)
    first_unit_at: float | None = None
    done_at: float | None = None
    error: str = ""
    seen_loading: bool = False


def source_name(chain: Chain) -> str:
    return chain.source.worker_id or chain.source.kind


@dataclass
class TransferSession:
    """The transfers of one decision: its plans (the first and every re-plan) and its targets."""

    decision_id: str
    model: str
    mode: str
    unit_nbytes: tuple[int, ...]
    started: float
    # A heartbeat in flight when a worker took its order may still show it idle; after this long
    # an idle target has really given the load up.
    grace_s: float = 2.0
    targets: dict[str, TargetState] = field(default_factory=dict)
    chains: list[Chain] = field(default_factory=list)  # live chains: what may still break
    plans: list[TransferPlan] = field(default_factory=list)
    failed: dict[str, set[str]] = field(default_factory=dict)  # transfer id → targets that said so
    broken: set[str] = field(default_factory=set)  # members that refused an order or vanished mid-way
    reasons: dict[str, str] = field(default_factory=dict)  # worker → last failure reason heard

    @property
    def num_units(self) -> int:
        return len(self.unit_nbytes)

    # ---- plans ---------------------------------------------------------------------------------
    def adopt(self, plan: TransferPlan) -> None:
        """Follow `plan`'s chains (the first plan, or a re-plan for survivors)."""
        self.plans.append(plan)
        for c in plan.chains:
            self.chains.append(c)
            for h in c.targets:
                t = self.targets.get(h.worker_id)
                if t is None:
                    self.targets[h.worker_id] = TargetState(h.worker_id, c.transfer_id, source_name(c))
                else:
                    t.transfer_id, t.source = c.transfer_id, source_name(c)

    def plan_of(self, chain: Chain) -> TransferPlan:
        """`chain` as a plan of its own (what `planner.replan` takes)."""
        for p in self.plans:
            if any(c.transfer_id == chain.transfer_id for c in p.chains):
                return replace(p, chains=(chain,))
        raise KeyError(chain.transfer_id)

    # ---- events --------------------------------------------------------------------------------
    def unit_ready(self, worker: str, unit: int, now: float) -> None:
        t = self.targets.get(worker)
        if t is None or t.phase in ("done", "failed"):
            return
        if 0 <= unit < self.num_units and unit not in t.held:  # a repeat is not progress
            t.held.add(unit)
            t.nbytes += self.unit_nbytes[unit]
            while t.units in t.held:
                t.units += 1
            if t.first_unit_at is None:
                t.first_unit_at = now
        if t.phase == "pending":
            t.phase = "loading"

    def reset(self, worker: str) -> None:
        """The worker dropped its model (a readiness reset)."""
        t = self.targets.get(worker)
        if t is not None and t.phase not in ("done", "failed"):
            t.units, t.nbytes = 0, 0
            t.held.clear()

    def transfer_event(self, ev: TransferEvent) -> None:
        if ev.kind != "failed":
            return
        self.reasons[ev.worker_id] = ev.reason
        if ev.role == "send":
            # A source's failure says little by itself (its downstream may have died); the targets
            # that lost the stream report it, and their reports name the break.
            return
        t = self.targets.get(ev.worker_id)
        if t is not None and t.transfer_id == ev.transfer_id and t.phase != "done":
            t.units = max(t.units, min(ev.units_held, self.num_units))
            self.failed.setdefault(ev.transfer_id, set()).add(ev.worker_id)

    def refused(self, worker: str, reason: str) -> None:
        """A member refused its order (or could not be reached): the chain breaks there."""
        self.broken.add(worker)
        self.reasons[worker] = reason
        if worker in self.targets:
            self.fail(worker, reason)

    def observe(self, worker: str, view: WorkerView | None, now: float) -> None:
        """A target as its latest heartbeat shows it (None: it stopped heart-beating)."""
        t = self.targets.get(worker)
        if t is None or t.phase in ("done", "failed"):
            return
        if view is None:
            self.fail(worker, f"{worker} stopped heart-beating while loading {self.model}")
        elif (
            view.state == "serving"
            and view.model == self.model
            and view.num_units > 0
            and view.units_ready == view.num_units
        ):
            t.phase, t.done_at, t.units = "done", now, self.num_units
            t.nbytes = sum(self.unit_nbytes)
        elif view.takes(self.model):
            # Before its first unit a target's readiness names no model, only its heartbeat does: a
            # first unit can take longer than the grace (an ordered plan starts a target in the middle
            # of the model, with a layer where a front-to-back one has the smaller embedding).
            t.seen_loading = True
        elif t.seen_loading or now - self.started >= self.grace_s:
            why = self.reasons.get(worker)
            self.fail(
                worker, f"{worker} gave up loading {self.model} (now {view.state}" + (f": {why})" if why else ")")
            )

    def fail(self, worker: str, reason: str) -> None:
        t = self.targets.get(worker)
        if t is not None and t.phase not in ("done", "failed"):
            t.phase, t.error = "failed", reason

    def give_up(self, workers: Iterable[str], reason: str) -> None:
        for w in workers:
            self.fail(w, reason)

    # ---- breaks --------------------------------------------------------------------------------
    def breaks(self, dead: Iterable[str]) -> list[tuple[Chain, str]]:
        """Chains broken now, with the member each one broke at (see the module docstring)."""
        from services.loader.planner import first_break

        gone = set(dead) | self.broken
        out = []
        for c in self.chains:
            brk = first_break(c, gone, self.failed.get(c.transfer_id, set()))
            if brk is not None:
                out.append((c, brk))
        return out

    def survivors(self, chain: Chain, brk: str) -> list[str]:
        """Targets of `chain` cut off by a break at `brk` (what a re-plan has to serve)."""
        ids = [h.worker_id for h in chain.targets]
        if brk not in ids:
            return ids
        return ids[ids.index(brk) + 1 :]

    def repaired(self, chain: Chain, brk: str, dead: Iterable[str]) -> None:
        """The break at `brk` is dealt with: keep following only the part of `chain` upstream of it
        (with `brk` itself when it is a live target that only lost its downstream)."""
        self.chains = [c for c in self.chains if c.transfer_id != chain.transfer_id]
        ids = [h.worker_id for h in chain.targets]
        failed = self.failed.pop(chain.transfer_id, set())
        if brk not in ids:
            return
        if brk in failed:
            # Blamed itself: a disk chain has no upstream, so its own read failed. Nothing to retry.
            self.fail(brk, self.reasons.get(brk) or f"{brk} failed to load {self.model}")
            keep = ids.index(brk)
        else:
            keep = ids.index(brk) + (0 if brk in set(dead) | self.broken else 1)
        part = chain.targets[:keep]
        if part:
            self.chains.append(replace(chain, targets=part))
            kept = failed & {h.worker_id for h in part}
            if kept:
                self.failed[chain.transfer_id] = kept

    # ---- outcome -------------------------------------------------------------------------------
    def pending(self) -> list[str]:
        return sorted(w for w, t in self.targets.items() if t.phase in ("pending", "loading"))

    def ready(self) -> list[str]:
        return sorted(w for w, t in self.targets.items() if t.phase == "done")

    def failures(self) -> list[str]:
        return [t.error for _, t in sorted(self.targets.items()) if t.phase == "failed"]

    def rows(self, now: float) -> list[dict[str, object]]:
        """Per target, what `cascade status` shows: units ready of total, MB/s, source, state."""
        out: list[dict[str, object]] = []
        for w, t in sorted(self.targets.items()):
            end = t.done_at if t.done_at is not None else now
            secs = max(end - self.started, 1e-6)
            out.append(
                {
                    "decision_id": self.decision_id,
                    "model": self.model,
                    "mode": self.mode,
                    "worker": w,
                    "transfer_id": t.transfer_id,
                    "source": t.source,
                    "units_ready": max(t.units, len(t.held)),
                    "num_units": self.num_units,
                    "mb_s": round(t.nbytes / 1e6 / secs, 1),
                    "seconds": round(secs, 2),
                    "state": t.phase,
                    "error": t.error,
                }
            )
        return out


def chain_members(chains: Sequence[Chain]) -> set[str]:
    return {m for c in chains for m in c.members}
