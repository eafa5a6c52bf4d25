"""Tool calling: OpenAI's `tools`/`tool_choice` validated, the grammar that forces a call in the
model's own format, and the parsers that turn what the model wrote back into OpenAI `tool_calls`,
whole or streamed. Pure: text in, structures out.

Formats (vLLM's `--tool-call-parser` names):

- `hermes` (Hermes, Qwen2.5/Qwen3, SmolLM3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call;
- `llama3_json` (Llama 3.1+): the message is one JSON object `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`;
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`.

`required` and a named function are enforced with structured outputs: the grammar admits exactly
the format's calls to the allowed functions with arguments valid for their schemas, so the output
always parses. `auto` lets the model choose and parses what it wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from cascade import structured

Parser = Literal["hermes", "llama3_json", "mistral"]
PARSERS: tuple[Parser, ...] = ("hermes", "llama3_json", "mistral")


class ToolError(ValueError):
    """A tools request this server cannot take: (message, param)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Tools:
    """A request's tools: the function definitions (as chat templates read them), the choice
    (`auto`, `none`, `required` or a function name) and whether several calls may come at once."""

    functions: list[dict[str, Any]]
    choice: str = "auto"  # "auto" | "none" | "required" | "function"
    name: str | None = None  # the named function, with choice "function"
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def allowed(self) -> list[dict[str, Any]]:
        if self.choice == "function":
            return [f for f in self.functions if f["function"]["name"] == self.name]
        return self.functions


def parse_tools(body: dict[str, Any]) -> Tools | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list", "tools")
    functions = []
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
        if name in names:
            raise ToolError(f"tools[{i}]: the function name {name!r} is used twice", f"tools[{i}].function.name")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]")
        # As the client sent it (templates render `tool | tojson`, key order and all), nulls dropped.
        functions.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if choice is None or choice in ("auto", "none", "required"):
        return Tools(functions, choice or "auto", None, parallel)
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict):
        raise ToolError(
            "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if fn.get("name") not in names:
        raise ToolError(f"tool_choice names {fn.get('name')!r}, which is not among the tools", "tool_choice")
    return Tools(functions, "function", fn["name"], parallel)


# --------------------------------------------------------------------------- forcing a call


def _call_schema(tools: Tools, args_key: str) -> dict[str, Any]:
    """A JSON schema for one call of an allowed function, in the format's key names."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["function"]["name"]}, args_key: _parameters(f)},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for f in tools.allowed()
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    # The JSON as chat templates show calls (json.dumps' separators), no free whitespace: a model
    # may not pad a call for ever.
    return {**schema, "x-guidance": _COMPACT}


_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if isinstance(params, dict) else {"type": "object", "properties": {}}


def forced_grammar(tools: Tools, parser: Parser, special: Collection[int] = ()) -> str:
    """The grammar that admits only calls, in the parser's format (one, or with parallel calls
    several), to the allowed functions with valid arguments. `special`: the format's markers the
    tokenizer has as special tokens (`special_markers`); the grammar then asks for the token, as
    the model was trained to write it, rather than its text spelled in pieces."""
    if parser == "llama3_json":
        # One JSON object per message: Llama 3's format has no list of calls.
        return structured.checked(structured_lark(f"start: %json{json.dumps(_call_schema(tools, 'parameters'))}"))
    if parser == "mistral":
        call = _call_schema(tools, "arguments")
        items: dict[str, Any] = {"type": "array", "items": call, "minItems": 1, "x-guidance": _COMPACT}
        if not tools.parallel:
            items["maxItems"] = 1
        ids = list(special)
        marker = f"<[{ids[0]}]>" if ids else '"[TOOL_CALLS]"'
        return structured.checked(structured_lark(f"start: {marker} %json{json.dumps(items)}"))
    call_json = json.dumps(_call_schema(tools, "arguments"))
    more = ' ("\\n" call)*' if tools.parallel else ""
    lark = f'start: call{more}\ncall: "<tool_call>\\n" %json{call_json} "\\n</tool_call>"'
    return structured.checked(structured_lark(lark))


# The text each format marks its calls with, where a tokenizer may have it as a special token.
_MARKERS: dict[Parser, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]",),
}


def special_markers(parser: Parser, encode: Callable[[str], list[int]], special_ids: Collection[int]) -> list[int]:
    """The parser's markers that the model's tokenizer has as special tokens: decoding must keep
    them in the text (vLLM turns skip_special_tokens off for tool parsers), or a model that
    writes the marker as its special token would never have its calls parsed."""
    out = []
    for marker in _MARKERS[parser]:
        ids = encode(marker)
        if len(ids) == 1 and ids[0] in special_ids:
            out.append(ids[0])
    return out


def structured_lark(text: str) -> str:
    import llguidance

    return str(llguidance.LLMatcher.grammar_from_lark(text))


def infer_parser(rendered: str) -> Parser:
    """The format a chat template teaches, from the template rendered with a tool."""
    if "[AVAILABLE_TOOLS]" in rendered or "[TOOL_CALLS]" in rendered:
        return "mistral"
    if "<tool_call>" in rendered:
        return "hermes"
    if "Environment: ipython" in rendered or ('"parameters"' in rendered and "<|start_header_id|>" in rendered):
        return "llama3_json"
    return "hermes"


# --------------------------------------------------------------------------- parsing


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(obj: Any, args_key: str) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _json_prefix(text: str) -> tuple[Any, int] | None:
    """The JSON value at the start of `text` (after whitespace) and where it ends, or None."""
    s = text.lstrip()
    try:
        obj, end = json.JSONDecoder().raw_decode(s)
    except json.JSONDecodeError:
        return None
    return obj, len(text) - len(s) + end


def parse(text: str, parser: Parser) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) from a whole message. Text that is not a well-formed call stays
    content, as vLLM's parsers leave it."""
    if parser == "hermes":
        calls: list[dict[str, Any]] = []
        content: list[str] = []
        rest = text
        while True:
            i = rest.find("<tool_call>")
            if i < 0:
                content.append(rest)
                break
            content.append(rest[:i])
            j = rest.find("</tool_call>", i)
            body = rest[i + len("<tool_call>") : j if j >= 0 else len(rest)]
            got = _json_prefix(body)
            call = _call(got[0], "arguments") if got else None
            if call is None:
                content.append(rest[i:])
                break
            calls.append(call)
            rest = rest[j + len("</tool_call>") :] if j >= 0 else ""
        joined = "".join(content).strip()
        return (joined or None) if calls else text, calls
    if parser == "mistral":
        i = text.find("[TOOL_CALLS]")
        if i < 0:
            return text, []
        got = _json_prefix(text[i + len("[TOOL_CALLS]") :])
        items = got[0] if got else None
        items = [items] if isinstance(items, dict) else items
        calls = [c for c in (_call(o, "arguments") for o in items or []) if c is not None] if items else []
        if not calls:
            return text, []
        return text[:i].strip() or None, calls
    s = text.strip()
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>") :]
    got = _json_prefix(s)
    if got is None or got[1] != len(s):
        return text, []
    objs = got[0] if isinstance(got[0], list) else [got[0]]
    calls = [c for c in (_call(o, "parameters") for o in objs) if c is not None]
    return (None, calls) if calls and len(calls) == len(objs) else (text, [])


# The head of a Hermes call up to where its arguments begin, in the order chat templates and the
# forced grammar write it: what lets the arguments stream while the model writes them.
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


def _value_end(text: str) -> int | None:
    """Where the JSON object or array at the start of `text` ends (brackets and strings
    counted, nothing validated), or None while it is open."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


@dataclass
class _LiveCall:
    """A Hermes call whose arguments are streaming: its delta index, the arguments text sent so
    far, and whether they ended (then the rest of its block is awaited)."""

    index: int
    args: str = ""
    closed: bool = False


@dataclass
class StreamParser:
    """Streams a message with tool calls as OpenAI does: content deltas while the model writes
    text, then the calls as `tool_calls` deltas. With `hermes` a call's first delta carries its
    `index`, `id`, `type` and `function.name` as soon as the model has written the name, and its
    `function.arguments` follow in fragments as the model writes them (what the official client's
    stream helpers accumulate); the other formats, and a Hermes call whose keys come in another
    order, go out whole once complete. Text that may be the start of a call is held back until
    it is known not to be one."""

    parser: Parser
    forced: bool = False
    _buf: str = ""
    _in_calls: bool = False
    _content: str = ""  # a block that looked like a call and was not one: content after all
    _live: _LiveCall | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)

    def _marker(self) -> str:
        return {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": "{"}[self.parser]

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, tool_calls delta items: at most one per call index)."""
        self._buf += text
        if not self._in_calls:
            marker = self._marker()
            if self.parser == "llama3_json":
                s = self._buf.lstrip()
                if not s:
                    return "", []
                if self.forced or s.startswith(("{", "<|python_tag|>")) or "<|python_tag|>".startswith(s):
                    self._in_calls = True
                else:
                    out, self._buf = self._buf, ""
                    return out, []
            else:
                i = self._buf.find(marker)
                if i < 0:
                    # Hold back a tail that could be the marker's beginning.
                    keep = next((k for k in range(len(marker) - 1, 0, -1) if self._buf.endswith(marker[:k])), 0)
                    cut = len(self._buf) - keep
                    out, self._buf = self._buf[:cut], self._buf[cut:]
                    return out, []
                out, self._buf = self._buf[:i], self._buf[i:]
                self._in_calls = True
                calls = self._drain(final=False)
                return out + self._take_content(), calls
        calls = self._drain(final=False)
        return self._take_content(), calls

    def _take_content(self) -> str:
        out, self._content = self._content, ""
        return out

    def _drain(self, final: bool) -> list[dict[str, Any]]:
        if self.parser != "hermes":
            if not final:
                return []
            _, calls = parse(self._buf, self.parser)
            return self._emit(calls)
        deltas: list[dict[str, Any]] = []
        while True:
            if self._live is not None:
                deltas += self._stream_args()
                if self._live is not None:
                    return _merged(deltas)
                continue
            i = self._buf.find("<tool_call>")
            j = self._buf.find("</tool_call>")
            if i >= 0 and (j < 0 or i < j):
                head = _HERMES_HEAD.match(self._buf, i + len("<tool_call>"))
                if head is not None:
                    try:
                        name = json.loads(f'"{head.group(1)}"')
                    except json.JSONDecodeError:
                        name = None
                    if name:
                        if self._buf[:i].strip():
                            self._content += self._buf[:i]
                        self._buf = self._buf[head.end() :]
                        self._live = _LiveCall(len(self.calls))
                        fn = {"name": name, "arguments": ""}
                        call: dict[str, Any] = {"id": new_call_id(), "type": "function", "function": fn}
                        self.calls.append(call)
                        deltas.append({"index": self._live.index, **call, "function": dict(fn)})
                        continue
            if j < 0:
                if final and self._buf.strip():
                    _, calls = parse(self._buf, "hermes")
                    deltas += self._emit(calls)
                    if calls:
                        self._buf = ""
                return _merged(deltas)
            block = self._buf[: j + len("</tool_call>")]
            _, calls = parse(block, "hermes")
            deltas += self._emit(calls)
            if not calls:
                self._content += block
            self._buf = self._buf[j + len("</tool_call>") :]

    def _stream_args(self) -> list[dict[str, Any]]:
        """The next fragment of the live call's arguments; the call ends with its block."""
        live = self._live
        assert live is not None
        out: list[dict[str, Any]] = []
        if not live.closed:
            end = _value_end(live.args + self._buf)
            take = len(self._buf) if end is None else end - len(live.args)
            piece, self._buf = self._buf[:take], self._buf[take:]
            if piece:
                live.args += piece
                self.calls[live.index]["function"]["arguments"] = live.args
                out.append({"index": live.index, "function": {"arguments": piece}})
            live.closed = end is not None
        if live.closed:
            # The object that held name and arguments closes, then the block: what lies between
            # is the format's own, not content.
            j = self._buf.find("</tool_call>")
            if j >= 0:
                self._buf = self._buf[j + len("</tool_call>") :]
                self._live = None
        return out

    def _emit(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for c in calls:
            out.append({"index": len(self.calls), **c})
            self.calls.append(c)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is left at the end: held-back content, or the last calls."""
        if not self._in_calls:
            out, self._buf = self._buf, ""
            return out, []
        calls = self._drain(final=True)
        if self._live is not None:
            # Cut short (max_tokens) inside a streamed call: what was sent stays sent.
            self._live, self._buf = None, ""
        if not calls and self._buf:
            # It looked like a call and was not one: it was content after all.
            self._content += self._buf
            self._buf = ""
        return self._take_content(), calls


def _merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One delta item per call index: a call's header and its first argument fragments, sent in
    the same step, go out as one item (as OpenAI's do)."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"]:
            fn = out[-1].setdefault("function", {})
            fn["arguments"] = fn.get("arguments", "") + d.get("function", {}).get("arguments", "")
        else:
            out.append({**d, "function": dict(d.get("function", {}))})
    return out
