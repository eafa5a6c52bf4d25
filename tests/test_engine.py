"""The engine: continuous batching keeps every request's greedy tokens, sampling knobs work,
stop strings and cancellation end requests the OpenAI way."""

from __future__ import annotations

import pytest

from cascade.config import GenerateSpec
from cascade.messages import SamplingParams, TokenEvent
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from services.worker.engine import Engine
from services.worker.model import LlamaModel
from tests.enginehelp import load_model, run_engine

SPEC = GenerateSpec(layers=3, hidden=64, heads=4, kv_heads=2, vocab=320, seed=11)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    d = tmp_path_factory.mktemp("model")
    generate_model(d, SPEC)
    return load_model(d)


def run(engine: Engine, max_steps: int = 500) -> dict[str, list[TokenEvent]]:
    return run_engine(engine, max_steps)


def tokens(evs: list[TokenEvent]) -> list[int]:
    return [t for e in evs for t in e.token_ids]


def text(evs: list[TokenEvent]) -> str:
    return "".join(e.text for e in evs)


tok = ByteTokenizer()
PROMPTS = ["hello there", "a", "the mesh scales live when load jumps", "zz top"]


def test_continuous_batching_keeps_each_requests_tokens(model: LlamaModel) -> None:
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = {}
    for p in PROMPTS:
        e = Engine(model, tok, max_batch=8)
        e.submit(p, "g", tok.encode(p), greedy)
        alone[p] = tokens(run(e)[p])
    e = Engine(model, tok, max_batch=8)
    out: dict[str, list[TokenEvent]] = {}
    sizes = set()
    # Staggered arrivals: each new request joins a batch that is already decoding.
    for p in PROMPTS:
        e.submit(p, "g", tok.encode(p), greedy)
        for _ in range(3):
            r = e.step()
            sizes.add(r.batch_size)
            for _, ev in r.events:
                out.setdefault(ev.request_id, []).append(ev)
    for k, v in run(e).items():
        out.setdefault(k, []).extend(v)
    assert {p: tokens(out[p]) for p in PROMPTS} == alone
    assert max(sizes) >= 3, sizes
    final = {p: out[p][-1] for p in PROMPTS}
    assert all(f.finish_reason == "length" and f.completion_tokens == 10 for f in final.values())
    assert all(f.prompt_tokens == len(tok.encode(p)) for p, f in final.items())


def test_batch_bound_respected(model: LlamaModel) -> None:
    e = Engine(model, tok, max_batch=2)
    for i in range(5):
        e.submit(f"r{i}", "g", tok.encode("x" * (i + 1)), SamplingParams(max_tokens=3, ignore_eos=True))
    sizes = []
    while e.has_work():
        sizes.append(e.step().batch_size)
    assert max(sizes) == 2
    assert e.stats.tokens == 15


def test_seeded_sampling_is_reproducible(model: LlamaModel) -> None:
    def sample(seed: int) -> list[int]:
        e = Engine(model, tok)
        e.submit("r", "g", tok.encode("hi"), SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True))
        return tokens(run(e)["r"])

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    e = Engine(model, tok)
    e.submit("r", "g", tok.encode("hi"), SamplingParams(max_tokens=12, temperature=0.5, top_p=1e-6, ignore_eos=True))
    g = Engine(model, tok)
    g.submit("r", "g", tok.encode("hi"), SamplingParams(max_tokens=12, ignore_eos=True))
    # top_p this small keeps only the most likely token: the same as greedy.
    assert tokens(run(e)["r"]) == tokens(run(g)["r"])


def test_stop_string_truncates_and_is_not_returned(model: LlamaModel) -> None:
    e = Engine(model, tok)
    e.submit("r", "g", tok.encode("hello"), SamplingParams(max_tokens=40, ignore_eos=True))
    full = text(run(e)["r"])
    assert len(full) > 6
    stop = full[3:5]
    e = Engine(model, tok)
    e.submit("r", "g", tok.encode("hello"), SamplingParams(max_tokens=40, stop=[stop], ignore_eos=True))
    evs = run(e)["r"]
    assert evs[-1].finish_reason == "stop"
    assert text(evs) == full[: full.find(stop)]


def test_cancel_ends_running_and_waiting(model: LlamaModel) -> None:
    e = Engine(model, tok, max_batch=1)
    e.submit("a", "g", tok.encode("aaa"), SamplingParams(max_tokens=100, ignore_eos=True))
    e.submit("b", "g", tok.encode("bbb"), SamplingParams(max_tokens=100, ignore_eos=True))
    e.step()
    e.cancel("a")
    e.cancel("b")
    out = run(e)
    assert out["a"][-1].finish_reason == "cancelled"
    assert out["b"][-1].finish_reason == "cancelled"
    assert not e.has_work()


def test_context_limit_finishes_with_length(tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("short")
    generate_model(d, GenerateSpec(layers=1, hidden=32, heads=2, kv_heads=1, vocab=320, max_position=16))
    ck = Checkpoint(d)
    m = LlamaModel(ck.config)
    for u in range(ck.config.num_units):
        m.load_unit(u, ck.unit_tensors(u))
    e = Engine(m, tok)
    e.submit("r", "g", tok.encode("0123456789"), SamplingParams(max_tokens=100, ignore_eos=True))
    evs = run(e)["r"]
    assert evs[-1].finish_reason == "length"
    assert evs[-1].prompt_tokens + evs[-1].completion_tokens == 16


def test_emulated_device_prices_each_step(model: LlamaModel) -> None:
    from cascade.device_profile import StepPadder, load_profile

    prof = load_profile("llama2-7b-a100-80gb")
    e = Engine(model, tok, max_batch=8, padder=StepPadder(prof, model.cfg.num_hidden_layers))
    for i in range(4):
        e.submit(f"r{i}", "g", tok.encode("abc"), SamplingParams(max_tokens=5, ignore_eos=True))
    first = e.step()  # prefill of 4 prompts of 4 tokens
    assert first.target_s * 1000 == pytest.approx(prof.step_ms(0, prefill_tokens=16), rel=1e-6)
    second = e.step()  # decode of 4 sequences whose KV holds 4 + 1 tokens each → positions 4
    assert second.target_s * 1000 == pytest.approx(prof.step_ms(4, 0, 4 * 4), rel=1e-6)
    # Without a profile nothing is padded.
    plain = Engine(model, tok)
    plain.submit("r", "g", tok.encode("abc"), SamplingParams(max_tokens=2, ignore_eos=True))
    assert plain.step().target_s == 0.0


def test_batch_limit_moves_within_the_kv_slots_and_steps_are_timed_by_batch(model: LlamaModel) -> None:
    e = Engine(model, tok, max_batch=2, kv_slots=4)
    assert (e.max_batch, e.kv_slots) == (2, 4)
    assert e.set_max_batch(16) == 4 and e.set_max_batch(0) == 1 and e.set_max_batch(3) == 3
    greedy = SamplingParams(max_tokens=5, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        e.submit(f"r{i}", "g", tok.encode(p), greedy)
    e.step()
    assert len(e.running) == 3  # the limit in force, not the KV slots
    e.set_max_batch(1)
    out = run(e)
    assert all(out[f"r{i}"][-1].finish_reason == "length" for i in range(1, len(PROMPTS)))
    steps, prompt, generated = e.stats.take_interval()
    assert prompt == sum(len(tok.encode(p)) for p in PROMPTS)
    assert generated == 5 * len(PROMPTS)
    assert 3 in steps and 1 in steps and all(n >= 1 and ms > 0 for n, ms, _ in steps.values())
    assert e.stats.take_interval() == ({}, 0, 0)  # taken: the next interval starts empty


def test_a_long_prompt_goes_on_after_a_short_neighbour_finishes(model: LlamaModel) -> None:
    # A long prompt holds many blocks beside a short one; the short one's blocks go back to the
    # pool when it finishes first, and the long one's table is untouched by that.
    e = Engine(model, tok, max_batch=4)
    e.submit("short", "g", tok.encode("hi"), SamplingParams(max_tokens=2, ignore_eos=True))
    e.submit("long", "g", tok.encode("x" * 300), SamplingParams(max_tokens=8, ignore_eos=True))
    out = run(e)
    assert out["short"][-1].finish_reason == "length"
    assert out["long"][-1].finish_reason == "length" and out["long"][-1].completion_tokens == 8
    alone = Engine(model, tok, max_batch=4)
    alone.submit("long", "g", tok.encode("x" * 300), SamplingParams(max_tokens=8, ignore_eos=True))
    assert tokens(run(alone)["long"]) == tokens(out["long"])


@pytest.mark.parametrize("budget", [1, 3, 7, 16])
def test_chunked_prefill_gives_the_whole_prompts_tokens(model: LlamaModel, budget: int) -> None:
    """Prompts longer than a step's budget are prefilled in chunks, beside other sequences'
    decode and other prompts' chunks; every request's greedy tokens stay those of a whole prefill,
    and no step computes more prompt tokens than the budget."""
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    whole = Engine(model, tok, max_batch=8)
    for p in PROMPTS:
        whole.submit(p, "g", tok.encode(p), greedy)
    expect = {k: tokens(v) for k, v in run(whole).items()}
    assert whole.stats.steps == 8  # one prefill step for all four, then decode
    e = Engine(model, tok, max_batch=8, max_prefill_tokens=budget)
    out: dict[str, list[TokenEvent]] = {}
    pending = list(PROMPTS)
    while pending or e.has_work():
        if pending:  # one arrival per step: chunks join steps that are decoding
            p = pending.pop(0)
            e.submit(p, "g", tok.encode(p), greedy)
        r = e.step()
        assert r.prefill_tokens <= budget
        for _, ev in r.events:
            out.setdefault(ev.request_id, []).append(ev)
    assert {k: tokens(v) for k, v in out.items()} == expect
    assert not e.prefilling


def test_decoding_keeps_its_pace_while_a_long_prompt_is_chunked(model: LlamaModel) -> None:
    e = Engine(model, tok, max_batch=4, max_prefill_tokens=8)
    e.submit("short", "g", tok.encode("hi"), SamplingParams(max_tokens=40, ignore_eos=True))
    e.step()
    long_prompt = tok.encode("y" * 40)  # 41 tokens with BOS: six steps of 8 at most
    e.submit("long", "g", long_prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    got_short, first_long = 0, None
    for n in range(1, 8):
        r = e.step()
        ids = {ev.request_id for _, ev in r.events}
        got_short += "short" in ids
        if "long" in ids and first_long is None:
            first_long = n
    assert got_short == 7  # a token every step
    assert first_long == 6  # ceil(41 / 8) steps to the first token
    assert e.load() == (2, 0)


def test_cancel_while_a_prompt_is_being_chunked(model: LlamaModel) -> None:
    e = Engine(model, tok, max_batch=4, max_prefill_tokens=4)
    e.submit("long", "g", tok.encode("z" * 30), SamplingParams(max_tokens=5, ignore_eos=True))
    e.step()
    assert [s.request_id for s in e.prefilling] == ["long"] and e.load() == (1, 0)
    e.cancel("long")
    out = run(e)
    assert out["long"][-1].finish_reason == "cancelled" and out["long"][-1].completion_tokens == 0
    assert not e.prefilling and not e.has_work() and e.in_flight() == 0


def test_emulated_device_prices_each_chunk(model: LlamaModel) -> None:
    from cascade.device_profile import StepPadder, load_profile

    prof = load_profile("llama2-7b-a100-80gb")
    e = Engine(
        model, tok, max_batch=8, max_prefill_tokens=512, padder=StepPadder(prof, model.cfg.num_hidden_layers),
        emulated_token_scale=16.0,
    )  # fmt: skip
    assert e.prefill_budget() == 32  # real tokens: each is priced as 16
    e.submit("r", "g", tok.encode("q" * 79), SamplingParams(max_tokens=2, ignore_eos=True))  # 80 tokens
    targets = [e.step().target_s * 1000 for _ in range(3)]
    # Chunks before the last run no head; later ones also read the cached part of the prompt once.
    assert targets[0] == pytest.approx(prof.step_ms(0, prefill_tokens=512) - prof.head_ms, rel=1e-6)
    assert targets[1] == pytest.approx(prof.step_ms(0, 512, context_tokens=512) - prof.head_ms, rel=1e-6)
    assert targets[2] == pytest.approx(prof.step_ms(0, prefill_tokens=16 * 16, context_tokens=1024), rel=1e-6)


def test_tokens_per_s_falls_to_zero_when_the_engine_goes_quiet() -> None:
    """`cascade status` and the dashboard show the heartbeat's figure: read at heartbeat time, it
    must not keep the last busy second's rate after the traffic stopped."""
    from services.worker.engine import EngineStats

    stats = EngineStats()
    for i in range(50):  # 10 tokens per step, 10 steps/s, for 5 s
        stats.record(batch=10, tokens=10, now=100.0 + i / 10)
    assert stats.rate(104.9) == pytest.approx(100.0, rel=0.05)
    # Two seconds after the last step: the steps of the last 5 s (102.0 .. 104.9) over those 5 s.
    assert stats.rate(107.0) == pytest.approx(300 / 5.0)
    assert stats.rate(120.0) == 0.0
    assert stats.tokens_per_s > 0  # the step-time figure, kept for the engine's own summaries


def test_every_event_echoes_the_dispatch_attempt(model: LlamaModel) -> None:
    e = Engine(model, tok, max_batch=4)
    e.submit("r", "g", tok.encode("hi"), SamplingParams(max_tokens=5, ignore_eos=True), attempt=3)
    e.submit("u", "g", tok.encode("hi"), SamplingParams(max_tokens=5, ignore_eos=True))
    out = run(e)
    assert len(tokens(out["r"])) == 5 and {ev.attempt for ev in out["r"]} == {3}
    assert {ev.attempt for ev in out["u"]} == {0}
