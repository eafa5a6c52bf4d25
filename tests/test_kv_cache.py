"""The paged KV cache: memory follows the tokens held, a budget smaller than the load is served by
admission and preemption with the tokens of an unconstrained run, prefix caching skips the shared
prefill, and pipelined routes are paged the same way."""

from __future__ import annotations

import pytest

from cascade.config import GenerateSpec
from cascade.messages import RouteStage, SamplingParams, TokenEvent
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from services.worker.engine import Engine
from services.worker.kvblocks import BlockManager, NoFreeBlocks, block_keys, blocks_for, cap_model_len
from services.worker.model import LlamaModel
from tests.test_pipeline import run_mesh

SPEC = GenerateSpec(layers=3, hidden=64, heads=4, kv_heads=2, vocab=320, seed=7, max_position=1024)
tok = ByteTokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    d = tmp_path_factory.mktemp("model")
    generate_model(d, SPEC)
    return Checkpoint(d)


def load(ck: Checkpoint, units: range | None = None) -> LlamaModel:
    m = LlamaModel(ck.config)
    for u in units if units is not None else range(ck.config.num_units):
        m.load_unit(u, ck.unit_tensors(u))
    return m


@pytest.fixture(scope="module")
def model(ckpt: Checkpoint) -> LlamaModel:
    return load(ckpt)


def run(engine: Engine, max_steps: int = 5000) -> dict[str, list[TokenEvent]]:
    out: dict[str, list[TokenEvent]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return out
        for _, ev in engine.step().events:
            out.setdefault(ev.request_id, []).append(ev)
    raise AssertionError("engine did not finish")


def tokens(evs: list[TokenEvent]) -> list[int]:
    return [t for e in evs for t in e.token_ids]


def budget_blocks(e: Engine, blocks: int) -> int:
    """Bytes of a budget of `blocks` usable blocks for engine `e`'s geometry."""
    return blocks * e.geometry.bytes_per_block


# ---------------------------------------------------------------- block manager (pure)


def test_blocks_are_refcounted_cached_and_evicted_least_recently_used() -> None:
    m = BlockManager(5, 4)  # four usable blocks
    keys = block_keys(list(range(12)), 4)
    assert len(keys) == 3 and keys == block_keys(list(range(13)), 4)  # only full blocks have keys
    table = [m.allocate() for _ in range(3)]
    for b, k in zip(table, keys, strict=True):
        m.register(b, k)
    assert m.match(keys) == table and all(m.refs(b) == 2 for b in table)
    m.free(table)
    m.free(table)
    assert m.free_count() == 4 and m.stats().cached_free == 3 and m.stats().used == 0
    # The never-keyed block goes first, then the least recently freed cached one (the last block
    # of the table, freed first).
    a, b = m.allocate(), m.allocate()
    assert a not in table and b == table[2]
    assert m.match(keys) == table[:2]  # the third is gone: the match stops there
    assert m.free_count() == 0
    with pytest.raises(NoFreeBlocks):
        m.allocate()


def test_model_len_is_capped_so_one_sequence_fits() -> None:
    assert cap_model_len(4096, 0, 10, 16) == 160
    assert cap_model_len(4096, 100, 1000, 16) == 100
    assert cap_model_len(128, 0, 1000, 16) == 128


# ---------------------------------------------------------------- memory follows the tokens


def test_one_long_prompt_among_32_slots_holds_only_the_blocks_its_tokens_need(model: LlamaModel) -> None:
    e = Engine(model, tok, max_batch=32)
    prompt = tok.encode("y" * 700)
    e.submit("long", "g", prompt, SamplingParams(max_tokens=9, ignore_eos=True))
    e.submit("short", "g", tok.encode("hi"), SamplingParams(max_tokens=3, ignore_eos=True))
    peak = 0
    while e.has_work():
        e.step()
        peak = max(peak, e.kv_bytes_held())
        if e.running and e.running[-1].request_id == "long" and len(e.running) == 1:
            held_tokens = e.running[0].length
            held = e.kv_bytes_held()
    g = e.geometry
    cfg = model.cfg
    # Count the bytes: what the tokens need, K and V, every layer...
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_per_head * 4
    assert g.bytes_per_token == per_token
    need = held_tokens * per_token
    # ... and what is held: at most one partly filled block per layer more.
    assert need <= held < need + g.block_size * per_token
    # The storage really is those blocks: per layer, [kv heads, blocks, block size, head dim].
    layer = e.kv.k[0]
    assert layer.shape[0] * layer.shape[2] * layer.shape[3] * layer.element_size() * 2 * cfg.num_hidden_layers == (
        g.bytes_per_block
    )
    # The cache this replaced held 32 rows of a capacity doubled past the longest sequence.
    assert peak * 32 <= 32 * 1024 * per_token
    assert e.kv_bytes_held() == 0  # all finished: every block back (the prefix cache keeps some, unheld)


# ---------------------------------------------------------------- admission and preemption


PROMPTS = [f"request {i}: " + "abcdefgh"[i % 8] * (20 + 9 * i) for i in range(8)]
LONG = SamplingParams(max_tokens=40, ignore_eos=True)


def unconstrained(model: LlamaModel) -> dict[str, list[int]]:
    e = Engine(model, tok, max_batch=8)
    for i, p in enumerate(PROMPTS):
        e.submit(f"r{i}", "g", tok.encode(p), LONG)
    return {k: tokens(v) for k, v in run(e).items()}


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_a_budget_smaller_than_the_load_completes_every_request_with_the_same_tokens(
    model: LlamaModel, prefix_caching: bool
) -> None:
    probe = Engine(model, tok)
    # Room for about two of the eight sequences at their full length: admission holds the rest
    # back, and growing decodes preempt the youngest.
    longest = max(len(tok.encode(p)) for p in PROMPTS) + LONG.max_tokens
    blocks = 2 * blocks_for(longest, probe.geometry.block_size) + 1
    e = Engine(
        model, tok, max_batch=8, kv_cache_bytes=budget_blocks(probe, blocks), prefix_caching=prefix_caching
    )  # fmt: skip
    assert e.blocks.total == blocks
    for i, p in enumerate(PROMPTS):
        e.submit(f"r{i}", "g", tok.encode(p), LONG)
    out: dict[str, list[TokenEvent]] = {}
    most_held = 0
    while e.has_work():
        for _, ev in e.step().events:
            out.setdefault(ev.request_id, []).append(ev)
        most_held = max(most_held, e.blocks.used_count())
        assert len(e.running) + len(e.prefilling) < len(PROMPTS)  # never all at once
    assert most_held <= blocks
    assert e.stats.preemptions > 0 and e.figures.num_preemptions == e.stats.preemptions
    assert {k: tokens(v) for k, v in out.items()} == unconstrained(model)
    assert all(v[-1].finish_reason == "length" and v[-1].error is None for v in out.values())
    assert all(v[-1].completion_tokens == LONG.max_tokens for v in out.values())


def test_a_preempted_stream_goes_on_with_no_gap_and_no_duplicate(model: LlamaModel) -> None:
    probe = Engine(model, tok)
    prompts = {"old": "the first request " * 3, "young": "the second one, admitted later " * 2}
    longest = max(len(tok.encode(p)) for p in prompts.values()) + LONG.max_tokens
    # One sequence fits at full length, not two: the younger one is preempted as both grow.
    e = Engine(model, tok, kv_cache_bytes=budget_blocks(probe, blocks_for(longest, 16) + 2), prefix_caching=False)
    for rid, p in prompts.items():
        e.submit(rid, "g", tok.encode(p), LONG)
    events: dict[str, list[TokenEvent]] = {}
    preempted_after: list[int] = []
    while e.has_work():
        before = e.stats.preemptions
        for _, ev in e.step().events:
            events.setdefault(ev.request_id, []).append(ev)
        if e.stats.preemptions > before:
            preempted_after.append(len(tokens(events.get("young", []))))
    # It was preempted mid-stream (tokens out before, more after) ...
    assert preempted_after and 0 < preempted_after[0] < LONG.max_tokens
    alone = Engine(model, tok)
    alone.submit("young", "g", tok.encode(prompts["young"]), LONG)
    expect = tokens(run(alone)["young"])
    young = events["young"]
    # ... and the stream, event by event, is exactly the unpreempted one: no token twice, none lost.
    assert tokens(young) == expect
    assert "".join(ev.text for ev in young) == tok.decode(expect)
    assert [ev.finish_reason for ev in young[:-1]] == [None] * (len(young) - 1)
    assert young[-1].finish_reason == "length" and young[-1].error is None


# ---------------------------------------------------------------- prefix caching

SYSTEM = "You are a helpful assistant of the Cascade mesh. Answer briefly and truthfully. " * 2


def test_prefix_reuse_gives_the_same_tokens_and_skips_the_shared_prefill(model: LlamaModel) -> None:
    questions = ["What is a block?", "Why page the cache?", "Who scales?"]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    got: dict[bool, dict[str, list[int]]] = {}
    prefilled: dict[bool, int] = {}
    for caching in (False, True):
        e = Engine(model, tok, max_batch=4, prefix_caching=caching)
        for i, q in enumerate(questions):
            # One after the other: each finds the system prompt the one before left in the cache.
            e.submit(f"q{i}", "g", tok.encode(SYSTEM + q), greedy)
            got.setdefault(caching, {}).update({k: tokens(v) for k, v in run(e).items()})
        prefilled[caching] = e.stats.prefilled
        if caching:
            f = e.figures
            assert f.prefix_cache_queries == sum(len(tok.encode(SYSTEM + q)) for q in questions)
            shared_blocks = len(tok.encode(SYSTEM)) // 16
            assert f.prefix_cache_hits == 2 * shared_blocks * 16
            assert 0 < f.prefix_cache_hit_rate < 1
    assert got[True] == got[False]
    assert prefilled[False] - prefilled[True] == 2 * (len(tok.encode(SYSTEM)) // 16) * 16


def test_prefix_cache_hits_in_the_same_batch_and_chunked(model: LlamaModel) -> None:
    """A shared prefix admitted while its first user still runs, prefilled in small chunks."""
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    runs = {}
    for caching in (False, True):
        e = Engine(model, tok, max_batch=4, prefix_caching=caching, max_prefill_tokens=40)
        e.submit("a", "g", tok.encode(SYSTEM + "first"), greedy)
        first = run_until_running(e, "a")
        e.submit("b", "g", tok.encode(SYSTEM + "second"), greedy)
        out = run(e)
        out.setdefault("a", []).extend(first)
        runs[caching] = ({k: tokens(v) for k, v in out.items()}, e.stats.prefilled)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] < runs[False][1]


def run_until_running(e: Engine, rid: str) -> list[TokenEvent]:
    evs: list[TokenEvent] = []
    while not any(s.request_id == rid for s in e.running):
        evs.extend(ev for _, ev in e.step().events)
    return evs


# ---------------------------------------------------------------- pipelined routes


def test_a_partial_layer_route_is_paged_on_both_stages(ckpt: Checkpoint) -> None:
    L = ckpt.config.num_hidden_layers
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    prompt = tok.encode("layer by layer the new instance helps " * 2)
    whole = Engine(load(ckpt), tok)
    whole.submit("r", "g", prompt, greedy)
    expect = tokens(run(whole)["r"])
    k = 1
    n = Engine(load(ckpt, range(0, k + 1)), tok, worker_id="N")
    f = Engine(load(ckpt), tok, worker_id="F")
    n.submit("r", "g", prompt, greedy, route=[RouteStage("N", 0, k), RouteStage("F", k, L)])
    engines = {"N": n, "F": f}
    held: dict[str, int] = {"N": 0, "F": 0}
    out: list[TokenEvent] = []
    # Step by hand to look at the blocks while the route is under way.
    for _ in range(2000):
        events = run_mesh_step(engines)
        out.extend(events)
        for w, e in engines.items():
            held[w] = max(held[w], e.blocks.used_count())
        if out and out[-1].finish_reason is not None:
            break
    run_mesh(engines)  # the closes
    assert tokens(out) == expect
    blocks = blocks_for(len(prompt) + greedy.max_tokens - 1, 16)
    # Each stage held the blocks the sequence's tokens need, in its own pool ...
    assert held == {"N": blocks, "F": blocks}
    # ... over its own layers only: the first stage never made storage for the layers it does not run.
    assert sorted(n.kv.k) == list(range(0, k)) and sorted(f.kv.k) == list(range(k, L))
    assert n.blocks.used_count() == 0 and f.blocks.used_count() == 0  # freed at the end


def run_mesh_step(engines: dict[str, Engine]) -> list[TokenEvent]:
    from tests.test_pipeline import wire

    evs: list[TokenEvent] = []
    for e in engines.values():
        if not e.has_work():
            continue
        r = e.step()
        evs.extend(ev for _, ev in r.events)
        for o in r.outbox:
            h, t = wire(o)
            engines[o.to.worker_id].stage_frame(h, t)
    return evs


def test_stage_work_that_preempts_a_decoding_sequence_leaves_every_stream_its_own_tokens(
    ckpt: Checkpoint,
) -> None:
    """A relayed prompt chunk arrives when the worker's blocks are held by two decoding full
    sequences: admitting it preempts the younger one in the step whose decode batch already holds
    it. That row is dropped (the preempted sequence recomputes it later), and no other sequence
    takes its token."""
    L = ckpt.config.num_hidden_layers
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    full = {"a": tok.encode("the older request " * 3), "b": tok.encode("a younger request " * 3)}
    routed = tok.encode("through two stages " * 2)
    whole = Engine(load(ckpt), tok)
    for rid, p in {**full, "r": routed}.items():
        whole.submit(rid, "g", p, greedy)
    expect = {k: tokens(v) for k, v in run(whole).items()}

    probe = Engine(load(ckpt), tok)
    bs = probe.geometry.block_size
    held = sum(blocks_for(len(p) + 1, bs) for p in full.values())
    # One block short of the routed prompt's blocks besides the two full sequences.
    f = Engine(
        load(ckpt), tok, worker_id="F", kv_cache_bytes=budget_blocks(probe, held + blocks_for(len(routed), bs) - 1)
    )
    for rid, p in full.items():
        f.submit(rid, "g", p, greedy)
    out: dict[str, list[TokenEvent]] = {}
    while len(f.running) < 2:
        for _, ev in f.step().events:
            out.setdefault(ev.request_id, []).append(ev)
    assert f.stats.preemptions == 0
    k = 1
    n = Engine(load(ckpt, range(0, k + 1)), tok, worker_id="N")
    n.submit("r", "g", routed, greedy, route=[RouteStage("N", 0, k), RouteStage("F", k, L)])
    engines = {"N": n, "F": f}
    for _ in range(2000):
        for ev in run_mesh_step(engines):
            out.setdefault(ev.request_id, []).append(ev)
        if f.stats.preemptions:
            break
    # The routed prompt took the younger sequence's blocks while both were decoding.
    assert [s.request_id for s in f.waiting] == ["b"] and [s.request_id for s in f.running] == ["a"]
    for _ in range(4000):
        for ev in run_mesh_step(engines):
            out.setdefault(ev.request_id, []).append(ev)
        if all(v[-1].finish_reason is not None for v in out.values()) and len(out) == 3:
            break
    run_mesh(engines)
    assert {rid: tokens(v) for rid, v in out.items()} == expect
