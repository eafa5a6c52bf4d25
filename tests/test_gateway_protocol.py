"""The real gateway and the real broker against scripted fake workers that speak the
protocol of docs/protocol.md (heartbeats, snapshots, GenerateBatch, TokenEvents,
Cancel). The fakes let each test force one situation — a rejection, a silent
worker, a death before or after the first token — that a real worker only
produces by chance. Real-worker end-to-end tests live with the worker."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import nats
import openai
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import (
    BatchReply,
    Cancel,
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    LayerReady,
    ModelMetrics,
    PlannedChain,
    Rejection,
    RouteStage,
    ScaleAck,
    ScaleDecision,
    SnapshotRequest,
    TokenEvent,
    TokenEvents,
    TransferEvent,
    TransferPlanned,
    WorkerSnapshot,
    decode,
    encode,
)
from cascade.models.generate import generate_model
from cascade.subjects import Subjects
from services.gateway import openai_api as oai
from services.gateway.streams import Failure, Phase
from services.gateway.testing import RunningGateway, parse_prometheus, running_gateway, sample

pytestmark = pytest.mark.e2e

MODEL = "tiny"
NUM_UNITS = 4
HB_S = 0.1  # fast heartbeats: a dead worker is found within a few tenths of a second


class FakeWorker:
    """A scripted worker. By default: serving, accepts everything, and answers each request
    with max_tokens one-letter tokens, one engine step each."""

    def __init__(self, nc: NATS, subjects: Subjects, worker_id: str, *, serving: bool = True) -> None:
        self.nc, self.s, self.id = nc, subjects, worker_id
        self.state = "serving" if serving else "loading"
        self.seq = NUM_UNITS if serving else 0
        self.units = list(range(NUM_UNITS)) if serving else []
        self.batches: list[list[str]] = []
        self.routes: dict[str, list[RouteStage]] = {}
        self.requests: dict[str, GenerateRequest] = {}
        self.running = 0  # what its heartbeats report
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.num_preemptions = 0
        self.stage_addr = f"127.0.0.1:{1000 + len(worker_id)}"  # never dialled: the fake runs no stages
        self.cancelled: set[str] = set()
        self.cancel_seen = asyncio.Event()
        self.snapshot_requests = 0
        self.reject: Callable[[GenerateRequest], str | None] = lambda r: None
        self.answer_batches = True
        self.tokens_before_hold: int | None = None  # stop producing after this many (a hung worker)
        self.release = asyncio.Event()  # ends the hold
        self.produced = asyncio.Event()  # at least one token went out
        self.beating = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subs: list[Any] = []

    async def start(self) -> FakeWorker:
        self._subs = [
            await self.nc.subscribe(self.s.generate(self.id), cb=self._on_generate),
            await self.nc.subscribe(self.s.snapshot(self.id), cb=self._on_snapshot),
            await self.nc.subscribe(self.s.cancel(self.id), cb=self._on_cancel),
        ]
        await self.nc.flush()
        self._spawn(self._heartbeats())
        return self

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            await sub.unsubscribe()

    def die(self) -> None:
        """Stop heart-beating and producing, as a crashed process would."""
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def heartbeat(self) -> None:
        hb = Heartbeat(
            worker_id=self.id,
            state=self.state,  # type: ignore[arg-type]
            model=MODEL,
            units_ready=len(self.units),
            num_units=NUM_UNITS,
            running=self.running,
            waiting=self.waiting,
            kv_cache_usage=self.kv_cache_usage,
            num_preemptions=self.num_preemptions,
            max_batch=8,
            tokens_per_s=0.0,
            ready_seq=self.seq,
            pid=os.getpid(),
            host="test",
            stage_addr=self.stage_addr,
        )
        await self.nc.publish(self.s.heartbeat(self.id), encode(hb))

    async def _heartbeats(self) -> None:
        while True:
            await self.heartbeat()
            await asyncio.sleep(HB_S)

    async def load_units(self, n: int) -> None:
        """Announce units 0..n-1 while staying in state loading."""
        for unit in range(len(self.units), n):
            self.seq += 1
            self.units.append(unit)
            await self.nc.publish(
                self.s.ready(self.id), encode(LayerReady(self.id, MODEL, unit, NUM_UNITS, self.seq, 0.0))
            )
        await self.heartbeat()

    async def become_ready(self, skip_seq: bool = False) -> None:
        """Announce every unit, then turn serving (optionally losing one readiness event)."""
        for unit in range(NUM_UNITS):
            self.seq += 1
            self.units.append(unit)
            if skip_seq and unit == 1:
                continue  # this event is "lost": the gateway must notice the gap
            ev = LayerReady(self.id, MODEL, unit, NUM_UNITS, self.seq, 0.0)
            await self.nc.publish(self.s.ready(self.id), encode(ev))
        self.state = "serving"
        await self.heartbeat()

    async def _on_snapshot(self, msg: Msg) -> None:
        decode(msg.data, SnapshotRequest)
        self.snapshot_requests += 1
        snap = WorkerSnapshot(self.id, self.state, MODEL, list(self.units), NUM_UNITS, self.seq)  # type: ignore[arg-type]
        await msg.respond(encode(snap))

    async def _on_cancel(self, msg: Msg) -> None:
        self.cancelled.update(decode(msg.data, Cancel).request_ids)
        self.cancel_seen.set()

    async def _on_generate(self, msg: Msg) -> None:
        batch = decode(msg.data, GenerateBatch)
        self.batches.append([r.request_id for r in batch.requests])
        self.routes.update({r.request_id: r.route for r in batch.requests})
        self.requests.update({r.request_id: r for r in batch.requests})
        if not self.answer_batches:
            return
        accepted, rejected = [], []
        for r in batch.requests:
            code = self.reject(r)
            if code:
                rejected.append(Rejection(r.request_id, code, f"fake {code}"))
            else:
                accepted.append(r.request_id)
        await msg.respond(encode(BatchReply(accepted, rejected)))
        for r in batch.requests:
            if r.request_id in accepted:
                self._spawn(self._generate(batch.gateway_id, r))

    async def _generate(self, gateway_id: str, r: GenerateRequest) -> None:
        # A migrated request resumes the alphabet where the lost worker's stream stopped.
        n = r.params.max_tokens
        for i in range(r.params.resumed, r.params.resumed + n):
            if self.tokens_before_hold is not None and i >= self.tokens_before_hold:
                await self.release.wait()  # hung until the test says otherwise
            if r.request_id in self.cancelled:
                await self._send(gateway_id, TokenEvent(r.request_id, [], "", "cancelled", len(r.prompt_ids), i))
                return
            last = i == r.params.resumed + n - 1
            ev = TokenEvent(
                r.request_id,
                [97 + i % 26],
                chr(97 + i % 26),
                "length" if last else None,
                len(r.prompt_ids) if last else 0,
                n if last else 0,
            )
            await self._send(gateway_id, ev)
            self.produced.set()
            await asyncio.sleep(0.005)  # one engine step

    async def _send(self, gateway_id: str, ev: TokenEvent) -> None:
        await self.nc.publish(self.s.tokens(gateway_id), encode(TokenEvents(self.id, [ev], batch_size=1)))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    path = tmp_path_factory.mktemp("gateway-protocol") / MODEL
    generate_model(path, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320))
    return Deployment(models=(ModelDeployment(name=MODEL, path=path, min_replicas=1),))


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


class Mesh:
    def __init__(self, gw: RunningGateway, nc: NATS, subjects: Subjects) -> None:
        self.gw, self.nc, self.subjects = gw, nc, subjects
        self.workers: list[FakeWorker] = []

    async def worker(self, worker_id: str, serving: bool = True) -> FakeWorker:
        w = await FakeWorker(self.nc, self.subjects, worker_id, serving=serving).start()
        self.workers.append(w)
        return w

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    async def routable(self, *worker_ids: str) -> None:
        def ok() -> bool:
            views = {v.worker_id: v for v in self.gw.core.registry.views()}
            return all(w in views and views[w].state == "serving" for w in worker_ids)

        await eventually(ok)


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@pytest.fixture
async def mesh(nats_url: str, prefix: str, deployment: Deployment, nc: NATS) -> AsyncIterator[Mesh]:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, batch_wait_timeout_s=0.01) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        try:
            yield m
        finally:
            for w in m.workers:
                await w.stop()


# --------------------------------------------------------------------------- the OpenAI client


async def test_openai_client_completion_and_chat(mesh: Mesh) -> None:
    await mesh.worker("w1")
    await mesh.routable("w1")
    client = mesh.client()
    c = await client.completions.create(model=MODEL, prompt="hi", max_tokens=5, temperature=0)
    assert c.id.startswith("cmpl-") and c.object == "text_completion" and c.model == MODEL
    assert c.choices[0].text == "abcde"
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (3, 5, 8)  # BOS + "hi"

    ch = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_completion_tokens=3
    )
    assert ch.id.startswith("chatcmpl-") and ch.object == "chat.completion"
    assert ch.choices[0].message.role == "assistant"
    assert ch.choices[0].message.content == "abc"
    assert ch.usage is not None and ch.usage.completion_tokens == 3
    await client.close()


async def test_openai_client_streams(mesh: Mesh) -> None:
    await mesh.worker("w1")
    await mesh.routable("w1")
    client = mesh.client()
    stream = await client.completions.create(
        model=MODEL, prompt="hi", max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    texts, reasons, usage = [], [], None
    async for ch in stream:
        assert ch.object == "text_completion"
        if ch.usage is not None:
            assert ch.choices == []
            usage = ch.usage
            continue
        texts.append(ch.choices[0].text)
        reasons.append(ch.choices[0].finish_reason)
    assert "".join(texts) == "abcd"
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)

    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
    )
    chunks = [ch async for ch in chat]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "abc"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({ch.id for ch in chunks}) == 1
    await client.close()


async def test_sse_wire_format(mesh: Mesh) -> None:
    await mesh.worker("w1")
    await mesh.routable("w1")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
    async with aiohttp.ClientSession() as http, http.post(mesh.gw.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    assert all(f.startswith(b"data: {") for f in frames[:-2])


# --------------------------------------------------------------------------- batching and routing


async def test_queued_requests_leave_as_one_batch(nats_url: str, prefix: str, deployment: Deployment, nc: NATS) -> None:
    # A long window would only matter if the batch were not full; 6 requests fill a batch of 6.
    async with running_gateway(
        nats_url, prefix, deployment, heartbeat_s=HB_S, max_batch_size=6, batch_wait_timeout_s=30.0
    ) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        w = await m.worker("w1", serving=False)
        try:
            client = m.client()
            calls = [
                asyncio.ensure_future(client.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=2))
                for i in range(6)
            ]
            await eventually(lambda: gw.core.queue_depths()[MODEL] == 6)
            assert w.batches == []  # nothing goes to a worker that is still loading
            await w.become_ready()
            results = await asyncio.wait_for(asyncio.gather(*calls), 20.0)
            assert [r.choices[0].text for r in results] == ["ab"] * 6
            assert [len(b) for b in w.batches] == [6]
            async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as r:
                samples = parse_prometheus(await r.text())
            assert sample(samples, "cascade_gateway_batches_total", model=MODEL) == 1
            assert sample(samples, "cascade_gateway_batch_size_count", model=MODEL) == 1
            assert sample(samples, "cascade:generation_tokens_total", model=MODEL, worker="w1") == 12
            assert sample(samples, "cascade:time_to_first_token_seconds_count", model=MODEL, worker="w1") == 6
            await client.close()
        finally:
            await w.stop()


async def test_a_lone_request_on_a_quiet_gateway_is_dispatched_in_its_admission(mesh: Mesh) -> None:
    w = await mesh.worker("w1")
    await mesh.routable("w1")
    core = mesh.gw.core
    info = core.catalog.get(MODEL)
    spec = oai.parse_completion({"model": MODEL, "prompt": "hi", "max_tokens": 3})
    ids, max_tokens = await core.prepare(info, spec)
    req = core.admit("cmpl-lone", info, ids, spec, max_tokens)
    # Bound to the worker before the handler's turn ends: no wake of the batcher's task for it.
    assert req.phase is Phase.PREFILL and req.worker_id == "w1"
    assert core.queue_depths()[MODEL] == 0
    try:
        texts = []
        while True:
            ev = await core.next_event(req)
            assert not isinstance(ev, Failure)
            texts.append(ev.text)
            if ev.finish_reason is not None:
                break
        assert "".join(texts) == "abc" and ev.finish_reason == "length"
        assert w.batches == [["cmpl-lone"]]
    finally:
        core.release(req)


async def test_readiness_gap_triggers_snapshot_and_health(mesh: Mesh) -> None:
    w = await mesh.worker("w1", serving=False)
    await eventually(lambda: w.snapshot_requests >= 1)  # first sight
    async with aiohttp.ClientSession() as http:
        async with http.get(mesh.gw.url + "/health") as r:
            assert r.status == 503
        before = w.snapshot_requests
        await w.become_ready(skip_seq=True)
        await eventually(lambda: w.snapshot_requests > before)  # the gap was noticed
        await mesh.routable("w1")
        async with http.get(mesh.gw.url + "/health") as r:
            assert r.status == 200


async def test_rejected_requests_go_to_another_instance(mesh: Mesh) -> None:
    a = await mesh.worker("a")
    b = await mesh.worker("b")
    a.reject = lambda r: "draining"
    b.reject = lambda r: "draining"
    await mesh.routable("a", "b")
    b.reject = lambda r: None  # only a turns work away now
    client = mesh.client()
    results = await asyncio.gather(
        *[client.completions.create(model=MODEL, prompt="x", max_tokens=2) for _ in range(4)]
    )
    assert all(r.choices[0].text == "ab" for r in results)
    served_by_b = {rid for batch in b.batches for rid in batch}
    assert len(served_by_b) == 4
    await client.close()


async def test_overloaded_instance_is_retried_after_backoff(mesh: Mesh) -> None:
    w = await mesh.worker("w1")
    await mesh.routable("w1")
    refused: set[str] = set()

    def once(r: GenerateRequest) -> str | None:
        if r.request_id in refused:
            return None
        refused.add(r.request_id)
        return "overloaded"

    w.reject = once
    client = mesh.client()
    r = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.choices[0].text == "ab"
    assert len(w.batches) == 2  # refused once, then admitted
    await client.close()


async def test_an_instance_that_stays_overloaded_ends_in_503(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, queue_timeout_s=0.3) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        w = await m.worker("w1")
        try:
            await m.routable("w1")
            w.reject = lambda r: "overloaded"
            async with aiohttp.ClientSession() as http:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
                async with http.post(gw.url + "/v1/completions", json=body) as r:
                    assert r.status == 503
                    assert (await r.json())["error"]["code"] == "no_instance"
                    assert "Retry-After" in r.headers
            assert len(w.batches) >= 2  # it was offered again after a back-off, then given up on
        finally:
            await w.stop()


async def test_unanswered_batch_is_cancelled_and_retried(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, dispatch_timeout_s=0.3) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        a = await m.worker("a")
        b = await m.worker("b")
        try:
            a.answer_batches = False  # takes the batch, never replies
            await m.routable("a", "b")
            client = m.client()
            # Equal load: the router breaks the tie on the id, so "a" gets the first try.
            r = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert r.choices[0].text == "ab"
            assert len(a.batches) == 1 and a.batches == b.batches
            await asyncio.wait_for(a.cancel_seen.wait(), 10.0)
            assert a.cancelled == set(a.batches[0])  # the silent one is told to drop it
            await client.close()
        finally:
            await a.stop()
            await b.stop()


# --------------------------------------------------------------------------- failures


async def test_worker_dying_before_first_token_is_retried_elsewhere(mesh: Mesh) -> None:
    a = await mesh.worker("a")
    await mesh.routable("a")
    a.tokens_before_hold = 0  # accepts, then never produces
    client = mesh.client()
    call = asyncio.ensure_future(client.completions.create(model=MODEL, prompt="x", max_tokens=3))
    await eventually(lambda: len(a.batches) == 1)
    b = await mesh.worker("b")
    await mesh.routable("b")
    a.die()
    r = await asyncio.wait_for(call, 20.0)
    assert r.choices[0].text == "abc"
    assert [len(x) for x in b.batches] == [1]
    await client.close()


async def test_worker_dying_mid_stream_moves_the_stream_to_another_worker(mesh: Mesh) -> None:
    a = await mesh.worker("a")
    await mesh.routable("a")
    a.tokens_before_hold = 2
    client = mesh.client()
    stream = await client.completions.create(
        model=MODEL, prompt="x", max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    got, usage = [], None
    async for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        if not ch.choices:
            continue
        got.append(ch.choices[0].text)
        if len(got) == 2:
            b = await mesh.worker("b")
            await mesh.routable("b")
            a.die()
    # One unbroken stream: b resumed after the two tokens a streamed, and usage counts all ten.
    assert "".join(got) == "abcdefghij"
    assert usage is not None and usage.completion_tokens == 10
    (moved,) = b.requests.values()
    assert moved.prompt_ids[-2:] == [97, 98] and moved.params.resumed == 2 and moved.params.max_tokens == 8
    await client.close()


async def test_worker_dying_mid_stream_with_migration_off_ends_the_stream_with_an_error(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, migration_limit=0) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        a = await m.worker("a")
        try:
            await m.routable("a")
            a.tokens_before_hold = 2
            client = m.client()
            stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=10, stream=True)
            got = []
            with pytest.raises(openai.APIError, match="stopped responding"):
                async for ch in stream:
                    got.append(ch.choices[0].text)
                    if len(got) == 2:
                        a.die()
            assert "".join(got) == "ab"
            await client.close()
            # A stream that broke after its 200 is a failure in /metrics, never a success.
            async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as r:
                samples = parse_prometheus(await r.text())
            failed = sample(samples, "cascade:request_failures_total", model=MODEL, worker="a", mid_stream="true")
            assert failed == 1
            assert sample(samples, "cascade:request_success_total", model=MODEL) is None
            statuses = {
                lab["status"]: v
                for lab, v in samples["cascade_gateway_requests_total"]
                if lab["endpoint"] == "/v1/completions"
            }
            assert statuses == {"503": 1}
        finally:
            await a.stop()


async def test_worker_dying_without_retry_left_is_503(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, max_attempts=1) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        a = await m.worker("a")
        try:
            await m.routable("a")
            a.tokens_before_hold = 0
            async with aiohttp.ClientSession() as http:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 3}
                call = asyncio.ensure_future(http.post(gw.url + "/v1/completions", json=body))
                await eventually(lambda: len(a.batches) == 1)
                a.die()
                r = await asyncio.wait_for(call, 20.0)
                assert r.status == 503
                err = (await r.json())["error"]
                assert err["code"] == "no_instance" and "stopped heart-beating" in err["message"]
                r.release()
        finally:
            await a.stop()


async def test_silent_worker_hits_the_inactivity_timeout(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, request_timeout_s=0.3) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        a = await m.worker("a")
        try:
            await m.routable("a")
            a.tokens_before_hold = 1  # alive (heart-beating) but stuck after one token
            async with aiohttp.ClientSession() as http:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 3}
                async with http.post(gw.url + "/v1/completions", json=body) as r:
                    assert r.status == 504
                    assert (await r.json())["error"]["code"] == "timeout"
            await asyncio.wait_for(a.cancel_seen.wait(), 10.0)
        finally:
            await a.stop()


async def test_client_disconnect_cancels_on_the_worker(mesh: Mesh) -> None:
    a = await mesh.worker("a")
    await mesh.routable("a")
    a.tokens_before_hold = 1
    body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": True}
    async with aiohttp.ClientSession() as http:
        r = await http.post(mesh.gw.url + "/v1/completions", json=body)
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {")
        r.close()  # hang up mid-stream
    await asyncio.wait_for(a.cancel_seen.wait(), 10.0)
    assert len(a.cancelled) == 1
    await eventually(lambda: mesh.gw.core.in_flight_by_model()[MODEL] == 0)
    assert mesh.gw.core.hub.inflight("a") == 0


# --------------------------------------------------------------------------- shutdown


async def refused(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as fresh, fresh.get(url) as r:
            await r.read()
    except aiohttp.ClientConnectionError:
        return True
    return False


async def test_shutdown_lets_running_streams_finish(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, shutdown_grace_s=30.0) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        a = await m.worker("a")
        try:
            await m.routable("a")
            a.tokens_before_hold = 1
            body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True}
            async with aiohttp.ClientSession() as http:
                r = await http.post(gw.url + "/v1/completions", json=body)
                assert r.status == 200
                first = await r.content.readuntil(b"\n\n")
                stopping = asyncio.ensure_future(gw.stop())
                deadline = asyncio.get_running_loop().time() + 10.0
                while not await refused(gw.url + "/live"):  # no new connections once stopping
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.01)
                assert not stopping.done()  # waiting for the running stream
                a.release.set()
                rest = await r.read()
                await asyncio.wait_for(stopping, 20.0)
            frames = (first + rest).split(b"\n\n")
            assert frames[-2] == b"data: [DONE]"
            chunks = [orjson.loads(f.removeprefix(b"data: ")) for f in frames[:-2]]
            assert "".join(c["choices"][0]["text"] for c in chunks) == "abcd"
            assert not a.cancelled
        finally:
            await a.stop()


async def test_shutdown_cancels_streams_after_the_grace(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    async with running_gateway(nats_url, prefix, deployment, heartbeat_s=HB_S, shutdown_grace_s=0.2) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        a = await m.worker("a")
        try:
            await m.routable("a")
            a.tokens_before_hold = 1  # never finishes on its own
            body = {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True}
            async with aiohttp.ClientSession() as http:
                r = await http.post(gw.url + "/v1/completions", json=body)
                await r.content.readuntil(b"\n\n")
                await asyncio.wait_for(gw.stop(), 20.0)
                rest = await r.read()
            # The stream ends with an error event when the grace ends (then [DONE], as every
            # stream that failed after its 200), not with a cut connection.
            frames = [f for f in rest.split(b"\n\n") if f]
            assert frames[-1] == b"data: [DONE]", rest
            assert orjson.loads(frames[-2].removeprefix(b"data: "))["error"]["code"] == "shutting_down", rest
            await asyncio.wait_for(a.cancel_seen.wait(), 10.0)
            assert len(a.cancelled) == 1
        finally:
            await a.stop()


# --------------------------------------------------------------------------- load reports


async def test_load_reports_reach_the_scaler_subject(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    subjects = Subjects(prefix)
    reports: asyncio.Queue[ModelMetrics] = asyncio.Queue()

    async def on_report(msg: Msg) -> None:
        reports.put_nowait(decode(msg.data, ModelMetrics))

    await nc.subscribe(subjects.metrics_all(), cb=on_report)
    await nc.flush()
    async with running_gateway(
        nats_url, prefix, deployment, heartbeat_s=HB_S, metrics_interval_s=0.05, queue_timeout_s=60.0
    ) as gw:
        m = Mesh(gw, nc, subjects)
        w = await m.worker("w1", serving=False)
        try:
            client = m.client()
            call = asyncio.ensure_future(client.completions.create(model=MODEL, prompt="x", max_tokens=3))
            seen: list[ModelMetrics] = []

            async def until(cond: Callable[[], bool]) -> None:
                while not cond():
                    seen.append(await asyncio.wait_for(reports.get(), 10.0))

            # A model with no instance still reports the request it holds: what scales it from zero.
            await until(lambda: any(r.waiting == 1 for r in seen))
            await w.become_ready()
            await asyncio.wait_for(call, 20.0)
            await until(lambda: sum(r.completions for r in seen) == 1)
            assert {(r.gateway_id, r.model) for r in seen} == {(gw.id, MODEL)}
            assert [r.seq for r in seen] == list(range(1, len(seen) + 1))
            totals = (
                sum(r.arrivals for r in seen),
                sum(r.generated_tokens for r in seen),
                sum(sum(r.ttft_hist) for r in seen),
                sum(sum(r.itl_hist) for r in seen),
                sum(r.errors for r in seen),
            )
            assert totals == (1, 3, 1, 2, 0)
            await client.close()
        finally:
            await w.stop()


# --------------------------------------------------------------------------- live scaling


async def _split_setup(m: Mesh) -> tuple[FakeWorker, FakeWorker]:
    f = await m.worker("f")
    f.running = 8  # every batch slot taken
    n = await m.worker("n", serving=False)
    await f.heartbeat()
    await n.load_units(2)  # the embedding and layer 0 of 2

    def seen() -> bool:
        views = {v.worker_id: v for v in m.gw.core.registry.views()}
        return "f" in views and views["f"].running == 8 and "n" in views and views["n"].prefix_units == 2

    await eventually(seen)
    return f, n


async def test_busy_full_instance_sheds_front_layers_to_a_loading_one(mesh: Mesh) -> None:
    f, n = await _split_setup(mesh)
    client = mesh.client()
    r = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r.choices[0].text == "ab"  # tokens come from the first stage, which drives
    assert f.batches == []
    ((rid,),) = n.batches
    assert n.routes[rid] == [RouteStage("n", 0, 1, n.stage_addr), RouteStage("f", 1, 2, f.stage_addr)]
    async with aiohttp.ClientSession() as http, http.get(mesh.gw.url + "/metrics") as resp:
        samples = parse_prometheus(await resp.text())
    assert sample(samples, "cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 1
    # Split depth: the loading instance ran one decoder layer before handing on.
    assert sample(samples, "cascade:partial_routes_total", model=MODEL, worker="n", depth="1") == 1
    await client.close()


async def test_stop_the_world_never_routes_to_a_loading_instance(
    nats_url: str, prefix: str, deployment: Deployment, nc: NATS
) -> None:
    stw = Deployment(models=tuple(dataclasses.replace(d, scaling="stop-the-world") for d in deployment.models))
    async with running_gateway(nats_url, prefix, stw, heartbeat_s=HB_S) as gw:
        m = Mesh(gw, nc, Subjects(prefix))
        try:
            f, n = await _split_setup(m)
            client = m.client()
            r = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert r.choices[0].text == "ab"
            assert n.batches == [] and len(f.batches) == 1
            assert f.routes[f.batches[0][0]] == []
            await client.close()
        finally:
            for w in m.workers:
                await w.stop()


# --------------------------------------------------------------------------- metrics and the dashboard


async def _samples(gw: RunningGateway) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as r:
        return parse_prometheus(await r.text())


async def test_vllm_request_metrics_carry_model_and_worker(mesh: Mesh) -> None:
    w = await mesh.worker("w1")
    w.running, w.waiting, w.kv_cache_usage, w.num_preemptions = 3, 2, 0.25, 7
    await mesh.routable("w1")
    client = mesh.client()
    stream = await client.completions.create(model=MODEL, prompt="hi", max_tokens=4, stream=True)
    assert "".join([ch.choices[0].text async for ch in stream]) == "abcd"
    await client.close()
    views = lambda: {v.worker_id: v for v in mesh.gw.core.registry.table.views()}  # noqa: E731
    await eventually(lambda: views()["w1"].num_preemptions == 7)
    s = await _samples(mesh.gw)
    mw = {"model": MODEL, "worker": "w1"}
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_time_per_output_token_seconds",
    ):
        assert sample(s, f"cascade:{name}_count", **mw) == 1, name
    assert sample(s, "cascade:inter_token_latency_seconds_count", **mw) == 3  # 4 tokens, 3 gaps
    assert sample(s, "cascade:prompt_tokens_total", **mw) == 3  # BOS + "hi"
    assert sample(s, "cascade:generation_tokens_total", **mw) == 4
    assert sample(s, "cascade:request_success_total", **mw, finished_reason="length") == 1
    # The worker's own figures, from its heartbeats: one scrape target for the whole mesh.
    assert sample(s, "cascade:num_requests_running", **mw) == 3
    assert sample(s, "cascade:num_requests_waiting", **mw) == 2
    assert sample(s, "cascade:kv_cache_usage_perc", **mw) == 0.25
    assert sample(s, "cascade:num_preemptions_total", **mw) == 7
    assert sample(s, "cascade:layers_ready", **mw) == NUM_UNITS
    assert sample(s, "cascade:layers_total", **mw) == NUM_UNITS


async def _sse_frames(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    event = ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, orjson.loads(line[len("data: ") :])


async def test_scale_and_transfer_events_reach_metrics_and_the_dashboard_stream(mesh: Mesh) -> None:
    await mesh.worker("w1")
    n = await mesh.worker("n", serving=False)
    await mesh.routable("w1")
    await eventually(lambda: "n" in {v.worker_id for v in mesh.gw.core.registry.views()})
    s = mesh.subjects
    async with (
        aiohttp.ClientSession() as http,
        http.get(mesh.gw.url + "/dashboard/events") as resp,
    ):
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        frames = _sse_frames(resp)
        event, snap = await asyncio.wait_for(anext(frames), 10)
        assert event == "snapshot"
        assert {i["worker_id"] for i in snap["instances"]} == {"w1", "n"}
        assert {i["worker_id"]: i["ready_units"] for i in snap["instances"]}["w1"] == list(range(NUM_UNITS))

        decision = ScaleDecision("d-1", MODEL, "up", 1, 2, "2 ongoing wants 2", policy="concurrency", trigger="load")
        chain = PlannedChain("t-1", "w1", ["n"], list(range(NUM_UNITS)))
        plan = TransferPlanned("p-1", "d-1", MODEL, "multicast", [chain], NUM_UNITS, 8_000_000)
        done = TransferEvent("n", "t-1", MODEL, "receive", "complete", nbytes=8_000_000, seconds=0.5)
        await mesh.nc.publish(s.scale_decision(), encode(decision))
        await mesh.nc.publish(s.transfer_plan(), encode(plan))
        await n.load_units(2)
        await mesh.nc.publish(s.transfer_event("n"), encode(done))
        await mesh.nc.publish(s.scale_ack(), encode(ScaleAck("d-1", MODEL, True, ["n"])))

        seen: dict[str, Any] = {}
        partial = False
        while not ({"decision", "plan", "transfer", "ack"} <= set(seen) and partial):
            event, body = await asyncio.wait_for(anext(frames), 10)
            seen[event] = body
            if event == "instances":
                ready = {i["worker_id"]: i["ready_units"] for i in body}
                partial = partial or ready.get("n") == [0, 1]
        assert seen["decision"]["reason"] == "2 ongoing wants 2" and seen["decision"]["policy"] == "concurrency"
        assert seen["plan"]["chains"] == [{"transfer_id": "t-1", "source": "w1", "targets": ["n"]}]
        assert seen["transfer"]["source"] == "chain" and seen["transfer"]["mb_s"] == 16.0
        assert seen["ack"]["ok"] is True

    samples = await _samples(mesh.gw)
    assert sample(samples, "cascade:scale_decisions_total", model=MODEL, policy="concurrency", action="up") == 1
    assert sample(samples, "cascade:scale_decisions_total", model=MODEL, reason="load") == 1
    labels = {"model": MODEL, "worker": "n", "source": "chain"}
    assert sample(samples, "cascade:transfer_bytes_total", **labels) == 8_000_000
    assert sample(samples, "cascade:transfer_mb_per_s", **labels) == 16.0
    assert sample(samples, "cascade:layers_ready", model=MODEL, worker="n") == 2


async def test_dashboard_page_and_its_files_are_served(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(mesh.gw.url + "/dashboard") as r:
            assert r.status == 200 and r.content_type == "text/html"
            html = await r.text()
        for name in ("dashboard.js", "dashboard.css"):
            assert f"/dashboard/static/{name}" in html
            async with http.get(mesh.gw.url + f"/dashboard/static/{name}") as r:
                assert r.status == 200 and len(await r.read()) > 100
        assert "http://" not in html and "https://" not in html  # nothing from a CDN
        async with http.get(mesh.gw.url + "/dashboard/static/..%2Fcore.py") as r:
            assert r.status == 404
