"""Chat templates rendered exactly as transformers 5 renders them.

transformers is the reference (`tokenizer.apply_chat_template(messages, tools=...,
add_generation_prompt=True, tokenize=False)`), so everything a template can see is built the
way `transformers.utils.chat_template_utils` builds it:

- the same Jinja environment: sandboxed and immutable, `trim_blocks`, `lstrip_blocks`, the
  `loopcontrols` extension and the `{% generation %}` tag (templates that mark assistant text
  for training masks use it, and would not even parse without it);
- the same helpers: `raise_exception`, `strftime_now`, a `tojson` filter that does not escape
  HTML and takes `indent`/`separators`/`sort_keys`, the restricted `dict` and `namespace`;
- the same variables: `messages` (keys whose value is None dropped, reasoning aliases filled),
  `tools`, `documents`, `add_generation_prompt`, and the tokenizer's named special tokens
  (`bos_token`, `eos_token`, ... and model-specific ones like `image_token`).

Where templates come from, in the order transformers 5's tokenizer reads them, is
`read_chat_templates`; which one of several named templates is used, `select_template`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Several named templates, or one.
Templates = str | dict[str, str]

# Names a message's reasoning comes under; the first is the one templates read (transformers
# fills it, and `thinking` for the templates that read that, from whichever is given).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(Exception):
    """The chat cannot be rendered: the model has no template, the template refused these
    messages (`raise_exception`), or it failed on them. The message says which, for the client."""


class NoChatTemplate(ChatTemplateError):
    """The model's tokenizer has no chat template (transformers and vLLM refuse chat then)."""


# --------------------------------------------------------------------------- sources


def read_chat_templates(model_dir: Path, tokenizer_config: Mapping[str, Any]) -> Templates | None:
    """The model's chat template(s), from where transformers 5's tokenizer takes them:

    1. `chat_template.jinja` (the default) and `additional_chat_templates/<name>.jinja`: when
       any of these exist they win over the tokenizer config, as in `_from_pretrained`;
    2. `tokenizer_config.json` `chat_template`: a string, or a list of {"name", "template"};
    3. `chat_template.json` (`{"chat_template": ...}`): AutoTokenizer never reads this file, but
       AutoProcessor and vLLM do (older multimodal checkpoints keep their only template there),
       so it is used only when the tokenizer itself has none.
    """
    templates: dict[str, str] = {}
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    found = _from_config_value(tokenizer_config.get("chat_template"))
    if found is not None:
        return found
    legacy = model_dir / "chat_template.json"
    if legacy.is_file():
        return _from_config_value(json.loads(legacy.read_text(encoding="utf-8")).get("chat_template"))
    return None


def _from_config_value(value: Any) -> Templates | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in value if isinstance(t, dict)}
        if named and all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()):
            return named
    raise ValueError(f"chat_template must be a string or a list of named templates, got {type(value).__name__}")


def select_template(templates: Templates, tools: Sequence[Any] | None) -> str:
    """The template transformers' `get_chat_template` picks: with several named ones,
    `tool_use` when tools are given (even an empty list), else `default`."""
    if isinstance(templates, str):
        return templates
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(
        f"this model has several chat templates ({', '.join(sorted(templates))}) and none is named 'default'"
    )


# --------------------------------------------------------------------------- environment


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body as is. transformers uses the
    tag to find assistant text for training masks, which serving never asks for."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads a class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates write prompts, not HTML.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    # Local time, as transformers does: Llama 3.2's template writes today's date this way.
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the dict type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so a template cannot reach interpreter
    internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's Namespace signature: `self` may be a key
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


_ENV = _environment()


@lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


# --------------------------------------------------------------------------- rendering

# Errors a template can raise while rendering: its own raise_exception and Jinja's errors
# (undefined names, sandbox refusals), and the Python errors of the operations it runs on the
# messages (a string plus a list, a missing index). Templates are data, not our code: any of these
# means "this template cannot render these messages", which the client hears as a 400.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError)


def render(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    context: Mapping[str, Any] | None = None,
) -> str:
    """`source` rendered as transformers renders it; `context` is the tokenizer's named special
    tokens (bos_token, eos_token, ...), which transformers passes as its `special_tokens_map`."""
    try:
        template = _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not parse: {e}") from None
    chat = _alias_reasoning([{k: _plain(v) for k, v in m.items() if v is not None} for m in messages])
    try:
        return template.render(
            messages=chat,
            tools=_plain(list(tools)) if tools is not None else None,
            documents=_plain(list(documents)) if documents is not None else None,
            add_generation_prompt=add_generation_prompt,
            **{k: _plain(v) for k, v in (context or {}).items()},
        )
    except _RENDER_ERRORS as e:
        # raise_exception's message is the template's own words for what is wrong with the chat.
        raise ChatTemplateError(f"the chat template cannot render these messages: {e}") from None


def _alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in chat:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _plain(value: Any) -> Any:
    """A fresh copy made of JSON types only, as transformers builds what a template sees: the
    template never touches the caller's objects, and the sandbox never meets an object whose
    methods it does not know."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums) back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def join_text_parts(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose content is a list of text parts get it as one string, the parts joined
    with newlines (vLLM's "string" content format), for templates that print `content`."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            texts = [p["text"] for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
            m = {**m, "content": "\n".join(texts)}
        out.append(dict(m))
    return out


# --------------------------------------------------------------------------- content format


@lru_cache(maxsize=64)
def wants_content_parts(source: str) -> bool:
    """Whether the template loops over a message's `content` (it expects OpenAI content parts,
    `[{"type": "text", "text": ...}]`), rather than printing it as a string.

    Templates written for plain chat do `'...' + message['content']`, which fails on a list;
    ones written for multimodal input iterate over the parts. Like vLLM's "auto" content
    format, this reads the template's syntax tree once: a `for` over `<x>.content` or
    `<x>['content']` (through filters such as `| list`) means parts."""
    try:
        tree = _ENV.parse(source)
    except jinja2.TemplateSyntaxError:
        return False  # rendering reports the syntax error
    return any(_reads_content(loop.iter) for loop in tree.find_all(jinja2.nodes.For))


def _reads_content(node: jinja2.nodes.Node) -> bool:
    for n in _unwrap(node):
        if isinstance(n, jinja2.nodes.Getattr) and n.attr == "content":
            return True
        if isinstance(n, jinja2.nodes.Getitem) and isinstance(n.arg, jinja2.nodes.Const) and n.arg.value == "content":
            return True
    return False


def _unwrap(node: jinja2.nodes.Node) -> Iterator[jinja2.nodes.Node]:
    # `message.content | selectattr(...)`, `message['content'][1:]`: look through filters, tests
    # and slices to the expression they apply to.
    yield node
    if isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) and node.node is not None:
        yield from _unwrap(node.node)
    elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        yield from _unwrap(node.node)
