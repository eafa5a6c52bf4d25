"""The OpenAI API features vLLM serves, through the mesh: the official `openai` client against a
real gateway, a real worker process and the real nats-server fixture, on a tiny random checkpoint
transformers wrote (so transformers is the oracle of every figure). The token ids behind the text
come from the worker's own token events, tapped on the broker (a random model's text is mostly
U+FFFD and cannot be compared alone)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import torch
from pydantic import BaseModel, Field

from cascade.config import Deployment, ModelDeployment
from cascade.messages import LoadModel, Ok, TokenEvents, decode
from cascade.models.tokenizer import ByteTokenizer
from cascade.natsutil import connect, gather_status, request
from cascade.subjects import Subjects
from services.gateway.router import serves_fully
from services.gateway.testing import RunningGateway, running_gateway
from tests.hfmodels import CASES, Built, build, hf_logits
from tests.test_sampling_api import reference_penalties
from tests.waiting import wait_until
from tests.workerprocs import WorkerProcs

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

MODEL = "m"
TOL = 1e-4
MESSAGES = [{"role": "user", "content": "Score this answer."}]
tok = ByteTokenizer()


@dataclass
class Mesh:
    gw: RunningGateway
    client: Any  # openai.AsyncOpenAI
    built: Built
    nc: Any
    subjects: Subjects
    # request id → (event index, token ids) as the worker sent them
    tapped: dict[str, list[Any]] = field(default_factory=dict)

    async def on_tokens(self, msg: Any) -> None:
        for ev in decode(msg.data, TokenEvents).events:
            self.tapped.setdefault(ev.request_id, []).append(ev)

    async def ids(self, request_id: str, choice: int = 0) -> list[int]:
        """The choice's token ids as the worker sent them. The client's answer can come before this
        connection has the last event (the gateway's and this tap's deliveries race): wait for it."""

        def finished() -> bool:
            evs = self.tapped.get(request_id, [])
            return any(ev.choice == choice and ev.finish_reason is not None for ev in evs)

        await wait_until(finished, 10, f"the tap's last event of {request_id}")
        return [t for ev in self.tapped.get(request_id, []) if ev.choice == choice for t in ev.token_ids]

    async def prefill_tokens(self) -> int:
        """Prompt tokens the worker computed so far (its status)."""
        st = await gather_status(self.nc, self.subjects, 0.5, "test")
        w = next(s for s in st.services if s.service == "worker")
        return int(w.detail["prefill_tokens"])


@pytest.fixture(scope="module")
async def mesh(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    root = tmp_path_factory.mktemp("features")
    # A longer context than the family tests need: structured outputs spell whole JSON documents.
    case = dataclasses.replace(CASES[0], name="llama-long", config={**CASES[0].config, "max_position_embeddings": 1024})
    built = build(case, root)
    subjects = Subjects("t" + uuid.uuid4().hex[:10])
    workers = WorkerProcs(nats_url, subjects.prefix, root)
    nc = await connect(nats_url, "test")
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=built.v5, min_replicas=1),))
    try:
        # The test taps token events on NATS: the gateway asks for them there (docs/subjects.md).
        async with running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=0.2, direct_tokens=False) as gw:
            workers.start("w1", "--heartbeat-s", "0.2")
            views = gw.core.registry.views
            await wait_until(lambda: any(v.worker_id == "w1" for v in views()), 60, "w1 heart-beating")
            await request(nc, subjects.load("w1"), LoadModel(MODEL, str(built.v5)), Ok, timeout=10)
            await wait_until(lambda: any(serves_fully(v, MODEL) for v in views()), 60, "w1 serving")
            client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            m = Mesh(gw, client, built, nc, subjects)
            await nc.subscribe(subjects.tokens(gw.id), cb=m.on_tokens)
            await nc.flush()
            yield m
            await m.client.close()
    finally:
        workers.stop_all()
        with contextlib.suppress(Exception):
            await nc.drain()


def log_softmax(built: Built, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(hf_logits(built.hf, ids), dim=-1)


async def test_chat_logprobs_equal_transformers(mesh: Mesh) -> None:
    prompt = tok.encode_chat(MESSAGES)
    r = await mesh.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True, "prompt_logprobs": 2},
    )  # fmt: skip
    gen = await mesh.ids(r.id)
    assert len(gen) == 6
    ls = log_softmax(mesh.built, prompt + gen)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for j, (t, item) in enumerate(zip(gen, content, strict=True)):
        row = ls[len(prompt) - 1 + j]
        assert abs(item.logprob - float(row[t])) < TOL
        assert item.token == tok.decode([t]) and item.bytes == list(item.token.encode())
        vals = row.topk(3).values.tolist()
        assert [x.logprob for x in item.top_logprobs] == pytest.approx(vals, abs=TOL)
    # vLLM's prompt_logprobs: on the response, one per prompt token, keyed by token id.
    plps = r.model_extra["prompt_logprobs"]
    assert len(plps) == len(prompt) and plps[0] is None
    for i in range(1, len(prompt)):
        got = plps[i][str(prompt[i])]
        assert abs(got["logprob"] - float(ls[i - 1, prompt[i]])) < TOL
        assert got["rank"] == int((ls[i - 1] > ls[i - 1, prompt[i]]).sum()) + 1

    # Streamed: the same log probabilities, chunk by chunk.
    stream = await mesh.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    streamed: list[Any] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [x.logprob for x in streamed] == pytest.approx([x.logprob for x in content], abs=TOL)
    assert [x.token for x in streamed] == [x.token for x in content]


async def test_completion_echo_logprobs_score_the_prompt(mesh: Mesh) -> None:
    """What evaluation harnesses send to score a continuation: echo, logprobs, max_tokens 1."""
    text = "The answer is B"
    prompt = tok.encode(text)
    r = await mesh.client.completions.create(
        model=MODEL, prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=2, extra_body={"ignore_eos": True}
    )
    gen = await mesh.ids(r.id)
    ch = r.choices[0]
    assert ch.text.startswith(text)
    lp = ch.logprobs
    assert len(lp.tokens) == len(prompt) + 1 == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ls = log_softmax(mesh.built, prompt + gen)
    for i in range(1, len(prompt) + 1):
        t = (prompt + gen)[i]
        assert abs(lp.token_logprobs[i] - float(ls[i - 1, t])) < TOL
        assert len(lp.top_logprobs[i]) <= 2
    # Streamed: the prompt's chunk first (its text and logprobs), then the token's.
    stream = await mesh.client.completions.create(
        model=MODEL, prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=2, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    token_lps: list[float | None] = []
    texts = []
    async for chunk in stream:
        for c in chunk.choices:
            texts.append(c.text)
            if c.logprobs is not None:
                token_lps += c.logprobs.token_logprobs
    assert "".join(texts) == ch.text
    assert token_lps[0] is None
    assert token_lps[1:] == pytest.approx(lp.token_logprobs[1:], abs=TOL)


async def test_penalties_through_the_mesh_follow_the_reference(mesh: Mesh) -> None:
    prompt = tok.encode("penalise me")
    pres, freq, rep = 0.5, 1.5, 1.1
    r = await mesh.client.completions.create(
        model=MODEL, prompt="penalise me", max_tokens=8, temperature=0, presence_penalty=pres, frequency_penalty=freq,
        extra_body={"ignore_eos": True, "repetition_penalty": rep},
    )  # fmt: skip
    got = await mesh.ids(r.id)
    seq: list[int] = []
    for _ in range(8):
        logits = hf_logits(mesh.built.hf, prompt + seq)[-1].tolist()
        pen = reference_penalties(logits, prompt, seq, pres, freq, rep)
        seq.append(max(range(len(pen)), key=pen.__getitem__))
    assert got == seq
    assert r.usage.completion_tokens == 8


async def test_logprob_parameters_out_of_range_are_400s(mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        await mesh.client.chat.completions.create(model=MODEL, messages=MESSAGES, top_logprobs=2)
    assert ei.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError):
        await mesh.client.completions.create(model=MODEL, prompt="x", logprobs=21)


async def test_n_greedy_choices_are_identical_and_share_one_prefill(mesh: Mesh) -> None:
    text = "n choices of " + uuid.uuid4().hex  # a prompt no earlier request cached
    prompt = tok.encode(text)
    before = await mesh.prefill_tokens()
    r = await mesh.client.completions.create(
        model=MODEL, prompt=text, max_tokens=5, temperature=0, n=4, logprobs=1, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) == 1
    assert all(c.logprobs.token_logprobs == r.choices[0].logprobs.token_logprobs for c in r.choices)
    assert [await mesh.ids(r.id, i) for i in range(4)] == [await mesh.ids(r.id, 0)] * 4
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 4 * 5
    assert await mesh.prefill_tokens() - before == len(prompt)


async def test_n_sampled_chat_choices_stream_with_their_index(mesh: Mesh) -> None:
    stream = await mesh.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7, n=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts: dict[int, str] = {}
    roles: dict[int, int] = {}
    finishes: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles[c.index] = roles.get(c.index, 0) + (c.delta.role == "assistant")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert sorted(texts) == [0, 1, 2] and roles == {0: 1, 1: 1, 2: 1}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert usage is not None and usage.completion_tokens == 18
    # The same request, not streamed: the same three choices (each choice's seed is its own).
    r = await mesh.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7, n=3, extra_body={"ignore_eos": True}
    )
    assert {c.index: c.message.content for c in r.choices} == texts


class Owner(BaseModel):
    first: str = Field(max_length=5)
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


class Pet(BaseModel):
    name: str = Field(max_length=6)
    kind: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=99)
    owner: Owner
    vaccinated: bool


def closed(schema: Any) -> Any:
    """`additionalProperties: false` on every object, as OpenAI's strict mode requires (an open
    object lets a random model add keys for ever)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if out.get("type") == "object":
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


async def test_openai_parse_with_a_pydantic_model(mesh: Mesh) -> None:
    """The official client's structured-output helper: a random model's output parses into the
    pydantic model every time (the mask is what makes it)."""
    for seed in range(3):
        r = await mesh.client.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Pet, max_tokens=300, temperature=1.0, seed=seed
        )
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop", msg.content
        assert isinstance(msg.parsed, Pet)
        assert Pet.model_validate_json(msg.content or "") == msg.parsed


async def test_json_object_guided_choice_and_streaming(mesh: Mesh) -> None:
    r = await mesh.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=300, temperature=0.8, seed=1, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    r2 = await mesh.client.completions.create(
        model=MODEL, prompt="pick", max_tokens=10, temperature=1.0, n=3, extra_body={"guided_choice": ["left", "right"]}
    )
    assert all(c.text in ("left", "right") and c.finish_reason == "stop" for c in r2.choices)
    pet = {"name": "pet", "schema": closed(Pet.model_json_schema()), "strict": True}
    stream = await mesh.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=300, temperature=1.0, seed=2, stream=True,
        response_format={"type": "json_schema", "json_schema": pet},
    )  # fmt: skip
    text = ""
    async for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
    Pet.model_validate_json(text)


async def test_structured_output_errors_are_400s_naming_the_parameter(mesh: Mesh) -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as ei:
        await mesh.client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=bad_schema)
    assert ei.value.body["param"] == "response_format" and "objekt" in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        await mesh.client.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "a("})
    assert ei.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as ei:
        await mesh.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}
        )
    assert ei.value.body["code"] == "conflicting_parameters"


class GetWeather(BaseModel):
    city: str = Field(max_length=8)
    unit: Literal["c", "f"]


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather", description="Weather at a place")
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


async def test_forced_tool_calls_parse_into_openai_shape(mesh: Mesh) -> None:
    """tool_choice required / a named function: even a random model's output is a call in the
    template's format (hermes here), parsed into OpenAI's tool_calls, with valid arguments."""
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_time"}}]):
        r = await mesh.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice,
            parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=seed,
        )  # fmt: skip
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        calls = ch.message.tool_calls or []
        assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
        fn = calls[0].function
        if fn.name == "get_weather":
            GetWeather.model_validate_json(fn.arguments)
        else:
            assert fn.name == "get_time" and json.loads(fn.arguments)["zone"] in ("UTC", "CET")
        if isinstance(choice, dict):
            assert fn.name == "get_time"


async def test_streamed_tool_calls_with_the_clients_helper(mesh: Mesh) -> None:
    """The client's streaming helper accumulates the tool_calls deltas into a final message whose
    arguments it parses into the pydantic model (strict function tools), with parallel calls."""
    async with mesh.client.chat.completions.stream(
        model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=400,
        temperature=1.0, seed=4,
    ) as stream:  # fmt: skip
        done = []
        fragments: dict[int, int] = {}
        async for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                done.append(event.name)
            elif event.type == "tool_calls.function.arguments.delta":
                fragments[event.index] = fragments.get(event.index, 0) + 1
        final = await stream.get_final_completion()
    ch = final.choices[0]
    assert ch.finish_reason == "tool_calls"
    calls = ch.message.tool_calls or []
    assert calls and done == ["get_weather"] * len(calls)
    for c in calls:
        assert isinstance(c.function.parsed_arguments, GetWeather)
    # The arguments came as the model wrote them, in several deltas per call, not in one piece.
    assert sorted(fragments) == list(range(len(calls))) and min(fragments.values()) > 1, fragments


@pytest.mark.parametrize("parser", ["llama3_json", "mistral"])
async def test_forced_tool_calls_in_the_other_formats_through_the_mesh(mesh: Mesh, nats_url: str, parser: str) -> None:
    """A gateway with --tool-call-parser llama3_json or mistral: a forced call is written in that
    format (the grammar) and parsed back into OpenAI's tool_calls, whole and streamed (through the
    client's helper)."""
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=mesh.built.v5, min_replicas=1),))
    async with running_gateway(nats_url, mesh.subjects.prefix, dep, heartbeat_s=0.2, tool_call_parser=parser) as gw:
        await wait_until(lambda: any(serves_fully(v, MODEL) for v in gw.core.registry.views()), 60, "w1 seen")
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        try:
            for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_time"}}]):
                r = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice,
                    max_tokens=300, temperature=1.0, seed=seed,
                )  # fmt: skip
                ch = r.choices[0]
                assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
                for c in ch.message.tool_calls or []:
                    if c.function.name == "get_weather":
                        GetWeather.model_validate_json(c.function.arguments)
                    else:
                        assert c.function.name == "get_time"
                        assert json.loads(c.function.arguments)["zone"] in ("UTC", "CET")
                assert ch.message.tool_calls
                if isinstance(choice, dict):
                    assert {c.function.name for c in ch.message.tool_calls} == {"get_time"}
            async with client.chat.completions.stream(
                model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=400,
                temperature=1.0, seed=5,
            ) as stream:  # fmt: skip
                final = await stream.get_final_completion()
            ch = final.choices[0]
            assert ch.finish_reason == "tool_calls" and ch.message.tool_calls
            for c in ch.message.tool_calls:
                assert isinstance(c.function.parsed_arguments, GetWeather)
        finally:
            await client.close()


async def test_tool_results_go_back_into_the_conversation(mesh: Mesh) -> None:
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    r = await mesh.client.chat.completions.create(
        model=MODEL, messages=messages, tools=[TIME_TOOL], tool_choice="none", max_tokens=4, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].message.tool_calls is None and r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as ei:
        await mesh.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[TIME_TOOL], tool_choice="required",
            response_format={"type": "json_object"},
        )  # fmt: skip
    assert ei.value.body["code"] == "conflicting_parameters"


async def test_a_model_whose_tokenizer_has_the_marker_as_a_special_token(
    nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A Mistral tokenizer ([TOOL_CALLS] a special token) on a random model, through the mesh: the
    parser is read off its template, the forced call is written with the special token (the
    worker's token events show it), and the text keeps the marker, so the call parses, whole and
    streamed."""
    import shutil

    from cascade.models.tokenizer import load_tokenizer
    from tests.hf_fixtures import MISTRAL
    from tests.hf_fixtures import build as build_tokenizer

    root = tmp_path_factory.mktemp("mistral-tools")
    config = {**CASES[0].config, "vocab_size": 1024, "max_position_embeddings": 1024}
    case = dataclasses.replace(CASES[0], name="llama-mistral-tok", config=config)
    built = build(case, root)
    tokdir = build_tokenizer(MISTRAL, root / "tok")
    for f in tokdir.iterdir():
        if f.name != "config.json":
            shutil.copy(f, built.v5 / f.name)
    tok = load_tokenizer(built.v5)
    (marker,) = tok.encode("[TOOL_CALLS]", add_special_tokens=False)
    assert marker in tok.special_ids
    subjects = Subjects("t" + uuid.uuid4().hex[:10])
    workers = WorkerProcs(nats_url, subjects.prefix, root)
    nc = await connect(nats_url, "test")
    dep = Deployment(models=(ModelDeployment(name=MODEL, path=built.v5, min_replicas=1),))
    tapped: list[Any] = []

    async def on_tokens(msg: Any) -> None:
        tapped.extend(decode(msg.data, TokenEvents).events)

    try:
        # The test taps token events on NATS: the gateway asks for them there (docs/subjects.md).
        async with running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=0.2, direct_tokens=False) as gw:
            workers.start("w1", "--heartbeat-s", "0.2")
            views = gw.core.registry.views
            await wait_until(lambda: any(v.worker_id == "w1" for v in views()), 60, "w1 heart-beating")
            await request(nc, subjects.load("w1"), LoadModel(MODEL, str(built.v5)), Ok, timeout=10)
            await wait_until(lambda: any(serves_fully(v, MODEL) for v in views()), 60, "w1 serving")
            await nc.subscribe(subjects.tokens(gw.id), cb=on_tokens)
            await nc.flush()
            client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
            try:
                r = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, tools=[TIME_TOOL], tool_choice="required", max_tokens=200,
                    temperature=1.0, seed=3,
                )  # fmt: skip
                ch = r.choices[0]
                assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
                assert ch.message.tool_calls
                for c in ch.message.tool_calls:
                    assert c.function.name == "get_time" and json.loads(c.function.arguments)["zone"] in ("UTC", "CET")
                ids = [t for ev in tapped if ev.request_id == r.id for t in ev.token_ids]
                assert ids[0] == marker  # the model wrote the special token, not the marker's text
                async with client.chat.completions.stream(
                    model=MODEL, messages=MESSAGES, tools=[TIME_TOOL], tool_choice="required", max_tokens=200,
                    temperature=1.0, seed=4,
                ) as stream:  # fmt: skip
                    final = await stream.get_final_completion()
                assert final.choices[0].finish_reason == "tool_calls" and final.choices[0].message.tool_calls
            finally:
                await client.close()
    finally:
        workers.stop_all()
        with contextlib.suppress(Exception):
            await nc.drain()
