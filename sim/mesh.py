"""One simulated mesh: hosts of workers, a gateway, a scaler and a loader on a modelled network,
fed a workload; and the run that turns a `Scenario` into a `Result`.

Messages between services (NATS) take `control_latency_s`; heartbeats and readiness reach every
service at the same moment (each service keeps its own table in the real mesh; here they read
one, filled as the heartbeats arrive). Stage-link frames take their bytes over the link between
the two workers plus `stage_latency_s`.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bench import occupancy
from cascade.config import Deployment, ModelDeployment
from cascade.messages import InstanceMetrics, ModelMetrics, ScaleAck, ScaleDecision
from services.loader.planner import send_rate
from sim.engine import Sim
from sim.gateway import Gateway
from sim.hardware import GB, Link, ModelShape, Network, Topology
from sim.loader import Loader, Pending
from sim.scaler import Scaler
from sim.settings import MeshSettings
from sim.worker import Beat, Worker

HOLDING = ("loading", "serving", "draining")  # a worker holds the model's memory (bench/burst.py)


class Arrival(NamedTuple):
    t: float  # seconds after the workload starts
    model: str
    prompt: int  # modelled prompt tokens (each priced as `token_scale`)
    out: int  # tokens to generate (ignore_eos: exactly these)


class Req:
    """One request's life in the mesh and what the client saw of it."""

    __slots__ = (
        "arrived",
        "done",
        "end",
        "first",
        "gw",
        "idx",
        "model",
        "out",
        "produced",
        "prompt",
        "route_k",
        "route_tail",
        "served_by",
        "state",
        "status",
        "worker",
    )

    def __init__(self, idx: int, a: Arrival, t: float) -> None:
        self.idx = idx
        self.model = a.model
        self.prompt = a.prompt
        self.out = a.out
        self.arrived = t
        self.state: Any = None  # the gateway's RequestState
        self.gw = 0  # which gateway took it
        self.worker: str | None = None
        self.route_k = 0  # > 0: a pipelined route, its first stage's layers [0, k)
        self.route_tail = ""
        self.produced = False
        self.served_by = ""  # the worker that drove it (its first stage), once it has a token
        self.first = math.nan
        self.end = math.nan
        self.status = "pending"
        self.done = False


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything a run needs. `preload`: instances serving each model at the start (a bench's
    mesh loads min_replicas before it replays); `warmup`: requests sent first, the workload
    starting `warmup_gap_s` after the last of them ends (bench/burst.py's warm-up)."""

    name: str
    topology: Topology
    settings: MeshSettings
    deployment: Deployment
    models: dict[str, ModelShape]
    arrivals: Sequence[Arrival]
    preload: dict[str, int] = field(default_factory=dict)
    fill_host_cache: tuple[str, ...] = ()
    warmup: Sequence[Arrival] = ()
    warmup_gap_s: float = 1.0
    window_s: float = 0.0  # instance-seconds are integrated over [start, start + window_s] (0: to the last arrival)
    # An operator's replica targets (`cascade scale`): (seconds after the workload starts, model, replicas).
    operator: Sequence[tuple[float, str, int]] = ()
    trace_beats: bool = False  # keep every heartbeat and readiness event in the result (small runs)
    halt_after_acks: int = 0  # stop once this many scale decisions are acked (loading experiments)
    seed: int = 0
    max_sim_s: float = math.inf  # stop here even if requests are left (they count as timed out)


@dataclass
class Result:
    scenario: Scenario
    t0: float  # when the workload started (after the warm-up)
    reqs: list[Req]
    beats: dict[str, list[tuple[float, bool]]]
    decisions: list[dict[str, Any]]
    acks: list[dict[str, Any]]
    plans: list[dict[str, Any]]
    transfers: list[dict[str, Any]]
    routed: dict[str, int]
    events: int
    wall_s: float
    # This process's CPU time over the run: on a machine shared with other work, the wall time
    # says as much about the neighbours as about the simulator.
    cpu_s: float
    sim_s: float
    cache_bytes_peak: int
    accelerators_per_instance: int
    beat_log: list[Beat] = field(default_factory=list)
    ready_log: list[tuple[float, str, int]] = field(default_factory=list)  # (time, worker, units ready)

    def holding_at(self, t: float) -> int:
        return occupancy.holding_at(self.beats, t)

    def instance_seconds(self, t0: float, t1: float) -> float:
        return occupancy.instance_seconds(self.beats, t0, t1)


class Mesh:
    def __init__(self, sc: Scenario) -> None:
        self.scenario = sc
        self.sim = Sim()
        self.rng = random.Random(sc.seed)
        self.settings = sc.settings
        self.topology = sc.topology
        self.deployment = sc.deployment
        self.models = sc.models
        self.net = Network(self.sim)
        self._links: dict[str, Link] = {}
        per = max((m.accelerators for m in sc.models.values()), default=1)
        if sc.topology.accelerators_per_host % per:
            raise ValueError(
                f"{per} accelerators per instance do not divide a host of {sc.topology.accelerators_per_host}"
            )
        self.per_instance = per
        self.workers: dict[str, Worker] = {}
        for h in range(sc.topology.hosts):
            for j in range(sc.topology.accelerators_per_host // per):
                # Host-major ids: the loader picks idle workers by id, so a chain's targets come
                # grouped by host and the chain crosses each host boundary once.
                wid = f"h{h:04d}-w{j}"
                self.workers[wid] = Worker(self, wid, h, per)
        self.beats: dict[str, Beat] = {}
        self.holding: dict[str, list[tuple[float, bool]]] = {}
        self.gateway = Gateway(self)
        self.scaler = Scaler(self)
        self.loader = Loader(self)
        self.decisions: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.reqs: list[Req] = []
        self._deadlines: deque[Req] = deque()
        self._deadline_event: Any = None
        self.outstanding = 0
        self.warm = 0  # warm-up requests, left out of the result
        self.all_sent = False
        self.cache_peak = 0
        self._steps_models = {m.name for m in sc.deployment.models if m.policy == "two-stage"}
        # Instance loads are read by the two-stage policy (batch limits) and by `rate` when it
        # learns capacity from them; for every other policy they change no decision.
        self._load_models = self._steps_models | {
            m.name for m in sc.deployment.models if m.policy == "rate" and m.knobs.get("learn_capacity", 1.0) != 0
        }
        self.beat_log: list[Beat] = []
        self.ready_log: list[tuple[float, str, int]] = []

    # ---- lookups -----------------------------------------------------------
    def worker(self, worker_id: str) -> Worker:
        return self.workers[worker_id]

    def deployment_of(self, model: str) -> ModelDeployment:
        d = self.deployment.get(model)
        assert d is not None
        return d

    def wants_steps(self, model: str) -> bool:
        return model in self._steps_models

    def wants_loads(self, model: str) -> bool:
        return model in self._load_models

    def hosts_with_workers(self) -> list[int]:
        return sorted({w.host for w in self.workers.values()})

    # ---- links -------------------------------------------------------------
    def _link(self, name: str, capacity: float) -> Link:
        return self.net.link(name, capacity)

    def ssd(self, host: int) -> Link:
        return self._link(f"ssd{host}", self.topology.ssd_gb_s * GB)

    def _pcie(self, w: Worker) -> Link:
        return self._link(f"pcie-{w.id}", self.topology.pcie_gb_s * GB * w.accelerators)

    def host_memory_to_worker(self, w: Worker) -> list[Link]:
        return [self._pcie(w)]

    def host_to_worker(self, host: int, w: Worker) -> list[Link]:
        if host == w.host:
            return [self._pcie(w)]
        t = self.topology
        return [
            self._link(f"nic-out{host}", t.nic_bytes_s()),
            self._link(f"nic-in{w.host}", t.nic_bytes_s()),
            self._pcie(w),
        ]

    def worker_to_worker(self, a: Worker, b: Worker) -> list[Link]:
        t = self.topology
        if a.host == b.host:
            return [
                self._link(f"nvl-out-{a.id}", t.nvlink_gb_s * GB * a.accelerators),
                self._link(f"nvl-in-{b.id}", t.nvlink_gb_s * GB * b.accelerators),
            ]
        return [self._link(f"nic-out{a.host}", t.nic_bytes_s()), self._link(f"nic-in{b.host}", t.nic_bytes_s())]

    def flow_cap(self, source_limit_bps: float) -> float:
        """A send's pace: the planner's own rule (`send_rate`: a serving holder's limit, capped by
        the loader's send cap), and the topology's per-flow cap."""
        cap = send_rate(source_limit_bps, self.settings.send_cap_bps)
        t = self.topology.flow_cap_gb_s * GB
        if t > 0:
            cap = min(cap, t) if cap > 0 else t
        return cap

    def stage_bytes_s(self, a: Worker, b: Worker) -> float:
        t = self.topology
        return (t.nvlink_gb_s if a.host == b.host else t.nic_gbps / 8) * GB

    # ---- messages ----------------------------------------------------------
    def control(self, fn: Any, *args: Any) -> None:
        self.sim.after(self.settings.control_latency_s, fn, *args)

    def heartbeat(self, hb: Beat) -> None:
        self.control(self._beat_arrives, hb)

    def _beat_arrives(self, hb: Beat) -> None:
        self.beats[hb.worker_id] = hb
        if self.scenario.trace_beats:
            self.beat_log.append(hb)
        holding = hb.model is not None and hb.state in HOLDING
        seq = self.holding.setdefault(hb.worker_id, [])
        if not seq or seq[-1][1] != holding:
            seq.append((self.sim.now, holding))
        self.gateway.on_heartbeat(hb)
        self.loader.mesh_changed()

    def layer_ready(self, worker: str, model: str, units: int, num_units: int) -> None:
        self.control(self._ready_arrives, worker, model, units, num_units)

    def _ready_arrives(self, worker: str, model: str, units: int, num_units: int) -> None:
        if self.scenario.trace_beats:
            self.ready_log.append((self.sim.now, worker, units))
        self.gateway.on_ready(worker, model, units, num_units)

    def layer_reset(self, worker: str) -> None:
        self.control(self.gateway.on_reset, worker)

    def tokens(self, worker: str, model: str, generated: int, firsts: list[Req], finished: list[Req]) -> None:
        self.control(self.gateway.on_tokens, worker, model, generated, firsts, finished)

    def stage_frame(self, src: str, dst: str, nbytes: int, fn: Any, *args: Any) -> None:
        a, b = self.workers[src], self.workers[dst]
        lat = self.settings.stage_latency_s or self.topology.link_latency_s
        self.sim.after(lat + nbytes / self.stage_bytes_s(a, b), fn, *args)

    def instance_metrics(self, m: InstanceMetrics) -> None:
        self.control(self.scaler.on_metrics, m)

    def model_metrics(self, m: ModelMetrics) -> None:
        self.control(self.scaler.on_metrics, m)

    def decision(self, d: ScaleDecision) -> None:
        self.decisions.append(
            {
                "t": self.sim.now,
                "id": d.decision_id,
                "model": d.model,
                "action": d.action,
                "count": d.count,
                "target": d.target_replicas,
                "reason": d.reason,
            }
        )
        self.control(self.loader.on_decision, d)

    def ack(self, ack: ScaleAck, p: Pending) -> None:
        self.acks.append(
            {
                "t": self.sim.now,
                "id": ack.decision_id,
                "model": ack.model,
                "ok": ack.ok,
                "workers": len(ack.workers),
                "error": ack.error,
                "seconds": self.sim.now - p.started,
            }
        )
        self.cache_peak = max(self.cache_peak, self.loader.memory_bytes())
        self.control(self.scaler.on_ack, ack)
        if self.scenario.halt_after_acks and len(self.acks) >= self.scenario.halt_after_acks:
            self.sim.halt()

    # ---- requests ----------------------------------------------------------
    def send(self, a: Arrival) -> None:
        req = Req(len(self.reqs), a, self.sim.now)
        self.reqs.append(req)
        self.outstanding += 1
        self.gateway.admit(req)
        if not req.done:
            # Deadlines come in arrival order: one timer for the earliest is enough.
            self._deadlines.append(req)
            if self._deadline_event is None:
                self._deadline_event = self.sim.at(req.arrived + self.settings.client_timeout_s, self._client_timeouts)

    def _client_timeouts(self) -> None:
        """Clients whose timeout has come give up (the gateway releases their requests)."""
        self._deadline_event = None
        q = self._deadlines
        limit = self.settings.client_timeout_s
        while q and (q[0].done or q[0].arrived + limit <= self.sim.now):
            req = q.popleft()
            if not req.done:
                self.gateway.client_gone(req)
        if q:
            self._deadline_event = self.sim.at(q[0].arrived + limit, self._client_timeouts)

    def finish(self, req: Req, status: str) -> None:
        if req.done:
            return
        req.done = True
        req.end = self.sim.now
        req.status = status
        self.outstanding -= 1
        if self.outstanding == 0 and self.all_sent:
            self.sim.halt()


def run(sc: Scenario) -> Result:
    """Simulate the scenario to the last request's end (or `max_sim_s`)."""
    wall = time.perf_counter()
    cpu = time.process_time()
    mesh = Mesh(sc)
    sim = mesh.sim
    # The mesh as the benchmark found it: instances loaded, host copies filled.
    for model, n in sc.preload.items():
        idle = [w for w in mesh.workers.values() if w.state == "idle"]
        for w in idle[:n]:
            w.preload(mesh.models[model])
            if sc.settings.local_cache:
                mesh.loader.local.setdefault(w.host, set()).add(model)
    for model in sc.fill_host_cache:
        mesh.loader.fill_host_cache(model, at_once=True)
    for w in mesh.workers.values():
        if w.model is not None:
            mesh._ready_arrives(w.id, w.model.name, w.units, w.model.num_units)
        mesh._beat_arrives(w.snapshot())
        w.start()
    mesh.gateway.start()
    mesh.scaler.start()
    t0 = [0.0]

    def begin() -> None:
        t0[0] = sim.now
        mesh.warm = len(mesh.reqs)
        base = sim.now
        for a in sc.arrivals:
            sim.at(base + a.t, mesh.send, a)
        sim.at(base + (sc.arrivals[-1].t if sc.arrivals else 0.0), _all_sent)
        for at, model, replicas in sc.operator:
            sim.at(base + at, mesh.scaler.operator_target, model, replicas)

    def _all_sent() -> None:
        mesh.all_sent = True
        if mesh.outstanding == 0:
            sim.halt()

    if sc.warmup:
        for a in sc.warmup:
            sim.at(a.t, mesh.send, a)
        _after_warmup(mesh, len(sc.warmup), sc.warmup_gap_s, begin)
    else:
        begin()
    sim.run(until=sc.max_sim_s)
    reqs = mesh.reqs[mesh.warm :]
    return Result(
        scenario=sc,
        t0=t0[0],
        reqs=reqs,
        beats=mesh.holding,
        decisions=mesh.decisions,
        acks=mesh.acks,
        plans=mesh.loader.plans,
        transfers=mesh.loader.transfers,
        routed=dict(mesh.gateway.routed),
        events=sim.events,
        wall_s=time.perf_counter() - wall,
        cpu_s=time.process_time() - cpu,
        sim_s=sim.now,
        cache_bytes_peak=max(mesh.cache_peak, mesh.loader.memory_bytes()),
        accelerators_per_instance=mesh.per_instance,
        beat_log=mesh.beat_log,
        ready_log=mesh.ready_log,
    )


def _after_warmup(mesh: Mesh, n: int, gap_s: float, then: Any) -> None:
    """Start the workload `gap_s` after the warm-up requests have all ended."""

    def check() -> None:
        if len(mesh.reqs) >= n and all(r.done for r in mesh.reqs[:n]):
            mesh.sim.after(gap_s, then)
        else:
            mesh.sim.after(0.01, check)

    mesh.sim.after(0.01, check)
