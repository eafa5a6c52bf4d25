"""Structured outputs through llguidance: a request's constraint becomes one grammar string, the
worker turns it into a token mask per step.

Why llguidance (and not xgrammar), measured in bench/results/grammar-engines.md (SmolLM2's 49k
vocabulary, a nested schema, a shared 2-core machine): a step's mask costs microseconds with
either (xgrammar's is the cheaper, by a few microseconds at the median and more at the worst
step), against milliseconds for the decode step it runs beside (services/worker/grammar.py);
llguidance compiles a schema about seven times faster, a cost every request pays. It also reads
Lark grammars and regexes as they are, and is one wheel with no dependencies, where xgrammar
pulls in triton and transformers at run time.

The gateway builds and validates the grammar (a schema the engine cannot compile is a 400 there,
before any work); the grammar string travels in SamplingParams; the worker builds one matcher per
sequence and asks it for the allowed tokens at every step.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

import llguidance

from cascade.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile."""


def from_json_schema(schema: dict[str, Any] | bool) -> str:
    if schema is True or schema == {}:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    # Clients send the same schema request after request: compile it once.
    return _compiled_schema(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _compiled_schema(text: str) -> str:
    schema = json.loads(text)
    try:
        # Compact JSON: no free whitespace, so a model cannot spend its max_tokens on indentation
        # (vLLM's xgrammar backend makes the same choice by default).
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "coerce_one_of": True}
        )
    except ValueError as e:
        raise GrammarError(str(e)) from None
    return checked(grammar)


def any_json_object() -> str:
    """`response_format: json_object`: any JSON object."""
    return from_json_schema({"type": "object"})


def from_regex(pattern: str) -> str:
    return checked(llguidance.LLMatcher.grammar_from_regex(pattern))


def from_choice(choices: Sequence[str]) -> str:
    """Exactly one of `choices` (vLLM's guided_choice)."""
    return from_regex("(" + "|".join(re.escape(c) for c in choices) + ")")


def from_grammar(text: str) -> str:
    """A Lark grammar (llguidance's own format), or GBNF/EBNF as llama.cpp and xgrammar take it
    (recognised by `::=`), converted to Lark."""
    if "::=" in text:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # the converter raises what its parser raises
            raise GrammarError(f"not a GBNF grammar: {e}") from None
    return checked(llguidance.LLMatcher.grammar_from_lark(text))


def checked(grammar: str) -> str:
    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err:
        raise GrammarError(err.strip())
    return grammar


class _ByteVocab:
    """The byte tokenizer's vocabulary as llguidance reads a tokenizer: 256 bytes, then specials."""

    def __init__(self, vocab: int, eos: int, bos: int | None) -> None:
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.tokens = [bytes([i]) for i in range(256)] + [b"<|special_%d|>" % i for i in range(256, vocab)]
        self.special_token_ids = list(range(256, vocab))

    def __call__(self, s: str | bytes) -> list[int]:
        return list(s.encode("utf-8") if isinstance(s, str) else s)


def tokenizer_for(tok: Tokenizer, vocab: int, eos: list[int]) -> llguidance.LLTokenizer:
    """The model's tokenizer for llguidance, over the model's whole vocabulary (the logits' width).
    Costs about half a second for a 50k vocabulary: build it once per model."""
    if isinstance(tok, HFTokenizer):
        return llguidance.LLTokenizer(tok.backend_json(), n_vocab=vocab, eos_token=eos or None)
    if isinstance(tok, ByteTokenizer):
        wrapper = llguidance.TokenizerWrapper(_ByteVocab(vocab, eos[0] if eos else tok.eos_ids[0], tok.bos_id))
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab, eos_token=eos or None)
    raise GrammarError(f"structured outputs do not support the tokenizer {type(tok).__name__}")
