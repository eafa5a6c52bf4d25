"""The gateway's own path from an OpenAI request body to prompt ids (openai_api validation, the
model catalog, GatewayCore.prepare) gives transformers' ids; and the real HTTP app answers a chat
it cannot render with a clear 400."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import nats
import pytest

from cascade.config import Deployment, ModelDeployment
from services.gateway import openai_api as oai
from services.gateway.core import GatewayCore
from services.gateway.openai_api import ApiError
from services.gateway.settings import GatewaySettings
from services.gateway.testing import running_gateway
from tests.hf_fixtures import LLAMA2, LLAMA3, MISTRAL, QWEN25, SMOLLM2, TEXTS, build, hf_chat_ids, hf_tokenizer

pytest.importorskip("transformers")

FLAVOURS = {"llama3": LLAMA3, "qwen": QWEN25, "smollm2": SMOLLM2, "mistral": MISTRAL, "llama2-base": LLAMA2}

# A chat as an OpenAI client sends it: tool call arguments as a JSON string, nulls, extra fields.
OPENAI_CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer weather queries."},
    {"role": "user", "content": [{"type": "text", "text": "Temperature"}, {"type": "text", "text": "in Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "abcdef123",
                "type": "function",
                "function": {"name": "get_current_temperature", "arguments": '{"location": "Paris, France"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcdef123", "content": "22.0"},
]
# The same chat as transformers' documentation has callers pass it.
HF_CHAT: list[dict[str, Any]] = [
    OPENAI_CHAT[0],
    {"role": "user", "content": "Temperature\nin Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "abcdef123",
                "type": "function",
                "function": {"name": "get_current_temperature", "arguments": {"location": "Paris, France"}},
            }
        ],
    },
    OPENAI_CHAT[3],
]
SIMPLE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("gwtok")
    models = []
    for name, f in FLAVOURS.items():
        d = build(f, root / name)
        # What the catalog reads besides the tokenizer (no weights needed to tokenize).
        config = {
            "model_type": f.model_type,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            # Families default the rest as transformers does (qwen2: 32 kv heads), so say it.
            "num_key_value_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 1024,
            "max_position_embeddings": 4096,
        }
        (d / "config.json").write_text(json.dumps(config))
        models.append(ModelDeployment(name=name, path=d, min_replicas=0))
    return Deployment(models=tuple(models))


async def test_prepare_gives_transformers_ids(nats_url: str, prefix: str, deployment: Deployment) -> None:
    nc = await nats.connect(nats_url)
    try:
        core = GatewayCore(GatewaySettings(nats_url=nats_url, prefix=prefix), deployment, nc)
        assert await core.catalog.refresh() == {}  # what start() does: the models' files, off the loop
        for m in deployment.models:
            hf = hf_tokenizer(m.path)
            info = core.catalog.get(m.name)
            for text in TEXTS[:6]:
                spec = oai.parse_completion({"model": m.name, "prompt": text, "max_tokens": 4})
                ids, _ = await core.prepare(info, spec)
                assert ids == hf(text)["input_ids"], (m.name, text)
            spec = oai.parse_completion({"model": m.name, "prompt": [5, 6, 7]})
            assert (await core.prepare(info, spec))[0] == [5, 6, 7]  # ids are taken as given
            if m.name == "llama2-base":
                continue  # no template: see the HTTP test
            chats = [SIMPLE_CHAT]
            if m.name in ("qwen", "llama3", "mistral"):  # templates that render tool calls
                chats.append(OPENAI_CHAT)
            for chat in chats:
                spec = oai.parse_chat({"model": m.name, "messages": chat})
                ids, _ = await core.prepare(info, spec)
                assert ids == hf_chat_ids(hf, HF_CHAT if chat is OPENAI_CHAT else chat), m.name
    except ApiError as e:
        raise AssertionError(e.message) from None
    finally:
        await nc.close()


async def test_chats_a_model_cannot_take_are_400(nats_url: str, prefix: str, deployment: Deployment) -> None:
    async with (
        running_gateway(nats_url, prefix, deployment) as gw,
        aiohttp.ClientSession(base_url=gw.url) as http,
    ):

        async def chat(model: str, messages: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
            async with http.post("/v1/chat/completions", json={"model": model, "messages": messages}) as r:
                return r.status, (await r.json())["error"]

        status, err = await chat("llama2-base", SIMPLE_CHAT)
        assert status == 400 and err["code"] == "chat_template_missing"
        assert "llama2-base" in err["message"] and "/v1/completions" in err["message"]
        # Mistral's template refuses turns that do not alternate, in its own words.
        status, err = await chat("mistral", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        assert status == 400 and err["code"] == "chat_template_error"
        assert "mistral" in err["message"] and "alternate" in err["message"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_temperature",
        "description": "The temperature at a place.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City, Country"}},
            "required": ["location"],
        },
    },
}


async def test_tools_render_through_the_models_template(nats_url: str, prefix: str, deployment: Deployment) -> None:
    """`tools` and `tool` role messages reach the chat template as transformers'
    apply_chat_template(tools=...) passes them: the same prompt ids; the tool-call format the
    template teaches picks the parser."""
    nc = await nats.connect(nats_url)
    try:
        core = GatewayCore(GatewaySettings(nats_url=nats_url, prefix=prefix), deployment, nc)
        assert await core.catalog.refresh() == {}
        expect_parser = {"qwen": "hermes", "llama3": "llama3_json", "mistral": "mistral"}
        for name, parser in expect_parser.items():
            m = next(d for d in deployment.models if d.name == name)
            hf = hf_tokenizer(m.path)
            info = core.catalog.get(name)
            spec = oai.parse_chat({"model": name, "messages": OPENAI_CHAT, "tools": [WEATHER_TOOL]})
            ids, _ = await core.prepare(info, spec)
            assert ids == hf_chat_ids(hf, HF_CHAT, tools=[WEATHER_TOOL]), name
            assert core.tool_parser(info) == parser
    finally:
        await nc.close()
