"""Who plans: a lease on one key of the control store, decided here without I/O.

Several loaders run; one leads (it alone sends orders and acks), the others follow (they hear
everything, so they can take over hot). The lease is the key `lease.loader`: its holder rewrites
it every `lease_s / 3` with compare-and-set on the revision it last wrote. A follower that sees
the same revision for `lease_s` on its own clock takes the key over, also by compare-and-set, so
two followers racing cannot both win.

No clock is shared: each side measures on its own. The leader counts from the moment it *sent*
its last successful write, the follower from the moment it first *saw* that revision, which is
later; so a leader that cannot renew gives up (`step_down`) before any follower can take over.

    lease = Lease("loader-a", lease_s=1.5)
    act = lease.next(now)              # Acquire(create=True), Acquire(last=rev), Renew(last=rev),
                                       # StepDown(), or Wait(until)
    lease.observed(holder, revision, now)   # what the key holds (None, 0: no key)
    lease.won(revision, sent_at) / lease.lost(holder, revision, now)
"""

from __future__ import annotations

from dataclasses import dataclass

LEASE_KEY = "lease.loader"
RENEWS_PER_LEASE = 3  # a renewal may fail twice before the lease runs out


@dataclass(frozen=True, slots=True)
class Acquire:
    last: int  # the revision to replace; 0: the key must not exist (create)


@dataclass(frozen=True, slots=True)
class Renew:
    last: int


@dataclass(frozen=True, slots=True)
class StepDown:
    why: str


@dataclass(frozen=True, slots=True)
class Wait:
    until: float


Action = Acquire | Renew | StepDown | Wait


@dataclass
class Lease:
    me: str
    lease_s: float
    holder: str | None = None  # who the key names (None: no key)
    revision: int = 0  # the key's revision as last read or written (0: no key)
    seen_at: float = 0.0  # when this side first saw `revision`
    leading: bool = False
    sent_at: float = 0.0  # leader: when its last successful write was sent

    def __post_init__(self) -> None:
        if not self.lease_s > 0:
            raise ValueError("lease_s must be above 0")

    @property
    def renew_every(self) -> float:
        return self.lease_s / RENEWS_PER_LEASE

    def next(self, now: float) -> Action:
        """What to do now about the lease."""
        if self.leading:
            if now - self.sent_at >= self.lease_s:
                return StepDown(f"no renewal for {now - self.sent_at:.2f}s (lease {self.lease_s:g}s)")
            if now - self.sent_at >= self.renew_every:
                return Renew(self.revision)
            return Wait(self.sent_at + self.renew_every)
        if self.holder is None:
            return Acquire(self.revision)
        if self.holder == self.me:
            # Our own name from before a restart: ids are unique in a mesh, so that process is gone.
            return Acquire(self.revision)
        if now - self.seen_at >= self.lease_s:
            return Acquire(self.revision)
        return Wait(self.seen_at + self.lease_s)

    def observed(self, holder: str | None, revision: int, now: float) -> None:
        """What a read of the key found (holder None, revision 0: there is no key). A leader
        that reads another holder has lost the lease."""
        if revision != self.revision or holder != self.holder:
            self.seen_at = now
        self.holder, self.revision = holder, revision
        if self.leading and holder != self.me:
            self.leading = False

    def won(self, revision: int, sent_at: float) -> None:
        """A write of ours (acquire or renew) went through; it was sent at `sent_at`."""
        self.leading = True
        self.holder, self.revision = self.me, revision
        self.sent_at = sent_at
        self.seen_at = sent_at

    def lost(self, now: float) -> None:
        """A compare-and-set of ours failed (someone else wrote), or we step down: follow, and
        read the key again before anything else."""
        self.leading = False
        if self.holder == self.me:
            self.holder = "?"  # whoever wrote since; the next read says who
        self.seen_at = now
