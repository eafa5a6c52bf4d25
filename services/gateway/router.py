"""Routing: which instance gets the next batch of a model. Pure functions over a
snapshot; the registry builds the snapshot, the batcher asks, nothing here does I/O.

`choose_instance` picks among instances that hold the whole model. `choose_route`
adds live scaling (docs/live-scaling.md): when every full instance is busy, a
request may run its front layers on an instance that is still loading them and
the rest on a full one, so the busy instance sheds work before the load ends. With no
instance of the model at all (scaling from zero), `zero_route` strings the instances still
loading it into a pipeline whose stages together run every layer, so the first requests need
no finished load.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from math import ceil, floor

from cascade.messages import RouteStage
from cascade.stages import covers


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What the gateway knows about one worker when it routes."""

    worker_id: str
    model: str | None
    state: str  # idle | loading | serving | draining
    units_ready: int
    num_units: int
    running: int  # from the worker's last heartbeat
    waiting: int  # from the worker's last heartbeat
    max_batch: int
    inflight: int = 0  # this gateway's requests on the worker now
    inflight_at_heartbeat: int = 0  # this gateway's requests on it when that heartbeat arrived
    prefix_units: int = 0  # units ready without a hole from unit 0 (embedding, layer 0, ...)
    stage_addr: str | None = None  # its stage link, for pipelined routes
    driven_layers: int = 0  # from the heartbeat: layers it runs for the routes it drives, summed
    prefill_budget: int = 0  # from the heartbeat: prompt tokens a step starts at most (0: unknown)
    unstarted_tokens: int = 0  # prompt tokens of this gateway's requests there without a token yet
    unstarted_prompts: int = 0  # and how many prompts those are
    # Prompt tokens of this gateway's pipelined routes without a token yet whose later stages run
    # here, each weighed by the share of the layers it runs here: prefill those routes queued here.
    relayed_unstarted_tokens: int = 0
    driven: int = 0  # from the heartbeat: routes it drives (in `running` too)
    kv_cache_usage: float = 0.0  # from the heartbeat: KV blocks held over usable blocks (0..1)
    # From the heartbeat: a stage of a pipeline-parallel instance (its id and the decoder layers
    # [stage_start, stage_end) it runs); "" / 0, 0 for a whole instance.
    group: str = ""
    stage_start: int = 0
    stage_end: int = 0
    # From the heartbeat: the worker process it shares with other instances ("" on a worker of its
    # own) and its compute quota there (relative to theirs; docs/pipelined-and-shared.md).
    shared_device: str = ""
    quota: float = 0.0
    # Which units are ready, once the gateway knows it from readiness events (None: only the
    # heartbeat's count is known). A load from zero fills units out of order (each instance its
    # own block first): routes through them need the set, not a prefix.
    ready_units: frozenset[int] | None = None
    # From the heartbeat: prompt tokens queued there and not computed yet, each weighed by the share
    # of the layers it runs there (a loading head's backlog of routes' first stages).
    prefill_queued: int = 0


@dataclass(frozen=True, slots=True)
class Room:
    """What one instance takes in a batch before the router would count it full or backlogged.

    A batch goes to one route, and the router weighs an instance only between batches: without
    this, the first instance of several to come up takes every request held for the model.
    Measured in bench/burst.py: a wave from zero held 8 long prompts, the first of four instances
    that finished loading 2 ms before the others got all 8 in one batch, and five of them waited
    1.3-1.6 s for a first token while the other three instances took only later arrivals.
    """

    requests: int  # batch slots and queue places left
    prompts: int  # prompts of this gateway's there without a token yet
    tokens: int  # and their prompt tokens
    prefill_budget: int  # prompt tokens a step starts at most (0: unknown, no prefill bound)

    def admits(self, n: int, tokens: int) -> bool:
        """One more request may join a batch that already holds `n` requests of `tokens`
        prompt tokens: the instance would not be full or backlogged (`prefill_backlogged`)
        before it."""
        return n < self.requests and not _backlogged(self.prefill_budget, self.prompts + n, self.tokens + tokens)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a batch goes. `stages` empty: `worker_id` runs the whole model. Otherwise the
    pinned pipeline, whose first stage is `worker_id` (it drives the token loop). `room`
    bounds the batch (None: the batcher's own size limit alone)."""

    worker_id: str
    stages: tuple[RouteStage, ...] = ()
    room: Room | None = field(default=None, compare=False)  # advice for the batch, not where it goes


def serves_fully(view: InstanceView, model: str) -> bool:
    """True when `view` can run every unit of `model` and admits new work."""
    return view.state == "serving" and view.model == model and view.num_units > 0 and view.units_ready >= view.num_units


# A route's head runs its decode in every other step at most: between two of its tokens the tail
# stage computes, so the next input reaches the busy instance after the step that made the token
# (measured in bench/scaleup.py: a relayed token takes about two of the busy instance's steps). Per
# step, a route through k of L layers is then at most half of k/L of a full sequence.
HEAD_DUTY = 0.5


def route_load(view: InstanceView, driven_layers: float) -> float:
    """Full-sequence equivalents of routes a head drives through `driven_layers` layers in all."""
    return HEAD_DUTY * driven_layers / max(view.num_units - 2, 1)


def estimated_load(view: InstanceView) -> float:
    """Sequences on the worker now, in full-sequence equivalents, as best the gateway can tell.

    The heartbeat's running + waiting was true when it was sent, and already counts this
    gateway's requests of that moment; what this gateway dispatched or finished since then is
    the difference of its own counts. Never less than what this gateway alone has there. The
    routes it drives count by their share of its steps (`route_load`), not one for one: measured
    in bench/scaleup.py, a new instance that finished loading while driving forty routes made at
    six or seven of eight layers had no room for whole requests until they ended, so the busy
    instance took every new request again and its latency climbed for seconds after the load.
    """
    routes = route_load(view, view.driven_layers)
    fresh = view.running - view.driven + routes + view.waiting + view.inflight - view.inflight_at_heartbeat
    # A worker whose KV cache is full is loaded whatever its free batch slots: a request sent
    # there waits for blocks (or makes it preempt one). Its KV usage counts as that share of its
    # batch limit.
    return max(fresh, view.inflight - view.driven, view.kv_cache_usage * max(view.max_batch, 1), 0)


def choose_instance(
    instances: Iterable[InstanceView], model: str, avoid: Sequence[str] | frozenset[str] = ()
) -> str | None:
    """The least-loaded instance serving `model` fully, or None when there is none.

    Load is relative to the instance's batch size, so a bigger instance takes more. Instances
    in `avoid` (ones that already failed this request) are used only when nothing else can
    serve: a retry on the same instance beats no answer. Ties go to the smaller worker id, so
    the choice is deterministic.
    """
    views = list(instances)
    best: tuple[bool, bool, float, float, float, str] | None = None
    for v in views:
        if not serves_fully(v, model):
            continue
        load = estimated_load(v)
        share = quota_share(v, views)
        key = (
            v.worker_id in avoid,
            prefill_backlogged(v),
            load / max(v.max_batch, 1) / share,
            -share,
            load,
            v.worker_id,
        )
        if best is None or key < best:
            best = key
    return None if best is None else best[5]


def quota_share(view: InstanceView, instances: Iterable[InstanceView]) -> float:
    """The share of its worker's compute `view` can count on now (0..1]: on a shared worker, its
    quota over the quotas of the instances there that have work, itself included (the stride
    scheduler gives an idle instance's steps to the others, so only busy neighbours take a
    share); 1 on a worker of its own or when no quota is known. The router weighs an instance's
    load by it: of two instances equally loaded, the one whose worker gives the model more of
    its compute steps faster, and an instance at quota q holding a load L is as loaded as one
    of its own holding L / q (docs/pipelined-and-shared.md, Routing by quota)."""
    if not view.shared_device or view.quota <= 0:
        return 1.0
    total = view.quota
    for o in instances:
        if o.worker_id == view.worker_id or o.shared_device != view.shared_device or o.quota <= 0:
            continue
        if o.state in ("serving", "loading", "draining") and o.running + o.waiting + o.inflight > 0:
            total += o.quota
    return min(1.0, view.quota / total)


def models_without_instance(instances: Sequence[InstanceView], required: Iterable[str]) -> list[str]:
    """The models in `required` that no instance, whole or pipelined, can serve (what /health reports)."""
    return [m for m in required if not any(serves_fully(v, m) for v in instances) and not pipelines(instances, m)]


# Prompts are computed a step's prefill budget at a time: with long prompts an instance with free
# batch slots can still have seconds of prefill queued. Keeping about two steps' worth there keeps
# its steps full; the rest of a backlog waits here (see QUEUE_AHEAD). With prompts longer than the
# budget (chunked), two steps' worth is less than the prompt under way, so two prompts are always
# let through: the next one is there when the one under way ends mid-step.
PREFILL_AHEAD_STEPS = 2
PREFILL_AHEAD_PROMPTS = 2


def prefill_backlogged(view: InstanceView) -> bool:
    """This gateway has given `view` PREFILL_AHEAD_PROMPTS prompts and as many prompt tokens as it
    computes in PREFILL_AHEAD_STEPS steps, and none of them has a token yet. Measured in
    bench/burst.py: at a burst's start the one instance up took every request it had slots for
    (16 long prompts: seconds of prefill) while the instances added half a second later found
    nothing left to do."""
    return _backlogged(view.prefill_budget, view.unstarted_prompts, view.unstarted_tokens)


def _backlogged(prefill_budget: int, prompts: int, tokens: int) -> bool:
    return prefill_budget > 0 and prompts >= PREFILL_AHEAD_PROMPTS and tokens >= PREFILL_AHEAD_STEPS * prefill_budget


def has_room(view: InstanceView) -> bool:
    return estimated_load(view) < max(view.max_batch, 1) and not prefill_backlogged(view)


# How many requests past its batch limit an instance may be given to queue: enough that its
# batch refills without waiting for a gateway round trip (a step admits a couple of long prompts
# at most), little enough that a backlog stays here, where any instance that frees up or comes up
# (a new one while loading, too) can take it. Half the batch limit, as before, pinned a burst's
# first seconds to the one instance up then: 16 long prompts are seconds of prefill there, while
# instances added half a second later idled (bench/burst.py).
QUEUE_AHEAD = 4


# From this share of its batch limit on, a full instance counts as busy for live routes: requests
# it holds are slowed by their neighbours, and a heartbeat's "waiting" is too brief a sample to
# be the only sign of a prefill backlog. Below it, a pipelined route would only add a hop.
BUSY_LOAD = 0.5


def accepts(view: InstanceView) -> bool:
    return estimated_load(view) < max(view.max_batch, 1) + QUEUE_AHEAD and not prefill_backlogged(view)


def room_of(view: InstanceView, others: Iterable[InstanceView] = ()) -> Room:
    """What a batch for full instance `view` may hold: about what the router would give it
    request by request. No more than `accepts` lets through, and no more than keeps it as
    loaded as the next-least-loaded instance in `others` that takes work (one at least: the
    router chose `view`)."""
    load = estimated_load(view)
    mb = max(view.max_batch, 1)
    n = ceil(mb + QUEUE_AHEAD - load)
    for o in others:
        if o.worker_id != view.worker_id and accepts(o):
            n = min(n, floor((estimated_load(o) / max(o.max_batch, 1) - load / mb) * mb))
    return Room(
        requests=max(1, n),
        prompts=view.unstarted_prompts,
        tokens=view.unstarted_tokens,
        prefill_budget=view.prefill_budget,
    )


def head_has_room(view: InstanceView, k: int) -> bool:
    """Room on a loading instance for one more route it drives through its first k layers.

    Its batch limit is for sequences running every layer; a route runs only some, so routes are
    weighed by the layers they run there and by the share of its steps they take (HEAD_DUTY), in
    full-sequence equivalents.
    Routes sent since the heartbeat count at the current k. Counting routes one for one was
    measured to turn the new instance away from the backlog it was loading to relieve
    (bench/scaleup.py): a two-stage route's decode waits on the tail stage each token, so routes
    live longer than full requests, and ones made at a small k kept the head full as k grew."""
    since = max(view.inflight - view.inflight_at_heartbeat, 0) + view.waiting
    return route_load(view, view.driven_layers + k * since) < max(view.max_batch, 1)


def front_layers(view: InstanceView, model: str) -> int:
    """Decoder layers `view` can run as the first stage of `model` (embedding included), or 0."""
    if view.model != model or view.num_units < 3 or view.prefix_units < 2:
        return 0
    return min(view.prefix_units - 1, view.num_units - 2)


def head_layers(view: InstanceView, model: str, full: InstanceView, avoid: Sequence[str] | frozenset[str] = ()) -> int:
    """Decoder layers `view` would run as the head of a live route whose tail is the full instance
    `full`, or 0 when it cannot be that head: it must be loading, reachable, not to avoid, of
    the same shape, hold at least one layer and leave the tail one, and have room for the route."""
    k = front_layers(view, model)
    if (
        view.state != "loading"  # a serving one is a full instance: choose_instance weighed it
        or not view.stage_addr
        or view.worker_id in avoid
        or view.num_units != full.num_units
        or not 1 <= k < full.num_units - 2  # the tail keeps at least one layer and the head
        or not head_has_room(view, k)
    ):
        return 0
    return k


def head_key(view: InstanceView, k: int) -> tuple[int, float, str]:
    """Order of heads for a live route: most front layers first, then least loaded per batch
    slot, then worker id (deterministic)."""
    return (-k, estimated_load(view) / max(view.max_batch, 1), view.worker_id)


# Late split. A live route's split depth is fixed when it is made, at the layers its head holds
# then; its later stages then wait their turn in the busy instance's prefill queue (oldest first)
# while the head keeps loading layers. So while the busy instance has this many steps of prefill
# queued already (its own prompts and routes' later stages), a new request waits here instead:
# it gets its route when it would soon be computed, through the head's layers of that moment, and
# the busy instance does less of it. The queue left there must keep its steps full meanwhile: the
# gateway counts a route from its dispatch to its first token, so its head's part and both hops
# are in the count too. Measured in bench scaleup (1→2, live, 4 paired runs each on a loaded
# machine): routes ran 2.3 of 8 layers on the new instance without the late split; 2.8 with 4
# steps, p99 no better (the busy instance took fewer steps: starved at times); 2.6-2.8 with 8
# steps, window p99 TTFT 3.45 s against 3.73 s. That 4 was measured while a route's batch took
# every request held here at once (up to the batcher's size), so the queue overshot and ran dry in
# turn; with the batch bounded at the late split (`late_room`), 4 steps against 8, live only,
# alternated, 2 runs each (load average 9-10): routes 3.15-3.36 of 8 layers deep on the new
# instance against 2.80-3.01 (1→2) and 2.57-2.73 against 2.33-2.35 (1→3); window p99 TTFT
# 2768 / 2909 ms against 3066 / 2739 (1→2), 2500 / 2256 against 2509 / 2779 (1→3).
LATE_SPLIT_STEPS = 4


def relaying_backlog(full: InstanceView) -> bool:
    """The full instance `full` has PREFILL_AHEAD_STEPS steps' worth of this gateway's prompt tokens
    queued counting routes' later stages there (by their share of the layers), not only its own
    prompts as `prefill_backlogged` does: a request sent whole now would wait behind them.

    Without it a busy instance relaying for a loading head counted as idle: the routes took its own
    requests' place, so its batch and own prompt queue were small, and new requests went to it
    whole. Measured in bench scaleup (1→2, live, per-request timelines): a quarter of the
    window's requests went whole to the busy instance while it computed routes' later stages in
    every step, each costing it the whole model instead of the layers past the head's."""
    queued = full.unstarted_tokens + full.relayed_unstarted_tokens
    return full.prefill_budget > 0 and queued >= PREFILL_AHEAD_STEPS * full.prefill_budget


def split_later(full: InstanceView) -> bool:
    """The busy full instance `full` has LATE_SPLIT_STEPS steps' worth of this gateway's prompt
    tokens queued (whole prompts, and routes' stages there by their share of the layers): a live
    route made now would wait there and run fewer of the head's layers than one made later."""
    queued = full.unstarted_tokens + full.relayed_unstarted_tokens
    return full.prefill_budget > 0 and queued >= LATE_SPLIT_STEPS * full.prefill_budget


# A live route's head takes every layer it holds while its prefill queue, with the route's first
# stage added, stays within this many of its steps of what the busy instance has queued with the
# route's stage there added: on a tie the loading instance, which has nothing else to do, takes the
# work. Beyond it the split moves towards the front (`head_split`).
HEAD_SLACK_STEPS = 1


def head_split(head: InstanceView, full: InstanceView, k: int, tail_layers: int = 0) -> int:
    """Decoder layers [0, m) a live route runs on its loading `head`, which holds k front layers,
    before the busy full instance `full` runs the rest (up to the `tail_layers` a back-loaded
    instance ends it with): the most of the k that leaves the head's prefill queue, with this
    route's share added, no more than HEAD_SLACK_STEPS of its steps behind `full`'s with its share
    added; 1 at least.

    Splitting at all k layers the head has was measured to move the bottleneck onto the head once
    k passes about half the model (bench scaleup 1→2, per-step logs of both workers): the busy
    instance's queue is kept short by the late split, so held requests flow out as fast as it
    drains and the head takes k/L of each; it ran four prompts' first stages every step from 5 s
    after the decision, its queue grew, and its routes' first tokens came 3.1-3.7 s after arrival
    while requests sent whole to the busy instance, now idle between steps, got theirs in
    0.4-2 s. Balancing the two queues keeps both busy: a route's stages together go no faster
    than its slower queue.

    Queues are in full-model prompt tokens over each worker's step budget. The head's is its
    heartbeat's `prefill_queued` plus the routes this gateway sent it since (each at the current
    k, with the typical prompt of the requests queued); the busy instance's is this gateway's
    prompts and relayed stages there without a token yet, as the late split counts it. Without a
    budget from either (an emulation-free worker reports one; 0 is an older worker), k."""
    num_layers = full.num_units - 2
    if k <= 1 or head.prefill_budget <= 0 or full.prefill_budget <= 0 or num_layers <= 0:
        return k
    prompts = head.unstarted_prompts + full.unstarted_prompts
    prompt = (head.unstarted_tokens + full.unstarted_tokens) / prompts if prompts else float(full.prefill_budget)
    since = max(head.inflight - head.inflight_at_heartbeat, 0)
    head_q = head.prefill_queued + since * prompt * k / num_layers
    full_q = full.unstarted_tokens + full.relayed_unstarted_tokens
    for m in range(k, 1, -1):
        head_steps = (head_q + prompt * m / num_layers) / head.prefill_budget
        full_steps = (full_q + prompt * (num_layers - tail_layers - m) / num_layers) / full.prefill_budget
        if head_steps <= full_steps + HEAD_SLACK_STEPS:
            return m
    return 1


def choose_route(
    instances: Sequence[InstanceView], model: str, avoid: Sequence[str] | frozenset[str] = (), live: bool = True
) -> Route | None:
    """A full instance while one has room and no backlog; with `live` and the least-loaded full
    instance busy (out of slots, or with admitted work waiting), a pipelined route through the
    loading instance that holds the most front layers (it must have room itself), ending on
    that full instance, or, when another loading instance holds the LM head and back layers
    (loaded from the back: planner.front_back_units), running the middle there and ending on
    that one (`best_tail`); once those two hold every layer between them, a route across the two
    alone. With no full instance at all (from zero), a pipeline across loading
    instances that together hold every layer (`zero_route`); None when there is none.

    Stop-the-world scaling (`live` false) never splits: a loading instance gets nothing until
    it holds every layer.
    """
    pipe = choose_pipeline(instances, model, avoid)
    full_id = choose_instance(instances, model, avoid)
    if full_id is None:
        if pipe is None and live:
            return zero_route(instances, model, avoid)
        return pipe
    full = next(v for v in instances if v.worker_id == full_id)
    if pipe is not None and _prefer_pipeline(pipe, full, instances, avoid):
        return pipe
    # Late binding: when even the least-loaded instance is past its batch limit and queue, the
    # request waits here rather than in that instance's queue (None: the batcher holds it until
    # a slot frees, an instance appears, or its deadline).
    room = room_of(full, [v for v in instances if serves_fully(v, model) and v.worker_id not in avoid])
    held = None if full_id not in avoid and not accepts(full) else Route(full_id, room=room)
    # Busy: out of batch slots, or holding admitted work it could not start yet (a prefill
    # backlog: compute-bound, so shedding the first k layers of new prompts shortens it), its own
    # or routes' later stages (`relaying_backlog`).
    busy = (
        estimated_load(full) >= max(full.max_batch, 1) * BUSY_LOAD
        or full.waiting > 0
        or prefill_backlogged(full)
        or relaying_backlog(full)
    )
    if not live or not busy or not full.stage_addr:
        return Route(full_id, room=room) if has_room(full) else held
    best: tuple[int, float, str] | None = None
    head: InstanceView | None = None
    for v in instances:
        k = head_layers(v, model, full, avoid)
        if not k:
            continue
        key = head_key(v, k)
        if best is None or key < best:
            best, head = key, v
    if head is None:
        return held
    k = front_layers(head, model)
    num_layers = full.num_units - 2
    tail, b = best_tail(instances, model, full, head, avoid)
    if tail is not None and k + b >= num_layers:
        # The two loading instances hold every layer between them: a pipeline of their own, the
        # busy instance spared the whole request. The split sits mid-model where both can run it,
        # so neither does more than half of each route.
        m = min(max(num_layers // 2, num_layers - b), k)
        return Route(
            head.worker_id,
            (
                RouteStage(head.worker_id, 0, m, head.stage_addr or ""),
                RouteStage(tail.worker_id, m, num_layers, tail.stage_addr or ""),
            ),
            room=head_room(head, m),
        )
    if split_later(full):
        return None
    k = head_split(head, full, k, b if tail is not None else 0)
    head_stage = RouteStage(head.worker_id, 0, k, head.stage_addr or "")
    if tail is None:
        stages: tuple[RouteStage, ...] = (head_stage, RouteStage(full.worker_id, k, num_layers, full.stage_addr))
    else:
        stages = (
            head_stage,
            RouteStage(full.worker_id, k, num_layers - b, full.stage_addr),
            RouteStage(tail.worker_id, num_layers - b, num_layers, tail.stage_addr or ""),
        )
    share = (stages[1].end - stages[1].start) / num_layers
    return Route(head.worker_id, stages, room=late_room(full, share, head_room(head, k).requests))


def back_layers(view: InstanceView, model: str) -> int:
    """Decoder layers `view` can run as the last stage of `model` (LM head included), or 0: the run
    of layers it holds that ends at the last one. Needs its ready units (readiness events): a load
    from the back fills no prefix."""
    units = view.ready_units
    if view.model != model or view.num_units < 3 or units is None or view.num_units - 1 not in units:
        return 0
    num_layers = view.num_units - 2
    b = 0
    while b < num_layers and num_layers - b in units:  # unit l + 1 is layer l
        b += 1
    return b


def best_tail(
    instances: Sequence[InstanceView],
    model: str,
    full: InstanceView,
    head: InstanceView,
    avoid: Sequence[str] | frozenset[str] = (),
) -> tuple[InstanceView | None, int]:
    """The loading instance (not `head`) that holds the most back layers and the LM head, to end a
    live route (`full` runs the middle), and how many layers it runs; (None, 0) when none can.

    A loading instance that fills from the back (planner.front_back_units) is no head (no
    embedding until its load ends) but can end routes: the busy instance is then spared the back
    layers too. It must not have LATE_SPLIT_STEPS steps of relayed prefill queued already: its
    steps compute only what routes bring it, and a route waiting on it waits for its first token."""
    best: tuple[int, float, str] | None = None
    tail: InstanceView | None = None
    for v in instances:
        if (
            v.worker_id == head.worker_id
            or v.state != "loading"
            or not v.stage_addr
            or v.worker_id in avoid
            or v.group
            or v.num_units != full.num_units
        ):
            continue
        b = back_layers(v, model)
        if not b or (v.prefill_budget > 0 and v.relayed_unstarted_tokens >= LATE_SPLIT_STEPS * v.prefill_budget):
            continue
        key = (-b, v.kv_cache_usage, v.worker_id)
        if best is None or key < best:
            best, tail = key, v
    return tail, (-best[0] if best is not None else 0)


def late_room(full: InstanceView, share: float, requests: int) -> Room:
    """What one batch of live routes may hold: no more than the head has room for (`requests`), and
    no more prompts than keep the busy instance's prefill queue under LATE_SPLIT_STEPS steps, each
    route's prompt weighed by the `share` of the layers it runs there (`split_later`). Without it a
    batch takes every request held here once the queue dips below the bound (up to the batcher's
    size) at the split of that moment, which is what the late split is there to avoid.

    `Room` bounds prompt tokens as PREFILL_AHEAD_STEPS budgets: the budget here is scaled so that
    bound falls where the busy instance's queue reaches LATE_SPLIT_STEPS of its own budgets."""
    if full.prefill_budget <= 0 or share <= 0:
        return Room(requests=max(1, requests), prompts=0, tokens=0, prefill_budget=0)
    queued = full.unstarted_tokens + full.relayed_unstarted_tokens
    return Room(
        requests=max(1, requests),
        prompts=PREFILL_AHEAD_PROMPTS,
        tokens=ceil(queued / share),
        prefill_budget=max(1, floor(LATE_SPLIT_STEPS * full.prefill_budget / share / PREFILL_AHEAD_STEPS)),
    )


# ---- from zero: a pipeline across loading instances (docs/live-scaling.md) -----------------------


def _layer_run(units: frozenset[int], start: int, num_layers: int) -> int:
    """The end of the run of decoder layers held from `start` on (unit l + 1 is layer l)."""
    end = start
    while end < num_layers and end + 1 in units:
        end += 1
    return end


def zero_route(
    instances: Sequence[InstanceView], model: str, avoid: Sequence[str] | frozenset[str] = ()
) -> Route | None:
    """A route for `model` when no instance holds it whole: a pipeline across instances still
    loading it whose ready layers together cover the model, contiguous and in order, or None.

    Built front to back, greedily: at each layer the instance whose ready run from there reaches
    furthest takes the next stage (one that also holds the LM head and reaches the end finishes
    it). The first stage needs the embedding and room for one more route it drives
    (`head_has_room`); a stage that reaches the last layer without the LM head leaves that layer
    to one holding it. An instance runs one stage at most (its relayed state is per request), and
    only instances whose ready units the gateway knows from readiness events take part. A request
    keeps its KV cache where its layers ran, as on any route. Loads from zero that give each
    instance its own block first (planner.ordered_units) make this possible after about 1/N of a
    load; as soon as one instance holds every unit, `choose_route` prefers it. Its head must not
    have the pipeline's prefill queued already (`pipeline_backlogged`; another head is tried):
    what does not fit waits here for a head with room or a whole instance."""
    cands = [
        v
        for v in instances
        if v.model == model
        and v.state == "loading"
        and v.stage_addr
        and v.ready_units is not None
        and v.worker_id not in avoid
        and not v.group
        and v.num_units >= 3
    ]
    if not cands:
        return None
    # A head whose pipeline already has its prefill queued gives way to another head, else the
    # request waits here (`pipeline_backlogged`): a route is pinned, so a prompt queued behind
    # others on the pipeline cannot move to the whole instances the load brings a moment later.
    backlogged: set[str] = set()
    while True:
        route = _zero_route(cands, backlogged)
        if route is None:
            return None
        head = next(v for v in cands if v.worker_id == route.worker_id)
        share = max(s.end - s.start for s in route.stages) / (head.num_units - 2)
        if not pipeline_backlogged(head, share):
            return replace(route, room=head_room(head, route.stages[0].end, share))
        backlogged.add(head.worker_id)


def _zero_route(cands: Sequence[InstanceView], not_head: Collection[str]) -> Route | None:
    """`zero_route`'s pipeline over `cands`, with none of `not_head` as its first stage."""
    num_units = max(v.num_units for v in cands)
    num_layers = num_units - 2
    stages: list[RouteStage] = []
    used: set[str] = set()
    pos = 0
    while pos < num_layers:
        best: tuple[tuple[bool, int, float, str], InstanceView, int] | None = None
        for v in cands:
            units = v.ready_units
            assert units is not None
            if v.worker_id in used or v.num_units != num_units or (pos == 0 and 0 not in units):
                continue
            if pos == 0 and v.worker_id in not_head:
                continue
            end = _layer_run(units, pos, num_layers)
            finishes = end == num_layers and num_units - 1 in units
            if end == num_layers and not finishes:
                end -= 1  # the last stage samples: the LM head's holder runs the last layer
            if end <= pos or (pos == 0 and not head_has_room(v, end)):
                continue
            key = (not finishes, -end, estimated_load(v) / max(v.max_batch, 1), v.worker_id)
            if best is None or key < best[0]:
                best = (key, v, end)
        if best is None:
            return None
        _, v, end = best
        stages.append(RouteStage(v.worker_id, pos, end, v.stage_addr or ""))
        used.add(v.worker_id)
        pos = end
    if len(stages) < 2:
        return None  # one instance holds it all: it serves whole within a heartbeat
    return Route(stages[0].worker_id, tuple(stages))


def pipeline_budget(head: InstanceView, share: float) -> int:
    """Whole prompt tokens per step a pipeline driven by `head` prefills, when none of its stages
    runs more than `share` of the model's layers: each stage spends a step's budget on `share` of
    each token, so the pipeline goes 1/share times as fast as one whole instance (0: unknown)."""
    if head.prefill_budget <= 0 or share <= 0:
        return head.prefill_budget
    return max(1, floor(head.prefill_budget / min(share, 1.0)))


def pipeline_backlogged(head: InstanceView, share: float) -> bool:
    """A pipeline from zero driven by `head` (no stage running more than `share` of the layers)
    has PREFILL_AHEAD_PROMPTS of this gateway's prompts and PREFILL_AHEAD_STEPS steps of its
    prefill without a first token: the bound `prefill_backlogged` puts on a whole instance, at the
    pipeline's pace (`pipeline_budget`).

    Without it every request held at a wave from zero went to the one pipeline there was: in
    bench/burst.py (keep-alive 0.5 s, gateway dispatch logs) the 15 requests of a wave that
    arrived while four instances loaded all went, within 20 ms, to one route through two of them;
    the loads ended 0.4 s later, and the last of those prompts, pinned to the route, got its first
    token 2-3.3 s after arrival while the four whole instances took only later arrivals (static
    at peak served the same requests in 0.2-1 s). Held here instead, they go to whichever whole
    instance comes up."""
    return _backlogged(pipeline_budget(head, share), head.unstarted_prompts, head.unstarted_tokens)


def head_room(view: InstanceView, k: int, share: float | None = None) -> Room:
    """What one batch of routes driven by `view` through its first k layers may hold: as many as
    `head_has_room` would let through one by one (one at least: the router chose it), so a
    burst's batch does not put every held request on one loading head at once. With `share`
    (a pipeline from zero whose stages each run at most that share of the layers) its prompts
    are bounded at the pipeline's pace, as `pipeline_backlogged` bounds them between batches."""
    since = max(view.inflight - view.inflight_at_heartbeat, 0) + view.waiting
    per_route = route_load(view, k)
    left = max(view.max_batch, 1) - route_load(view, view.driven_layers + k * since)
    return Room(
        requests=max(1, ceil(left / per_route) if per_route > 0 else 1),
        prompts=view.unstarted_prompts,
        tokens=view.unstarted_tokens,
        prefill_budget=view.prefill_budget if share is None else pipeline_budget(view, share),
    )


# ---- pipeline-parallel instances (docs/pipelined-and-shared.md) ----------------------------------


def serves_stage(view: InstanceView, model: str) -> bool:
    """`view` is a serving stage of a pipelined instance of `model`, every unit of its range ready."""
    if view.state != "serving" or view.model != model or not view.group or not view.stage_addr:
        return False
    layers = view.num_units - 2
    if not 0 <= view.stage_start < view.stage_end <= layers:
        return False
    need = view.stage_end - view.stage_start + (view.stage_start == 0) + (view.stage_end == layers)
    return view.units_ready >= need


def pipelines(instances: Iterable[InstanceView], model: str) -> list[tuple[InstanceView, ...]]:
    """The complete pipelined instances of `model`: each group's serving stages, front to back,
    when they run every layer once. A group with a stage missing (lost, still loading, draining)
    is no route: its requests would stop at the gap."""
    groups: dict[str, list[InstanceView]] = {}
    for v in instances:
        if serves_stage(v, model):
            groups.setdefault(v.group, []).append(v)
    out = []
    for _, members in sorted(groups.items()):
        members.sort(key=lambda v: v.stage_start)
        if covers([(v.stage_start, v.stage_end) for v in members], members[0].num_units - 2):
            out.append(tuple(members))
    return out


def pipeline_load(head: InstanceView) -> float:
    """Sequences on a pipelined instance, in full-sequence equivalents: what its first stage drives.

    Every request of the instance is a route its head drives through all its stages, one for one
    (unlike a live route's head, whose routes run a few of the model's layers: `route_load`), so
    the head's own count is the instance's, corrected for what this gateway sent since."""
    fresh = head.running + head.waiting + head.inflight - head.inflight_at_heartbeat
    return max(fresh, head.inflight, head.kv_cache_usage * max(head.max_batch, 1), 0)


def _pipeline_key(
    stages: tuple[InstanceView, ...], avoid: Sequence[str] | frozenset[str], instances: Sequence[InstanceView] = ()
) -> tuple[bool, float, float, str]:
    head = stages[0]
    avoided = any(v.worker_id in avoid for v in stages)
    # Its slowest stage paces a pipeline: the least share any of its workers gives it.
    share = min(quota_share(v, instances) for v in stages)
    return avoided, pipeline_load(head) / max(head.max_batch, 1) / share, -share, head.group


def choose_pipeline(
    instances: Sequence[InstanceView], model: str, avoid: Sequence[str] | frozenset[str] = ()
) -> Route | None:
    """The least-loaded complete pipelined instance of `model` as a route through its stages, or
    None when there is none or it is past its batch limit and queue (the request waits here, as
    for a whole instance). Instances with a stage in `avoid` only when nothing else serves."""
    best: tuple[InstanceView, ...] | None = None
    for stages in pipelines(instances, model):
        if best is None or _pipeline_key(stages, avoid, instances) < _pipeline_key(best, avoid, instances):
            best = stages
    if best is None:
        return None
    head = best[0]
    load = pipeline_load(head)
    mb = max(head.max_batch, 1)
    if load >= mb + QUEUE_AHEAD or prefill_backlogged(head):
        return None
    room = Room(
        requests=max(1, ceil(mb + QUEUE_AHEAD - load)),
        prompts=head.unstarted_prompts,
        tokens=head.unstarted_tokens,
        prefill_budget=head.prefill_budget,
    )
    route = tuple(RouteStage(v.worker_id, v.stage_start, v.stage_end, v.stage_addr or "") for v in best)
    return Route(head.worker_id, route, room=room)


def _prefer_pipeline(
    pipe: Route, full: InstanceView, instances: Sequence[InstanceView], avoid: Sequence[str] | frozenset[str]
) -> bool:
    """A model served by whole and pipelined instances at once: the pipelined one takes the
    request when it is less loaded relative to its batch limit (ties to the whole one: no hop)."""
    head = next(v for v in instances if v.worker_id == pipe.worker_id)
    pipe_key = (any(s.worker_id in avoid for s in pipe.stages), pipeline_load(head) / max(head.max_batch, 1))
    full_key = (full.worker_id in avoid, estimated_load(full) / max(full.max_batch, 1))
    return pipe_key < full_key


# ---- consolidation: a partial route's decode onto one whole instance ------------------------------


@dataclass(frozen=True, slots=True)
class PartialRoute:
    """A request decoding on a route across several workers (a live or from-zero route)."""

    request_id: str
    workers: tuple[str, ...]  # its route's workers, the driver first
    context_tokens: int  # prompt and tokens streamed: what a whole instance prefills to take it over
    remaining: int  # tokens it may still generate


def consolidations(
    instances: Sequence[InstanceView],
    model: str,
    partials: Iterable[PartialRoute],
    min_remaining: int,
    pending: Mapping[str, tuple[int, int]] | None = None,
) -> list[tuple[str, str]]:
    """Which requests decoding on partial routes of `model` move now, and to which whole instance:
    (request_id, worker_id) pairs.

    A live route is made while the full instances are busy and keeps its split for the request's
    whole life: every decode step pays a stage-link hop and waits in two instances' queues, long
    after the instance that ran its front layers has finished loading. Moving it costs one prefill
    of its context on the new instance, so only a request with at least `min_remaining` tokens to
    go moves, those with the most to go first, and only onto a whole instance that would not count
    as busy for live routes (`choose_route`) with the moves on it: below BUSY_LOAD of its batch
    limit, nothing waiting there, and its prefill queue, the re-prefills included, within what
    `Room.admits` lets through, and only once none of the route's instances is still loading.
    `pending` counts, per worker, moves decided earlier and not sent
    yet (requests, context tokens). Routes through a pipeline-parallel instance's stages stay:
    that instance is split by design. Pure: the gateway acts on the pairs.
    """
    pending = pending or {}
    by_id = {v.worker_id: v for v in instances}
    targets: list[tuple[InstanceView, int, int]] = []  # whole instance, requests and tokens added
    for v in instances:
        if not serves_fully(v, model) or v.group or v.waiting > 0:
            continue
        n, tokens = pending.get(v.worker_id, (0, 0))
        targets.append((v, n, tokens))
    if not targets:
        return []
    moves: list[tuple[str, str]] = []
    order = sorted(partials, key=lambda p: (-p.remaining, p.request_id))
    for p in order:
        if p.remaining < min_remaining or len(p.workers) < 2:
            continue
        if any(by_id[w].group for w in p.workers if w in by_id):
            continue
        # Only once the route has no loading instance left: while its head still loads, the route
        # is what takes work off the full instances, and a move onto one of them (whose load
        # figure leaves out the routes' stages it relays) would undo it at one more prefill's cost.
        if any(not serves_fully(by_id[w], model) for w in p.workers if w in by_id):
            continue
        best: tuple[float, str] | None = None
        pick = -1
        for i, (v, n, tokens) in enumerate(targets):
            mb = max(v.max_batch, 1)
            if estimated_load(v) + n + 1 >= mb * BUSY_LOAD:
                continue
            room = Room(mb, v.unstarted_prompts, v.unstarted_tokens, v.prefill_budget)
            if not room.admits(n, tokens):
                continue
            key = ((estimated_load(v) + n) / mb, v.worker_id)
            if best is None or key < best:
                best, pick = key, i
        if pick < 0:
            continue
        v, n, tokens = targets[pick]
        targets[pick] = (v, n + 1, tokens + p.context_tokens)
        moves.append((p.request_id, v.worker_id))
    return moves
