"""Transfer planning: which source sends a model's units to which targets, in what order.

A pure core (no I/O, no clocks): a mesh snapshot and a request go in, a `TransferPlan` comes out;
the loader turns the plan into `TransferOrder`s (`plan_orders`) and sends them. The only
non-determinism is the auth token, drawn from `secrets` unless a test passes its own factory.

Source preference, for `multicast` and `star` (within each class, and before a host cache on
another host, sources on a target's own host come first: `WorkerView.host`, `--host-id`):
  1. workers holding the model in full and serving no requests (several → several chains);
  2. a host copy (`host_copies` per model, default 1, each in a loader's memory; one on a
     target's host first);
  3. workers holding it in full while serving requests, their send rate-limited so the transfer
     does not starve their requests. The host cache comes before them: it costs no request
     latency, while a live holder pays for every byte it sends;
  4. disk: each target reads the checkpoint itself.
`host-cache` mode uses only the host cache (each target gets its own stream: what a system with a
host-memory cache and no multicast does); `disk` mode only disk (ServerlessLLM-style).

Ordered plans (`PlanRequest.ordered`, execute-while-load from zero, docs/live-scaling.md): when
nothing in the mesh holds the model (the source is the host cache or disk) and several targets
load it, each target gets its own stream and its own block of the unit range first
(`ordered_units`: target i of N starts with block i, then i+1, ... wrapping round), so together
they hold every layer after about 1/N of a load and the gateway can route through them as a
pipeline. A plain chain gives every target the same order: none of them would hold the back
layers before the whole load ends. The price, in `multicast` mode, is one stream per target from
the host cache instead of one chain: it pays where each target has its own link to the host
cache (PCIe per accelerator, or an emulated per-send cap), not where one network link carries
them all. Beside a worker that already holds the model in full (live scaling of a served model),
an ordered plan loads its targets from the front and from the back in turn instead
(`front_back_units`): the gateway's live routes then run the front layers on one, the middle on the
full instance and the back on the other.

A chain source → T1 → … → Tn costs about one transfer plus a chunk per hop, so a chain is never
split for speed; several sources give several chains only so that one failure touches fewer
targets and no single source carries every stream.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from cascade.messages import TransferOrder
from cascade.workers import WorkerView

LoadingMode = Literal["multicast", "host-cache", "disk", "star"]
SourceKind = Literal["worker", "host-cache", "disk"]

# A serving holder gives at most this many bytes/s to a transfer by default: a fraction of what one
# loopback hop moves here (~2 GB/s), so its request path keeps most of the memory bandwidth.
DEFAULT_SERVING_RATE_LIMIT_BPS = 256e6


class PlanError(ValueError):
    """The request cannot be planned (unknown target, no data address, nothing to load from)."""


@dataclass(frozen=True, slots=True)
class MeshSnapshot:
    workers: tuple[WorkerView, ...]
    # Models the host cache holds (and, for display, where it sends from).
    host_cache_models: frozenset[str] = frozenset()
    host_cache_addr: str | None = None
    host_cache_host: str = ""  # the host the cache is on ("" = unknown)
    # Other loaders' host copies (loader id, host, models), sources like this loader's own.
    peer_copies: tuple[tuple[str, str, frozenset[str]], ...] = ()

    def cached(self, model: str) -> bool:
        """Some loader holds a host copy of `model`."""
        return model in self.host_cache_models or any(model in m for _, _, m in self.peer_copies)

    def worker(self, worker_id: str) -> WorkerView | None:
        for w in self.workers:
            if w.worker_id == worker_id:
                return w
        return None


@dataclass(frozen=True, slots=True)
class PlanRequest:
    model: str
    targets: tuple[str, ...]
    mode: LoadingMode
    unit_nbytes: tuple[int, ...]  # per unit, front to back; len = num_units
    model_path: str = ""  # where a disk source reads the checkpoint
    serving_rate_limit_bps: float = DEFAULT_SERVING_RATE_LIMIT_BPS
    # A target whose units 0..k-1 are already verified needs only the rest (re-plans use this).
    first_unit: int = 0
    # From zero with execute-while-load: each target its own block first (module docstring).
    ordered: bool = False


@dataclass(frozen=True, slots=True)
class Source:
    kind: SourceKind
    worker_id: str | None = None
    addr: str | None = None
    serving: bool = False  # a live holder answering requests: its send is rate-limited
    rate_limit_bps: float = 0.0  # 0 = unlimited
    loader: str = ""  # a host-cache source on another loader ("" = the planning loader's own)


@dataclass(frozen=True, slots=True)
class Hop:
    worker_id: str
    addr: str | None  # None for a disk chain (the target reads locally)


@dataclass(frozen=True, slots=True)
class Chain:
    """source → targets[0] → targets[1] → …; one transfer id and token, its own fault domain."""

    transfer_id: str
    token: str
    source: Source
    targets: tuple[Hop, ...]
    units: tuple[int, ...]

    @property
    def members(self) -> tuple[str, ...]:
        head = (self.source.worker_id,) if self.source.worker_id else ()
        return head + tuple(h.worker_id for h in self.targets)


@dataclass(frozen=True, slots=True)
class TransferPlan:
    plan_id: str
    model: str
    mode: LoadingMode
    chains: tuple[Chain, ...]
    unit_nbytes: tuple[int, ...]
    model_path: str = ""
    note: str = ""  # why this shape (fallbacks taken), for `cascade tap`

    @property
    def num_units(self) -> int:
        return len(self.unit_nbytes)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(h.worker_id for c in self.chains for h in c.targets)

    def chain_of(self, worker_id: str) -> Chain | None:
        for c in self.chains:
            if worker_id in c.members:
                return c
        return None


TokenFactory = Callable[[], str]


def _token() -> str:
    return secrets.token_hex(16)


def _transfer_id(plan_id: str, i: int) -> str:
    return f"{plan_id}-{i}"


def _split(items: Sequence[str], parts: int) -> list[tuple[str, ...]]:
    """Split `items` into `parts` contiguous groups whose sizes differ by at most one."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out, i = [], 0
    for p in range(parts):
        n = q + (1 if p < r else 0)
        out.append(tuple(items[i : i + n]))
        i += n
    return out


def ordered_units(units: Sequence[int], index: int, parts: int, nbytes: Sequence[int] | None = None) -> tuple[int, ...]:
    """`units` (front to back) for target `index` of `parts` in an ordered plan: its own block of
    the range first, then the blocks after it, then those before it. The block after its own
    extends the contiguous range it holds, so the pipelines the gateway builds over the targets
    get shorter as loads go on.

    The blocks are contiguous and hold about the same bytes when `nbytes` (each unit's size, same
    order as `units`) is given, else about the same number of units: the layers are covered once
    the largest block is in, and the embedding and LM head units are rarely a layer's size."""
    n = len(units)
    if parts <= 1 or n < 2:
        return tuple(units)
    parts = min(parts, n)
    sizes = list(nbytes) if nbytes is not None and len(nbytes) == n and sum(nbytes) > 0 else [1] * n
    cum = [0]
    for x in sizes:
        cum.append(cum[-1] + x)
    bounds = [0]
    for p in range(1, parts):
        target = cum[n] * p / parts
        lo, hi = bounds[-1] + 1, n - (parts - p)  # every block keeps a unit at least
        bounds.append(min(range(lo, hi + 1), key=lambda j: (abs(cum[j] - target), j)))
    bounds.append(n)
    blocks = [tuple(units[bounds[p] : bounds[p + 1]]) for p in range(parts)]
    i = index % parts
    return tuple(u for b in blocks[i:] + blocks[:i] for u in b)


def select_sources(snapshot: MeshSnapshot, req: PlanRequest, exclude: frozenset[str] = frozenset()) -> list[Source]:
    """Sources for `req.model` in preference order of their class (see module docstring); every
    source returned belongs to the best class available. Empty means: read from disk."""
    holders = [
        w
        for w in snapshot.workers
        if w.holds(req.model) and w.worker_id not in exclude and w.worker_id not in req.targets and w.data_addr
    ]
    # Same-host sources first: a copy on the targets' own machine crosses no network link.
    hosts = {w.host for t in req.targets if (w := snapshot.worker(t)) is not None and w.host}

    def local(w: WorkerView) -> bool:
        return w.host in hosts

    # Host copies (this loader's, then other loaders'): one on a target's host first. A cache lives
    # in a loader and connects out to the first target: no address needed.
    copies = [("", snapshot.host_cache_host)] if req.model in snapshot.host_cache_models else []
    copies += sorted((lid, host) for lid, host, models in snapshot.peer_copies if req.model in models)
    copies.sort(key=lambda c: not (c[1] and c[1] in hosts))
    cached = req.mode in ("multicast", "star", "host-cache") and bool(copies) and "host-cache" not in exclude
    cache = [Source("host-cache", None, snapshot.host_cache_addr, loader=copies[0][0])] if cached else []
    cache_local = cached and bool(copies[0][1]) and copies[0][1] in hosts
    if req.mode in ("multicast", "star"):
        idle = sorted((w for w in holders if w.load == 0), key=lambda w: (not local(w), w.worker_id))
        if idle and (local(idle[0]) or not cache_local):
            return [Source("worker", w.worker_id, w.data_addr) for w in idle]
    if cache:
        return cache
    if req.mode in ("multicast", "star"):
        busy = sorted((w for w in holders if w.load > 0), key=lambda w: (not local(w), w.load, w.worker_id))
        if busy:
            # One serving source only: every byte it sends costs its requests something.
            w = busy[0]
            return [Source("worker", w.worker_id, w.data_addr, serving=True, rate_limit_bps=req.serving_rate_limit_bps)]
    return []


def plan_transfer(
    snapshot: MeshSnapshot, req: PlanRequest, plan_id: str, token_factory: TokenFactory = _token
) -> TransferPlan:
    """Plan moving `req.model` to `req.targets` (see module docstring for the source choice)."""
    return _plan(snapshot, req, plan_id, token_factory, exclude=frozenset())


def _plan(
    snapshot: MeshSnapshot, req: PlanRequest, plan_id: str, token_factory: TokenFactory, exclude: frozenset[str]
) -> TransferPlan:
    if not req.targets:
        raise PlanError("no targets")
    if len(set(req.targets)) != len(req.targets):
        raise PlanError("a target is named twice")
    if not req.unit_nbytes:
        raise PlanError(f"model {req.model} has no units")
    if not 0 <= req.first_unit < len(req.unit_nbytes):
        raise PlanError(f"first unit {req.first_unit} out of range")
    units = tuple(range(req.first_unit, len(req.unit_nbytes)))
    hops = []
    for t in req.targets:
        w = snapshot.worker(t)
        if w is None:
            raise PlanError(f"target {t} is not in the mesh")
        if w.holds(req.model):
            raise PlanError(f"target {t} already holds {req.model}")
        hops.append(Hop(t, w.data_addr))

    sources = [] if req.mode == "disk" else select_sources(snapshot, req, exclude)
    note = ""
    if not sources:
        if req.mode != "disk":
            note = f"no live holder{'' if req.mode == 'multicast' else ' or host cache'} of {req.model}: disk"
        if req.mode == "host-cache" and not snapshot.cached(req.model):
            note = f"{req.model} is not in the host cache: disk"
        if not req.model_path:
            raise PlanError(f"nothing holds {req.model} and no checkpoint path was given")
        diskless = [h.worker_id for h in hops if (w := snapshot.worker(h.worker_id)) and w.model_source == "network"]
        if diskless:
            raise PlanError(
                f"{', '.join(diskless)} read no model store (--model-source network) and no live worker or host "
                f"cache holds {req.model}"
            )
        disk = Source("disk")
        order = _orders(req, units, len(hops), _full_holder(snapshot, req))
        chains = tuple(
            Chain(_transfer_id(plan_id, i), token_factory(), disk, (h,), order[i]) for i, h in enumerate(hops)
        )
        if req.ordered and len(hops) > 1:
            note = (note + "; " if note else "") + "ordered: each target its own block first"
        return TransferPlan(plan_id, req.model, req.mode, chains, req.unit_nbytes, req.model_path, note)

    for h in hops:
        if not h.addr:
            raise PlanError(f"target {h.worker_id} has no data-plane address")
    by_id = {h.worker_id: h for h in hops}
    if req.ordered and len(hops) > 1 and sources[0].kind == "host-cache":
        # One stream per target, each starting with its own block, or with a full holder serving
        # already the front and the back in turn (module docstring).
        order = _orders(req, units, len(hops), _full_holder(snapshot, req))
        for i, h in enumerate(hops):
            w = snapshot.worker(h.worker_id)
            if w is not None and w.model_source == "network" and 0 in order[i]:
                # A worker that reads no model store builds the model from the files unit 0
                # carries: that unit comes first, then its own block.
                order[i] = (0, *(u for u in order[i] if u != 0))
        chains = tuple(
            Chain(_transfer_id(plan_id, i), token_factory(), sources[0], (h,), order[i]) for i, h in enumerate(hops)
        )
        note = "ordered from the host cache: each target its own stream, its own block first"
        return TransferPlan(plan_id, req.model, req.mode, chains, req.unit_nbytes, req.model_path, note)
    if req.mode in ("host-cache", "star"):
        # One stream per target from the source itself; targets spread round-robin over sources.
        chains = tuple(
            Chain(_transfer_id(plan_id, i), token_factory(), sources[i % len(sources)], (h,), units)
            for i, h in enumerate(hops)
        )
    else:
        groups = _split(req.targets, len(sources))
        chains = tuple(
            Chain(_transfer_id(plan_id, i), token_factory(), src, tuple(by_id[t] for t in g), units)
            for i, (src, g) in enumerate(zip(sources, groups, strict=False))
        )
    if sources[0].serving:
        note = f"only serving holders of {req.model}: send rate-limited"
    return TransferPlan(plan_id, req.model, req.mode, chains, req.unit_nbytes, req.model_path, note)


def _full_holder(snapshot: MeshSnapshot, req: PlanRequest) -> bool:
    """A worker other than the targets holds `req.model` in full: live routes can end on it."""
    return any(w.worker_id not in req.targets and w.holds(req.model) for w in snapshot.workers)


def front_back_units(units: Sequence[int], index: int) -> tuple[int, ...]:
    """`units` for target `index` of an ordered plan while a full instance serves the model: front
    to back for even indices, back to front for odd ones.

    The gateway's live routes then run the front layers on one loading instance, the middle on the
    full one and the back layers with the LM head on the other (router.choose_route): the busy full
    instance is spared the layers both hold, twice what one loading head spares it, and once the two
    meet they form a whole pipeline of their own, half-way through the load. Blocks, as from zero,
    would leave the second target without the embedding or the LM head for its whole first block:
    no use in a route until then."""
    return tuple(units) if index % 2 == 0 else tuple(reversed(units))


def _orders(req: PlanRequest, units: tuple[int, ...], n: int, full_holder: bool = False) -> list[tuple[int, ...]]:
    """Each target's unit order: front to back, or in an ordered plan its own block first (from
    zero), or the front and the back in turn (`full_holder`: a full instance serves already)."""
    if not req.ordered:
        return [units] * n
    if full_holder:
        return [front_back_units(units, i) for i in range(n)]
    sizes = [req.unit_nbytes[u] for u in units]
    return [ordered_units(units, i, n, sizes) for i in range(n)]


def replan(
    plan: TransferPlan,
    failed: str,
    snapshot: MeshSnapshot,
    units_ready: Mapping[str, int],
    plan_id: str,
    token_factory: TokenFactory = _token,
    serving_rate_limit_bps: float = DEFAULT_SERVING_RATE_LIMIT_BPS,
) -> TransferPlan | None:
    """A new plan for the survivors downstream of `failed` in its chain, or None if there are none.

    `failed` is a target worker id, a source worker id, or "host-cache". `units_ready` says how many
    units of the model (front to back) each survivor holds verified; the new chain starts at the
    fewest, and a survivor ignores the units it already holds. None also when every survivor
    already holds every unit. The new source is another holder, else the host
    cache, else disk; never the failed member. Chains of `plan` without the failed member are
    untouched (each chain is its own fault domain)."""
    chain = plan.chain_of(failed) if failed != "host-cache" else None
    if failed == "host-cache":
        chain = next((c for c in plan.chains if c.source.kind == "host-cache"), None)
    if chain is None:
        return None
    if failed in (chain.source.worker_id, "host-cache"):
        survivors = tuple(h.worker_id for h in chain.targets)
    else:
        pos = [h.worker_id for h in chain.targets].index(failed)
        survivors = tuple(h.worker_id for h in chain.targets[pos + 1 :])
    live = tuple(s for s in survivors if snapshot.worker(s) is not None)
    if not live:
        return None
    first = min(units_ready.get(s, 0) for s in live)
    if first >= plan.num_units:
        return None
    # A multicast re-plan stays a chain; star and host-cache re-plan their single lost branch.
    mode: LoadingMode = plan.mode
    req = PlanRequest(
        model=plan.model,
        targets=live,
        mode=mode,
        unit_nbytes=plan.unit_nbytes,
        model_path=plan.model_path,
        serving_rate_limit_bps=serving_rate_limit_bps,
        first_unit=first,
    )
    exclude = frozenset({failed})
    new = _plan(snapshot, req, plan_id, token_factory, exclude)
    return replace(new, note=f"re-plan after {failed} failed" + (f"; {new.note}" if new.note else ""))


def first_break(chain: Chain, dead: Collection[str], failed: Collection[str]) -> str | None:
    """Which member of `chain` to re-plan around, from what the loader heard: `dead` workers (no
    heartbeat) and targets that reported their receive `failed`. A dead member breaks the chain
    where it stands; else a failed target blames its upstream hop (the source, or the target
    before it), whose stream broke. Downstream targets of a break fail too; only the first break
    matters. None: nothing is broken."""
    upstream = chain.source.worker_id or ("host-cache" if chain.source.kind == "host-cache" else None)
    if upstream is not None and upstream in dead:
        return upstream
    for hop in chain.targets:
        if hop.worker_id in dead:
            return hop.worker_id
        if hop.worker_id in failed:
            return upstream if upstream is not None else hop.worker_id
        upstream = hop.worker_id
    return None


def send_rate(source_limit_bps: float, cap_bps: float) -> float:
    """The pace of one send: the source's own limit (a serving holder's), further capped by a
    mesh-wide `cap_bps` (an operator's bandwidth budget, or an emulated link); 0 = unlimited."""
    limits = [x for x in (source_limit_bps, cap_bps) if x > 0]
    return min(limits) if limits else 0.0


def plan_orders(
    plan: TransferPlan, timeout_s: float = 30.0, rate_cap_bps: float = 0.0
) -> dict[str, list[TransferOrder]]:
    """The `TransferOrder`s to send, by worker id ("host-cache" for the loader's own cache).

    Receivers must get theirs before the source's send order (they must be expecting the
    connection), so the loader sends every "receive"/"disk" order first, then the "send" ones.
    Receive orders carry the checkpoint path too: a new instance reads `config.json` and the
    tokenizer there (small files); the weights come over the data plane."""
    out: dict[str, list[TransferOrder]] = {}
    n = plan.num_units
    for c in plan.chains:
        units = list(c.units)
        sizes = [plan.unit_nbytes[u] for u in units]
        if c.source.kind == "disk":
            for h in c.targets:
                out.setdefault(h.worker_id, []).append(
                    TransferOrder(
                        c.transfer_id,
                        c.token,
                        plan.model,
                        "disk",
                        units,
                        n,
                        path=plan.model_path,
                        timeout_s=timeout_s,
                        unit_nbytes=sizes,
                        plan_id=plan.plan_id,
                    )
                )
            continue
        for i, h in enumerate(c.targets):
            nxt = c.targets[i + 1].addr if i + 1 < len(c.targets) else None
            out.setdefault(h.worker_id, []).append(
                TransferOrder(
                    c.transfer_id,
                    c.token,
                    plan.model,
                    "receive",
                    units,
                    n,
                    downstream=nxt,
                    path=plan.model_path,
                    timeout_s=timeout_s,
                    unit_nbytes=sizes,
                    plan_id=plan.plan_id,
                )
            )
        sender = c.source.worker_id or "host-cache"
        out.setdefault(sender, []).append(
            TransferOrder(
                c.transfer_id,
                c.token,
                plan.model,
                "send",
                units,
                n,
                downstream=c.targets[0].addr,
                rate_limit_bps=send_rate(c.source.rate_limit_bps, rate_cap_bps),
                timeout_s=timeout_s,
                plan_id=plan.plan_id,
            )
        )
    return out
