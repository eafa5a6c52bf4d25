"""Request migration with real worker processes and a real broker: a worker SIGKILLed while it
streams, and the client's stream carries on from another instance, token for token what an
unbroken run gives (greedy and seeded sampling; a full route and a pipelined one), with usage
counted right; with migration off, or nowhere to go, the client gets an explicit error chunk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import LoadModel, Ok, TokenEvents, decode
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from services.gateway.router import serves_fully
from services.gateway.testing import RunningGateway, parse_prometheus, running_gateway, sample
from tests.waiting import wait_until
from tests.workerprocs import WorkerProcs

MODEL = "m"
SPEC = GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, seed=11, max_position=4096)
HB_S = 0.2
# Paces every step to an emulated accelerator's time, so a stream lasts long enough to be cut.
PACED = ("--device-profile", "llama2-7b-a100-80gb", "--heartbeat-s", str(HB_S))
GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
# Sampling state that must move with the request: penalty counts and a grammar's matcher.
STATEFUL = {
    "temperature": 0.9, "seed": 77, "frequency_penalty": 0.8, "presence_penalty": 0.4, "repetition_penalty": 1.2,
    "guided_regex": "[a-z]+( [a-z]+)*",
}  # fmt: skip


# Nested objects, an enum, an array and a free string (so that seeded choices differ).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "k": {"enum": ["x", "y", "z"]},
        "v": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "boolean"}},
                                         "required": ["b"], "additionalProperties": False}, "maxItems": 2},
    },
    "required": ["name", "k", "v"],
    "additionalProperties": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("migration-model")
    generate_model(d, SPEC)
    return d


class Tap:
    """The token events workers send the gateway, by request id: the token ids a client's text
    stands for (the model is random, so its text is mostly U+FFFD and cannot be compared alone)."""

    def __init__(self) -> None:
        self.events: dict[str, list[Any]] = {}
        self.senders: dict[str, list[str]] = {}  # request id → workers in the order they streamed it

    async def on_msg(self, msg: Any) -> None:
        te = decode(msg.data, TokenEvents)
        for ev in te.events:
            self.events.setdefault(ev.request_id, []).append(ev)
            seen = self.senders.setdefault(ev.request_id, [])
            if not seen or seen[-1] != te.worker_id:
                seen.append(te.worker_id)

    def tokens(self, request_id: str, choice: int | None = None) -> list[int]:
        """What reached the client (of one choice when given): a stream that broke (error,
        cancelled) is dropped, with the tokens of its last event, by the gateway, and recomputed
        elsewhere."""
        evs = [e for e in self.events.get(request_id, []) if choice is None or e.choice == choice]
        return [t for e in evs if e.finish_reason not in ("error", "cancelled") for t in e.token_ids]


@dataclass
class Mesh:
    gw: RunningGateway
    workers: WorkerProcs
    nc: Any
    subjects: Subjects
    model_dir: Path
    http: aiohttp.ClientSession
    tap: Tap = field(default_factory=Tap)

    async def start_tap(self) -> None:
        await self.nc.subscribe(self.subjects.tokens(self.gw.id), cb=self.tap.on_msg)
        await self.nc.flush()

    def view(self, wid: str) -> Any:
        return next((v for v in self.gw.core.registry.views() if v.worker_id == wid), None)

    async def load(self, wid: str) -> None:
        await wait_until(lambda: self.view(wid) is not None, 60, f"{wid} heart-beating")
        await request(self.nc, self.subjects.load(wid), LoadModel(MODEL, str(self.model_dir)), Ok, timeout=10)

    async def serving(self, wid: str) -> None:
        await wait_until(
            lambda: (v := self.view(wid)) is not None and serves_fully(v, MODEL), 60, f"{wid} serving {MODEL}"
        )

    def holder(self) -> str:
        """The worker this gateway has requests on now (from its status)."""
        busy = [w["worker_id"] for w in self.gw.core.status()["instances"] if w["gateway_in_flight"] > 0]
        assert len(busy) == 1, busy
        return str(busy[0])

    async def metric(self, name: str, **labels: str) -> float:
        async with self.http.get(self.gw.url + "/metrics") as r:
            return sample(parse_prometheus(await r.text()), name, **labels) or 0.0


@pytest.fixture
async def mesh(nats_url: str, subjects: Subjects, model_dir: Path, tmp_path: Path) -> AsyncIterator[Mesh]:
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=model_dir, min_replicas=1),))
    workers = WorkerProcs(nats_url, subjects.prefix, tmp_path)
    nc = await connect(nats_url, "test")
    try:
        # The tap reads token events on NATS: the gateway asks for them there (docs/subjects.md).
        async with (
            running_gateway(
                nats_url, subjects.prefix, dep, heartbeat_s=HB_S, queue_timeout_s=20, direct_tokens=False
            ) as gw,
            aiohttp.ClientSession() as http,
        ):
            m = Mesh(gw, workers, nc, subjects, model_dir, http)
            await m.start_tap()
            yield m
    finally:
        workers.stop_all()
        with contextlib.suppress(Exception):
            await nc.drain()


@dataclass
class Streamed:
    text: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finish: str | None = None
    done: bool = False
    id: str = ""
    # Every choice's text chunks and finish reason, by index (`text` and `finish` are choice 0's).
    choices: dict[int, list[str]] = field(default_factory=dict)
    finishes: dict[int, str] = field(default_factory=dict)


class Stream:
    """One SSE completion stream, read chunk by chunk."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.out = Streamed()

    async def read(self, until_chunks: int | None = None) -> Streamed:
        while not self.out.done and (until_chunks is None or len(self.out.text) < until_chunks):
            line = await self.resp.content.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                self.out.done = True
                break
            obj = orjson.loads(data)
            self.out.id = obj.get("id", self.out.id)
            if "error" in obj:
                self.out.error = obj["error"]
            elif obj.get("choices"):
                ch = obj["choices"][0]
                i = ch.get("index", 0)
                if ch["text"]:
                    self.out.choices.setdefault(i, []).append(ch["text"])
                    if i == 0:
                        self.out.text.append(ch["text"])
                if ch.get("finish_reason"):
                    self.out.finishes[i] = ch["finish_reason"]
                    if i == 0:
                        self.out.finish = ch["finish_reason"]
            if obj.get("usage"):
                self.out.usage = obj["usage"]
        return self.out


def body(sampling: dict[str, Any], max_tokens: int, stream: bool) -> dict[str, Any]:
    b = {"model": MODEL, "prompt": "migrate me", "max_tokens": max_tokens, "ignore_eos": True, **sampling}
    if stream:
        b |= {"stream": True, "stream_options": {"include_usage": True}}
    return b


async def complete(m: Mesh, sampling: dict[str, Any], max_tokens: int) -> tuple[str, list[int]]:
    """An unbroken run: its text and token ids."""
    async with m.http.post(m.gw.url + "/v1/completions", json=body(sampling, max_tokens, False)) as r:
        assert r.status == 200, await r.text()
        out = await r.json()
    return str(out["choices"][0]["text"]), m.tap.tokens(out["id"])


@contextlib.asynccontextmanager
async def stream(m: Mesh, sampling: dict[str, Any], max_tokens: int) -> AsyncIterator[Stream]:
    async with m.http.post(m.gw.url + "/v1/completions", json=body(sampling, max_tokens, True)) as r:
        assert r.status == 200, await r.text()
        yield Stream(r)


async def test_streams_cut_by_a_killed_worker_resume_token_for_token(mesh: Mesh) -> None:
    m = mesh
    n = 400
    m.workers.start("a", *PACED)
    m.workers.start("b", *PACED)
    await m.load("a")
    await m.serving("a")
    # The unbroken runs, both on `a`.
    kinds = (("greedy", GREEDY), ("seeded", SEEDED), ("stateful", STATEFUL))
    # Together, as the streams below run: a batch on the worker, a third of the time one by one.
    want = dict(zip((k for k, _ in kinds), await asyncio.gather(*(complete(m, s, n) for _, s in kinds)), strict=True))
    assert want["greedy"][1] != want["seeded"][1] and len(want["greedy"][1]) == n
    assert re.fullmatch("[a-z]+( [a-z]+)*", want["stateful"][0])

    async with stream(m, GREEDY, n) as g, stream(m, SEEDED, n) as s, stream(m, STATEFUL, n) as st:
        await asyncio.gather(g.read(until_chunks=10), s.read(until_chunks=10), st.read(until_chunks=10))
        # Only `a` serves: the streams are all there. `b` takes the model while they move.
        assert m.holder() == "a"
        await m.load("b")
        m.workers.kill("a")
        got = await asyncio.gather(g.read(), s.read(), st.read())

    for name, out in zip(("greedy", "seeded", "stateful"), got, strict=True):
        assert out.error is None, (name, out.error)
        assert out.done and out.finish == "length"
        assert m.tap.senders[out.id] == ["a", "b"], "the stream was not cut mid-way"
        assert m.tap.tokens(out.id) == want[name][1], name
        assert "".join(out.text) == want[name][0], name
        assert out.usage is not None and out.usage["completion_tokens"] == n, out.usage
        assert out.usage["prompt_tokens"] + n == out.usage["total_tokens"]
    moved = await m.metric("cascade:migrations_total", model=MODEL, reason="worker_lost")
    assert moved == 3


async def complete_n(m: Mesh, sampling: dict[str, Any], max_tokens: int) -> tuple[str, list[list[int]], list[str]]:
    """An unbroken run with n choices: its id, each choice's token ids and text."""
    out = await complete_json(m, sampling, max_tokens)
    texts = [str(c["text"]) for c in sorted(out["choices"], key=lambda c: c["index"])]
    return out["id"], [m.tap.tokens(out["id"], i) for i in range(len(texts))], texts


async def complete_json(m: Mesh, sampling: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    async with m.http.post(m.gw.url + "/v1/completions", json=body(sampling, max_tokens, False)) as r:
        assert r.status == 200, await r.text()
        out: dict[str, Any] = await r.json()
    return out


def prompt_scores(out: dict[str, Any]) -> list[dict[str, float] | None]:
    """vLLM's prompt_logprobs of a completions response: per prompt token, the logprob of it and
    of the top ones, by token id."""
    plps = out["choices"][0]["prompt_logprobs"]
    return [None if p is None else {k: v["logprob"] for k, v in p.items()} for p in plps]


async def test_n_choices_cut_by_a_killed_worker_each_resume_token_for_token(mesh: Mesh) -> None:
    """An n > 1 request moves whole: every choice goes on from its own tokens on the new
    instance, exactly as the unbroken run (greedy, and seeded choices that differ)."""
    m = mesh
    n, k = 250, 3
    m.workers.start("a", *PACED)
    m.workers.start("b", *PACED)
    await m.load("a")
    await m.serving("a")
    kinds = (("greedy", {**GREEDY, "n": k}), ("seeded", {**SEEDED, "n": k}))
    want = dict(zip((k for k, _ in kinds), await asyncio.gather(*(complete_n(m, s, n) for _, s in kinds)), strict=True))
    assert all(len(ids) == n for ids in want["greedy"][1]) and len({*map(tuple, want["greedy"][1])}) == 1
    assert len({*map(tuple, want["seeded"][1])}) == k, "seeded choices should differ"

    async with stream(m, kinds[0][1], n) as g, stream(m, kinds[1][1], n) as s:
        await asyncio.gather(g.read(until_chunks=10), s.read(until_chunks=10))
        assert m.holder() == "a"
        await m.load("b")
        m.workers.kill("a")
        got = await asyncio.gather(g.read(), s.read())

    for (name, _), out in zip(kinds, got, strict=True):
        assert out.error is None, (name, out.error)
        assert out.done and out.finishes == dict.fromkeys(range(k), "length"), (name, out.finishes)
        assert m.tap.senders[out.id] == ["a", "b"], "the stream was not cut mid-way"
        for i in range(k):
            assert m.tap.tokens(out.id, i) == want[name][1][i], (name, i)
            assert "".join(out.choices.get(i, [])) == want[name][2][i], (name, i)
        assert out.usage is not None and out.usage["completion_tokens"] == k * n, out.usage
        assert out.usage["prompt_tokens"] + k * n == out.usage["total_tokens"]
    assert await m.metric("cascade:migrations_total", model=MODEL, reason="worker_lost") == 2


async def test_a_stream_through_a_pipelined_route_resumes_when_its_stage_dies(mesh: Mesh) -> None:
    m = mesh
    unit_mb = Checkpoint(m.model_dir).unit_nbytes(1) / 1e6
    # `full` has one batch slot, so a long stream makes it busy and the next request is split;
    # `new` loads at ~1.5 s a layer, slow enough to be caught half-loaded.
    m.workers.start("full", *PACED, "--max-batch", "1", "--kv-slots", "2")
    m.workers.start("new", *PACED, "--load-mb-s", str(unit_mb / 1.5))
    await m.load("full")
    await m.serving("full")
    n = 300
    want = await complete(m, SEEDED, n)

    async with stream(m, GREEDY, 3000) as busy:
        await busy.read(until_chunks=1)
        await wait_until(lambda: m.view("full").running >= 1, 30, "full instance reported busy")
        await m.load("new")
        await wait_until(
            lambda: (v := m.view("new")) is not None and v.state == "loading" and v.prefix_units >= 2,
            30,
            "new instance holding its first layer",
        )
        async with stream(m, SEEDED, n) as split:
            await split.read(until_chunks=5)
            assert await m.metric("cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 1
            # The tail stage dies: the split stream (and the busy one) move to `new` once it holds
            # every layer, and resume where they stopped.
            m.workers.kill("full")
            out = await split.read()
    assert out.error is None, out.error
    assert out.done and out.finish == "length"
    assert m.tap.senders[out.id] == ["new"]  # as a driver first, then alone
    assert m.tap.tokens(out.id) == want[1]
    assert "".join(out.text) == want[0]
    assert out.usage is not None and out.usage["completion_tokens"] == n
    assert (
        await m.metric("cascade:migrations_total", model=MODEL, reason="worker_lost")
        + await m.metric("cascade:migrations_total", model=MODEL, reason="worker_error")
        >= 1
    )


async def test_n_choices_and_prompt_logprobs_through_a_pipelined_route_are_the_whole_instances(mesh: Mesh) -> None:
    """While a new instance loads, an n > 1 request the router splits goes through the partial
    route as one sequence per choice: each choice equals the whole instance's, token for token,
    and each is JSON valid for the schema (the grammar's state lives at the route's last stage);
    a prompt_logprobs request split the same way is scored there as the whole instance scores it."""
    m = mesh
    unit_mb = Checkpoint(m.model_dir).unit_nbytes(1) / 1e6
    k, n = 3, 200
    m.workers.start("full", *PACED, "--max-batch", str(k), "--kv-slots", str(2 * k))
    m.workers.start("new", *PACED, "--load-mb-s", str(unit_mb / 1.5))
    await m.load("full")
    await m.serving("full")
    sampled = {**SEEDED, "n": k, "ignore_eos": False, "guided_json": SCHEMA}
    _, want_ids, want_text = await complete_n(m, sampled, n)
    scored = {**GREEDY, "prompt_logprobs": 3}
    want_scores = prompt_scores(await complete_json(m, scored, 2))
    assert len({tuple(ids) for ids in want_ids}) == k
    for text in want_text:
        jsonschema.validate(json.loads(text), SCHEMA)

    # A long n = k stream fills `full`'s batch, so the next request is split.
    async with stream(m, {**GREEDY, "n": k}, 3000) as busy:
        await busy.read(until_chunks=1)
        await wait_until(lambda: m.view("full").running >= 1, 30, "full instance reported busy")
        await m.load("new")
        await wait_until(
            lambda: (v := m.view("new")) is not None and v.state == "loading" and v.prefix_units >= 2,
            30,
            "new instance holding its first layer",
        )
        rid, got_ids, got_text = await complete_n(m, sampled, n)
        got_scores = prompt_scores(await complete_json(m, scored, 2))
        assert await m.metric("cascade_gateway_routed_requests_total", model=MODEL, route="pipelined") == 2
    assert m.tap.senders[rid] == ["new"]  # the route's driver sent its tokens
    assert got_ids == want_ids
    assert got_text == want_text
    # The prompt's logprobs, scored at the route's last stage: the whole instance's figures.
    assert len(got_scores) == len(want_scores) and got_scores[0] is None and want_scores[0] is None
    for got, want in zip(got_scores[1:], want_scores[1:], strict=True):
        assert got is not None and want is not None and got.keys() == want.keys()
        assert got == pytest.approx(want, abs=1e-4)


async def test_without_an_instance_to_move_to_the_client_gets_an_error_chunk(
    nats_url: str, subjects: Subjects, model_dir: Path, tmp_path: Path
) -> None:
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=model_dir, min_replicas=1),))
    workers = WorkerProcs(nats_url, subjects.prefix, tmp_path)
    nc = await connect(nats_url, "test")
    try:
        async with (
            running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S, migration_limit=0) as gw,
            aiohttp.ClientSession() as http,
        ):
            m = Mesh(gw, workers, nc, subjects, model_dir, http)
            workers.start("a", *PACED)
            workers.start("b", *PACED)
            await m.load("a")
            await m.load("b")
            await m.serving("a")
            await m.serving("b")
            async with stream(m, GREEDY, 500) as s:
                await s.read(until_chunks=5)
                workers.kill(m.holder())
                out = await s.read()
            # Migration is off: an explicit error, not a hang and not a silent end.
            assert out.error is not None and out.error["code"] == "worker_died", out
            assert out.done and out.finish is None
            assert await m.metric("cascade:migration_failures_total", model=MODEL, reason="limit") == 1
    finally:
        workers.stop_all()
        with contextlib.suppress(Exception):
            await nc.drain()
