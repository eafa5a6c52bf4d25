"""The one picture of the workers every service keeps: who is alive, in which state, holding
which units of which model, under what load. Pure: heartbeats, readiness events and snapshots
go in with the current time; views come out. The gateway routes on it, the scaler counts
replicas and the idle pool from it, the loader picks targets and sources from it; the NATS
side that feeds it is `cascade.workerfeed`.

Two streams describe a worker (docs/protocol.md):

- its **heartbeat**, every interval: state, model, load figures, addresses. Three missed and
  the worker is dead (`expire`);
- its **readiness events**, one per unit as it becomes usable, numbered per worker
  (`LayerReady.seq`). They are authoritative for which units are ready, but a subscriber may
  miss one or meet a worker mid-load: a gap, or a worker seen for the first time, asks for a
  snapshot (`WorkerSnapshot`), and events that arrive meanwhile wait in a buffer.

Every input that returns True means "request a snapshot of that worker now"; the entry is
marked pending so the same need is reported once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cascade.messages import Heartbeat, LayerReady, WorkerSnapshot, WorkerState

# A worker is dead after this many heartbeat intervals without one (docs/protocol.md).
MISSED_HEARTBEATS = 3

# Workers in these states count toward a model's replicas: a loading one will serve soon, and
# counting it is what stops the scaler from asking for the same capacity twice.
COUNTED_STATES: tuple[WorkerState, ...] = ("loading", "serving")


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as the services see it. Unit counts come from readiness once it is known
    (a snapshot, then events in order), else from the heartbeat."""

    worker_id: str
    state: WorkerState
    model: str | None
    units_ready: int
    num_units: int
    running: int = 0  # sequences in its running batch (heartbeat)
    waiting: int = 0  # admitted, not yet in the batch (heartbeat)
    max_batch: int = 1
    tokens_per_s: float = 0.0
    # Units ready without a hole from unit 0 (embedding, layer 0, ...): what a first stage runs.
    prefix_units: int = 0
    stage_addr: str | None = None
    data_addr: str | None = None
    driven_layers: int = 0
    driven: int = 0
    stage_running: int = 0
    prefill_budget: int = 0
    prefill_queued: int = 0  # prompt tokens queued there, weighed by its layers (heartbeat)
    kv_cache_usage: float = 0.0  # KV blocks held over usable blocks (heartbeat)
    max_model_len: int = 0  # longest sequence it serves (heartbeat; 0: unknown)
    num_preemptions: int = 0  # since it started (heartbeat)
    loading_mb_s: float = 0.0
    pid: int = 0
    host: str = ""
    # Readiness is known from a snapshot and events in order.
    synced: bool = False
    # Heartbeat and readiness name the same model (they disagree for a moment around a change).
    consistent: bool = True
    ready_seq: int = 0  # the last readiness event applied
    # Which units are ready (by readiness once synced; the heartbeat's prefix before that).
    ready_units: frozenset[int] = frozenset()
    model_source: str = "disk"  # "network": reads no model store (heartbeat)
    # A stage of a pipeline-parallel instance (heartbeat): the instance's id and the decoder
    # layers [stage_start, stage_end) it runs. "" / 0, 0: a whole instance of its own.
    group: str = ""
    stage_start: int = 0
    stage_end: int = 0
    # The worker process it shares with other instances (`--slots`), "" when it has one alone,
    # and its compute quota there (heartbeat; what a quota policy reads before it moves one).
    shared_device: str = ""
    quota: float = 0.0
    # The model its last heartbeat names. Once synced, `model` is readiness's, which names a model
    # only with its first ready unit; the heartbeat names it from the moment the order is taken.
    heartbeat_model: str | None = None

    @property
    def device(self) -> str:
        """The compute it runs on: its shared worker's id, else its own."""
        return self.shared_device or self.worker_id

    @property
    def instance(self) -> str:
        """The instance this worker is (part of): its group, else itself."""
        return self.group or self.worker_id

    def serves_stage(self, model: str) -> bool:
        """A stage of a pipelined instance of `model` with every unit of its layer range ready."""
        if self.state != "serving" or self.model != model or not self.group or self.stage_end <= self.stage_start:
            return False
        layers = self.num_units - 2
        want = set(range(self.stage_start + 1, self.stage_end + 1))
        want |= {0} if self.stage_start == 0 else set()
        want |= {layers + 1} if self.stage_end == layers else set()
        # Before a snapshot the heartbeat's count is all there is (a stage's units are no prefix).
        return want <= self.ready_units if self.synced else self.units_ready >= len(want)

    @property
    def load(self) -> int:
        return self.running + self.waiting

    def holds(self, model: str) -> bool:
        """Every unit of `model` is here and stays (not draining): it can send them to a new instance."""
        return (
            self.model == model
            and self.num_units > 0
            and self.units_ready >= self.num_units
            and self.state in ("serving", "idle")
        )

    @property
    def counted_model(self) -> str | None:
        """The model this worker counts toward as a replica (None: none): loading or serving it,
        by readiness or, before its first unit is ready, by its heartbeat, which names the model
        from the moment the order is taken (a load whose first unit is slow to come is a load,
        and a scaler that lost its loader mid-decision must see it to not decide the same gap
        again: tests/test_control_restart.py)."""
        if self.state not in COUNTED_STATES:
            return None
        return self.model if self.model is not None else self.heartbeat_model

    def takes(self, model: str) -> bool:
        """Loading or serving `model` (`counted_model`)."""
        return self.counted_model == model

    def serves_fully(self, model: str) -> bool:
        """The protocol's "serves the model fully": every unit ready and state serving."""
        return self.state == "serving" and self.model == model and 0 < self.num_units <= self.units_ready


@dataclass(slots=True)
class _Entry:
    worker_id: str
    last_heartbeat: float
    heartbeat: Heartbeat | None = None
    # Readiness (authoritative for which units are ready, once synced).
    ready_model: str | None = None
    num_units: int = 0
    ready_units: set[int] = field(default_factory=set)
    seq: int = 0
    synced: bool = False
    snapshot_pending: bool = False
    buffered: dict[int, LayerReady] = field(default_factory=dict)  # seq → event, while unsynced
    # A snapshot's state, until the next heartbeat says it again.
    snapshot_state: WorkerState | None = None
    # The view, built once per change of what it shows (a heartbeat, a readiness event applied, a
    # snapshot): the gateway reads every worker's view at every routing decision.
    view: WorkerView | None = None


class WorkerTable:
    def __init__(self, heartbeat_s: float, missed: int = MISSED_HEARTBEATS) -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be above 0")
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = heartbeat_s * missed
        self._workers: dict[str, _Entry] = {}

    # ---- inputs ------------------------------------------------------------
    def on_heartbeat(self, hb: Heartbeat, now: float) -> bool:
        e = self._entry(hb.worker_id, now)
        e.last_heartbeat = now
        e.heartbeat = hb
        e.snapshot_state = None
        e.view = None
        if not e.synced or hb.ready_seq > e.seq:
            return self._want_snapshot(e)
        return False

    def on_layer_ready(self, ev: LayerReady, now: float) -> bool:
        e = self._entry(ev.worker_id, now)
        if ev.seq <= e.seq and e.synced:
            return False  # already applied (a duplicate, or covered by a snapshot)
        if e.synced and not e.snapshot_pending and ev.seq == e.seq + 1:
            self._apply(e, ev)
            return False
        # A gap, a worker met for the first time, or a snapshot on its way: keep the event for
        # after the snapshot, and ask for one unless already asked.
        e.buffered[ev.seq] = ev
        return self._want_snapshot(e)

    def on_snapshot(self, snap: WorkerSnapshot) -> bool:
        e = self._workers.get(snap.worker_id)
        if e is None:
            return False  # declared dead while the snapshot was on its way
        e.snapshot_pending = False
        e.synced = True
        e.view = None
        e.ready_model = snap.model
        e.num_units = snap.num_units
        e.ready_units = set(snap.ready_units)
        e.seq = snap.seq
        e.snapshot_state = snap.state
        # Events that arrived while the snapshot was on its way and are newer than it.
        while e.seq + 1 in e.buffered:
            self._apply(e, e.buffered.pop(e.seq + 1))
        e.buffered = {s: ev for s, ev in e.buffered.items() if s > e.seq}
        if e.buffered:
            return self._want_snapshot(e)  # still a gap
        # A heartbeat's ready_seq ahead of the snapshot is left to the next heartbeat: asking again
        # at once could loop on a worker whose two counters disagree.
        return False

    def on_snapshot_failed(self, worker_id: str) -> None:
        """The snapshot request failed; the next heartbeat or event asks again."""
        e = self._workers.get(worker_id)
        if e is not None:
            e.snapshot_pending = False

    def expire(self, now: float) -> list[str]:
        """Remove and return the workers that missed too many heartbeats."""
        dead = [w for w, e in self._workers.items() if now - e.last_heartbeat > self.dead_after_s]
        for w in dead:
            del self._workers[w]
        return dead

    def excuse(self, now: float) -> None:
        """The listener itself was cut off (its broker connection is down): silence says nothing
        about the workers, so each gets a whole dead interval again from `now`."""
        for e in self._workers.values():
            e.last_heartbeat = max(e.last_heartbeat, now)

    def forget(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def pid(self, worker_id: str) -> int | None:
        """The pid its last heartbeat gave (None: unknown)."""
        e = self._workers.get(worker_id)
        return e.heartbeat.pid if e is not None and e.heartbeat is not None else None

    # ---- outputs -----------------------------------------------------------
    def get(self, worker_id: str, now: float | None = None) -> WorkerView | None:
        """The worker's view; None when unknown, known by neither a heartbeat nor a snapshot, or
        (with `now`) silent too long."""
        e = self._workers.get(worker_id)
        if e is None or (e.heartbeat is None and not e.synced) or (now is not None and not self._alive(e, now)):
            return None
        return self._view(e)

    def views(self, now: float | None = None) -> list[WorkerView]:
        """Every worker heard from (with `now`: and not silent too long), by id."""
        return [self._view(e) for w, e in sorted(self._workers.items()) if self._alive(e, now)]

    def instances(self, now: float | None = None) -> dict[str, frozenset[str]]:
        """Model → instances loading or serving it (`WorkerView.counted_model`): worker ids, and
        for the stages of a pipelined instance its group id once (one replica of S workers)."""
        out: dict[str, set[str]] = {}
        for v in self.views(now):
            if (m := v.counted_model) is not None:
                out.setdefault(m, set()).add(v.instance)
        return {m: frozenset(ws) for m, ws in out.items()}

    def idle(self, now: float | None = None) -> frozenset[str]:
        """The idle pool: live workers that hold no model."""
        return frozenset(v.worker_id for v in self.views(now) if v.state == "idle")

    def loading(self, now: float | None = None) -> dict[str, int]:
        """Model → workers still loading it."""
        out: dict[str, int] = {}
        for v in self.views(now):
            if v.state == "loading" and (m := v.counted_model) is not None:
                out[m] = out.get(m, 0) + 1
        return out

    def states(self, now: float | None = None) -> dict[str, int]:
        """How many live workers are in each state."""
        out: dict[str, int] = {}
        for v in self.views(now):
            out[v.state] = out.get(v.state, 0) + 1
        return out

    def describe(self) -> list[dict[str, object]]:
        """One row per worker for status answers (readiness bookkeeping included)."""
        return [
            {
                "worker_id": v.worker_id,
                "state": v.state,
                "model": v.model,
                "units_ready": v.units_ready,
                "num_units": v.num_units,
                "running": v.running,
                "waiting": v.waiting,
                "seq": v.ready_seq,
                "synced": v.synced,
            }
            for v in self.views()
        ]

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers

    # ---- internals ---------------------------------------------------------
    def _alive(self, e: _Entry, now: float | None) -> bool:
        if e.heartbeat is None:
            return False  # no state or load figures yet; the first heartbeat comes within an interval
        return now is None or now - e.last_heartbeat <= self.dead_after_s

    def _view(self, e: _Entry) -> WorkerView:
        v = e.view
        if v is None:
            v = e.view = self._build_view(e)
        return v

    @staticmethod
    def _build_view(e: _Entry) -> WorkerView:
        # Known by a snapshot alone (met through a readiness event): no load figures yet.
        hb = e.heartbeat or Heartbeat(
            e.worker_id, e.snapshot_state or "idle", e.ready_model, 0, 0, 0, 0, 1, 0.0, 0, 0, ""
        )
        if e.synced:
            model, units, num_units = e.ready_model, len(e.ready_units), e.num_units
            prefix, ready = _prefix(e.ready_units), frozenset(e.ready_units)
        else:
            # Units load front to back, so without a snapshot the heartbeat's count is the prefix.
            model, units, num_units, prefix = hb.model, hb.units_ready, hb.num_units, hb.units_ready
            ready = frozenset(range(hb.units_ready))
        return WorkerView(
            worker_id=e.worker_id,
            state=e.snapshot_state or hb.state,
            model=model,
            units_ready=units,
            num_units=num_units,
            running=hb.running,
            waiting=hb.waiting,
            max_batch=max(hb.max_batch, 1),
            tokens_per_s=hb.tokens_per_s,
            prefix_units=prefix,
            stage_addr=hb.stage_addr,
            data_addr=hb.data_addr,
            driven_layers=hb.driven_layers,
            driven=hb.driven,
            stage_running=hb.stage_running,
            prefill_budget=hb.prefill_budget,
            prefill_queued=hb.prefill_queued,
            kv_cache_usage=hb.kv_cache_usage,
            max_model_len=hb.max_model_len,
            num_preemptions=hb.num_preemptions,
            loading_mb_s=hb.loading_mb_s,
            pid=hb.pid,
            host=hb.host,
            synced=e.synced,
            consistent=not e.synced or hb.model == e.ready_model,
            ready_seq=e.seq,
            ready_units=ready,
            model_source=hb.model_source,
            group=hb.group,
            stage_start=hb.stage_start,
            stage_end=hb.stage_end,
            shared_device=hb.shared_device,
            quota=hb.quota,
            heartbeat_model=hb.model,
        )

    def _entry(self, worker_id: str, now: float) -> _Entry:
        e = self._workers.get(worker_id)
        if e is None:
            # First sight counts as a heartbeat: the clock to declare it dead starts now.
            e = self._workers[worker_id] = _Entry(worker_id=worker_id, last_heartbeat=now)
        return e

    @staticmethod
    def _want_snapshot(e: _Entry) -> bool:
        if e.snapshot_pending:
            return False
        e.snapshot_pending = True
        return True

    @staticmethod
    def _apply(e: _Entry, ev: LayerReady) -> None:
        e.seq = ev.seq
        e.view = None
        if ev.reset:
            e.ready_model = None
            e.ready_units.clear()
            e.num_units = 0
            return
        if ev.model != e.ready_model:
            e.ready_model = ev.model
            e.ready_units = set()
        e.num_units = ev.num_units
        e.ready_units.add(ev.unit)


def _prefix(units: set[int]) -> int:
    n = 0
    while n in units:
        n += 1
    return n
