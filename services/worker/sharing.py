"""Sharing one worker between instances (Dilu): compute by quota, memory by a ledger. Pure: no
threads, clocks or torch; the engine thread (`runner.EngineRunner`) asks the scheduler which
instance steps next, and the instances' loads ask the ledger for memory.

**Compute.** Each instance (a slot of the worker, docs/pipelined-and-shared.md) has a quota, a
share of the worker's engine steps. Stride scheduling (Waldspurger & Weihl, 1995): every instance
has a pass value; the one with work and the lowest pass steps next and its pass grows by
1/quota. Over any stretch in which all of them have work, instance i gets quota_i / sum(quota)
of the steps, off by at most one step each; an instance without work gives its share to those
with work (a quota is a floor under contention, not a cap: the device never idles while any
instance has work). An instance that comes back from idle starts at the current minimum pass,
so it cannot claim the steps it did not use while idle.

Why steps and not time: every instance's step here is one forward pass of its batch, and on an
emulated device a step is padded to the profile's time, so step shares are time shares for
instances of one model and a first-order proxy across models. The benchmark of issue 17 measures
the time shares.

**Memory.** The ledger holds each instance's weights and KV cache in bytes against the worker's
budget (`--memory-mb`); a load that would exceed it is refused before any byte moves, with what
is held and by whom.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# The default quota of an instance (shares are relative: two instances at 1.0 split evenly).
DEFAULT_QUOTA = 1.0


class QuotaError(ValueError):
    """A quota that cannot be applied (the message says why)."""


class MemoryRefused(RuntimeError):
    """A reservation that would exceed the worker's memory budget."""


def check_quota(quota: float) -> float:
    if not isinstance(quota, int | float) or isinstance(quota, bool) or not quota > 0 or quota != quota:
        raise QuotaError(f"a quota is a share above 0 (got {quota!r})")
    if quota > 1e6:
        raise QuotaError(f"a quota of {quota} is past any share this worker can tell apart")
    return float(quota)


@dataclass
class _Share:
    quota: float
    pass_: float = 0.0
    steps: int = 0
    active: bool = False  # had work at the last pick


@dataclass
class StrideScheduler:
    """Which instance's engine steps next, by quota."""

    shares: dict[str, _Share] = field(default_factory=dict)

    def add(self, name: str, quota: float = DEFAULT_QUOTA) -> None:
        self.shares[name] = _Share(check_quota(quota), pass_=self._floor())

    def remove(self, name: str) -> None:
        self.shares.pop(name, None)

    def set_quota(self, name: str, quota: float) -> float:
        """Apply a new quota (from the next pick on); returns the value applied."""
        s = self.shares.get(name)
        if s is None:
            raise QuotaError(f"no instance {name!r} on this worker (instances: {', '.join(sorted(self.shares))})")
        s.quota = check_quota(quota)
        return s.quota

    def quota(self, name: str) -> float:
        return self.shares[name].quota

    def quotas(self) -> dict[str, float]:
        return {n: s.quota for n, s in sorted(self.shares.items())}

    def steps(self) -> dict[str, int]:
        return {n: s.steps for n, s in sorted(self.shares.items())}

    def pick(self, with_work: Iterable[str]) -> str | None:
        """The instance that steps next among those with work (None: none has work), and count
        its step."""
        if len(self.shares) == 1:
            # One instance, a worker's usual case: it steps whenever it has work. What the rule
            # below comes to then, without its lists (this runs after every step, cold).
            [(name, s)] = self.shares.items()
            s.active = name in with_work
            if not s.active:
                return None
            s.pass_ += 1.0 / s.quota
            s.steps += 1
            return name
        ready = [n for n in with_work if n in self.shares]
        if not ready:
            for s in self.shares.values():
                s.active = False
            return None
        # Where the instances that kept working are: one back from idle joins them there.
        going = [self.shares[n].pass_ for n in ready if self.shares[n].active]
        floor = min(going) if going else min(self.shares[n].pass_ for n in ready)
        for n, s in self.shares.items():
            now_active = n in ready
            if now_active and not s.active:
                # Back from idle: no credit for the steps it did not want meanwhile.
                s.pass_ = max(s.pass_, floor)
            s.active = now_active
        name = min(ready, key=lambda n: (self.shares[n].pass_, n))
        s = self.shares[name]
        s.pass_ += 1.0 / s.quota
        s.steps += 1
        return name

    def _floor(self) -> float:
        active = [s.pass_ for s in self.shares.values() if s.active]
        return min(active) if active else max((s.pass_ for s in self.shares.values()), default=0.0)


@dataclass(frozen=True, slots=True)
class Holding:
    weights: int = 0
    kv: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv


class MemoryLedger:
    """Bytes held per instance against one budget (0: unbounded, nothing refused)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("a memory budget is >= 0 bytes")
        self.budget = budget_bytes
        self.held: dict[str, Holding] = {}

    @property
    def used(self) -> int:
        return sum(h.total for h in self.held.values())

    def free(self) -> int | None:
        """Bytes left (None: unbounded)."""
        return None if self.budget == 0 else self.budget - self.used

    def fair_share(self, name: str, instances: int) -> int | None:
        """What a measured KV budget of `name` may take (None: unbounded): the free bytes split
        evenly among the `instances` of the worker that hold no KV yet, `name` one of them, so
        the first instance to load does not take the memory the others will need."""
        free = self.free()
        if free is None:
            return None
        settled = sum(1 for n, h in self.held.items() if n != name and h.kv > 0)
        return max(free, 0) // max(instances - settled, 1)

    def reserve(self, name: str, weights: int = 0, kv: int = 0) -> Holding:
        """Add `weights` and `kv` bytes to what `name` holds, or raise MemoryRefused (nothing changes)."""
        if weights < 0 or kv < 0:
            raise ValueError("a reservation is >= 0 bytes")
        have = self.held.get(name, Holding())
        after = Holding(have.weights + weights, have.kv + kv)
        if self.budget and self.used - have.total + after.total > self.budget:
            others = ", ".join(f"{n} {h.total / 1e6:.1f} MB" for n, h in sorted(self.held.items()) if h.total) or "none"
            raise MemoryRefused(
                f"{name} needs {(weights + kv) / 1e6:.1f} MB more ({weights / 1e6:.1f} MB weights, "
                f"{kv / 1e6:.1f} MB KV) but only {max(self.budget - self.used, 0) / 1e6:.1f} MB of the worker's "
                f"{self.budget / 1e6:.1f} MB (--memory-mb) are free (held: {others})"
            )
        self.held[name] = after
        return after

    def release(self, name: str) -> Holding:
        """Everything `name` holds is given back; returns what it held."""
        return self.held.pop(name, Holding())

    def describe(self) -> dict[str, object]:
        return {
            "budget_mb": round(self.budget / 1e6, 1),
            "used_mb": round(self.used / 1e6, 1),
            "instances": {
                n: {"weights_mb": round(h.weights / 1e6, 1), "kv_mb": round(h.kv / 1e6, 1)}
                for n, h in sorted(self.held.items())
            },
        }
