"""The worker's sampler against transformers: log probabilities of prompt and generated tokens
(raw and processed), penalties as their reference definition says, on a tiny random checkpoint
transformers itself wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cascade.messages import SamplingParams, TokenEvent
from cascade.models.tokenizer import ByteTokenizer
from services.worker.engine import Engine
from services.worker.model import LlamaModel
from services.worker.sampling import SampleRow, apply_penalties
from tests.enginehelp import load_model, run_engine
from tests.hfmodels import CASES, Built, build, hf_logits

TOL = 1e-4
PROMPT = [5, 17, 99, 3, 250, 42, 7, 7, 120, 64, 18, 33, 2, 91, 200, 11, 150, 6, 71, 8]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(CASES[0], tmp_path_factory.mktemp("sampling"))


@pytest.fixture(scope="module")
def model(built: Built) -> LlamaModel:
    return load_model(built.v5)


def run(engine: Engine, max_steps: int = 500) -> dict[str, list[TokenEvent]]:
    return run_engine(engine, max_steps)


def generate(model: LlamaModel, params: SamplingParams, **kw: Any) -> list[TokenEvent]:
    e = Engine(model, ByteTokenizer(), max_batch=4, **kw)
    e.submit("r", "g", PROMPT, params)
    return run(e)["r"]


def check_entry(e: Any, ls_row: torch.Tensor, token: int, k: int) -> None:
    assert e.token == token
    assert abs(e.logprob - float(ls_row[token])) < TOL
    vals, ids = ls_row.topk(k)
    assert e.top_ids == ids.tolist()
    assert max(abs(a - b) for a, b in zip(e.top_logprobs, vals.tolist(), strict=True)) < TOL
    assert e.rank == int((ls_row > ls_row[token]).sum()) + 1


@pytest.mark.parametrize("chunk", [2048, 6])  # whole prompt in one step, and in chunks of 6
def test_raw_logprobs_equal_transformers_log_softmax(built: Built, model: LlamaModel, chunk: int) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    evs = generate(model, params, max_prefill_tokens=chunk)
    gen = [t for e in evs for t in e.token_ids]
    lps = [x for e in evs for x in e.logprobs]
    plps = [e.prompt_logprobs for e in evs if e.prompt_logprobs is not None]
    assert len(gen) == len(lps) == 8 and len(plps) == 1 and evs[0].prompt_logprobs is not None
    ls = torch.log_softmax(hf_logits(built.hf, PROMPT + gen), dim=-1)
    prompt_entries = plps[0]
    assert len(prompt_entries) == len(PROMPT) and prompt_entries[0] is None
    for i in range(1, len(PROMPT)):
        entry = prompt_entries[i]
        assert entry is not None
        check_entry(entry, ls[i - 1], PROMPT[i], 3)
    for j, (tok, e) in enumerate(zip(gen, lps, strict=True)):
        check_entry(e, ls[len(PROMPT) - 1 + j], tok, 5)
        assert e.rank == 1  # greedy


def test_processed_logprobs_are_the_sampled_distribution(built: Built, model: LlamaModel) -> None:
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.7, seed=3, logprobs=2)
    raw = generate(model, params)
    proc = generate(model, params, logprobs_mode="processed")
    gen = [t for e in proc for t in e.token_ids]
    assert gen == [t for e in raw for t in e.token_ids]  # the same seeded draws either way
    logits = hf_logits(built.hf, PROMPT + gen)
    ls_raw = torch.log_softmax(logits, dim=-1)
    ls_t = torch.log_softmax(logits / 0.7, dim=-1)
    for j, (tok, r, p) in enumerate(
        zip(gen, [x for e in raw for x in e.logprobs], [x for e in proc for x in e.logprobs], strict=True)
    ):
        row = len(PROMPT) - 1 + j
        check_entry(r, ls_raw[row], tok, 2)
        check_entry(p, ls_t[row], tok, 2)


def reference_penalties(
    logits: list[float], prompt: list[int], output: list[int], presence: float, frequency: float, repetition: float
) -> list[float]:
    """The definitions, one token at a time: transformers' repetition penalty over prompt and
    output, then OpenAI's presence and frequency penalties over the output."""
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def test_penalties_change_logits_exactly_as_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(4, V, generator=g)
    cases = [
        (0.0, 0.0, 1.0),  # untouched
        (0.5, 0.0, 1.0),
        (-0.3, 1.2, 1.0),
        (0.2, 0.7, 1.3),
    ]
    rows, prompts, outputs = [], [], []
    for b, (pres, freq, rep) in enumerate(cases):
        prompt = torch.randint(0, V, (6,), generator=g).tolist()
        output = torch.randint(0, V, (9 + b,), generator=g).tolist()
        prompts.append(prompt)
        outputs.append(output)
        p = SamplingParams(presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep)
        rows.append(SampleRow(p, None, prompt, output))
    got = apply_penalties(logits, rows)
    for b, (pres, freq, rep) in enumerate(cases):
        want = reference_penalties(logits[b].tolist(), prompts[b], outputs[b], pres, freq, rep)
        assert torch.allclose(got[b], torch.tensor(want), atol=1e-6), b
    assert torch.equal(got[0], logits[0])


def test_penalised_greedy_follows_the_reference_on_transformers_logits(built: Built, model: LlamaModel) -> None:
    """Greedy decoding with penalties, batched beside an unpenalised request, gives the tokens a
    loop over transformers' logits with the reference penalties gives."""
    pres, freq, rep = 0.4, 0.9, 1.2
    params = SamplingParams(
        max_tokens=10, ignore_eos=True, presence_penalty=pres, frequency_penalty=freq, repetition_penalty=rep
    )
    e = Engine(model, ByteTokenizer(), max_batch=4)
    e.submit("pen", "g", PROMPT, params)
    e.submit("plain", "g", PROMPT, SamplingParams(max_tokens=10, ignore_eos=True))
    out = run(e)
    got = [t for ev in out["pen"] for t in ev.token_ids]
    seq: list[int] = []
    for _ in range(10):
        logits = hf_logits(built.hf, PROMPT + seq)[-1].tolist()
        pen = reference_penalties(logits, PROMPT, seq, pres, freq, rep)
        seq.append(max(range(len(pen)), key=pen.__getitem__))
    assert got == seq
    plain = [t for ev in out["plain"] for t in ev.token_ids]
    assert plain != got  # the penalties did change the output (and did not leak into the other row)


def test_prompt_logprobs_are_computed_past_the_prefix_cache(model: LlamaModel) -> None:
    e = Engine(model, ByteTokenizer(), max_batch=4)
    params = SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=0)
    e.submit("a", "g", PROMPT, params)
    first = run(e)["a"]
    e.submit("b", "g", PROMPT, params)  # its prefix is cached now; its logprobs must not be missing
    second = run(e)["b"]
    pa = next(ev.prompt_logprobs for ev in first if ev.prompt_logprobs is not None)
    pb = next(ev.prompt_logprobs for ev in second if ev.prompt_logprobs is not None)
    assert len(pa) == len(pb) == len(PROMPT)
    assert [x.logprob if x else None for x in pa] == pytest.approx([x.logprob if x else None for x in pb], abs=TOL)


def test_logprobs_do_not_change_the_tokens(model: LlamaModel, tmp_path: Path) -> None:
    plain = generate(model, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.9, seed=5))
    with_lp = generate(model, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.9, seed=5, logprobs=3))
    assert [t for e in plain for t in e.token_ids] == [t for e in with_lp for t in e.token_ids]
    assert all(not e.logprobs for e in plain)


def choices(evs: list[TokenEvent]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in evs:
        out.setdefault(e.choice, []).extend(e.token_ids)
    return out


def test_n_greedy_choices_share_one_prefill(model: LlamaModel) -> None:
    e = Engine(model, ByteTokenizer(), max_batch=8)
    e.submit("r", "g", PROMPT, SamplingParams(max_tokens=7, ignore_eos=True, n=4))
    evs = run(e)["r"]
    got = choices(evs)
    assert sorted(got) == [0, 1, 2, 3]
    assert all(v == got[0] for v in got.values()) and len(got[0]) == 7
    assert e.stats.prefilled == len(PROMPT)  # the prompt was computed once, not four times
    finals = [ev for ev in evs if ev.finish_reason is not None]
    assert sorted(f.choice for f in finals) == [0, 1, 2, 3]
    assert all(f.completion_tokens == 7 and f.finish_reason == "length" for f in finals)
    assert e.blocks.used_count() == 0  # every shared block went back


@pytest.mark.parametrize("prompt_len", [16, 20])  # the prompt fills whole blocks; it ends in a part-filled one
@pytest.mark.parametrize("chunk", [2048, 7])
def test_each_sampled_choice_is_what_one_request_with_its_seed_gives(
    model: LlamaModel, prompt_len: int, chunk: int
) -> None:
    """Choice i of a seeded request draws from seed + i: with the KV blocks forked right, each
    choice equals a single request with that seed, token for token."""
    prompt = PROMPT[:prompt_len]
    base = SamplingParams(max_tokens=9, ignore_eos=True, temperature=1.0, seed=40, frequency_penalty=0.5)
    e = Engine(model, ByteTokenizer(), max_batch=8, max_prefill_tokens=chunk)
    e.submit("n", "g", prompt, SamplingParams(**{**_fields(base), "n": 3}))
    got = choices(run(e)["n"])
    assert len({tuple(v) for v in got.values()}) > 1  # the choices differ
    for i in range(3):
        one = Engine(model, ByteTokenizer(), max_batch=8)
        one.submit("1", "g", prompt, SamplingParams(**{**_fields(base), "seed": 40 + i}))
        assert got[i] == [t for ev in run(one)["1"] for t in ev.token_ids], i


def _fields(p: SamplingParams) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}


def test_n_choices_take_batch_slots(model: LlamaModel) -> None:
    e = Engine(model, ByteTokenizer(), max_batch=4)
    e.submit("a", "g", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True, n=3))
    e.submit("b", "g", PROMPT[:5], SamplingParams(max_tokens=3, ignore_eos=True, n=2))
    e.step()
    assert len(e.running) == 3  # b's two choices do not fit beside a's three
    out = run(e)
    assert sorted(choices(out["b"])) == [0, 1]


def test_top_k_and_min_p_keep_only_the_tokens_they_allow() -> None:
    from services.worker.sampling import sample

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 50, generator=g) * 3
    top3 = set(logits[0].topk(3).indices.tolist())
    probs = torch.softmax(logits[0], -1)
    above = {i for i in range(50) if probs[i] >= 0.2 * probs.max()}
    seen_k, seen_p = set(), set()
    for seed in range(60):
        k = SamplingParams(temperature=1.0, top_k=3)
        seen_k.add(sample(logits, [SampleRow(k, torch.Generator().manual_seed(seed))])[0][0])
        p = SamplingParams(temperature=1.0, min_p=0.2)
        seen_p.add(sample(logits, [SampleRow(p, torch.Generator().manual_seed(seed))])[0][0])
    assert seen_k <= top3 and len(seen_k) > 1
    assert seen_p <= above and len(above) > 1
    greedy = int(logits.argmax())
    one = SamplingParams(temperature=1.0, top_k=1)
    assert sample(logits, [SampleRow(one, torch.Generator().manual_seed(0))])[0] == [greedy]
