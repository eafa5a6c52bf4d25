"""The simulated loader: services/loader/decisions.py's way of carrying out a ScaleDecision, with
the real choices (`services.loader.assign.choose_for_up` / `choose_for_down`, and
`services.loader.planner.plan_transfer`: chains from live holders, else the host cache, else
disk, as the model's `loading` mode allows) and the bytes moved on the modelled network.

Where the bytes come from, as the plan names its sources:
- a worker (chain head): its accelerators, over NVLink to a target on its host, RDMA to another;
- "host-cache": the one host-memory copy of the model in the mesh (on the host `host_cache_host`
  gives), or, with `host_cache = "every-host"` (AllCache), the target host's own copy;
- "disk": the target host's SSD, or its DRAM when the host read that model before and keeps it
  (`local_cache`, ServerlessLLM's server-side checkpoint cache).

A chain's targets each receive every unit as the chain's head sends it, one data-plane chunk and
one link latency later per hop (each forwards while it receives); a unit is announced (LayerReady)
as it arrives, so the gateway can route pipelined requests through the front layers. The ack goes
out when every target serves fully.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cascade.messages import ScaleAck, ScaleDecision
from cascade.workers import WorkerView
from services.loader.assign import choose_for_down, choose_for_up
from services.loader.planner import Chain, MeshSnapshot, PlanError, PlanRequest, TransferPlan, plan_transfer
from sim.engine import Sim
from sim.hardware import Flow, Link, ModelShape

if TYPE_CHECKING:
    from sim.mesh import Mesh
    from sim.worker import Worker


@dataclass(slots=True)
class Pending:
    """A decision being carried out."""

    decision: ScaleDecision
    started: float
    targets: list[str] = field(default_factory=list)
    left: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    read_disk: bool = False


class Loader:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.sim: Sim = mesh.sim
        self.reserved: set[str] = set()
        self.host_cache: set[str] = set()  # models with their one host copy in place
        self.filling: set[str] = set()
        self.local: dict[int, set[str]] = {}  # host → models its DRAM keeps (local_cache)
        self._waits: list[Callable[[], None]] = []
        self._plans = itertools.count(1)
        self.transfers: list[dict[str, Any]] = []  # one row per finished target
        self.plans: list[dict[str, Any]] = []
        self.inbound: dict[str, tuple[Pending, Flow]] = {}

    # ---- the host cache ------------------------------------------------------
    def host_cache_host(self, model: str) -> int:
        """Where a model's one host copy lives: hosts in turn by model, so copies spread (on the
        storage hosts, when the topology has some)."""
        t = self.mesh.topology
        names = sorted(m.name for m in self.mesh.models.values())
        i = names.index(model) if model in names else 0
        return t.hosts + i % t.storage_hosts if t.storage_hosts else i % t.hosts

    def fill_host_cache(self, model: str, at_once: bool = False) -> None:
        """`cascade cache load` / the loader's fill after a disk read: the host reads the model
        from its SSD into memory (at once: filled before the run starts)."""
        mode = self.mesh.settings.host_cache
        if mode == "off" or model in self.host_cache or model in self.filling:
            return
        if at_once or mode == "every-host":
            self.host_cache.add(model)
            return
        shape = self.mesh.models[model]
        h = self.host_cache_host(model)
        self.filling.add(model)

        def done() -> None:
            self.filling.discard(model)
            self.host_cache.add(model)

        self.mesh.net.start(Flow([self.mesh.ssd(h)], shape.nbytes, on_done=done))

    def memory_bytes(self) -> int:
        """Host memory the parameter caches hold now: the host cache's copies (one per model, or
        one per host and model for AllCache) and the hosts' own DRAM copies (local_cache)."""
        per_copy = {m: s.nbytes for m, s in self.mesh.models.items()}
        copies = len(self.mesh.hosts_with_workers()) if self.mesh.settings.host_cache == "every-host" else 1
        total = sum(per_copy[m] * copies for m in self.host_cache)
        total += sum(per_copy[m] for ms in self.local.values() for m in ms)
        return total

    # ---- decisions -------------------------------------------------------------
    def on_decision(self, d: ScaleDecision) -> None:
        p = Pending(d, self.sim.now)
        if d.action == "up":
            self._up(p, self.sim.now + self.mesh.settings.idle_wait_s)
        else:
            self._down(p)

    def snapshot(self) -> MeshSnapshot:
        views = []
        for w, hb in sorted(self.mesh.beats.items()):
            views.append(
                WorkerView(
                    worker_id=w,
                    state=hb.state,
                    model=hb.model,
                    units_ready=hb.units_ready,
                    num_units=hb.num_units,
                    running=hb.running,
                    waiting=hb.waiting,
                    max_batch=hb.max_batch,
                    data_addr=w,
                    stage_addr=w,
                )
            )
        return MeshSnapshot(tuple(views), frozenset(self.host_cache))

    def mesh_changed(self) -> None:
        waits, self._waits = self._waits, []
        for fn in waits:
            fn()

    def _up(self, p: Pending, deadline: float) -> None:
        d = p.decision
        chosen = choose_for_up(self.snapshot(), d.count, self.reserved)
        if chosen.shortfall and self.sim.now < deadline:
            # Wait for the mesh to change (a worker back in the pool) or the deadline.
            fired = [False]

            def again() -> None:
                if not fired[0]:
                    fired[0] = True
                    self._up(p, deadline)

            self._waits.append(again)
            self.sim.at(deadline, again)
            return
        if not chosen.workers:
            self._ack(p, [], f"no idle worker for {d.model}")
            return
        if chosen.shortfall:
            p.failed.append(f"only {len(chosen.workers)} idle worker(s) of {d.count} wanted")
        self.reserved.update(chosen.workers)
        shape = self.mesh.models[d.model]
        mode = d.loading or self.mesh.deployment_of(d.model).loading
        req = PlanRequest(
            d.model,
            tuple(chosen.workers),
            mode,  # type: ignore[arg-type]
            shape.unit_nbytes,
            f"sim://{d.model}",
            serving_rate_limit_bps=self.mesh.settings.serving_send_bps,
        )
        try:
            plan = plan_transfer(self.snapshot(), req, f"{d.decision_id}-p{next(self._plans)}", lambda: "sim")
        except PlanError as e:
            self.reserved.difference_update(chosen.workers)
            self._ack(p, [], f"cannot plan loading {d.model}: {e}")
            return
        self.plans.append(
            {
                "t": self.sim.now,
                "decision": d.decision_id,
                "mode": plan.mode,
                "note": plan.note,
                "chains": [
                    {"source": c.source.worker_id or c.source.kind, "targets": len(c.targets)} for c in plan.chains
                ],
            }
        )
        p.targets = list(plan.targets)
        p.left = set(p.targets)
        # Orders out: receivers first, then senders (a round trip each), then the bytes flow.
        setup = 2 * self.mesh.settings.control_latency_s
        for c in plan.chains:
            extra = self.mesh.settings.disk_setup_s if c.source.kind == "disk" else self.mesh.settings.transfer_setup_s
            self.sim.after(setup + extra, self._start_chain, p, plan, c, shape)

    def _start_chain(self, p: Pending, plan: TransferPlan, c: Chain, shape: ModelShape) -> None:
        mesh = self.mesh
        targets = [mesh.worker(h.worker_id) for h in c.targets]
        for w in targets:
            if not w.begin_load(shape):
                p.failed.append(f"{w.id} refused the order (it is {w.state})")
                p.left.discard(w.id)
        targets = [w for w in targets if w.model is shape and w.state == "loading"]
        if not targets:
            self._maybe_ack(p)
            return
        if c.source.kind == "disk":
            for w in targets:
                self._disk(p, w, shape)
            return
        links, cap = self._chain_links(c, targets, shape)
        marks = list(itertools.accumulate(shape.unit_nbytes))
        topo = self.mesh.topology

        def hop_s() -> float:
            # Each target forwards a chunk once it has it: one chunk at the chain's pace, per hop.
            return topo.link_latency_s + topo.chunk_bytes / max(flow.rate, 1.0)

        def on_mark(i: int) -> None:
            for j, w in enumerate(targets):
                self.sim.after(j * hop_s(), w.unit_ready, i)

        flow = Flow(links, shape.nbytes, cap, marks[:-1], on_mark, lambda: self._chain_done(p, targets, hop_s()))
        for w in targets:
            self.inbound[w.id] = (p, flow)
            w.load_flow = flow
        p.flows.append(flow)
        self.mesh.net.start(flow)

    def _chain_links(self, c: Chain, targets: list[Worker], shape: ModelShape) -> tuple[list[Link], float]:
        """The links a chain crosses, and its rate cap."""
        mesh = self.mesh
        s = mesh.settings
        links: list[Link] = []
        if c.source.kind == "worker" and c.source.worker_id is not None:
            prev: Any = mesh.worker(c.source.worker_id)
            src_host = prev.host
        else:
            prev = None
            every = s.host_cache == "every-host"
            src_host = targets[0].host if every else self.host_cache_host(shape.name)
        for w in targets:
            if prev is None:
                links += mesh.host_to_worker(src_host, w)
            else:
                links += mesh.worker_to_worker(prev, w)
            prev = w
        return links, mesh.flow_cap(c.source.rate_limit_bps)

    def _disk(self, p: Pending, w: Worker, shape: ModelShape) -> None:
        mesh = self.mesh
        local = mesh.settings.local_cache and shape.name in self.local.get(w.host, set())
        links = mesh.host_memory_to_worker(w) if local else [mesh.ssd(w.host), *mesh.host_memory_to_worker(w)]
        marks = list(itertools.accumulate(shape.unit_nbytes))

        def done() -> None:
            if mesh.settings.local_cache:
                self.local.setdefault(w.host, set()).add(shape.name)
            self._chain_done(p, [w], 0.0)

        flow = Flow(links, shape.nbytes, mesh.flow_cap(0.0), marks[:-1], w.unit_ready, done)
        self.inbound[w.id] = (p, flow)
        w.load_flow = flow
        p.flows.append(flow)
        p.read_disk = True
        mesh.net.start(flow)

    def _chain_done(self, p: Pending, targets: list[Worker], hop_s: float) -> None:
        for j, w in enumerate(targets):
            self.sim.after(j * hop_s, self._target_done, p, w)

    def _target_done(self, p: Pending, w: Worker) -> None:
        self.inbound.pop(w.id, None)
        w.load_flow = None
        if w.state == "loading":
            w.unit_ready(w.model.num_units - 1 if w.model is not None else 0)
            w.load_done()
            self.transfers.append({"t": self.sim.now, "worker": w.id, "seconds": self.sim.now - p.started})
        else:
            p.failed.append(f"{w.id} stopped loading ({w.state})")
        p.left.discard(w.id)
        self._maybe_ack(p)

    def _maybe_ack(self, p: Pending) -> None:
        if p.left:
            return
        self.reserved.difference_update(p.targets)
        d = p.decision
        ready = [w for w in p.targets if self.mesh.worker(w).state == "serving"]
        mode = self.mesh.deployment_of(d.model).loading
        if p.read_disk and mode in ("multicast", "host-cache"):
            # The next scale-up of this model must not wait on the disk: keep the one host copy.
            self.fill_host_cache(d.model)
        # The ack leaves once the loader has seen the last target's heartbeat (sent at once).
        self.sim.after(2 * self.mesh.settings.control_latency_s, self._ack, p, ready, "; ".join(p.failed))

    def cancel_inbound(self, w: Worker) -> None:
        """An unload stops a load: this target's bytes stop (a chain's downstream targets keep
        receiving; the real loader would re-plan them from the survivors)."""
        entry = self.inbound.pop(w.id, None)
        w.load_flow = None
        if entry is None:
            return
        p, flow = entry
        if not any(v[1] is flow for v in self.inbound.values()):
            self.mesh.net.stop(flow)
        p.left.discard(w.id)
        p.failed.append(f"{w.id} unloaded while loading")
        self._maybe_ack(p)

    def _down(self, p: Pending) -> None:
        d = p.decision
        chosen = choose_for_down(self.snapshot(), d.model, d.count, self.reserved)
        if not chosen.workers:
            self._ack(p, [], f"no instance of {d.model} to remove")
            return
        self.reserved.update(chosen.workers)
        p.targets = list(chosen.workers)
        p.left = set(p.targets)
        for w in chosen.workers:
            self.mesh.control(self._unload, p, w)

    def _unload(self, p: Pending, worker: str) -> None:
        def done() -> None:
            self.mesh.control(self._unloaded, p, worker)

        self.mesh.worker(worker).unload(done)

    def _unloaded(self, p: Pending, worker: str) -> None:
        p.left.discard(worker)
        self.reserved.discard(worker)
        if not p.left:
            self._ack(p, p.targets, "")

    def _ack(self, p: Pending, workers: list[str], error: str) -> None:
        d = p.decision
        ack = ScaleAck(d.decision_id, d.model, ok=not error, workers=list(workers), error=error, ts=self.sim.now)
        self.mesh.ack(ack, p)
