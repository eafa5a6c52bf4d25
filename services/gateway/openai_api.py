"""The OpenAI wire format: request validation, response bodies, stream chunks, errors.

Pure functions: a decoded JSON body goes in, a `GenerationSpec` or an
`ApiError` comes out; results go in, dicts shaped exactly like OpenAI's come
out. Fields this server cannot honour are refused with a 400 that names them,
rather than silently ignored; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from cascade import structured
from cascade.messages import TokenLogprob
from services.gateway.tools import ToolError, Tools, parse_tools

Kind = Literal["completion", "chat"]

# OpenAI's own limits where it has them; generous where the model is the limit anyway.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs; vLLM's default max_logprobs too
MAX_N = 16
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class ApiError(Exception):
    """An error answered as an OpenAI error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status)
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    """A validated completion or chat request, before tokenisation."""

    kind: Kind
    model: str
    prompt: str | None = None  # completion text to tokenise
    prompt_ids: list[int] | None = None  # completion given as token ids
    messages: list[dict[str, Any]] | None = None  # chat
    max_tokens: int | None = None  # None: the endpoint's default
    # None: not given; the model's generation_config.json default applies, else OpenAI's (1.0).
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    n: int = 1
    # None: not asked. Chat: top_logprobs when logprobs is true; completions: the logprobs int.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # vLLM's extension (both endpoints)
    echo: bool = False  # completions: the prompt (and with logprobs its logprobs) leads the text
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extensions; None: not given (the model's generation_config.json default applies).
    repetition_penalty: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    # Structured outputs: the llguidance grammar every token is masked by (None: free text), and
    # the request parameter it came from.
    grammar: str | None = None
    grammar_param: str | None = None
    tools: Tools | None = None  # chat: the functions the model may call, and how
    keep_special: list[int] = field(default_factory=list)  # special tokens the text keeps (tool markers)

    @property
    def worker_prompt_logprobs(self) -> int | None:
        """What the worker computes for the prompt: prompt_logprobs, or with echo the logprobs."""
        k = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            k = max(k or 0, self.logprobs)
        return k


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise invalid("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


def parse_completion(body: dict[str, Any]) -> GenerationSpec:
    common = _common(body, "completion")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise invalid("echo must be a boolean", "echo")
    if _present(body, "best_of") and _int(body, "best_of", lo=1) != common["n"]:
        raise _unsupported("best_of", "best_of must equal n (choices are not ranked by this server)")
    if body.get("suffix"):
        raise _unsupported("suffix")
    logprobs = None
    if _present(body, "logprobs"):
        logprobs = _int(body, "logprobs", lo=0)
        if logprobs > MAX_TOP_LOGPROBS:
            raise invalid(f"logprobs must be at most {MAX_TOP_LOGPROBS}, got {logprobs}", "logprobs")
    prompt, prompt_ids = _prompt(body)
    return GenerationSpec(
        kind="completion", prompt=prompt, prompt_ids=prompt_ids, logprobs=logprobs, echo=bool(echo), **common
    )


def parse_chat(body: dict[str, Any]) -> GenerationSpec:
    common = _common(body, "chat")
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise invalid("logprobs must be a boolean", "logprobs")
    top = None
    if _present(body, "top_logprobs"):
        top = _int(body, "top_logprobs", lo=0)
        if top > MAX_TOP_LOGPROBS:
            raise invalid(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
        if not lp:
            raise invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    common["logprobs"] = (top or 0) if lp else None
    if body.get("functions") or body.get("function_call"):
        raise _unsupported("functions", "functions/function_call are deprecated: send tools and tool_choice")
    try:
        tools = parse_tools(body)
    except ToolError as e:
        raise invalid(str(e), e.param) from None
    if tools is not None and tools.choice != "none" and common["grammar"] is not None:
        # Both would constrain the same output: a call in the model's format, or the given shape.
        raise invalid(
            f"tools (tool_choice {tools.choice!r}) cannot go with {common['grammar_param']}",
            common["grammar_param"],
            code="conflicting_parameters",
        )
    common["tools"] = tools
    if body.get("echo"):
        raise _unsupported("echo", "echo is a /v1/completions parameter")
    return GenerationSpec(kind="chat", messages=_messages(body), **common)


def _common(body: dict[str, Any], kind: Kind) -> dict[str, Any]:
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter", "model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string", "model")
    n = _int(body, "n", lo=1) if _present(body, "n") else 1
    if n > MAX_N:
        raise invalid(f"n must be at most {MAX_N}, got {n}", "n")
    prompt_logprobs = None
    if _present(body, "prompt_logprobs"):
        prompt_logprobs = _int(body, "prompt_logprobs", lo=0)
        if prompt_logprobs > MAX_TOP_LOGPROBS:
            raise invalid(f"prompt_logprobs must be at most {MAX_TOP_LOGPROBS}", "prompt_logprobs")
    # Chat deprecates max_tokens for max_completion_tokens; when both come, the newer one wins.
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens") if kind == "chat" else ("max_tokens",):
        if _present(body, name):
            max_tokens = _int(body, name, lo=1)
    temperature = _number(body, "temperature", 0.0, 2.0) if _present(body, "temperature") else None
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True) if _present(body, "top_p") else None
    penalties = {
        name: _number(body, name, -2.0, 2.0) if _present(body, name) else 0.0
        for name in ("presence_penalty", "frequency_penalty")
    }
    if _present(body, "repetition_penalty"):
        penalties["repetition_penalty"] = _number(body, "repetition_penalty", 0.0, 100.0, lo_open=True)
    if _present(body, "top_k"):
        k = _int(body, "top_k", lo=-1)
        penalties["top_k"] = max(k, 0)  # vLLM: -1 (or 0) turns it off
    if _present(body, "min_p"):
        penalties["min_p"] = _number(body, "min_p", 0.0, 1.0)
    if body.get("logit_bias"):
        raise _unsupported("logit_bias")
    _refuse_unhonoured(body, kind)
    seed = _int(body, "seed") if _present(body, "seed") else None
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(so, dict):
            raise invalid("stream_options must be an object", "stream_options")
        iu = so.get("include_usage", False)
        if iu is not None and not isinstance(iu, bool):
            raise invalid("stream_options.include_usage must be a boolean", "stream_options.include_usage")
        include_usage = bool(iu)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", "user")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise invalid("ignore_eos must be a boolean", "ignore_eos")
    grammar, grammar_param = _structured(body)
    return {
        "grammar": grammar,
        "grammar_param": grammar_param,
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": _stop(body),
        "stream": stream,
        "include_usage": include_usage,
        "user": user,
        "ignore_eos": bool(ignore_eos),
        "n": n,
        "prompt_logprobs": prompt_logprobs,
        **penalties,
    }


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _structured(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """The request's one output constraint as a grammar, from OpenAI's response_format, vLLM's
    guided_* extras or its structured_outputs object; (None, None) for free text. More than one
    constraint, or one the grammar engine cannot compile, is a 400 naming the parameter."""
    found: list[tuple[str, str, Any]] = []  # (param, kind, value)
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise invalid("response_format.type must be text, json_object or json_schema", "response_format")
        if rf["type"] == "json_object":
            found.append(("response_format", "json_object", True))
        elif rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("name"), str):
                raise invalid("response_format.json_schema must be an object with a name", "response_format")
            schema = js.get("schema", {})
            strict = js.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise invalid("response_format.json_schema.strict must be a boolean", "response_format")
            # strict or not, the schema is enforced (as vLLM does): the output always validates.
            found.append(("response_format", "json", schema))
    for name, kind in _GUIDED.items():
        if _present(body, name):
            found.append((name, kind, body[name]))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise invalid("structured_outputs must be an object", "structured_outputs")
        for kind in ("json", "regex", "choice", "grammar"):
            if so.get(kind) is not None:
                found.append((f"structured_outputs.{kind}", kind, so[kind]))
        if so.get("json_object"):
            found.append(("structured_outputs.json_object", "json_object", True))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(sorted({p for p, _, _ in found}))
        raise invalid(
            f"only one output constraint may be given, got {names}", found[1][0], code="conflicting_parameters"
        )
    param, kind, value = found[0]
    try:
        if kind == "json_object":
            return structured.any_json_object(), param
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = orjson.loads(value)
                except orjson.JSONDecodeError as e:
                    raise invalid(f"{param} is not valid JSON: {e}", param) from None
            if not isinstance(value, dict | bool):
                raise invalid(f"{param} must be a JSON schema (an object)", param)
            return structured.from_json_schema(value), param
        if kind == "regex":
            if not isinstance(value, str):
                raise invalid(f"{param} must be a string", param)
            return structured.from_regex(value), param
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise invalid(f"{param} must be a non-empty list of non-empty strings", param)
            return structured.from_choice(value), param
        if not isinstance(value, str):
            raise invalid(f"{param} must be a string", param)
        return structured.from_grammar(value), param
    except structured.GrammarError as e:
        raise invalid(f"{param} cannot be compiled: {e}", param, code="invalid_schema") from None


def _present(body: dict[str, Any], name: str) -> bool:
    return body.get(name) is not None  # OpenAI treats an explicit null as "not given"


def _int(body: dict[str, Any], name: str, lo: int | None = None) -> int:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"{name} must be an integer, got {_show(v)}", name)
    if lo is not None and v < lo:
        raise invalid(f"{name} must be at least {lo}, got {v}", name)
    return v


def _number(body: dict[str, Any], name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise invalid(f"{name} must be a number, got {_show(v)}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        span = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise invalid(f"{name} must be in {span}, got {v}", name)
    return float(v)


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}", "stop")
    if any(len(s) > MAX_STOP_LENGTH for s in items):
        raise invalid(f"each stop sequence must be at most {MAX_STOP_LENGTH} characters", "stop")
    return [s for s in items if s]  # an empty stop string would end every completion at once


def _prompt(body: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("you must provide a prompt parameter", "prompt", code="missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, str):
        return p, None
    if isinstance(p, list):
        if not p:
            raise invalid("prompt must not be an empty list", "prompt")
        if all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise invalid(f"prompt holds {len(p)} strings; this server takes one prompt per request", "prompt")
            return p[0], None
        if len(p) == 1 and isinstance(p[0], list):
            p = p[0]  # [[ids...]]: one tokenised prompt
        if p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            if any(x < 0 for x in p):
                raise invalid("token ids in prompt must not be negative", "prompt")
            return None, list(p)
        if all(isinstance(x, list) for x in p):
            raise invalid(f"prompt holds {len(p)} token lists; this server takes one prompt per request", "prompt")
    raise invalid("prompt must be a string, a list with one string, or a list of token ids", "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat as the model's chat template reads it: each message keeps the OpenAI fields
    templates use (role, content, name, an assistant's tool_calls, a tool message's
    tool_call_id); other fields are dropped, and so are nulls (transformers drops them too)."""
    msgs = body.get("messages")
    if msgs is None:
        raise invalid("you must provide a messages parameter", "messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object", where)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {_show(role)}", f"{where}.role")
        content = m.get("content")
        if content is None:
            if role != "assistant":
                raise invalid(f"{where}.content is required for role {role}", f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"{where}.content[{j}]: only text content parts are supported", f"{where}.content")
        elif not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        msg: dict[str, Any] = {"role": role, "content": content}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid(f"{where}.name must be a string", f"{where}.name")
            msg["name"] = name
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise invalid(f"{where}.tool_calls is only allowed in assistant messages", f"{where}.tool_calls")
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            tcid = m.get("tool_call_id")
            if not isinstance(tcid, str):
                raise invalid(f"{where}.tool_call_id is required for role tool", f"{where}.tool_call_id")
            msg["tool_call_id"] = tcid
        out.append({k: v for k, v in msg.items() if v is not None})
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier tool calls. OpenAI sends `arguments` as a JSON string; chat templates
    read it as an object (`tool_call.arguments | tojson`, `.items()`), as transformers documents and
    vLLM passes it, so it is parsed here."""
    if not isinstance(calls, list):
        raise invalid(f"{where} must be a list", where)
    out = []
    for j, c in enumerate(calls):
        at = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(c, dict) or c.get("type", "function") != "function" or not isinstance(fn, dict):
            raise invalid(f"{at} must be a function call: {{'type': 'function', 'function': {{...}}}}", at)
        if not isinstance(fn.get("name"), str):
            raise invalid(f"{at}.function.name must be a string", f"{at}.function.name")
        args = fn.get("arguments")
        if args is None or args == "":
            args = {}
        elif isinstance(args, str):
            try:
                args = orjson.loads(args)
            except orjson.JSONDecodeError as e:
                raise invalid(f"{at}.function.arguments is not valid JSON: {e}", f"{at}.function.arguments") from None
        if not isinstance(args, dict):
            raise invalid(f"{at}.function.arguments must be a JSON object", f"{at}.function.arguments")
        call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if c.get("id") is not None:
            if not isinstance(c["id"], str):
                raise invalid(f"{at}.id must be a string", f"{at}.id")
            call = {"id": c["id"], **call}
        out.append(call)
    return out


def _off(*neutral: Any) -> Callable[[Any], bool]:
    return lambda v: v in neutral


def _empty(v: Any) -> bool:
    return not v


# Fields of OpenAI's API and vLLM's extensions that this server does not act on, with the values
# that ask for nothing (vLLM's defaults): those are accepted, anything else is a 400 naming the
# field rather than an answer that quietly ignores it. Fields nobody defines stay ignored.
_NOT_HONOURED: dict[str, Callable[[Any], bool]] = {
    "min_tokens": _off(None, 0),
    "stop_token_ids": _empty,
    "include_stop_str_in_output": _off(None, False),
    "skip_special_tokens": _off(None, True),  # special tokens are always left out of the text
    "spaces_between_special_tokens": _off(None, True),
    "typical_p": _off(None, 1, 1.0),
    "use_beam_search": _off(None, False),
    "length_penalty": _off(None, 1, 1.0),
    "truncate_prompt_tokens": _off(None),
    "bad_words": _empty,
    "allowed_token_ids": _empty,
    "logits_processors": _empty,
    "return_tokens_as_token_ids": _off(None, False),
    "guided_whitespace_pattern": _off(None),
    "guided_decoding_backend": _off(None, "auto", "llguidance", "guidance"),
    "priority": _off(None, 0),
    "logprob_token_ids": _empty,
    "prompt_embeds": _off(None),
    "prediction": _off(None),
    "audio": _off(None),
    "modalities": _off(None, ["text"]),
}
_NOT_HONOURED_CHAT: dict[str, Callable[[Any], bool]] = {
    "add_generation_prompt": _off(None, True),
    "continue_final_message": _off(None, False),
    "chat_template": _off(None),
    "chat_template_kwargs": _empty,
    "documents": _empty,
}


def _refuse_unhonoured(body: dict[str, Any], kind: Kind) -> None:
    checks = {**_NOT_HONOURED, **(_NOT_HONOURED_CHAT if kind == "chat" else {})}
    for name, neutral in checks.items():
        if name in body and not neutral(body[name]):
            raise _unsupported(name, f"{name}={_show(body[name])} is not supported by this server")


def _unsupported(name: str, why: str | None = None) -> ApiError:
    return invalid(why or f"{name} is not supported by this server", name, code="unsupported_parameter")


def _show(v: Any) -> str:
    s = orjson.dumps(v).decode() if not isinstance(v, bytes) else repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# --------------------------------------------------------------------------- responses


# Request ids are a random prefix drawn once per process and a counter, 32 hex digits as uuid4's:
# uuid4 reads the kernel's random source, a syscall on every request's path (61 µs against 33 µs
# for the counter's id, run cold after 12 ms idle on this VM), and an id need only be unique,
# which 64 random bits per gateway process and a counter make it.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_request_id(kind: Kind) -> str:
    return f"{'chatcmpl-' if kind == 'chat' else 'cmpl-'}{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def object_name(kind: Kind, stream: bool) -> str:
    if kind == "completion":
        return "text_completion"
    return "chat.completion.chunk" if stream else "chat.completion"


def choice(
    kind: Kind,
    text: str,
    finish_reason: str | None,
    *,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    prompt_logprobs: list[Any] | None = None,
    message: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice of a whole response (chat: `message` replaces the plain text message)."""
    out: dict[str, Any]
    if kind == "completion":
        out = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs  # vLLM's extension, per choice on completions
        return out
    return {
        "index": index,
        "message": message if message is not None else {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def full_response(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    use: dict[str, int],
    *,
    choices: list[dict[str, Any]] | None = None,
    prompt_logprobs: list[Any] | None = None,
) -> dict[str, Any]:
    out = {
        "id": rid,
        "object": object_name(kind, False),
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices if choices is not None else [choice(kind, text, finish_reason)],
        "usage": use,
    }
    if kind == "chat" and prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs  # vLLM's extension, on the response for chat
    return out


def chunk(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    *,
    first: bool = False,
    include_usage: bool = False,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
    delta: dict[str, Any] | None = None,
    prompt_logprobs: list[Any] | None = None,
) -> dict[str, Any]:
    """One stream chunk with a text delta (chat: the first one also carries the role; `delta`
    replaces the text delta, for tool calls)."""
    ch: dict[str, Any]
    if kind == "completion":
        ch = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if prompt_logprobs is not None:
            ch["prompt_logprobs"] = prompt_logprobs
    else:
        d: dict[str, Any] = {}
        if first:
            d["role"] = "assistant"
        if delta is not None:
            d.update(delta)
        elif text or first:
            d["content"] = text
        ch = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}
    out: dict[str, Any] = {
        "id": rid,
        "object": object_name(kind, True),
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [ch],
    }
    if kind == "chat" and prompt_logprobs is not None:
        out["prompt_logprobs"] = prompt_logprobs
    if include_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last, which carries the figures
    return out


def usage_chunk(kind: Kind, rid: str, created: int, model: str, use: dict[str, int]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": object_name(kind, True),
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": use,
    }


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_list(names: list[str], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": created, "owned_by": "cascade"} for n in names],
    }


# --------------------------------------------------------------------------- log probabilities

TokenText = Callable[[int], str]


def _lp_item(text_of: TokenText, token: int, logprob: float) -> dict[str, Any]:
    t = text_of(token)
    return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: per token its text, log probability, UTF-8 bytes and the top ones."""
    content = []
    for e in entries:
        item = _lp_item(text_of, e.token, e.logprob)
        item["top_logprobs"] = [_lp_item(text_of, i, lp) for i, lp in zip(e.top_ids, e.top_logprobs, strict=True)]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(
    items: list[tuple[int, TokenLogprob | None]], text_of: TokenText, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs` for (token id, entry) pairs: an entry of None (the
    first prompt token, under echo) has no log probability. `offset`: text_offset of the first."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tok, e in items:
        t = text_of(tok)
        tokens.append(t)
        offsets.append(offset)
        offset += len(t)
        token_lps.append(None if e is None else e.logprob)
        if e is None:
            tops.append(None)
        else:
            top: dict[str, float] = {}
            for i, lp in zip(e.top_ids, e.top_logprobs, strict=True):
                top.setdefault(text_of(i), lp)
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(
    prompt_ids: list[int], entries: list[TokenLogprob | None], text_of: TokenText
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} for the token itself and the top ones."""
    out: list[dict[str, Any] | None] = []
    for tok, e in zip(prompt_ids, entries, strict=False):
        if e is None:
            out.append(None)
            continue
        d = {str(tok): {"logprob": e.logprob, "rank": e.rank, "decoded_token": text_of(tok)}}
        for r, (i, lp) in enumerate(zip(e.top_ids, e.top_logprobs, strict=True), 1):
            d.setdefault(str(i), {"logprob": lp, "rank": r, "decoded_token": text_of(i)})
        out.append(d)
    return out
