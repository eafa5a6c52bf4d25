"""Structured outputs in the engine: on a random model (the mask is all that makes its output
parse), every sampled output validates against a schema with nested objects, enums and arrays;
regexes, choices and grammars hold; a guided sequence batched beside free ones leaves their tokens
as they are; choices forked with n > 1 each keep their own grammar state."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from cascade import structured
from cascade.config import GenerateSpec
from cascade.messages import SamplingParams, TokenEvent
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from services.worker.engine import Engine
from services.worker.model import LlamaModel
from tests.enginehelp import load_model, run_engine

SPEC = GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=5)
tok = ByteTokenizer()

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "owner": {
            "type": "object",
            "properties": {
                "first": {"type": "string", "maxLength": 5},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            },
            "required": ["first", "tags"],
            "additionalProperties": False,
        },
        "vaccinated": {"type": "boolean"},
    },
    "required": ["name", "kind", "age", "owner", "vaccinated"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    d = tmp_path_factory.mktemp("model")
    generate_model(d, SPEC)
    return load_model(d)


def run(engine: Engine, max_steps: int = 2000) -> dict[str, list[TokenEvent]]:
    return run_engine(engine, max_steps)


def texts(evs: list[TokenEvent]) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in evs:
        out[e.choice] = out.get(e.choice, "") + e.text
    return out


def test_every_sampled_output_validates_against_a_nested_schema(model: LlamaModel) -> None:
    grammar = structured.from_json_schema(SCHEMA)
    e = Engine(model, tok, max_batch=16)
    for i in range(12):
        p = SamplingParams(max_tokens=200, temperature=1.0, seed=i, grammar=grammar)
        e.submit(f"r{i}", "g", tok.encode(f"pet {i}:"), p)
    out = run(e)
    for rid, evs in out.items():
        assert evs[-1].finish_reason == "stop", (rid, texts(evs))
        doc = json.loads(texts(evs)[0])
        jsonschema.validate(doc, SCHEMA)


def test_guided_rows_leave_free_rows_alone(model: LlamaModel) -> None:
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = Engine(model, tok)
    alone.submit("free", "g", tok.encode("free text"), free)
    want = [t for ev in run(alone)["free"] for t in ev.token_ids]
    e = Engine(model, tok)
    e.submit("free", "g", tok.encode("free text"), free)
    e.submit("json", "g", tok.encode("json"), SamplingParams(max_tokens=200, grammar=structured.any_json_object()))
    out = run(e)
    assert [t for ev in out["free"] for t in ev.token_ids] == want
    assert isinstance(json.loads(texts(out["json"])[0]), dict)


@pytest.mark.parametrize(
    ("grammar", "check"),
    [
        (structured.from_regex(r"[0-9]{3}-[a-z]{2}"), lambda s: re.fullmatch(r"[0-9]{3}-[a-z]{2}", s)),
        (structured.from_choice(["yes", "no", "maybe"]), lambda s: s in ("yes", "no", "maybe")),
        (
            structured.from_grammar('start: "(" num ("+" num)* ")"\nnum: /[1-9]/'),
            lambda s: re.fullmatch(r"\(\d(\+\d)*\)", s),
        ),
        (structured.from_grammar('root ::= "x" [0-9] "y"'), lambda s: re.fullmatch(r"x\dy", s)),
    ],
    ids=["regex", "choice", "lark", "gbnf"],
)
def test_regex_choice_and_grammars_hold(model: LlamaModel, grammar: str, check: object) -> None:
    e = Engine(model, tok, max_batch=8)
    for i in range(6):
        e.submit(
            f"r{i}", "g", tok.encode("go"), SamplingParams(max_tokens=60, temperature=1.0, seed=i, grammar=grammar)
        )
    for rid, evs in run(e).items():
        s = texts(evs)[0]
        assert evs[-1].finish_reason == "stop" and callable(check) and check(s), (rid, s)


def test_forked_choices_keep_their_own_grammar_state(model: LlamaModel) -> None:
    grammar = structured.from_json_schema(SCHEMA)
    e = Engine(model, tok, max_batch=8)
    e.submit(
        "n", "g", tok.encode("pets:"), SamplingParams(max_tokens=200, temperature=1.0, seed=3, n=4, grammar=grammar)
    )
    out = texts(run(e)["n"])
    assert sorted(out) == [0, 1, 2, 3] and len(set(out.values())) > 1
    for s in out.values():
        jsonschema.validate(json.loads(s), SCHEMA)


def test_uncompilable_constraints_are_named() -> None:
    with pytest.raises(structured.GrammarError, match="strin"):
        structured.from_json_schema({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(structured.GrammarError, match="unclosed group"):
        structured.from_regex("a(")


@pytest.mark.parametrize("flavour", ["qwen", "llama3"])
def test_a_hugging_face_tokenizer_drives_the_mask(tmp_path: object, flavour: str) -> None:
    """A real tokenizer.json (byte-level BPE, special tokens) through llguidance: a random walk of
    the mask, decoded by Cascade's own tokenizer, is JSON that validates."""
    import random
    from pathlib import Path

    import llguidance
    import torch

    from cascade.models.tokenizer import HFTokenizer
    from tests.hf_fixtures import LLAMA3, QWEN25, build

    pytest.importorskip("transformers")
    d = build({"qwen": QWEN25, "llama3": LLAMA3}[flavour], Path(str(tmp_path)) / flavour)
    tok = HFTokenizer(d)
    vocab = len(json.loads(tok.backend_json())["model"]["vocab"]) + 64
    eos = tok.eos_ids
    lltok = structured.tokenizer_for(tok, vocab, eos)
    for seed in range(4):
        m = llguidance.LLMatcher(lltok, structured.from_json_schema(SCHEMA), log_level=0)
        rng = random.Random(seed)
        words = (vocab + 31) // 32
        mask = torch.full((words,), -1, dtype=torch.int32)
        out: list[int] = []
        for _ in range(400):
            m.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
            bits = ((mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:vocab]
            allowed = [int(i) for i in bits.nonzero().view(-1).tolist() if int(i) not in eos]
            if not allowed or m.is_stopped():
                break
            t = rng.choice(allowed)
            assert m.consume_token(t), m.get_error()
            out.append(t)
        assert m.is_stopped() or m.is_accepting()
        jsonschema.validate(json.loads(tok.decode(out)), SCHEMA)


def test_a_warmed_engine_builds_no_grammar_tokenizer_in_a_step(
    model: LlamaModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker warms structured outputs when it takes a model: the tokenizer llguidance needs
    (half a second for a 50k vocabulary) is built then, on the helper thread, never in the step
    of the first guided request, which would hold up the rest of its batch."""
    e = Engine(model, tok, max_batch=4)
    e.warm_grammar().result(timeout=60)

    def no_build(*args: object) -> None:
        raise AssertionError("the grammar tokenizer was built in a step")

    monkeypatch.setattr(structured, "tokenizer_for", no_build)
    grammar = structured.from_json_schema(SCHEMA)
    e.submit("g", "gw", tok.encode("pet"), SamplingParams(max_tokens=200, temperature=1.0, seed=2, grammar=grammar))
    e.submit("f", "gw", tok.encode("free"), SamplingParams(max_tokens=5, ignore_eos=True))
    out = run(e)
    assert out["g"][-1].finish_reason == "stop", out["g"][-1]
    jsonschema.validate(json.loads(texts(out["g"])[0]), SCHEMA)
    assert out["f"][-1].finish_reason == "length"
    e.close()
