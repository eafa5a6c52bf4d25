"""A simulated worker: its life cycle (idle → loading → serving → draining → idle), its
heartbeats, readiness and load reports, and its engine's steps.

The engine is modelled as services/worker/engine.py steps, not approximated: every step decodes
the whole running batch (and the decode rows of pipelined routes it drives or relays), then
spends one prefill budget on prompt work chosen by the engine's own admission rule
(`services.worker.admission.admit`: prompts under way first, then oldest arrival first across
full prompts, driven first stages and relayed chunks); the step lasts what the device profile
says (`DeviceProfile.stage_step_ms`, the engine's own pricing, with the same token scale); its
tokens exist when it ends, and the next step starts at once with whatever arrived meanwhile.

One shortcut keeps a 1,000-accelerator hour affordable, and changes no request's times: a run of
decode-only steps (no prompt work anywhere, nothing arriving) is one event. Its steps' times are
the profile's, which is linear in the context; the run ends when its first sequence finishes, or
early, at the end of the step under way when new work arrives. Generated tokens are reported to
the gateway when the run ends rather than step by step (only the scaler's token rates see that).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cascade.device_profile import LayerWork
from cascade.messages import InstanceMetrics, StepStat, WorkerState
from services.worker.admission import Staged, admit
from sim.engine import Event, Sim
from sim.hardware import ModelShape

if TYPE_CHECKING:
    from sim.mesh import Mesh, Req


@dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat as every service reads it (cascade.messages.Heartbeat's load figures)."""

    worker_id: str
    state: WorkerState
    model: str | None
    units_ready: int
    num_units: int
    running: int
    waiting: int
    max_batch: int
    driven_layers: int
    driven: int
    prefill_budget: int
    stage_running: int
    ts: float


class Full:
    """A request this worker runs whole (engine.py's full `Sequence`)."""

    __slots__ = ("arrived", "done", "finish_k", "gen", "out", "prompt", "req")

    def __init__(self, req: Req) -> None:
        self.req = req
        self.prompt = req.prompt
        self.out = req.out
        self.arrived = req.arrived
        self.done = 0  # prompt tokens computed (chunked prefill)
        self.gen = 0
        self.finish_k = 0


class Driven:
    """The first stage of a pipelined route this worker drives: layers [0, k); the tail runs the
    rest and the head, and sends each sampled token back."""

    __slots__ = ("arrived", "done", "gen", "k", "out", "prefilled", "prompt", "req", "tail", "token_in")

    def __init__(self, req: Req, k: int, tail: str) -> None:
        self.req = req
        self.prompt = req.prompt
        self.out = req.out
        self.arrived = req.arrived
        self.k = k
        self.tail = tail
        self.done = 0
        self.gen = 0
        self.prefilled = False
        self.token_in = False  # a token came back: its decode row goes in this step


class Relayed:
    """A later stage of another worker's route: layers [k, L) and the head."""

    __slots__ = ("arrived", "driver", "inputs", "k", "rid")

    def __init__(self, rid: int, driver: str, k: int, arrived: float) -> None:
        self.rid = rid
        self.driver = driver
        self.k = k
        self.arrived = arrived
        # (prefill, position or chunk start, tokens, final)
        self.inputs: deque[tuple[bool, int, int, bool]] = deque()


class Worker:
    def __init__(self, mesh: Mesh, worker_id: str, host: int, accelerators: int) -> None:
        self.mesh = mesh
        self.sim: Sim = mesh.sim
        self.id = worker_id
        self.host = host
        self.accelerators = accelerators
        s = mesh.settings
        self.base_batch = s.max_batch
        self.max_batch = s.max_batch
        self.kv_slots = max(s.kv_slots or s.max_batch, s.max_batch)
        self.scale = s.token_scale
        self.budget = s.prefill_budget
        self.state: WorkerState = "idle"
        self.model: ModelShape | None = None
        self.units = 0  # units ready, front to back (transfers and disk reads fill in that order)
        self.load_flow: Any = None  # the loader's handle on an inbound transfer, to cancel it
        self.on_idle: list[Any] = []  # drain waiters (an unload)
        self._reset_engine()
        self.metrics_seq = 0
        self.beat_event: Event | None = None
        self.metrics_event: Event | None = None
        self.started = False
        self.beat_phase = self.metrics_phase = 0.0
        self._said: tuple[Any, ...] | None = None  # the last heartbeat's figures
        self._generated = 0  # tokens generated and not yet reported to the gateway

    # ------------------------------------------------------------------ engine state
    def _reset_engine(self) -> None:
        self.k = 0  # steps completed
        self.running: list[tuple[int, int, Full]] = []  # heap of (finish step, order, seq)
        self.order = 0
        self.ctx = 0  # positions summed over the running batch (modelled tokens)
        self.waiting: deque[Full] = deque()
        self.prefilling: list[Full] = []
        self.driven: dict[int, Driven] = {}
        self.relayed: dict[int, Relayed] = {}
        self.inbox: list[Any] = []
        self.busy = False  # a step (or a run of decode steps) is under way
        self.step_event: Event | None = None
        self.macro: tuple[float, int, float, float] | None = None  # (start, steps, first step s, growth s)
        self.scheduled = False
        # Per metrics interval: batch → [steps, ms]; generated tokens.
        self.steps_by_batch: dict[int, list[float]] = {}
        self.interval_generated = 0
        self.interval_prompt = 0

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Heartbeats and load reports from a random phase, as independent processes have."""
        rng = self.mesh.rng
        s = self.mesh.settings
        self.started = True
        self.beat_phase = rng.random() * s.heartbeat_s
        self.metrics_phase = rng.random() * s.metrics_s
        self._arm()

    def _arm(self) -> None:
        """Heartbeat and metrics timers on their phase grid. An idle worker that has said so lets
        them sleep (a beat would repeat itself and it has no metrics); a load wakes them."""
        s = self.mesh.settings
        now = self.sim.now
        if self.beat_event is None:
            k = math.floor((now - self.beat_phase) / s.heartbeat_s) + 1
            self.beat_event = self.sim.at(self.beat_phase + k * s.heartbeat_s, self._beat_loop)
        if self.metrics_event is None:
            k = math.floor((now - self.metrics_phase) / s.metrics_s) + 1
            self.metrics_event = self.sim.at(self.metrics_phase + k * s.metrics_s, self._metrics_loop)

    def begin_load(self, model: ModelShape) -> bool:
        """A load order: the engine exists from the first unit on (a loading instance serves as
        the first stage of pipelined routes). False: not idle."""
        if self.state != "idle" or self.model is not None:
            return False
        self.state = "loading"
        self.model = model
        self.units = 0
        self.max_batch = self.base_batch
        self._reset_engine()
        if self.started:
            self._arm()
        return True

    def unit_ready(self, unit: int) -> None:
        if self.model is None or self.state not in ("loading", "serving"):
            return
        if unit == self.units:
            self.units += 1
            self.mesh.layer_ready(self.id, self.model.name, self.units, self.model.num_units)

    def load_done(self) -> None:
        if self.model is None or self.state != "loading":
            return
        self.units = self.model.num_units
        self.state = "serving"
        self.beat()

    def preload(self, model: ModelShape) -> None:
        """Serving from the start (the instances a benchmark's mesh loaded before it began)."""
        self.begin_load(model)
        self.units = model.num_units
        self.state = "serving"

    def unload(self, done: Any) -> None:
        """UnloadModel: stop a load, drain (in-flight requests finish), free the model; `done()`
        when idle again."""
        if self.state == "idle":
            done()
            return
        if self.load_flow is not None:
            self.mesh.loader.cancel_inbound(self)
        self.state = "draining"
        self.beat()
        self.on_idle.append(done)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        # A step under way holds the prompts it admitted whole, which are in no queue until it
        # ends (the engine has them in its batch): the drain waits for the step (`_next` after it).
        if self.state != "draining" or self.busy or self.in_flight():
            return
        model = self.model
        if model is not None and self._generated:
            self.mesh.tokens(self.id, model.name, self._generated, [], [])
            self._generated = 0
        self.model = None
        self.units = 0
        self.state = "idle"
        self._reset_engine()
        if model is not None:
            self.mesh.layer_reset(self.id)
        self.beat()
        waiters, self.on_idle = self.on_idle, []
        for fn in waiters:
            fn()

    def in_flight(self) -> int:
        n = len(self.running) + len(self.prefilling) + len(self.waiting) + len(self.driven) + len(self.relayed)
        return n + sum(1 for x in self.inbox if x[0] == "req")

    def load(self) -> tuple[int, int]:
        """(running, waiting) as the engine reports them."""
        inbox = sum(1 for x in self.inbox if x[0] == "req")
        return len(self.running) + len(self.prefilling) + len(self.driven), len(self.waiting) + inbox

    # ------------------------------------------------------------------ heartbeats and metrics
    def snapshot(self) -> Beat:
        running, waiting = self.load() if self.model is not None else (0, 0)
        m = self.model
        return Beat(
            worker_id=self.id,
            state=self.state,
            model=m.name if m is not None else None,
            units_ready=self.units,
            num_units=m.num_units if m is not None else 0,
            running=running,
            waiting=waiting,
            max_batch=self.max_batch,
            driven_layers=sum(d.k for d in self.driven.values()),
            driven=len(self.driven),
            prefill_budget=self.budget if m is not None else 0,
            stage_running=len(self.relayed),
            ts=self.sim.now,
        )

    def beat(self) -> None:
        hb = self.snapshot()
        self._said = _figures(hb)
        self.mesh.heartbeat(hb)

    def _beat_loop(self) -> None:
        self.beat_event = None
        hb = self.snapshot()
        if self.state == "idle" and _figures(hb) == self._said:
            return  # idle and said so: nothing a service reads would change
        self._said = _figures(hb)
        self.mesh.heartbeat(hb)
        self.beat_event = self.sim.after(self.mesh.settings.heartbeat_s, self._beat_loop)

    def _metrics_loop(self) -> None:
        s = self.mesh.settings
        self.metrics_event = None
        m = self.model
        if m is None:
            return
        self.metrics_event = self.sim.after(s.metrics_s, self._metrics_loop)
        if self._generated:
            # Decode-only steps' tokens reach the gateway with the next first token or end, or here.
            self.mesh.tokens(self.id, m.name, self._generated, [], [])
            self._generated = 0
        if not self.mesh.wants_loads(m.name):
            self.interval_generated = self.interval_prompt = 0
            self.steps_by_batch = {}
            return  # no policy of this model reads them (the simulator's shortcut; Mesh.wants_loads)
        running, waiting = self.load()
        self.metrics_seq += 1
        # Step samples feed only the two-stage policy's latency fit; a window of them from every
        # instance is what a scaler tick reads, so they are sent only where that policy runs.
        steps = (
            [StepStat(b, int(n), round(ms, 3)) for b, (n, ms) in sorted(self.steps_by_batch.items())]
            if self.mesh.wants_steps(m.name)
            else []
        )
        msg = InstanceMetrics(
            worker_id=self.id,
            model=m.name,
            seq=self.metrics_seq,
            ts=self.sim.now,
            interval_s=s.metrics_s,
            state=self.state,
            running=running,
            waiting=waiting,
            max_batch=self.max_batch,
            tokens_per_s=round(self.interval_generated / s.metrics_s, 3),
            prompt_tokens=self.interval_prompt,
            generated_tokens=self.interval_generated,
            steps=steps,
            kv_slots=self.kv_slots,
        )
        self.steps_by_batch = {}
        self.interval_generated = 0
        self.interval_prompt = 0
        self.mesh.instance_metrics(msg)

    def set_max_batch(self, limit: int) -> None:
        """SetBatchLimit (the two-stage policy's vertical action), within the KV slots."""
        if self.model is None:
            return
        self.max_batch = max(1, min(limit or self.base_batch, self.kv_slots))
        self.kick()

    # ------------------------------------------------------------------ requests
    def reject_reason(self, req: Req) -> str | None:
        """services/worker/main.py `_reject_reason`, on the modelled state."""
        if self.state == "draining":
            return "draining"
        m = self.model
        if m is None or self.state not in ("serving", "loading"):
            return "not_ready"
        if req.model != m.name:
            return "wrong_model"
        if req.route_k:
            if self.units < req.route_k + 1:
                return "not_ready"
        elif self.state != "serving":
            return "not_ready"
        if self.load()[1] >= self.mesh.settings.max_waiting:
            return "overloaded"
        return None

    def submit(self, req: Req) -> None:
        self.inbox.append(("req", req))
        self.kick()

    def stage_input(self, rid: int, driver: str, k: int, arrived: float, inp: tuple[bool, int, int, bool]) -> None:
        self.inbox.append(("input", rid, driver, k, arrived, inp))
        self.kick()

    def stage_token(self, rid: int) -> None:
        self.inbox.append(("token", rid))
        self.kick()

    def stage_close(self, rid: int) -> None:
        self.inbox.append(("close", rid))
        self.kick()

    def cancel(self, rid: int) -> None:
        """Cancel (the gateway released the request: its client left)."""
        self.inbox.append(("cancel", rid))
        self.kick()

    def kick(self) -> None:
        """New work: the engine thread wakes, or takes it at its next step."""
        if self.busy:
            if self.macro is not None:
                self._cut_macro()
            return
        if not self.scheduled:
            self.scheduled = True
            self.sim.at(self.sim.now, self._begin)

    # ------------------------------------------------------------------ the step
    def _has_work(self) -> bool:
        return bool(
            self.running
            or self.waiting
            or self.prefilling
            or self.inbox
            or any(d.token_in or not d.prefilled for d in self.driven.values())
            or any(r.inputs for r in self.relayed.values())
        )

    def _take_inbox(self) -> tuple[list[Req], list[Req], int]:
        """Requests in, stage frames applied (engine.step's first lines). Returns the driven
        requests that finished on a token that came back, those that got their first one, and
        how many tokens came back."""
        tokens = 0
        finished: list[Req] = []
        firsts: list[Req] = []
        inbox, self.inbox = self.inbox, []
        for item in inbox:
            kind = item[0]
            if kind == "req":
                req: Req = item[1]
                if req.route_k:
                    self.driven[req.idx] = Driven(req, req.route_k, req.route_tail)
                else:
                    self._enqueue(Full(req))
            elif kind == "input":
                _, rid, driver, k, arrived, inp = item
                rel = self.relayed.get(rid)
                if rel is None:
                    if not inp[0]:
                        continue  # a decode input for a route closed meanwhile
                    rel = self.relayed[rid] = Relayed(rid, driver, k, arrived)
                rel.inputs.append(inp)
            elif kind == "token":
                d = self.driven.get(item[1])
                if d is not None:
                    tokens += 1
                    d.gen += 1
                    if d.gen == 1:
                        firsts.append(d.req)
                    if d.gen >= d.out:
                        del self.driven[d.req.idx]
                        finished.append(d.req)
                        self.mesh.stage_frame(self.id, d.tail, 0, self.mesh.worker(d.tail).stage_close, d.req.idx)
                    else:
                        d.token_in = True
            elif kind == "close":
                self.relayed.pop(item[1], None)
            elif kind == "cancel":
                self._cancel(item[1])
        return finished, firsts, tokens

    def _cancel(self, rid: int) -> None:
        """engine.py `_apply_cancels`: the sequence ends wherever it is (nothing is reported back:
        the gateway has forgotten it); a driven route tells its later stage to free its state."""
        for seq in self.waiting:
            if seq.req.idx == rid:
                self.waiting.remove(seq)
                return
        for seq in self.prefilling:
            if seq.req.idx == rid:
                self.prefilling.remove(seq)
                return
        d = self.driven.pop(rid, None)
        if d is not None:
            self.mesh.stage_frame(self.id, d.tail, 0, self.mesh.worker(d.tail).stage_close, rid)
            return
        for i, (fk, _, seq) in enumerate(self.running):
            if seq.req.idx == rid:
                gen = seq.out - (fk - self.k)  # tokens it has now
                self.ctx -= seq.prompt + gen - 1
                self.running[i] = self.running[-1]
                self.running.pop()
                heapq.heapify(self.running)
                return

    def _enqueue(self, seq: Full) -> None:
        """Waiting queue kept in arrival order (engine.py `_enqueue`)."""
        w = self.waiting
        if not w or w[-1].arrived <= seq.arrived:
            w.append(seq)
            return
        i = len(w)
        while i > 0 and w[i - 1].arrived > seq.arrived:
            i -= 1
        w.insert(i, seq)

    def _begin(self) -> None:
        self.scheduled = False
        if self.busy or self.model is None:
            return
        # Tokens that came back to driven routes go out with this step's events (the engine's
        # pending ids), when it ends.
        finished, firsts, tokens = self._take_inbox()
        if not (
            self.running
            or self.waiting
            or self.prefilling
            or any(d.token_in or not d.prefilled for d in self.driven.values())
            or any(r.inputs for r in self.relayed.values())
        ):
            if tokens:
                self.mesh.tokens(self.id, self.model.name, self._generated + tokens, firsts, finished)
                self._generated = 0
            self._maybe_idle()
            return
        if not tokens and not self.waiting and not self.prefilling and not self.driven and not self.relayed:
            self._start_macro()
            return
        self._step(finished, firsts, tokens)

    def _step(self, pre_finished: list[Req], pre_firsts: list[Req], pre_tokens: int) -> None:
        model = self.model
        assert model is not None
        L = model.layers
        sc = self.scale
        # Work on every layer is summed here, as `stage_step_ms` would sum it per layer (the
        # engine prices each segment's tokens with int(); so is each here); partial-layer work
        # of pipelined routes goes in `parts`.
        fb = fn = fc = 0
        parts: list[LayerWork] = []
        head = False
        b_old = len(self.running)
        if b_old:
            fb, fc = b_old, int(self.ctx * sc)
            head = True
        rel_decode: list[Relayed] = []
        for rel in self.relayed.values():
            if rel.inputs and not rel.inputs[0][0]:
                pos = rel.inputs[0][1]
                parts.append(LayerWork(rel.k, L, 1, 0, int(pos * sc)))
                head = True
                rel_decode.append(rel)
        drv_decode: list[Driven] = []
        for d in self.driven.values():
            if d.token_in and d.prefilled:
                parts.append(LayerWork(0, d.k, 1, 0, int((d.prompt + d.gen - 1) * sc)))
                drv_decode.append(d)
        # Stage prompt work, sorted as the engine sorts it: by arrival, then position in its own
        # table, relayed before driven (the engine's stable sort of relayed-then-driven entries).
        staged: list[tuple[float, int, int, Any]] = []
        if self.relayed or self.driven:
            for n, rel in enumerate(self.relayed.values()):
                if rel.inputs and rel.inputs[0][0]:
                    staged.append((rel.arrived, n, 0, rel))
            for n, d in enumerate(self.driven.values()):
                if not d.prefilled:
                    staged.append((d.arrived, n, 1, d))
            staged.sort()
        plan = admit(
            self.budget,
            [s.prompt - s.done for s in self.prefilling],
            _Waiting(self.waiting),
            _StagedView(staged, L),
            self.max_batch - b_old - len(self.prefilling),
            self.budget,
        )
        chunks: list[tuple[Full, int]] = []
        for seq, n in zip(list(self.prefilling), plan.chunks, strict=False):
            fn += int(n * sc)
            fc += int(seq.done * sc)
            head = head or seq.done + n == seq.prompt
            chunks.append((seq, n))
        new: list[Full] = []
        rel_prefill: list[Relayed] = []
        drv_prefill: list[tuple[Driven, int]] = []
        for kind, index, n in plan.takes:
            if kind == "whole":
                new.append(self.waiting.popleft())
            elif kind == "start":
                seq = self.waiting.popleft()
                self.prefilling.append(seq)
                fn += int(n * sc)
                chunks.append((seq, n))
            elif kind == "relayed":
                rel = staged[index][3]
                _, start, tokens, final = rel.inputs[0]
                parts.append(LayerWork(rel.k, L, 0, int(tokens * sc), int(start * sc)))
                head = head or final
                rel_prefill.append(rel)
            else:
                d = staged[index][3]
                parts.append(LayerWork(0, d.k, 0, int(n * sc), int(d.done * sc)))
                drv_prefill.append((d, n))
        if new:
            fn += int(sum(s.prompt for s in new) * sc)
            head = True
        if fb or fn:
            parts.append(LayerWork(0, L, fb, fn, fc))
        ms = model.profile.stage_step_ms(L, parts, head)
        prompt = sum(s.prompt for s in new) + sum(n for _, n in chunks)
        batch = b_old + len(new) + len(rel_decode) + len(rel_prefill)
        self.busy = True
        self.step_event = self.sim.after(
            ms / 1000,
            self._end_step,
            (
                pre_finished,
                pre_firsts,
                pre_tokens,
                b_old,
                new,
                chunks,
                rel_decode,
                rel_prefill,
                drv_decode,
                drv_prefill,
            ),
        )
        self._record_steps(batch, 1, ms, prompt)

    def _record_steps(self, batch: int, n: int, ms: float, prompt: int) -> None:
        if batch > 0:
            acc = self.steps_by_batch.get(batch)
            if acc is None:
                self.steps_by_batch[batch] = [n, ms]
            else:
                acc[0] += n
                acc[1] += ms
        self.interval_prompt += prompt

    def _end_step(self, work: tuple[Any, ...]) -> None:
        pre_finished, pre_firsts, pre_tokens, b_old, new, chunks, rel_decode, rel_prefill, drv_decode, drv_prefill = (
            work
        )
        self.busy = False
        self.step_event = None
        model = self.model
        assert model is not None
        mesh = self.mesh
        firsts: list[Req] = list(pre_firsts)
        finished: list[Req] = list(pre_finished)
        generated = pre_tokens
        # Decode: every old running sequence got a token.
        self.k += 1
        if b_old:
            self.ctx += b_old
            generated += b_old
            self._retire(finished)
        # Prompts done this step: their first token, and into the batch.
        joined: list[Full] = list(new)
        for seq, n in chunks:
            seq.done += n
            if seq.done >= seq.prompt:
                self.prefilling.remove(seq)
                joined.append(seq)
        for seq in joined:
            seq.gen = 1
            generated += 1
            firsts.append(seq.req)
            if seq.out <= 1:
                finished.append(seq.req)
                continue
            seq.finish_k = self.k + seq.out - 1
            self.order += 1
            heapq.heappush(self.running, (seq.finish_k, self.order, seq))
            self.ctx += seq.prompt
        # Relayed stages: the last stage samples and sends the token back.
        for rel in rel_decode:
            rel.inputs.popleft()
            mesh.stage_frame(self.id, rel.driver, 0, mesh.worker(rel.driver).stage_token, rel.rid)
        for rel in rel_prefill:
            _, _, _, final = rel.inputs.popleft()
            if final:
                mesh.stage_frame(self.id, rel.driver, 0, mesh.worker(rel.driver).stage_token, rel.rid)
        # Driven routes: hidden states down the route.
        for d in drv_decode:
            d.token_in = False
            pos = d.prompt + d.gen - 1
            mesh.stage_frame(
                self.id,
                d.tail,
                model.hidden * model.act_bytes,
                mesh.worker(d.tail).stage_input,
                d.req.idx,
                self.id,
                d.k,
                d.arrived,
                (False, pos, 1, True),
            )
        for d, n in drv_prefill:
            start = d.done
            d.done += n
            final = d.done >= d.prompt
            if final:
                d.prefilled = True
            mesh.stage_frame(
                self.id,
                d.tail,
                n * model.hidden * model.act_bytes,
                mesh.worker(d.tail).stage_input,
                d.req.idx,
                self.id,
                d.k,
                d.arrived,
                (True, start, n, final),
            )
        self.interval_generated += generated
        self._generated += generated
        if firsts or finished:
            mesh.tokens(self.id, model.name, self._generated, firsts, finished)
            self._generated = 0
        self._next()

    def _retire(self, finished: list[Req]) -> None:
        heap = self.running
        while heap and heap[0][0] <= self.k:
            _, _, seq = heapq.heappop(heap)
            self.ctx -= seq.prompt + seq.out - 1
            finished.append(seq.req)

    def _next(self) -> None:
        if self.inbox or self._has_work():
            self._begin()
        else:
            self._maybe_idle()

    # ------------------------------------------------------------------ runs of decode steps
    def _step_ms(self, b: int, ctx: int) -> float:
        m = self.model
        assert m is not None
        return m.profile.stage_step_ms(m.layers, (LayerWork(0, m.layers, b, 0, int(ctx * self.scale)),), True)

    def _start_macro(self) -> None:
        b = len(self.running)
        n = self.running[0][0] - self.k  # steps until the first sequence finishes
        t0 = self._step_ms(b, self.ctx) / 1000
        # Each step reads b more KV tokens than the last; the profile is linear in them.
        dt = self._step_ms(b, self.ctx + b) / 1000 - t0 if n > 1 else 0.0
        self.busy = True
        self.macro = (self.sim.now, n, t0, dt)
        self.step_event = self.sim.after(_span(n, t0, dt), self._end_macro)

    def _cut_macro(self) -> None:
        """New work during a run: end it with the step under way."""
        assert self.macro is not None
        start, n, t0, dt = self.macro
        elapsed = self.sim.now - start
        m = _steps_to_cover(elapsed, t0, dt, n)
        if m >= n:
            return
        self.macro = (start, m, t0, dt)
        Sim.cancel(self.step_event)
        self.step_event = self.sim.at(start + _span(m, t0, dt), self._end_macro)

    def _end_macro(self) -> None:
        assert self.macro is not None and self.model is not None
        _, n, t0, dt = self.macro
        self.macro = None
        self.busy = False
        self.step_event = None
        b = len(self.running)
        self.k += n
        self.ctx += b * n
        finished: list[Req] = []
        self._retire(finished)
        self._record_steps(b, n, 1000 * _span(n, t0, dt), 0)
        self.interval_generated += b * n
        self._generated += b * n
        if finished:
            self.mesh.tokens(self.id, self.model.name, self._generated, [], finished)
            self._generated = 0
        self._next()


def _figures(hb: Beat) -> tuple[Any, ...]:
    return (
        hb.state,
        hb.model,
        hb.units_ready,
        hb.running,
        hb.waiting,
        hb.max_batch,
        hb.driven_layers,
        hb.driven,
        hb.stage_running,
    )


class _Waiting:
    """The waiting queue as `admit` reads it, (arrival, prompt tokens) by position, without a
    copy of the whole queue each step."""

    __slots__ = ("q",)

    def __init__(self, q: deque[Full]) -> None:
        self.q = q

    def __len__(self) -> int:
        return len(self.q)

    def __getitem__(self, i: int) -> tuple[float, int]:
        s = self.q[i]
        return s.arrived, s.prompt


class _StagedView:
    """Stage work as `admit` reads it, built only as far as it reads."""

    __slots__ = ("layers", "staged")

    def __init__(self, staged: list[tuple[float, int, int, Any]], layers: int) -> None:
        self.staged = staged
        self.layers = layers

    def __len__(self) -> int:
        return len(self.staged)

    def __getitem__(self, i: int) -> Staged:
        _, _, kind, o = self.staged[i]
        L = self.layers
        if kind == 0:
            return Staged(o.arrived, "relayed", o.inputs[0][2], (L - o.k) / L)
        return Staged(o.arrived, "driven", o.prompt - o.done, o.k / L)


def _span(n: int, t0: float, dt: float) -> float:
    """Seconds of n steps whose first lasts t0 and each next dt longer."""
    return n * t0 + dt * n * (n - 1) / 2


def _steps_to_cover(elapsed: float, t0: float, dt: float, n: int) -> int:
    """The fewest steps (1..n) of a run that last at least `elapsed`: the step under way ends then."""
    if elapsed <= 0:
        return 1
    if dt <= 1e-15:
        m = math.ceil(elapsed / t0) if t0 > 0 else 1
    else:
        a, b = dt / 2, t0 - dt / 2
        m = math.ceil((-b + math.sqrt(b * b + 4 * a * elapsed)) / (2 * a))
    m = max(1, min(n, m))
    while m > 1 and _span(m - 1, t0, dt) >= elapsed:
        m -= 1
    while m < n and _span(m, t0, dt) < elapsed:
        m += 1
    return m
