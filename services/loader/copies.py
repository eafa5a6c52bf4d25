"""Host copies across loaders: which loaders keep a host-memory copy of which model.

Every loader announces the copies it holds (`HostCopies`). The leader keeps what it heard
(`CopyTable`), decides which models the mesh keeps cached at all (a model becomes wanted when a
scale-up had to read it from the store, or an operator loads it; it stops being wanted by the
keep-alive policy or an operator's release), and for each wanted model asks `place_copies` which
loaders should fill or drop a copy so that `host_copies` (the deployment's K, default 1) loaders
hold one, on distinct hosts where there are enough of them. With K >= 2 a loader that takes the
lease over usually holds a warm copy already.

`place_copies` is pure: loaders and wants go in, orders come out. The table is plain state fed
by the loader's NATS handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from services.loader.hostcache import KeepAlive, keep_alive_decision

CopyAction = Literal["fill", "drop"]


@dataclass(frozen=True, slots=True)
class LoaderCopies:
    """One loader's copies as last heard."""

    loader_id: str
    host: str
    models: frozenset[str] = frozenset()
    filling: frozenset[str] = frozenset()
    cache: bool = True  # False: --host-cache off, never given a copy
    seen: float = 0.0

    def holds(self, model: str) -> bool:
        return model in self.models or model in self.filling


@dataclass(frozen=True, slots=True)
class CopyOrder:
    loader_id: str
    model: str
    action: CopyAction


def _keep_order(leader: str) -> Callable[[LoaderCopies], tuple[bool, bool, str]]:
    # A held copy before one still filling; the leader's own before a follower's (its sends need no
    # message); then by id, so that every pass picks the same loaders.
    return lambda c: (not c.models, c.loader_id != leader, c.loader_id)


def _spread(candidates: Sequence[LoaderCopies], k: int, hosts: set[str]) -> list[LoaderCopies]:
    """Up to `k` of `candidates` (already in preference order): one per host not in `hosts`
    first, then the rest in order (several copies on one host when there are too few hosts)."""
    seen = set(hosts)
    first, rest = [], []
    for c in candidates:
        if c.host not in seen:
            seen.add(c.host)
            first.append(c)
        else:
            rest.append(c)
    return (first + rest)[:k]


def place_copies(wanted: Mapping[str, int], loaders: Iterable[LoaderCopies], leader: str) -> list[CopyOrder]:
    """The fill and drop orders that bring each wanted model (name → K) to K copies, and every
    other model to none.

    Copies already held are kept, spread over distinct hosts first; new copies go to loaders with
    a host cache on hosts that hold none yet, the leader first among equals, then to any."""
    live = sorted(loaders, key=lambda c: c.loader_id)
    out: list[CopyOrder] = []
    models = set(wanted) | {m for c in live for m in c.models | c.filling}
    for model in sorted(models):
        k = wanted.get(model, 0)
        holders = sorted((c for c in live if c.holds(model)), key=_keep_order(leader))
        keep = _spread(holders, k, set())
        out += [CopyOrder(c.loader_id, model, "drop") for c in holders if c not in keep]
        if len(keep) >= k:
            continue
        hosts = {c.host for c in keep}
        free = sorted(
            (c for c in live if c.cache and not c.holds(model)), key=lambda c: (c.loader_id != leader, c.loader_id)
        )
        out += [CopyOrder(c.loader_id, model, "fill") for c in _spread(free, k - len(keep), hosts)]
    return out


@dataclass
class CopyTable:
    """What the loader heard of every loader's copies, and (while leading) which models the mesh
    keeps cached, with when each was last used (on the loader's clock)."""

    me: str
    stale_s: float  # a loader not heard for this long is gone (its copies with it)
    loaders: dict[str, LoaderCopies] = field(default_factory=dict)
    wanted: dict[str, float] = field(default_factory=dict)  # model → last used

    def heard(self, c: LoaderCopies) -> None:
        self.loaders[c.loader_id] = c

    def live(self, now: float) -> list[LoaderCopies]:
        for lid in [lid for lid, c in self.loaders.items() if now - c.seen > self.stale_s]:
            del self.loaders[lid]
        return list(self.loaders.values())

    def peers(self, now: float) -> list[LoaderCopies]:
        """Other loaders' copies ready to send (chain sources besides this loader's own)."""
        return [c for c in self.live(now) if c.loader_id != self.me and c.models]

    def want(self, model: str, now: float) -> None:
        """Keep `model` cached mesh-wide; also marks it used now."""
        self.wanted[model] = max(now, self.wanted.get(model, now))

    def touch(self, model: str, now: float) -> None:
        if model in self.wanted:
            self.wanted[model] = now

    def adopt(self, now: float) -> list[str]:
        """On taking the lease: what live loaders hold stays wanted (the last leader wanted it),
        its idle time counted from now. Returns the models adopted."""
        held = sorted({m for c in self.live(now) for m in c.models | c.filling} - set(self.wanted))
        for m in held:
            self.wanted[m] = now
        return held

    def sweep(
        self,
        now: float,
        live_holders: Mapping[str, int],
        in_use: Callable[[str], int],
        keep_alive_s: float,
        keep_alive_cold_s: float,
    ) -> list[tuple[str, KeepAlive]]:
        """Stop wanting what the keep-alive policy releases (then `place_copies` drops every copy)."""
        out = []
        for model, last in list(self.wanted.items()):
            d = keep_alive_decision(
                now, last, in_use(model), live_holders.get(model, 0), keep_alive_s, keep_alive_cold_s
            )
            if d.release:
                del self.wanted[model]
                out.append((model, d))
        return out

    def count(self, model: str, now: float) -> int:
        return sum(1 for c in self.live(now) if model in c.models)

    def status(self, now: float) -> dict[str, object]:
        """For `cascade status`: every live loader's copies, and the models kept cached."""
        return {
            "loaders": {
                c.loader_id: {"host": c.host, "models": sorted(c.models), "filling": sorted(c.filling)}
                for c in sorted(self.live(now), key=lambda c: c.loader_id)
            },
            "wanted": sorted(self.wanted),
        }
