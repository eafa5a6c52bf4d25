"""The simulated scaler: services/scaler/main.py's loop around the real pure core
(`services.scaler.core.tick`), on modelled time.

What arrives between ticks (load reports from the gateway and the workers, the loader's acks)
is queued; each tick hands it to `core.tick` with the mesh as the heartbeats show it and carries
out the effects: `Publish` goes to the loader, `SetLimit` to the worker, `Note`s are kept. A tick
runs every `scaler_tick_s`, and sooner (at most four per tick) when an ack arrives or the gateway
reports requests waiting, as the service does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cascade.messages import InstanceMetrics, ModelMetrics, ScaleAck, ScaleRequest
from cascade.workers import COUNTED_STATES
from services.scaler import core
from services.scaler.replicas import Settings
from sim.engine import Event, Sim

if TYPE_CHECKING:
    from sim.mesh import Mesh


class Scaler:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.sim: Sim = mesh.sim
        s = mesh.settings
        self.tick_s = s.scaler_tick_s
        # Warm-up lasts a little over one heartbeat round (services/scaler/main.py).
        settings = Settings(ack_timeout_s=s.ack_timeout_s, warmup_s=1.5 * s.heartbeat_s)
        self.state = core.new_state(
            mesh.deployment,
            settings,
            self.now(),
            "scaler",
            window_s=s.window_s,
            rate_window_s=s.rate_window_s,
            stale_s=s.stale_s,
        )
        self._metrics: list[ModelMetrics | InstanceMetrics] = []
        self._acks: list[ScaleAck] = []
        self._loader_up: str | None = "loader"
        self._next: Event | None = None
        self._last_tick = -1e9
        self.notes: list[dict[str, Any]] = []
        self.ticks = 0

    def now(self) -> core.Now:
        return core.Now(self.sim.now, self.sim.now)

    def start(self) -> None:
        self._next = self.sim.after(self.mesh.rng.random() * self.tick_s, self._tick)

    # ---- inputs ------------------------------------------------------------
    def on_metrics(self, m: ModelMetrics | InstanceMetrics) -> None:
        self._metrics.append(m)
        if isinstance(m, ModelMetrics) and m.waiting > 0:
            self._wake()

    def on_ack(self, ack: ScaleAck) -> None:
        self._acks.append(ack)
        self._wake()

    def _wake(self) -> None:
        """Look now rather than at the next tick; at most four looks per tick."""
        at = max(self.sim.now, self._last_tick + self.tick_s / 4)
        if self._next is not None and Sim.pending(self._next) and self._next[0] <= at:
            return
        Sim.cancel(self._next)
        self._next = self.sim.at(at, self._tick)

    def operator_target(self, model: str, replicas: int) -> None:
        """`cascade scale MODEL --replicas N` (the core's `set_target`), then a look at once."""
        _, effects = core.set_target(self.state, ScaleRequest(model, replicas), self.mesh_view(), self.now())
        for e in effects:
            if isinstance(e, core.Note):
                self.notes.append({"t": self.sim.now, "event": e.event, **e.fields})
        self._wake()

    # ---- the tick ----------------------------------------------------------
    def mesh_view(self) -> core.Mesh:
        instances: dict[str, set[str]] = {}
        idle: set[str] = set()
        loading: dict[str, int] = {}
        holding: dict[str, str | None] = {}
        for w, hb in self.mesh.beats.items():
            if hb.model and hb.state in COUNTED_STATES:
                instances.setdefault(hb.model, set()).add(w)
            if hb.state == "idle":
                idle.add(w)
            if hb.model and hb.state == "loading":
                loading[hb.model] = loading.get(hb.model, 0) + 1
            holding[w] = hb.model if hb.state in COUNTED_STATES else None
        return core.Mesh(
            instances={m: frozenset(ws) for m, ws in instances.items()},
            idle=frozenset(idle),
            loading=loading,
            holding=holding,
        )

    def _tick(self) -> None:
        self._next = None
        self._last_tick = self.sim.now
        self.ticks += 1
        inputs = core.Inputs(mesh=self.mesh_view(), metrics=self._metrics, acks=self._acks, loader_up=self._loader_up)
        self._metrics, self._acks, self._loader_up = [], [], None
        self.state, effects = core.tick(self.state, inputs, self.now())
        # The tick takes its time: its effects leave, and the wait for the next one begins, at its end.
        self.sim.after(self.mesh.settings.scaler_tick_cost_s, self._carry_out, effects)

    def _carry_out(self, effects: list[core.Effect]) -> None:
        for e in effects:
            if isinstance(e, core.Publish):
                self.mesh.decision(e.decision)
            elif isinstance(e, core.SetLimit):
                self.mesh.control(self.mesh.worker(e.worker).set_max_batch, e.limit)
            elif isinstance(e, core.Announce):
                # Only `cascade deploy --model` announces, and the simulated mesh has no operator.
                self.notes.append({"t": self.sim.now, "event": "deployment_changed", "added": list(e.added)})
            elif isinstance(e, core.Note):
                self.notes.append({"t": self.sim.now, "event": e.event, **e.fields})
            # SetQuota needs shared workers, which the simulated mesh does not model.
        if self._next is None or not Sim.pending(self._next):
            self._next = self.sim.at(self.sim.now + self.tick_s, self._tick)
