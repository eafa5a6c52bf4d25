from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest

from services.gateway import openai_api as oai
from services.gateway.openai_api import ApiError


def completion(**kw: Any) -> oai.GenerationSpec:
    return oai.parse_completion({"model": "m", "prompt": "hi", **kw})


def chat(**kw: Any) -> oai.GenerationSpec:
    return oai.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def bad(fn: Any, param: str | None = None, code: str | None = None, match: str | None = None) -> ApiError:
    with pytest.raises(ApiError, match=match) as ei:
        fn()
    e = ei.value
    assert e.status == 400
    assert e.type == "invalid_request_error"
    if param is not None:
        assert e.param == param
    if code is not None:
        assert e.code == code
    return e


# --------------------------------------------------------------------------- bodies


def test_json_body() -> None:
    assert oai.parse_json(b'{"a": 1}') == {"a": 1}
    bad(lambda: oai.parse_json(b"{nope"), code="invalid_json", match="not valid JSON")
    bad(lambda: oai.parse_json(b"[1, 2]"), code="invalid_json", match="JSON object")
    bad(lambda: oai.parse_json(b"  "), code="invalid_json", match="empty")


def test_completion_defaults_and_fields() -> None:
    s = completion()
    assert (s.kind, s.model, s.prompt, s.prompt_ids, s.max_tokens) == ("completion", "m", "hi", None, None)
    # Unset sampling fields stay unset here: the model's generation_config.json may set them.
    assert (s.temperature, s.top_p, s.seed, s.stop, s.stream, s.include_usage) == (None, None, None, [], False, False)
    s = completion(
        max_tokens=5,
        temperature=0,
        top_p=0.5,
        seed=7,
        stop="\n",
        stream=True,
        stream_options={"include_usage": True},
        user="u",
        n=1,
        some_future_field={"x": 1},  # unknown fields are ignored, as OpenAI does
        presence_penalty=0,
        logprobs=None,
        ignore_eos=True,
    )
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop, s.stream, s.include_usage, s.user) == (
        5,
        0.0,
        0.5,
        7,
        ["\n"],
        True,
        True,
        "u",
    )
    assert s.ignore_eos and not completion().ignore_eos
    assert completion(stop=["a", "", "b"]).stop == ["a", "b"]
    assert completion(max_tokens=None).max_tokens is None  # null means "not given"


def test_prompt_forms() -> None:
    assert completion(prompt=["one"]).prompt == "one"
    assert completion(prompt=[1, 2, 3]).prompt_ids == [1, 2, 3]
    assert completion(prompt=[[4, 5]]).prompt_ids == [4, 5]
    bad(lambda: completion(prompt=["a", "b"]), "prompt", match="one prompt per request")
    bad(lambda: completion(prompt=[[1], [2]]), "prompt", match="one prompt per request")
    bad(lambda: completion(prompt=[]), "prompt")
    bad(lambda: completion(prompt=[1, "a"]), "prompt")
    bad(lambda: completion(prompt=[-1]), "prompt", match="negative")
    bad(lambda: completion(prompt=7), "prompt")
    bad(lambda: oai.parse_completion({"model": "m"}), "prompt", code="missing_required_parameter")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("model", None, "model parameter"),
        ("model", 3, "non-empty string"),
        ("max_tokens", 0, "at least 1"),
        ("max_tokens", 1.5, "integer"),
        ("max_tokens", True, "integer"),
        ("max_tokens", "10", "integer"),
        ("temperature", 2.5, r"\[0, 2\]"),
        ("temperature", -0.1, r"\[0, 2\]"),
        ("temperature", "hot", "number"),
        ("top_p", 0, r"\(0, 1\]"),
        ("top_p", 1.01, r"\(0, 1\]"),
        ("seed", 1.5, "integer"),
        ("n", 17, "at most 16"),
        ("n", 0, "at least 1"),
        ("stop", 5, "string or a list"),
        ("stop", ["x"] * 17, "at most"),
        ("stream", "yes", "boolean"),
        ("stream_options", {"include_usage": True}, "only allowed when stream"),
        ("user", 5, "string"),
        ("ignore_eos", "yes", "boolean"),
        ("echo", "yes", "boolean"),
        ("best_of", 3, "best_of must equal n"),
        ("logprobs", 21, "at most 20"),
        ("logprobs", -1, "at least 0"),
        ("logprobs", True, "integer"),
        ("prompt_logprobs", 21, "at most 20"),
        ("presence_penalty", 2.5, r"\[-2, 2\]"),
        ("frequency_penalty", 3, r"\[-2, 2\]"),
        ("repetition_penalty", 0, r"\(0, 100\]"),
        ("logit_bias", {"1": 5}, "not supported"),
    ],
)
def test_completion_field_errors(field: str, value: Any, match: str) -> None:
    body = {"model": "m", "prompt": "hi", field: value}
    if value is None:
        del body[field]
    bad(lambda: oai.parse_completion(body), field, match=match)


def test_temperature_and_top_p_bounds_are_inclusive_where_openai_says() -> None:
    assert completion(temperature=2).temperature == 2.0
    assert completion(top_p=1).top_p == 1.0
    bad(lambda: completion(stream=True, stream_options="x"), "stream_options")


def test_chat_fields() -> None:
    s = chat(max_tokens=3, max_completion_tokens=9)
    assert s.kind == "chat"
    assert s.max_tokens == 9  # the newer field wins
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    s = oai.parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": parts, "name": "bob"},
                {"role": "assistant", "content": None},
            ],
            "response_format": {"type": "text"},
        }
    )
    # The fields chat templates read are kept (name too); nulls are dropped, as transformers does.
    assert s.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": parts, "name": "bob"},
        {"role": "assistant"},
    ]


def test_chat_tool_messages() -> None:
    s = oai.parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call12345",
                            "type": "function",
                            "function": {"name": "temp", "arguments": '{"city": "Paris"}'},
                        },
                        {"type": "function", "function": {"name": "noargs", "arguments": ""}},
                    ],
                    "refusal": None,
                },
                {"role": "tool", "tool_call_id": "call12345", "name": "temp", "content": "22"},
            ],
        }
    )
    assert s.messages is not None
    # OpenAI sends arguments as a JSON string; templates read an object.
    assert s.messages[1] == {
        "role": "assistant",
        "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "temp", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "noargs", "arguments": {}}},
        ],
    }
    assert s.messages[2] == {"role": "tool", "content": "22", "name": "temp", "tool_call_id": "call12345"}


@pytest.mark.parametrize(
    ("message", "param", "match"),
    [
        ({"role": "user", "content": "x", "name": 5}, "messages[0].name", "string"),
        ({"role": "tool", "content": "x"}, "messages[0].tool_call_id", "required"),
        ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls", "assistant"),
        ({"role": "assistant", "tool_calls": {"a": 1}}, "messages[0].tool_calls", "list"),
        ({"role": "assistant", "tool_calls": [{"type": "code"}]}, "messages[0].tool_calls[0]", "function call"),
        (
            {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
            "messages[0].tool_calls[0].function.name",
            "string",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{nope"}}]},
            "messages[0].tool_calls[0].function.arguments",
            "valid JSON",
        ),
        (
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
            "messages[0].tool_calls[0].function.arguments",
            "object",
        ),
    ],
)
def test_chat_tool_message_errors(message: dict[str, Any], param: str, match: str) -> None:
    bad(lambda: oai.parse_chat({"model": "m", "messages": [message]}), param, match=match)


@pytest.mark.parametrize(
    ("messages", "param", "match"),
    [
        (None, "messages", "messages parameter"),
        ([], "messages", "non-empty"),
        ("hi", "messages", "non-empty"),
        (["hi"], "messages[0]", "object"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role", "one of"),
        ([{"role": "user"}], "messages[0].content", "required"),
        ([{"role": "user", "content": 5}], "messages[0].content", "string or a list"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content", "text"),
    ],
)
def test_chat_message_errors(messages: Any, param: str, match: str) -> None:
    body: dict[str, Any] = {"model": "m"}
    if messages is not None:
        body["messages"] = messages
    bad(lambda: oai.parse_chat(body), param, match=match)


def test_chat_unsupported() -> None:
    bad(lambda: chat(tools=[{"type": "function"}]), "tools[0]")
    bad(lambda: chat(functions=[{"name": "f"}]), "functions", code="unsupported_parameter")
    tool = {"type": "function", "function": {"name": "f"}}
    bad(lambda: chat(tools=[tool], tool_choice="required", guided_regex="a"), code="conflicting_parameters")
    assert chat(tools=[tool], tool_choice="none", guided_regex="a").grammar is not None
    bad(lambda: chat(top_logprobs=2), "top_logprobs", match="requires logprobs")
    bad(lambda: chat(logprobs=True, top_logprobs=21), "top_logprobs", match="at most 20")
    bad(lambda: chat(logprobs=3), "logprobs", match="boolean")
    bad(lambda: chat(echo=True), "echo", code="unsupported_parameter")
    bad(lambda: chat(response_format={"type": "xml"}), "response_format")
    bad(lambda: chat(response_format={"type": "json_schema"}), "response_format")
    bad(lambda: chat(guided_choice=[]), "guided_choice")
    bad(lambda: chat(guided_json={"type": "objekt"}), "guided_json", code="invalid_schema")
    bad(lambda: chat(guided_regex="a", guided_choice=["a"]), code="conflicting_parameters")
    bad(lambda: completion(structured_outputs={"regex": "(("}), "structured_outputs.regex", code="invalid_schema")
    bad(lambda: chat(max_completion_tokens=0), "max_completion_tokens")


@pytest.mark.parametrize(
    ("field", "value", "neutral"),
    [
        ("min_tokens", 3, 0),
        ("stop_token_ids", [5], []),
        ("include_stop_str_in_output", True, False),
        ("skip_special_tokens", False, True),
        ("typical_p", 0.9, 1.0),
        ("use_beam_search", True, False),
        ("truncate_prompt_tokens", 8, None),
        ("bad_words", ["x"], []),
        ("allowed_token_ids", [1, 2], None),
        ("guided_whitespace_pattern", " ", None),
        ("guided_decoding_backend", "xgrammar", "auto"),
        ("priority", 2, 0),
        ("logprob_token_ids", [3, 4], []),
        ("prediction", {"type": "content", "content": "x"}, None),
    ],
)
def test_fields_this_server_does_not_act_on_are_400s_unless_they_ask_for_nothing(
    field: str, value: Any, neutral: Any
) -> None:
    """A request is never answered as if a field it set meant nothing: set to anything but its
    default, a vLLM or OpenAI field the server does not implement is a 400 naming it."""
    for parse in (completion, chat):
        bad(lambda: parse(**{field: value}), field, code="unsupported_parameter")  # noqa: B023
        assert parse(**{field: neutral}).model == "m"
    bad(lambda: chat(chat_template="{{ x }}"), "chat_template", code="unsupported_parameter")
    bad(lambda: chat(continue_final_message=True), "continue_final_message", code="unsupported_parameter")
    assert chat(add_generation_prompt=True, chat_template_kwargs={}).model == "m"
    assert completion(chat_template="ignored on completions", user="u").model == "m"


# --------------------------------------------------------------------------- responses


def test_error_body_shape_and_types() -> None:
    e = ApiError(404, "no such model", param="model", code="model_not_found")
    assert e.body() == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert ApiError(429, "x").type == "rate_limit_error"
    assert ApiError(503, "x").type == "server_error"


def test_request_ids() -> None:
    assert oai.new_request_id("completion").startswith("cmpl-")
    assert oai.new_request_id("chat").startswith("chatcmpl-")
    ids = [oai.new_request_id("chat") for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    # 32 hex digits after the prefix, as uuid4().hex gave: clients and logs see the same shape.
    assert all(len(i) == len("chatcmpl-") + 32 and int(i[len("chatcmpl-") :], 16) >= 0 for i in ids)


def test_request_ids_differ_between_gateway_processes() -> None:
    """Two gateways (two processes) never hand out the same ids: each draws its own prefix."""
    code = "from services.gateway.openai_api import new_request_id as n; print(n('chat'))"
    got = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(got) == 2


def test_full_responses() -> None:
    use = oai.usage(3, 2)
    assert use == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    c = oai.full_response("completion", "cmpl-1", 10, "m", "ab", "length", use)
    assert c["object"] == "text_completion"
    assert c["choices"] == [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "length"}]
    assert c["usage"] == use
    ch = oai.full_response("chat", "chatcmpl-1", 10, "m", "ab", "stop", use)
    assert ch["object"] == "chat.completion"
    assert ch["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert (ch["id"], ch["created"], ch["model"]) == ("chatcmpl-1", 10, "m")


def parse_sse(raw: bytes) -> list[Any]:
    """Split an SSE body into its data payloads, checking the framing on the way."""
    assert raw.endswith(b"\n\n")
    out: list[Any] = []
    for frame in raw.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        payload = frame[len(b"data: ") :]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def test_sse_chunks_completion() -> None:
    raw = (
        oai.sse(oai.chunk("completion", "cmpl-1", 5, "m", "he", first=True))
        + oai.sse(oai.chunk("completion", "cmpl-1", 5, "m", "", "stop"))
        + oai.SSE_DONE
    )
    first, last, done = parse_sse(raw)
    assert first == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": "he", "logprobs": None, "finish_reason": None}],
    }
    assert last["choices"][0]["finish_reason"] == "stop"
    assert done == "[DONE]"


def test_sse_chunks_chat_and_usage() -> None:
    first = oai.chunk("chat", "c", 1, "m", "", first=True, include_usage=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None
    mid = oai.chunk("chat", "c", 1, "m", "x")
    assert mid["choices"][0]["delta"] == {"content": "x"}
    assert "usage" not in mid
    end = oai.chunk("chat", "c", 1, "m", "", "length")
    assert end["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    u = oai.usage_chunk("chat", "c", 1, "m", oai.usage(1, 2))
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 3
    assert oai.sse(u).startswith(b"data: {") and oai.sse(u).endswith(b"}\n\n")


def test_model_list() -> None:
    assert oai.model_list(["a"], 9) == {
        "object": "list",
        "data": [{"id": "a", "object": "model", "created": 9, "owned_by": "cascade"}],
    }


def test_unset_sampling_fields_take_the_models_defaults_then_openais() -> None:
    from services.gateway.core import sampling_params

    bare = completion()
    assert (sampling_params(bare, 8, {}).temperature, sampling_params(bare, 8, {}).top_p) == (1.0, 1.0)
    model = {"temperature": 0.6, "top_p": 0.9}
    p = sampling_params(bare, 8, model)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.6, 0.9, 8)
    given = completion(temperature=0, top_p=0.5)
    p = sampling_params(given, 8, model)
    assert (p.temperature, p.top_p) == (0.0, 0.5)  # what the request says wins
    # top_k, min_p and repetition_penalty from generation_config.json too, as vLLM takes them.
    model = {"top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1}
    p = sampling_params(bare, 8, model)
    assert (p.top_k, p.min_p, p.repetition_penalty) == (50, 0.05, 1.1)
    p = sampling_params(completion(top_k=-1, min_p=0, repetition_penalty=1.0), 8, model)
    assert (p.top_k, p.min_p, p.repetition_penalty) == (0, 0.0, 1.0)


def test_logprob_and_penalty_fields_are_honoured() -> None:
    s = chat(logprobs=True, top_logprobs=3, prompt_logprobs=2, presence_penalty=0.5, frequency_penalty=-1)
    assert (s.logprobs, s.prompt_logprobs, s.presence_penalty, s.frequency_penalty) == (3, 2, 0.5, -1.0)
    assert chat(logprobs=True).logprobs == 0 and chat(logprobs=False).logprobs is None
    assert (completion(top_k=-1).top_k, completion(top_k=40).top_k, completion(min_p=0.1).min_p) == (0, 40, 0.1)
    assert completion().top_k is None and completion().repetition_penalty is None  # the model's defaults then
    bad(lambda: completion(top_k=-2), "top_k")
    bad(lambda: completion(min_p=1.5), "min_p")
    c = completion(logprobs=2, echo=True, repetition_penalty=1.3)
    assert (c.logprobs, c.echo, c.repetition_penalty) == (2, True, 1.3)
    # echo with logprobs: the worker computes the prompt's logprobs too, with the same top count.
    assert c.worker_prompt_logprobs == 2
    assert completion(echo=True).worker_prompt_logprobs is None
    assert completion(logprobs=0).worker_prompt_logprobs is None


def test_logprob_shapes() -> None:
    from cascade.messages import TokenLogprob

    text_of = {1: "a", 2: "é", 3: "c"}.__getitem__
    e = TokenLogprob(2, -0.5, [2, 3], [-0.5, -1.0], 1)
    ch = oai.chat_logprobs([e], text_of)
    assert ch == {
        "content": [
            {
                "token": "é",
                "logprob": -0.5,
                "bytes": [195, 169],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
                    {"token": "c", "logprob": -1.0, "bytes": [99]},
                ],
            }
        ],
        "refusal": None,
    }
    c = oai.completion_logprobs([(1, None), (2, e)], text_of)
    assert c == {
        "tokens": ["a", "é"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"é": -0.5, "c": -1.0}],
        "text_offset": [0, 1],
    }
    p = oai.vllm_prompt_logprobs([1, 2], [None, e], text_of)
    assert p == [
        None,
        {
            "2": {"logprob": -0.5, "rank": 1, "decoded_token": "é"},
            "3": {"logprob": -1.0, "rank": 2, "decoded_token": "c"},
        },
    ]


def test_structured_output_fields_become_one_grammar() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
            "response_format",
        ),
        ({"guided_json": '{"type": "array"}'}, "guided_json"),
        ({"guided_regex": "[a-z]+"}, "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "guided_choice"),
        ({"guided_grammar": 'start: "x"'}, "guided_grammar"),
        ({"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs.json"),
    ]
    for body, param in cases:
        s = chat(**body)
        assert s.grammar and s.grammar_param == param, body
    assert chat(response_format={"type": "text"}).grammar is None
