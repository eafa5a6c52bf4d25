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


def test_a_marker_the_tokenizer_has_as_a_special_token_stays_in_the_text(tmp_path: Any) -> None:
    """Mistral's tokenizer has [TOOL_CALLS] as a special token, which decoding leaves out: the
    gateway asks the worker to keep the parser's markers, so a call the model writes with that
    token is parsed, streamed or not. Without it the marker vanishes and no call is found."""
    from cascade.models.tokenizer import IncrementalDecoder, load_tokenizer
    from tests.hf_fixtures import MISTRAL, QWEN25, build

    tok = load_tokenizer(build(MISTRAL, tmp_path / "mistral"))
    keep = tl.special_markers("mistral", lambda t: tok.encode(t, add_special_tokens=False), tok.special_ids)
    (marker,) = keep
    assert marker in tok.special_ids and tok.token_text(marker) == "[TOOL_CALLS]"
    body = '[{"name": "get_time", "arguments": {"zone": "UTC"}}]'
    ids = [*tok.encode("Sure.", add_special_tokens=False), marker, *tok.encode(body, add_special_tokens=False)]
    for kept, found in ((keep, ["get_time"]), ([], [])):
        dec = IncrementalDecoder(tok, kept)
        sp = tl.StreamParser("mistral")
        shown, streamed = "", list[dict[str, Any]]()
        for i in ids:
            s, new = sp.feed(dec.push([i]))
            shown, streamed = shown + s, streamed + new
        s, new = sp.feed(dec.flush())
        shown, streamed = shown + s, streamed + new
        s, new = sp.finish()
        shown, streamed = shown + s, streamed + new
        assert [c["function"]["name"] for c in assemble(streamed)] == found
        content, calls = tl.parse(dec.text, "mistral")
        assert [c["function"]["name"] for c in calls] == found
        if found:
            assert content == shown.strip() == "Sure."
            assert json.loads(calls[0]["function"]["arguments"]) == {"zone": "UTC"}
    # Qwen writes <tool_call> as plain added text, not a special token: nothing to keep.
    qwen = load_tokenizer(build(QWEN25, tmp_path / "qwen"))
    assert tl.special_markers("hermes", lambda t: qwen.encode(t, add_special_tokens=False), qwen.special_ids) == []


def test_a_forced_mistral_call_asks_for_the_special_marker_token(tmp_path: Any) -> None:
    """With [TOOL_CALLS] a special token, the forced grammar admits that token (as the model was
    trained to write it), not the marker's text spelled in pieces; a walk through it decodes,
    with the marker kept, into a call the parser reads."""
    from cascade.models.tokenizer import IncrementalDecoder, load_tokenizer
    from tests.hf_fixtures import MISTRAL, build

    tok = load_tokenizer(build(MISTRAL, tmp_path / "mistral"))
    keep = tl.special_markers("mistral", lambda t: tok.encode(t, add_special_tokens=False), tok.special_ids)
    t = tl.parse_tools({"tools": [TIME], "tool_choice": "required"})
    assert t is not None
    n = 1024  # the logits' width: the fixture's vocabulary fits in it
    lltok = structured.tokenizer_for(tok, n, tok.eos_ids)
    m = llguidance.LLMatcher(lltok, tl.forced_grammar(t, "mistral", keep), log_level=0)
    assert m.validate_tokens(tok.encode("[TOOL_CALLS]", add_special_tokens=False)[:1]) == 1
    text_pieces = [i for i in tok.encode("[TOOL", add_special_tokens=False) if i not in tok.special_ids]
    assert m.validate_tokens(text_pieces) == 0  # the marker's text is not a way in
    # A random walk through the grammar over this tokenizer's vocabulary, decoded as the worker does.
    words = (n + 31) // 32
    mask = torch.full((1, words), -1, dtype=torch.int32)
    rng = random.Random(3)
    ids: list[int] = []
    while not m.is_stopped() and len(ids) < 400:
        m.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
        bits = ((mask.view(-1).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:n]
        allowed = [int(i) for i in bits.nonzero().view(-1).tolist() if i not in tok.eos_ids]
        if not allowed:
            break
        ids.append(rng.choice(allowed))
        assert m.consume_token(ids[-1]), m.get_error()
    assert ids[0] == keep[0]
    dec = IncrementalDecoder(tok, keep)
    text = dec.push(ids) + dec.flush()
    content, calls = tl.parse(text, "mistral")
    assert content is None and calls, text
    for c in calls:
        assert c["function"]["name"] == "get_time" and json.loads(c["function"]["arguments"])["zone"] in ("UTC", "CET")
