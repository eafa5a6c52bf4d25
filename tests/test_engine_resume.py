"""A migrated request on the engine: resumed from the tokens a lost instance streamed, it gives
what the unbroken run gives from there: the same token ids (greedy and seeded), and text that
joins what the client already had without a character lost or repeated."""

from __future__ import annotations

import dataclasses

import pytest

from cascade.config import GenerateSpec
from cascade.messages import SamplingParams, TokenEvent
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from services.worker.engine import Engine
from services.worker.model import LlamaModel

SPEC = GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=5)
tok = ByteTokenizer()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    d = tmp_path_factory.mktemp("resume-model")
    generate_model(d, SPEC)
    ck = Checkpoint(d)
    m = LlamaModel(ck.config)
    for u in range(ck.config.num_units):
        m.load_unit(u, ck.unit_tensors(u))
    return m


def run(engine: Engine, rid: str) -> list[TokenEvent]:
    out: list[TokenEvent] = []
    for _ in range(1000):
        if not engine.has_work():
            return out
        out += [ev for _, ev in engine.step().events if ev.request_id == rid]
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.9, top_p=0.9, seed=77, ignore_eos=True),
        # A stop string that never matches still holds text back: the resumed run holds the same.
        SamplingParams(max_tokens=40, temperature=0.7, seed=3, stop=["\x00\x01\x02\x03"], ignore_eos=True),
    ],
    ids=["greedy", "seeded", "stop-held"],
)
@pytest.mark.parametrize("cut", [1, 17])
def test_a_resumed_request_continues_the_unbroken_run(model: LlamaModel, params: SamplingParams, cut: int) -> None:
    prompt = tok.encode("resume me")
    e = Engine(model, tok, max_batch=4)
    e.submit("r", "g", prompt, params)
    whole = run(e, "r")
    ids = [t for ev in whole for t in ev.token_ids]
    assert len(ids) == 40

    # What the client had when the first instance died: the events up to the cut.
    before, n = [], 0
    for ev in whole:
        if n >= cut:
            break
        before.append(ev)
        n += len(ev.token_ids)
    streamed = [t for ev in before for t in ev.token_ids]
    resumed = dataclasses.replace(params, max_tokens=params.max_tokens - len(streamed), resumed=len(streamed))
    e2 = Engine(model, tok, max_batch=4)
    e2.submit("r", "g", prompt + streamed, resumed)
    after = run(e2, "r")

    assert streamed + [t for ev in after for t in ev.token_ids] == ids
    assert "".join(ev.text for ev in before + after) == "".join(ev.text for ev in whole)
    assert after[-1].finish_reason == "length" and after[-1].completion_tokens == 40 - len(streamed)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=30, n=3, ignore_eos=True),
        SamplingParams(
            max_tokens=30, n=3, temperature=0.9, seed=41, ignore_eos=True, frequency_penalty=0.7,
            presence_penalty=0.3, repetition_penalty=1.3,
        ),
    ],
    ids=["greedy", "seeded-penalised"],
)  # fmt: skip
def test_choices_of_a_migrated_request_each_continue_their_own_run(model: LlamaModel, params: SamplingParams) -> None:
    """A migrated n > 1 request arrives as one sequence per unfinished choice under the same
    request id (n = 1, its `choice`, its own tokens ending the prompt): each goes on exactly as
    that choice did in the forked run (its seed + choice stream, its penalty counts), cut at a
    different point each, and its events carry its choice."""
    prompt = tok.encode("choose")
    e = Engine(model, tok, max_batch=8)
    e.submit("r", "g", prompt, params)
    whole = run(e, "r")
    by_choice = {c: [t for ev in whole if ev.choice == c for t in ev.token_ids] for c in range(3)}
    assert all(len(ids) == 30 for ids in by_choice.values())
    if params.seed is not None:
        assert len({tuple(ids) for ids in by_choice.values()}) == 3

    e2 = Engine(model, tok, max_batch=8)
    cuts = {0: 5, 1: 0, 2: 23}  # choice 1 had streamed nothing yet
    for c, cut in cuts.items():
        mine = by_choice[c][:cut]
        one = dataclasses.replace(params, n=1, choice=c, max_tokens=params.max_tokens - cut, resumed=cut)
        e2.submit("r", "g", prompt + mine, one)
    after = run(e2, "r")
    for c, cut in cuts.items():
        evs = [ev for ev in after if ev.choice == c]
        assert by_choice[c][:cut] + [t for ev in evs for t in ev.token_ids] == by_choice[c], c
        assert evs[0].index == 0 and evs[-1].finish_reason == "length"
        assert evs[-1].completion_tokens == 30 - cut
