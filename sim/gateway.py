"""The simulated gateway: the real batcher (`services.gateway.batcher.Batcher`) and router
(`services.gateway.router.choose_route`) deciding, around the bookkeeping a gateway keeps
(services/gateway/core.py): which worker each request is bound to, how many prompts there have
no token yet, the heartbeats and readiness it has heard, and its load reports
(`services.gateway.loadreport.LoadReport`, also the real one).

Only one thing differs from the service, for speed, and not in what it decides: the router is
handed the instances that can change its answer rather than every instance of the model. The
gateway keeps the model's fully-serving instances sorted by the router's own key
(`prefill_backlogged`, then `estimated_load` per batch slot, then load, then id, as
`choose_instance` orders them); the answer of `choose_route` depends only on the first of them
not to avoid, the first after it that `accepts` work (the `room` bound), the instances to avoid,
and the loading ones (live routes). tests/test_sim_gateway.py checks that the choice from that
subset is the choice from all of them, on random snapshots.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

from cascade.messages import SamplingParams
from services.gateway.batcher import Batcher, QueueFull
from services.gateway.loadreport import LoadReport
from services.gateway.router import (
    InstanceView,
    Route,
    accepts,
    choose_instance,
    choose_route,
    estimated_load,
    front_layers,
    head_key,
    head_layers,
    prefill_backlogged,
    serves_fully,
)
from services.gateway.streams import RequestState
from sim.engine import Event, Sim
from sim.worker import Beat, _figures

if TYPE_CHECKING:
    from sim.mesh import Mesh, Req

# services/gateway/core.py: back-off after an "overloaded" rejection.
_OVERLOAD_BACKOFF_S = 0.02
_OVERLOAD_BACKOFF_MAX_S = 1.0
_RETRYABLE = frozenset({"draining", "wrong_model", "not_ready"})
_PARAMS = SamplingParams()


class Seen:
    """What the gateway knows of one worker (its registry entry and its own counts there)."""

    __slots__ = (
        "accepting",
        "beat",
        "inflight",
        "inflight_at_hb",
        "key",
        "lkey",
        "loading_of",
        "ready_model",
        "ready_num",
        "ready_units",
        "serving_of",
        "suspended",
        "unstarted_prompts",
        "unstarted_tokens",
        "view",
    )

    def __init__(self) -> None:
        self.beat: Beat | None = None
        self.ready_model: str | None = None
        self.ready_units = 0
        self.ready_num = 0
        self.suspended = False
        self.inflight = 0
        self.inflight_at_hb = 0
        self.unstarted_prompts = 0
        self.unstarted_tokens = 0
        self.view: InstanceView | None = None
        self.key: tuple[Any, ...] | None = None  # in the serving index of `serving_of`
        self.accepting = False  # and in its index of instances that `accepts` work
        self.serving_of: str | None = None
        self.loading_of: str | None = None
        self.lkey: tuple[Any, ...] | None = None  # in the loading index of `loading_of` (router.head_key)


class Gateway:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.sim: Sim = mesh.sim
        s = mesh.settings
        self.settings = s
        self.seen: dict[str, Seen] = {}
        self.index: dict[str, list[tuple[Any, ...]]] = {}  # model → sorted keys of fully serving instances
        self.accepting: dict[str, list[tuple[Any, ...]]] = {}  # the same, of those that `accepts` work
        # model → router.head_key of its loading workers (heads of live routes), sorted
        self.loading: dict[str, list[tuple[Any, ...]]] = {}
        self.live: dict[str, bool] = {}
        self.reqs: dict[str, Req] = {}
        for dep in mesh.deployment.models:
            self.live[dep.name] = dep.scaling == "live"
            self.index[dep.name] = []
            self.accepting[dep.name] = []
            self.loading[dep.name] = []
        self.fronts = [Front(self, i) for i in range(max(1, s.gateways))]
        self.routed = {"full": 0, "pipelined": 0}
        self._next_front = 0

    def start(self) -> None:
        for f in self.fronts:
            f.start()

    # ------------------------------------------------------------------ admission
    def admit(self, req: Req) -> None:
        """A request arrives, at the gateways in turn (a load balancer's round robin)."""
        req.gw = self._next_front
        self._next_front = (self._next_front + 1) % len(self.fronts)
        self.fronts[req.gw].admit(req)

    def _wake_all(self) -> None:
        for f in self.fronts:
            f.wake_all()

    # ------------------------------------------------------------------ routing
    def pick(self, model: str, avoid: frozenset[str]) -> Route | None:
        return choose_route(self.candidates(model, avoid), model, avoid, self.live[model])

    def candidates(self, model: str, avoid: frozenset[str] = frozenset()) -> list[InstanceView]:
        """The instances `choose_route` needs to see to decide as it would with all of them
        (module docstring)."""
        out: list[InstanceView] = []
        full: tuple[Any, ...] | None = None
        for key in self.index[model]:
            if key[-1] not in avoid:
                full = key
                break
        if full is not None:
            sw = self.seen[full[-1]]
            assert sw.view is not None
            out.append(sw.view)
            if sw.accepting:
                # The first instance after it that accepts work bounds its room (`room_of`).
                acc = self.accepting[model]
                for key in acc[bisect.bisect_right(acc, full) :]:
                    if key[-1] not in avoid:
                        v = self.seen[key[-1]].view
                        assert v is not None
                        out.append(v)
                        break
        for w in avoid:
            other = self.seen.get(w)
            if other is not None and other.serving_of == model and other.view is not None:
                out.append(other.view)
        if self.live[model] and self.loading[model]:
            # The head of a live route is the loading instance first by `head_key` among those
            # `head_layers` accepts behind the full instance `choose_route` will pick: the index
            # is in that order, so the first one accepted is the only one it needs to see.
            fid = choose_instance(out, model, avoid)
            fv = next((v for v in out if v.worker_id == fid), None)
            if fv is not None:
                for key in self.loading[model]:
                    v = self.seen[key[-1]].view
                    if v is not None and head_layers(v, model, fv, avoid):
                        out.append(v)
                        break
        return out

    def _refresh(self, worker: str) -> None:
        """Rebuild the worker's routing view and its place in the indexes (registry.views)."""
        sw = self.seen[worker]
        hb = sw.beat
        if hb is None:
            return
        model = sw.ready_model
        state: str = hb.state
        if sw.suspended or hb.model != model:
            state = "unavailable"  # turned work away, or heartbeat and readiness disagree for now
        v = InstanceView(
            worker_id=worker,
            model=model,
            state=state,
            units_ready=sw.ready_units,
            num_units=sw.ready_num,
            running=hb.running,
            waiting=hb.waiting,
            max_batch=max(hb.max_batch, 1),
            inflight=sw.inflight,
            inflight_at_heartbeat=sw.inflight_at_hb,
            prefix_units=sw.ready_units,
            stage_addr=worker,
            driven_layers=hb.driven_layers,
            prefill_budget=hb.prefill_budget,
            unstarted_tokens=sw.unstarted_tokens,
            unstarted_prompts=sw.unstarted_prompts,
            driven=hb.driven,
        )
        sw.view = v
        key: tuple[Any, ...] | None = None
        serving = model if model is not None and serves_fully(v, model) else None
        if serving is not None:
            load = estimated_load(v)
            key = (prefill_backlogged(v), load / v.max_batch, load, worker)
        ok = key is not None and accepts(v)
        if sw.key != key or sw.serving_of != serving or sw.accepting != ok:
            if sw.serving_of is not None and sw.key is not None:
                idx = self.index[sw.serving_of]
                del idx[bisect.bisect_left(idx, sw.key)]
                if sw.accepting:
                    acc = self.accepting[sw.serving_of]
                    del acc[bisect.bisect_left(acc, sw.key)]
            if serving is not None and key is not None:
                bisect.insort(self.index[serving], key)
                if ok:
                    bisect.insort(self.accepting[serving], key)
            sw.key, sw.serving_of, sw.accepting = key, serving, ok
        loading = model if model is not None and state == "loading" and model in self.loading else None
        lkey = head_key(v, front_layers(v, loading)) if loading is not None else None
        if loading != sw.loading_of or lkey != sw.lkey:
            if sw.loading_of is not None and sw.lkey is not None:
                idx = self.loading[sw.loading_of]
                del idx[bisect.bisect_left(idx, sw.lkey)]
            if loading is not None and lkey is not None:
                bisect.insort(self.loading[loading], lkey)
            sw.loading_of, sw.lkey = loading, lkey

    def _seen(self, worker: str) -> Seen:
        sw = self.seen.get(worker)
        if sw is None:
            sw = self.seen[worker] = Seen()
        return sw

    # ------------------------------------------------------------------ the worker feed
    def on_heartbeat(self, hb: Beat) -> None:
        sw = self._seen(hb.worker_id)
        old = sw.beat
        same = (
            old is not None
            and not sw.suspended
            and sw.inflight_at_hb == sw.inflight
            and _figures(old) == _figures(hb)
            and old.prefill_budget == hb.prefill_budget
        )
        sw.beat = hb
        if same:
            return  # the view it would rebuild is the one there: nothing to look at again
        sw.inflight_at_hb = sw.inflight
        sw.suspended = False
        self._refresh(hb.worker_id)
        self._wake_all()

    def on_ready(self, worker: str, model: str, units: int, num_units: int) -> None:
        sw = self._seen(worker)
        sw.ready_model, sw.ready_units, sw.ready_num = model, units, num_units
        self._refresh(worker)
        self._wake_all()

    def on_reset(self, worker: str) -> None:
        sw = self._seen(worker)
        sw.ready_model, sw.ready_units, sw.ready_num = None, 0, 0
        self._refresh(worker)
        self._wake_all()

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, route: Route, batch: list[RequestState]) -> None:
        worker = route.worker_id
        k = route.stages[0].end if route.stages else 0
        tail = route.stages[1].worker_id if route.stages else ""
        self.routed["pipelined" if route.stages else "full"] += len(batch)
        reqs = []
        for st in batch:
            req = self.reqs[st.request_id]
            st.attempts += 1
            req.route_k, req.route_tail = k, tail
            self._bind(req, worker)
            reqs.append(req)
        self.mesh.control(self._deliver_batch, worker, reqs)

    def _deliver_batch(self, worker: str, reqs: list[Req]) -> None:
        """The worker's `on_generate`: each request accepted or rejected; the reply comes back."""
        w = self.mesh.worker(worker)
        verdicts: list[tuple[Req, str | None]] = []
        for req in reqs:
            why = w.reject_reason(req)
            if why is None:
                w.submit(req)
            verdicts.append((req, why))
        if any(why is not None for _, why in verdicts):
            self.mesh.control(self._replied, worker, verdicts)

    def _replied(self, worker: str, verdicts: list[tuple[Req, str | None]]) -> None:
        for req, why in verdicts:
            if why is None or req.worker != worker or req.done:
                continue
            st = req.state
            assert st is not None
            if why == "overloaded":
                st.attempts -= 1
                st.overloads += 1
                delay = min(_OVERLOAD_BACKOFF_S * 2 ** (st.overloads - 1), _OVERLOAD_BACKOFF_MAX_S)
                self._retry(req, worker, delay)
            else:
                if why in _RETRYABLE:
                    sw = self.seen.get(worker)
                    if sw is not None:
                        sw.suspended = True
                        self._refresh(worker)
                self._retry(req, worker, 0.0)

    def _retry(self, req: Req, worker: str, delay_s: float) -> None:
        st = req.state
        assert st is not None
        if req.worker == worker:
            self._unbind(req)
        if st.attempts >= self.settings.gw_max_attempts:
            self.fronts[req.gw].load.failed(req.model)
            self._close(req, "http_error")
            return
        st.avoid.add(worker)
        req.route_k, req.route_tail = 0, ""
        f = self.fronts[req.gw]
        f.batchers[req.model].requeue(st, delay_s=delay_s, fresh_deadline=delay_s == 0)
        f.kick(req.model)

    def _bind(self, req: Req, worker: str) -> None:
        req.worker = worker
        sw = self._seen(worker)
        sw.inflight += 1
        if not req.produced:
            sw.unstarted_prompts += 1
            sw.unstarted_tokens += req.prompt
        self.fronts[req.gw].bound[req.model] += 1
        self._refresh(worker)

    def _unbind(self, req: Req) -> None:
        worker = req.worker
        if worker is None:
            return
        req.worker = None
        sw = self.seen[worker]
        sw.inflight -= 1
        if not req.produced:
            sw.unstarted_prompts -= 1
            sw.unstarted_tokens -= req.prompt
        self.fronts[req.gw].bound[req.model] -= 1
        self._refresh(worker)

    def client_gone(self, req: Req) -> None:
        """The client gave up (its timeout): the handler releases the request (`release`): out
        of the queue, or cancelled on its worker."""
        if req.done:
            return
        st = req.state
        if st is not None:
            self.fronts[req.gw].batchers[req.model].discard(st)
        worker = req.worker
        if worker is not None:
            self._unbind(req)
            self.mesh.control(self.mesh.worker(worker).cancel, req.idx)
        self._close(req, "timeout")

    # ------------------------------------------------------------------ tokens back
    def on_tokens(self, worker: str, model: str, generated: int, firsts: list[Req], finished: list[Req]) -> None:
        if generated:
            # Counted at the first gateway: the scaler reads the sum over gateways.
            self.fronts[0].load.generated(model, generated)
        now = self.sim.now
        wake: set[int] = set()
        for req in firsts:
            if req.done or req.worker != worker or req.produced:
                continue
            req.produced = True
            req.first = now
            req.served_by = worker
            self.fronts[req.gw].load.first_token(model, now - req.arrived)
            sw = self.seen[worker]
            sw.unstarted_prompts -= 1
            sw.unstarted_tokens -= req.prompt
            self._refresh(worker)
            wake.add(req.gw)
        for req in finished:
            if req.done or req.worker != worker:
                continue
            if req.out > 1 and req.first == req.first:
                # One gap for the request's mean time between tokens: no policy reads the
                # inter-token histogram; the rate figures it feeds are the generated counts.
                self.fronts[req.gw].load.token_gap(model, (now - req.first) / (req.out - 1))
            self.fronts[req.gw].load.completed(model)
            self._unbind(req)
            self._close(req, "ok")
            wake.add(req.gw)
        # A slot freed up (or a prompt started): the requests' own gateway looks again at once;
        # the others learn of it from the next heartbeat.
        for i in wake:
            f = self.fronts[i]
            if f.batchers[model].depth:
                f.kick(model)

    def _close(self, req: Req, status: str) -> None:
        st = req.state
        if st is not None:
            self.reqs.pop(st.request_id, None)
        req.state = None  # its queue and batcher fields are not needed past its end (memory, at scale)
        self.mesh.finish(req, status)


class Front:
    """One gateway's own parts: its batchers (one per model, the real `Batcher`), its load
    reports (the real `LoadReport`) and its gauges. The routing picture is the `Gateway`'s,
    shared by every front: each real gateway knows only its own requests in flight between two
    heartbeats, so these gateways are better informed than real ones (they never pick the same
    instance for lack of knowing what another sent it)."""

    def __init__(self, gw: Gateway, i: int) -> None:
        self.gw = gw
        self.sim = gw.sim
        self.i = i
        s = gw.settings
        self.settings = s
        self.load = LoadReport(f"gw-{i}")
        self.batchers: dict[str, Batcher] = {}
        self._step_at: dict[str, Event | None] = {}
        self.bound: dict[str, int] = {}  # model → requests on a worker, not finished (the load gauge)
        self._report_at: Event | None = None
        self._last_report = 0.0
        self._early = False
        for name in gw.live:
            self.bound[name] = 0
            self._step_at[name] = None
            self.batchers[name] = Batcher(
                name,
                max_batch_size=s.gw_max_batch_size,
                wait_s=s.gw_batch_wait_s,
                max_queue=s.gw_max_queue,
                queue_timeout_s=s.gw_queue_timeout_s,
                owner=self,
                clock=self._clock,
            )

    def _clock(self) -> float:
        return self.sim.now

    def start(self) -> None:
        # Its own phase: services start at their own moments, and a report that always reached the
        # scaler just after its tick would always be read an interval late.
        self._last_report = self.sim.now
        self._report_at = self.sim.after(self.gw.mesh.rng.random() * self.settings.metrics_s, self._report)

    def admit(self, req: Req) -> None:
        """The HTTP handler's `admit`: into the model's queue, or 429."""
        self.load.arrival(req.model, req.prompt, self.sim.now)
        st = RequestState(
            request_id=str(req.idx),
            model=req.model,
            # The batcher and router read only its length: a range is one without the ids.
            prompt_ids=range(req.prompt),  # type: ignore[arg-type]
            params=_PARAMS,
            arrived_at=req.arrived,
        )
        req.state = st
        self.gw.reqs[st.request_id] = req
        try:
            self.batchers[req.model].submit(st)
        except QueueFull:
            self.load.failed(req.model)
            del self.gw.reqs[st.request_id]
            self.gw.mesh.finish(req, "http_error")
            return
        self.kick(req.model)

    # ---- the batcher's loop --------------------------------------------------
    def kick(self, model: str) -> None:
        """Wake the model's batcher (its `_wake` event): a step now, once."""
        ev = self._step_at[model]
        if ev is not None and Sim.pending(ev):
            if ev[0] <= self.sim.now:
                return
            Sim.cancel(ev)
        self._step_at[model] = self.sim.at(self.sim.now, self._batch_step, model)

    def _batch_step(self, model: str) -> None:
        self._step_at[model] = None
        timeout = self.batchers[model].step()
        if timeout is None:
            return
        # 0: more to dispatch now (the real loop yields to other tasks first, as this does).
        self._step_at[model] = self.sim.after(max(timeout, 0.0), self._batch_step, model)

    def wake_all(self) -> None:
        for model, b in self.batchers.items():
            if b.depth:
                self.kick(model)

    # ---- the batcher's owner (services.gateway.batcher.Dispatcher) ------------
    def pick(self, model: str, avoid: frozenset[str]) -> Route | None:
        return self.gw.pick(model, avoid)

    def dispatch(self, route: Route, batch: list[RequestState]) -> None:
        self.gw.dispatch(route, batch)

    def expired(self, st: RequestState) -> None:
        req = self.gw.reqs.get(st.request_id)
        if req is not None:
            self.load.failed(req.model)
            self.gw._close(req, "http_error")

    def holding(self, model: str) -> None:
        """Requests began to wait for room: report now rather than at the next interval."""
        if self._early:
            return
        self._early = True
        at = max(self.sim.now, self._last_report + self.settings.metrics_s / 4)
        if self._report_at is None or self._report_at[0] > at:
            Sim.cancel(self._report_at)
            self._report_at = self.sim.at(at, self._report)

    def _report(self) -> None:
        now = self.sim.now
        gauges = {m: (self.bound[m], b.depth) for m, b in self.batchers.items()}
        for msg in self.load.take(now, now - self._last_report, gauges):
            self.gw.mesh.model_metrics(msg)
        self._last_report = now
        self._early = False
        self._report_at = self.sim.at(now + self.settings.metrics_s, self._report)
