"""Tool calling's pure parts: validation of tools/tool_choice, the grammar that forces a call (a
random walk through it always parses into OpenAI's shape, with arguments valid for the schema),
and the parsers, whole and streamed piece by piece."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import llguidance
import pytest
import torch

from cascade import structured
from cascade.models.tokenizer import ByteTokenizer
from services.gateway import tools as tl

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather at a place",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
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
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


def test_tool_parameters_are_validated() -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tools": []}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ]
    for body, param in bad:
        with pytest.raises(tl.ToolError) as ei:
            tl.parse_tools(body)
        assert ei.value.param == param, body
    t = tl.parse_tools(
        {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    )
    assert t is not None and t.forced and [f["function"]["name"] for f in t.allowed()] == ["get_time"]
    assert tl.parse_tools({"tools": [WEATHER]}) == tl.Tools([WEATHER], "auto", None, True)


def walk(grammar: str, seed: int, limit: int = 3000) -> str:
    """A random walk through `grammar` over the byte tokenizer: each step a uniformly drawn
    allowed token, until the grammar is complete."""
    lltok = structured.tokenizer_for(ByteTokenizer(), 320, [257])
    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    rng = random.Random(seed)
    mask = torch.full((1, 10), -1, dtype=torch.int32)
    out = []
    for _ in range(limit):
        m.unsafe_compute_mask_ptr(mask.data_ptr(), 40)
        bits = ((mask.view(-1).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:320]
        allowed = [int(i) for i in bits.nonzero().view(-1).tolist()]
        if 257 in allowed and (allowed == [257] or rng.random() < 0.5):
            break  # the grammar may end here (EOS allowed): end half the time
        tok = rng.choice([a for a in allowed if a != 257])
        assert m.consume_token(tok), m.get_error()
        out.append(tok)
        if m.is_stopped():
            break
    else:
        raise AssertionError("the walk did not end")
    return bytes(out).decode("utf-8")


@pytest.mark.parametrize("parser", tl.PARSERS)
@pytest.mark.parametrize("choice", ["required", "get_time"])
@pytest.mark.parametrize("parallel", [True, False])
def test_a_forced_call_always_parses_into_openai_shape(parser: tl.Parser, choice: str, parallel: bool) -> None:
    body: dict[str, Any] = {"tools": [WEATHER, TIME], "parallel_tool_calls": parallel}
    body["tool_choice"] = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    t = tl.parse_tools(body)
    assert t is not None
    grammar = tl.forced_grammar(t, parser)
    for seed in range(8):
        text = walk(grammar, seed)
        content, calls = tl.parse(text, parser)
        assert calls and content is None, text
        if not parallel or parser == "llama3_json":
            assert len(calls) == 1
        for c in calls:
            assert set(c) == {"id", "type", "function"} and c["type"] == "function" and c["id"].startswith("call_")
            name = c["function"]["name"]
            assert name == choice or (choice == "required" and name in SCHEMAS)
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])
        # Streamed in pieces of any size: the same calls, nothing as content.
        sp = tl.StreamParser(parser, forced=True)
        rng = random.Random(seed)
        got: list[dict[str, Any]] = []
        shown = ""
        i = 0
        while i < len(text):
            n = rng.randint(1, 7)
            s, new = sp.feed(text[i : i + n])
            shown += s
            got += new
            i += n
        s, new = sp.finish()
        shown += s
        got += new
        assembled = assemble(got)
        assert shown == "" and len(assembled) == len(calls)
        assert [a["function"]["name"] for a in assembled] == [c["function"]["name"] for c in calls]
        assert [json.loads(a["function"]["arguments"]) for a in assembled] == [
            json.loads(c["function"]["arguments"]) for c in calls
        ]
        assert all(a["id"].startswith("call_") and a["type"] == "function" for a in assembled)


@pytest.mark.parametrize(
    ("parser", "text", "content", "names"),
    [
        ("hermes", 'Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>', "Sure.", ["a"]),
        (
            "hermes",
            '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
            None,
            ["a", "b"],
        ),
        ("hermes", "no call here <tool_", "no call here <tool_", []),
        ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
        ("llama3_json", '{"name": "a", "parameters": {"x": "y"}}', None, ["a"]),
        ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {}}', None, ["a"]),
        ("llama3_json", "Paris is in France.", "Paris is in France.", []),
        (
            "mistral",
            '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": 2}}]',
            None,
            ["a", "b"],
        ),
        ("mistral", "plain text", "plain text", []),
    ],
)
def test_parsers_whole_and_streamed(parser: tl.Parser, text: str, content: str | None, names: list[str]) -> None:
    got_content, calls = tl.parse(text, parser)
    assert got_content == content and [c["function"]["name"] for c in calls] == names
    sp = tl.StreamParser(parser)
    shown = ""
    streamed: list[dict[str, Any]] = []
    for ch in text:
        s, new = sp.feed(ch)
        shown += s
        streamed += new
    s, new = sp.finish()
    shown += s
    streamed += new
    assert [c["function"]["name"] for c in assemble(streamed)] == names
    assert shown.strip() == (content or "").strip()


def assemble(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """tool_calls deltas put together as OpenAI's clients do: the first item of an index brings
    id, type and name, later ones append to the arguments."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        c = calls.get(d["index"])
        if c is None:
            assert {"id", "type", "function"} <= set(d) and d["function"]["name"], d
            calls[d["index"]] = {"id": d["id"], "type": d["type"], "function": dict(d["function"])}
        else:
            assert "id" not in d and set(d["function"]) == {"arguments"}, d
            c["function"]["arguments"] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]


def test_hermes_arguments_stream_in_fragments_as_the_model_writes_them() -> None:
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"} x", "unit": "c"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    )
    sp = tl.StreamParser("hermes")
    shown = ""
    steps: list[list[dict[str, Any]]] = []
    for ch in text:
        s, new = sp.feed(ch)
        shown += s
        if new:
            steps.append(new)
            assert len({d["index"] for d in new}) == len(new), "one item per call in a delta"
    s, new = sp.finish()
    assert s == "" and new == []
    assert shown == "Let me look.\n"
    flat = [d for step in steps for d in step]
    # The first delta of a call names it as soon as its arguments begin.
    assert flat[0] == {"index": 0, "id": flat[0]["id"], "type": "function",
                       "function": {"name": "get_weather", "arguments": "{"}}  # fmt: skip
    fragments = [d["function"]["arguments"] for d in flat if d["index"] == 0 and "id" not in d]
    assert len(fragments) > 10
    calls = assemble(flat)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": 'Paris "} x', "unit": "c"},
        {"zone": "UTC"},
    ]
    assert [c["function"]["name"] for c in sp.calls] == ["get_weather", "get_time"]
    # Keys in another order: the call still comes, whole.
    sp = tl.StreamParser("hermes")
    out = [sp.feed(ch)[1] for ch in '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>']
    whole = [d for o in out for d in o] + sp.finish()[1]
    assert [(d["function"]["name"], json.loads(d["function"]["arguments"])) for d in whole] == [("f", {"a": 1})]
