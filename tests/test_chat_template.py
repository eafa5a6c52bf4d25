"""Chat prompts: real instruct templates rendered and tokenized by Cascade, against
`apply_chat_template(messages, tools=..., add_generation_prompt=True)` of transformers 5 on the
same files: the same text and the same ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cascade.models.chat_template import ChatTemplateError, NoChatTemplate, render, wants_content_parts
from cascade.models.tokenizer import HFTokenizer, load_tokenizer
from tests.hf_fixtures import (
    LLAMA2,
    LLAMA3,
    MISTRAL,
    QWEN25,
    SMOLLM2,
    TEMPLATES,
    Flavour,
    build,
    edit_json,
    hf_chat_ids,
    hf_tokenizer,
)

pytest.importorskip("transformers")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_temperature",
            "description": "Get the current temperature at a location.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": 'The location, as "City, Country"'},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    }
]

ONE_TURN: list[dict[str, Any]] = [{"role": "user", "content": "Hello, how are you?"}]
MULTI_TURN: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a terse bot.  "},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": " Weather in Zürich? 😀\nTwo lines."},
]
NO_SYSTEM_MULTI: list[dict[str, Any]] = MULTI_TURN[1:]
# A tool round trip as the gateway passes it on: arguments parsed to an object, no null fields.
TOOL_ROUND: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer weather queries."},
    {"role": "user", "content": "What's the temperature in Paris?"},
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
    {"role": "tool", "tool_call_id": "abcdef123", "name": "get_current_temperature", "content": "22.0"},
]

# (template, tokenizer flavour, conversations it supports, whether it takes tools)
CASES: list[tuple[str, Flavour, list[list[dict[str, Any]]], bool]] = [
    ("smollm2-135m-instruct.jinja", SMOLLM2, [ONE_TURN, MULTI_TURN, NO_SYSTEM_MULTI], False),
    ("llama-3.1-8b-instruct.jinja", LLAMA3, [ONE_TURN, MULTI_TURN, NO_SYSTEM_MULTI, TOOL_ROUND], True),
    ("llama-3.2-3b-instruct.jinja", LLAMA3, [ONE_TURN, MULTI_TURN, NO_SYSTEM_MULTI, TOOL_ROUND], True),
    ("qwen2.5-instruct.jinja", QWEN25, [ONE_TURN, MULTI_TURN, NO_SYSTEM_MULTI, TOOL_ROUND], True),
    ("mistral-nemo-instruct-2407.jinja", MISTRAL, [ONE_TURN, MULTI_TURN, NO_SYSTEM_MULTI, TOOL_ROUND], True),
    ("mistral-7b-instruct-v0.3.jinja", MISTRAL, [ONE_TURN, NO_SYSTEM_MULTI, TOOL_ROUND], True),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, HFTokenizer]]:
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for template, flavour, _, _ in CASES:
        d = build(flavour, root / template, template=(TEMPLATES / template).read_text())
        tok = load_tokenizer(d)
        assert isinstance(tok, HFTokenizer)
        out[template] = (hf_tokenizer(d), tok)
    return out


@pytest.mark.parametrize(("template", "flavour", "chats", "takes_tools"), CASES, ids=[c[0] for c in CASES])
def test_chat_prompt_equals_apply_chat_template(
    models: dict[str, tuple[Any, HFTokenizer]],
    template: str,
    flavour: Flavour,
    chats: list[list[dict[str, Any]]],
    takes_tools: bool,
) -> None:
    hf, ours = models[template]
    for chat in chats:
        for tools in [None, TOOLS] if takes_tools else [None]:
            want_text = hf.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=False)
            assert ours.render_chat(chat, tools=tools) == want_text
            assert ours.encode_chat(chat, tools=tools) == hf_chat_ids(hf, chat, tools)
    no_prompt = hf.apply_chat_template(ONE_TURN, add_generation_prompt=False, tokenize=False)
    assert ours.render_chat(ONE_TURN, add_generation_prompt=False) == no_prompt


def test_prompts_have_their_special_tokens(models: dict[str, tuple[Any, HFTokenizer]]) -> None:
    """The ids spell the template's control tokens as single special ids; BOS comes once, from the
    template (Llama) or not at all (Qwen), never added again by the tokenizer."""
    _, llama = models["llama-3.1-8b-instruct.jinja"]
    ids = llama.encode_chat(ONE_TURN)
    assert ids[0] == llama.bos_id and ids.count(llama.bos_id) == 1
    tail = llama.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    assert ids[-len(tail) :] == tail and sum(i in llama.special_ids for i in tail) == 2
    _, qwen = models["qwen2.5-instruct.jinja"]
    ids = qwen.encode_chat(ONE_TURN)
    tail = qwen.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(tail) :] == tail and tail[0] in qwen.special_ids
    assert qwen.bos_id is None


@pytest.mark.parametrize(
    ("template", "chat", "match"),
    [
        # Roles must alternate: the template says so with raise_exception.
        ("mistral-nemo-instruct-2407.jinja", [{"role": "user", "content": "a"}] * 2, "alternate"),
        # Mistral's tool-call ids are 9 characters; an OpenAI-style id is refused by the template.
        (
            "mistral-nemo-instruct-2407.jinja",
            [*TOOL_ROUND[:2], {**TOOL_ROUND[2], "tool_calls": [{**TOOL_ROUND[2]["tool_calls"][0], "id": "call_1"}]}],
            "length 9",
        ),
        # No first user message to put the tools in.
        ("llama-3.1-8b-instruct.jinja", [{"role": "system", "content": "s"}], "no first user message"),
    ],
)
def test_template_refusals_are_chat_template_errors(
    models: dict[str, tuple[Any, HFTokenizer]], template: str, chat: list[dict[str, Any]], match: str
) -> None:
    import jinja2

    hf, ours = models[template]
    tools = TOOLS if "llama" in template else None
    with pytest.raises(jinja2.TemplateError, match=match):
        hf.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=False)
    with pytest.raises(ChatTemplateError, match=match):
        ours.encode_chat(chat, tools=tools)


def test_template_failures_are_chat_template_errors(models: dict[str, tuple[Any, HFTokenizer]]) -> None:
    _, smol = models["smollm2-135m-instruct.jinja"]
    # SmolLM2's template adds strings; an assistant turn without content leaves it an undefined value.
    with pytest.raises(ChatTemplateError, match="content"):
        smol.encode_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}])
    with pytest.raises(ChatTemplateError, match="parse"):
        render("{% if %}", ONE_TURN)


def test_tokenizer_without_template_refuses_chat(tmp_path: Path) -> None:
    d = build(LLAMA2, tmp_path / "base")  # a base model: no chat template
    hf, ours = hf_tokenizer(d), load_tokenizer(d)
    with pytest.raises(ValueError, match="chat_template is not set"):
        hf.apply_chat_template(ONE_TURN, tokenize=False)
    with pytest.raises(NoChatTemplate):
        ours.encode_chat(ONE_TURN)


# --------------------------------------------------------------------------- where templates come from


def _files_case(tmp_path: Path, name: str) -> Path:
    return build(QWEN25, tmp_path / name, template="CONFIG {{ messages[0].content }}")


def _move_template_to_config(d: Path, value: Any) -> None:
    (d / "chat_template.jinja").unlink()
    edit_json(d / "tokenizer_config.json", chat_template=value)


def test_template_sources_in_transformers_order(tmp_path: Path) -> None:
    # 1. chat_template.jinja wins over tokenizer_config.json.
    d = _files_case(tmp_path, "jinja")
    edit_json(d / "tokenizer_config.json", chat_template="IGNORED")
    (d / "chat_template.jinja").write_text("JINJA {{ messages[0].content }}")
    # 2. tokenizer_config.json: one string.
    c = _files_case(tmp_path, "config")
    _move_template_to_config(c, "CONFIG {{ messages[0].content }}")
    # 3. tokenizer_config.json: named templates; "tool_use" only when tools are given.
    n = _files_case(tmp_path, "named")
    _move_template_to_config(
        n,
        [
            {"name": "default", "template": "DEFAULT {{ messages[0].content }}"},
            {"name": "tool_use", "template": "TOOLS {{ tools | length }} {{ messages[0].content }}"},
        ],
    )
    # 4. additional_chat_templates/<name>.jinja beside chat_template.jinja.
    a = _files_case(tmp_path, "additional")
    (a / "additional_chat_templates").mkdir()
    (a / "additional_chat_templates" / "tool_use.jinja").write_text("EXTRA {{ tools | length }}")
    for path, want, want_tools in [
        (d, "JINJA hi", "JINJA hi"),
        (c, "CONFIG hi", "CONFIG hi"),
        (n, "DEFAULT hi", "TOOLS 1 hi"),
        (a, "CONFIG hi", "EXTRA 1"),
    ]:
        hf, ours = hf_tokenizer(path), load_tokenizer(path)
        chat = [{"role": "user", "content": "hi"}]
        assert ours.render_chat(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert ours.render_chat(chat) == want
        got = ours.render_chat(chat, tools=TOOLS)
        assert got == hf.apply_chat_template(chat, tools=TOOLS, add_generation_prompt=True, tokenize=False)
        assert got == want_tools


def test_chat_template_json_is_the_last_resort(tmp_path: Path) -> None:
    """AutoTokenizer never reads chat_template.json (the processor's file); Cascade uses it only
    when the tokenizer has no template of its own, as vLLM falls back to the processor's."""
    d = _files_case(tmp_path, "legacy")
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "JSON {{ messages[0].content }}"}))
    assert hf_tokenizer(d).chat_template is None
    assert load_tokenizer(d).render_chat([{"role": "user", "content": "hi"}]) == "JSON hi"
    edit_json(d / "tokenizer_config.json", chat_template="CONFIG {{ messages[0].content }}")
    assert load_tokenizer(d).render_chat([{"role": "user", "content": "hi"}]) == "CONFIG hi"


# --------------------------------------------------------------------------- the environment

# One template that uses every helper transformers provides, and the special tokens in context.
HELPERS = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}{%- if loop.index > 2 %}{% break %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
{{ bos_token }}{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=true) }}|{{ dict(a=1) | tojson }}
{% generation %}{{ m.content }}{% endgeneration %}
{%- endfor %}
{{ ns.n }} {{ eos_token }} {{ pad_token }} {{ image_token }} {{ strftime_now("%Y") }} {{ documents | tojson }}
{%- if tools %}{{ tools[0].function.name }}{% endif %}
{%- if add_generation_prompt %}<gen>{% endif %}"""


def test_helpers_and_context_as_transformers(tmp_path: Path) -> None:
    d = build(QWEN25, tmp_path / "h", template=HELPERS)
    edit_json(d / "tokenizer_config.json", image_token="<|image|>")
    hf, ours = hf_tokenizer(d), load_tokenizer(d)
    chat: list[dict[str, Any]] = [
        {"role": "user", "content": '<b>é</b> & "q"', "name": None},
        {"role": "assistant", "content": "ok", "reasoning": "thought"},
        {"role": "user", "content": "third"},
    ]
    docs = [{"title": "T", "text": "body"}]
    want = hf.apply_chat_template(chat, tools=TOOLS, documents=docs, add_generation_prompt=True, tokenize=False)
    got = ours.render_chat(chat, tools=TOOLS, documents=docs)
    assert got == want
    assert "<b>é</b>" in got and '"name"' not in got  # no HTML escaping; null fields dropped
    assert '"reasoning_content": "thought"' in got  # reasoning aliased as transformers does
    assert ours.encode_chat(chat, tools=TOOLS, documents=docs) == hf(want, add_special_tokens=False)["input_ids"]


def test_sandbox_refuses_underscore_namespace_attributes() -> None:
    with pytest.raises(ChatTemplateError, match="underscore"):
        render("{% set ns = namespace(_x=1) %}", ONE_TURN)
    with pytest.raises(ChatTemplateError):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", ONE_TURN)


def test_text_parts_follow_the_template(tmp_path: Path) -> None:
    """Content given as OpenAI text parts: a template that prints `content` gets the parts joined
    by newlines (vLLM's "string" format); one that loops over them gets the parts."""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    string_tpl = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    parts_tpl = "{% for m in messages %}{% for p in m['content'] %}[{{ p.text }}]{% endfor %}{% endfor %}"
    assert not wants_content_parts(string_tpl)
    assert wants_content_parts(parts_tpl)
    assert wants_content_parts("{% for m in messages %}{% for p in m.content | list %}x{% endfor %}{% endfor %}")
    s = build(QWEN25, tmp_path / "s", template=string_tpl)
    p = build(QWEN25, tmp_path / "p", template=parts_tpl)
    hs, hp = hf_tokenizer(s), hf_tokenizer(p)
    joined: list[dict[str, Any]] = [{"role": "user", "content": "a\nb"}]
    as_parts: list[dict[str, Any]] = [{"role": "user", "content": parts}]
    assert load_tokenizer(s).encode_chat(as_parts) == hf_chat_ids(hs, joined)
    assert load_tokenizer(p).render_chat(as_parts) == "[a][b]"
    assert load_tokenizer(p).encode_chat(as_parts) == hf_chat_ids(hp, as_parts)


def test_llama2_style_sentencepiece_chat(tmp_path: Path) -> None:
    """A SentencePiece tokenizer with the legacy normalizer and a Llama 2-era template whose text
    follows special tokens with and without spaces."""
    tpl = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    for cls in (None, "LlamaTokenizerFast"):
        d = build(LLAMA2, tmp_path / str(cls), template=tpl)
        if cls:
            edit_json(d / "tokenizer_config.json", tokenizer_class=cls, legacy=False)
        hf, ours = hf_tokenizer(d), load_tokenizer(d)
        for chat in (ONE_TURN, NO_SYSTEM_MULTI):
            assert ours.encode_chat(chat) == hf_chat_ids(hf, chat)
