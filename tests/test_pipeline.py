"""Pipelined (partial-layer) execution between engines: for every split point the tokens
equal the whole model's, for prefill and decode, with the downstream stage batching relayed
work together with its own requests. Frames cross the real stage-link encoding."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from cascade.config import GenerateSpec
from cascade.messages import RouteStage, SamplingParams, TokenEvent
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from cascade.models.tokenizer import ByteTokenizer
from cascade.stagewire import PREFIX_SIZE, StageFrame, StageInput, decode_frame, encode_frame, split_prefix
from services.worker.engine import Engine, Outgoing
from services.worker.model import LlamaModel, Segment

SPEC = GenerateSpec(layers=4, hidden=64, heads=4, kv_heads=2, vocab=320, seed=21)
tok = ByteTokenizer()
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = ["partial routes", "x", "layer by layer, the new instance helps"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    d = tmp_path_factory.mktemp("model")
    generate_model(d, SPEC)
    return Checkpoint(d)


def model(ck: Checkpoint, units: range) -> LlamaModel:
    m = LlamaModel(ck.config)
    for u in units:
        m.load_unit(u, ck.unit_tensors(u))
    return m


def wire(o: Outgoing) -> tuple[StageFrame, torch.Tensor | None]:
    parts = encode_frame(o.frame, o.tensor)
    raw = b"".join(bytes(p) for p in parts)
    hlen, _ = split_prefix(raw[:PREFIX_SIZE])
    return decode_frame(raw[PREFIX_SIZE : PREFIX_SIZE + hlen], raw[PREFIX_SIZE + hlen :])


def run_mesh(engines: dict[str, Engine], max_steps: int = 2000) -> dict[str, list[TokenEvent]]:
    """Step every engine in turn, delivering stage frames, until none has work."""
    out: dict[str, list[TokenEvent]] = {}
    for _ in range(max_steps):
        busy = False
        for e in engines.values():
            if not e.has_work():
                continue
            busy = True
            r = e.step()
            for _, ev in r.events:
                out.setdefault(ev.request_id, []).append(ev)
            for o in r.outbox:
                if o.to.worker_id in engines:  # frames to a worker that is gone are lost, as on a real link
                    h, t = wire(o)
                    engines[o.to.worker_id].stage_frame(h, t)
        if not busy:
            return out
    raise AssertionError("pipeline did not finish")


def toks(evs: list[TokenEvent]) -> list[int]:
    return [t for e in evs for t in e.token_ids]


def whole_tokens(ck: Checkpoint) -> dict[str, list[int]]:
    e = Engine(model(ck, range(ck.config.num_units)), tok)
    for p in PROMPTS:
        e.submit(p, "g", tok.encode(p), GREEDY)
    return {p: toks(v) for p, v in run_mesh({"F": e}).items()}


@pytest.mark.parametrize("budget", [2048, 6], ids=["whole-prompts", "chunked-prompts"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_split_point_gives_the_whole_models_tokens(ckpt: Checkpoint, k: int, budget: int) -> None:
    L = ckpt.config.num_hidden_layers
    expect = whole_tokens(ckpt)
    # N holds only what it has loaded so far: the embedding and layers [0, k).
    n = Engine(model(ckpt, range(0, k + 1)), tok, worker_id="N", max_prefill_tokens=budget)
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F", max_prefill_tokens=budget)
    route = [RouteStage("N", 0, k), RouteStage("F", k, L)]
    for p in PROMPTS:
        n.submit(p, "g", tok.encode(p), GREEDY, route=route)
    got = run_mesh({"N": n, "F": f})
    assert {p: toks(v) for p, v in got.items()} == expect
    assert all(v[-1].finish_reason == "length" for v in got.values())
    assert not f.relayed and not n.driven  # closes freed the stage state on both sides
    assert f.stats.relayed_steps > 0


@pytest.mark.parametrize("budget", [2048, 5], ids=["whole-prompts", "chunked-prompts"])
def test_three_stages(ckpt: Checkpoint, budget: int) -> None:
    expect = whole_tokens(ckpt)
    engines = {
        "A": Engine(model(ckpt, range(0, 2)), tok, worker_id="A", max_prefill_tokens=budget),
        "B": Engine(model(ckpt, range(2, 4)), tok, worker_id="B", max_prefill_tokens=budget),
        "C": Engine(model(ckpt, range(4, ckpt.config.num_units)), tok, worker_id="C", max_prefill_tokens=budget),
    }
    route = [RouteStage("A", 0, 1), RouteStage("B", 1, 3), RouteStage("C", 3, 4)]
    for p in PROMPTS:
        engines["A"].submit(p, "g", tok.encode(p), GREEDY, route=route)
    got = run_mesh(engines)
    assert {p: toks(v) for p, v in got.items()} == expect


def test_relayed_work_batches_with_own_requests(ckpt: Checkpoint) -> None:
    L = ckpt.config.num_hidden_layers
    expect = whole_tokens(ckpt)
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N")
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F")
    route = [RouteStage("N", 0, 2), RouteStage("F", 2, L)]
    # F serves two prompts itself while relaying the third for N.
    f.submit(PROMPTS[0], "g", tok.encode(PROMPTS[0]), GREEDY)
    f.submit(PROMPTS[1], "g", tok.encode(PROMPTS[1]), GREEDY)
    n.submit(PROMPTS[2], "g", tok.encode(PROMPTS[2]), GREEDY, route=route)
    got = run_mesh({"N": n, "F": f})
    assert {p: toks(v) for p, v in got.items()} == expect
    # Some of F's steps computed its own batch and a relayed sequence together.
    assert any(b >= 3 for b in f.stats.batch_hist)


def test_stage_decodes_at_one_depth_run_as_one_segment(ckpt: Checkpoint) -> None:
    """Routes split at the same layer decode together: one segment (one attention call per layer)
    on each side per depth, whatever the number of routes, with the whole model's tokens."""
    L = ckpt.config.num_hidden_layers
    expect = whole_tokens(ckpt)
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N")
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F")
    seen: dict[str, list[list[tuple[bool, int]]]] = {"N": [], "F": []}
    for name, e in (("N", n), ("F", f)):
        real = e.model.forward_segments

        def spy(segs: list[Segment], real: Any = real, name: str = name) -> list[torch.Tensor]:
            seen[name].append([(s.prefill, s.positions.shape[0]) for s in segs])
            return real(segs)

        e.model.forward_segments = spy  # type: ignore[method-assign]
    expect2 = {f"{p}@{k}": v for p, v in expect.items() for k in (1, 2)}
    for k in (1, 2):
        route = [RouteStage("N", 0, k), RouteStage("F", k, L)]
        for p in PROMPTS:
            n.submit(f"{p}@{k}", "g", tok.encode(p), GREEDY, route=route)
    got = run_mesh({"N": n, "F": f})
    assert {r: toks(v) for r, v in got.items()} == expect2
    for name in ("N", "F"):
        decode_segments = [[b for pre, b in step if not pre] for step in seen[name]]
        assert max(len(d) for d in decode_segments) <= 2  # one per depth
        assert max(b for d in decode_segments for b in d) == len(PROMPTS)  # every route of a depth at once


def test_stage_missing_layers_fails_the_request_clearly(ckpt: Checkpoint) -> None:
    n = Engine(model(ckpt, range(0, 2)), tok, worker_id="N")
    f = Engine(model(ckpt, range(0, 3)), tok, worker_id="F")  # lacks layers 2.. and the head
    route = [RouteStage("N", 0, 1), RouteStage("F", 1, ckpt.config.num_hidden_layers)]
    n.submit("r", "g", tok.encode("hello"), GREEDY, route=route)
    got = run_mesh({"N": n, "F": f})
    assert got["r"][-1].finish_reason == "error"
    assert "lacks layers" in (got["r"][-1].error or "")


def test_peer_failure_ends_driven_requests(ckpt: Checkpoint) -> None:
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N")
    route = [RouteStage("N", 0, 2), RouteStage("F", 2, ckpt.config.num_hidden_layers)]
    n.submit("r", "g", tok.encode("hello"), GREEDY, route=route)
    r = n.step()
    assert r.outbox and r.outbox[0].to.worker_id == "F"
    n.peer_failed("F", "connection reset")
    got = run_mesh({"N": n})
    assert got["r"][-1].finish_reason == "error" and "F failed" in (got["r"][-1].error or "")
    assert not n.driven


def test_relayed_stages_do_not_take_batch_slots(ckpt: Checkpoint) -> None:
    """A busy instance relaying for a new one still admits its own requests up to its limit
    (engine.py says why: measured in bench/scaleup.py)."""
    L = ckpt.config.num_hidden_layers
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, max_batch=2, worker_id="F")
    n = Engine(model(ckpt, range(0, 2)), tok, worker_id="N")
    route = [RouteStage("N", 0, 1), RouteStage("F", 1, L)]
    n.submit("relay", "g", tok.encode("hello"), SamplingParams(max_tokens=30, ignore_eos=True), route=route)
    for o in n.step().outbox:
        h, t = wire(o)
        f.stage_frame(h, t)
    for i in range(3):
        f.submit(f"own{i}", "g", tok.encode("abc"), GREEDY)
    f.step()
    assert len(f.relayed) == 1 and f.relayed["relay"].length > 0
    assert len(f.running) == 2 and len(f.waiting) == 1  # the limit binds on its own sequences


def test_relayed_prompts_share_the_step_prefill_budget(ckpt: Checkpoint) -> None:
    L = ckpt.config.num_hidden_layers
    expect = whole_tokens(ckpt)
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N", max_prefill_tokens=16)
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F", max_prefill_tokens=16)
    route = [RouteStage("N", 0, 2), RouteStage("F", 2, L)]
    for p in PROMPTS:
        n.submit(p, "g", tok.encode(p), GREEDY, route=route)
    first = n.step()
    # 16 tokens of budget at half the layers: the 15- and 2-token prompts fit (8.5 tokens), and the
    # 39-token one starts with a chunk of what is left: 7.5 tokens at half the layers is 15.
    frames = [(o.frame, o.tensor) for o in first.outbox]
    sizes = [(f.start, t.shape[1], f.final) for f, t in frames if isinstance(f, StageInput) and t is not None]
    assert sizes == [(0, 15, True), (0, 2, True), (0, 15, False)]
    for o in first.outbox:
        h, t = wire(o)
        f.stage_frame(h, t)
    got = run_mesh({"N": n, "F": f})
    assert {p: toks(v) for p, v in got.items()} == expect


def test_prompts_start_oldest_first_across_own_and_relayed_work(ckpt: Checkpoint) -> None:
    """A relayed prompt that arrived at the gateway after F's own waiting requests does not
    overtake them (it would raise their latency by what it saves its own), and one that arrived
    before them goes first."""
    L = ckpt.config.num_hidden_layers
    n = Engine(model(ckpt, range(0, 2)), tok, worker_id="N")
    # Budget for one prompt per step (5 tokens with BOS): the order of admission is visible step by step.
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F", max_prefill_tokens=5)
    route = [RouteStage("N", 0, 1), RouteStage("F", 1, L)]
    own = tok.encode("abcd")
    f.submit("old", "g", own, GREEDY, arrived_at=100.0)
    f.submit("young", "g", own, GREEDY, arrived_at=300.0)
    n.submit("relay", "g", own, GREEDY, route=route, arrived_at=200.0)
    for o in n.step().outbox:
        h, t = wire(o)
        f.stage_frame(h, t)
    order: list[str] = []
    for _ in range(3):
        f.step()
        order += [s.request_id for s in f.running if s.request_id not in order]
        order += [rid for rid, r in f.relayed.items() if r.length and rid not in order]
    assert order == ["old", "relay", "young"]


def test_a_late_request_is_queued_by_its_arrival(ckpt: Checkpoint) -> None:
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F", max_batch=1)
    f.submit("running", "g", tok.encode("a"), SamplingParams(max_tokens=50, ignore_eos=True), arrived_at=1.0)
    f.step()
    for rid, at in (("c", 30.0), ("a", 10.0), ("b", 20.0)):
        f.submit(rid, "g", tok.encode("a"), GREEDY, arrived_at=at)
    f.step()
    assert [s.request_id for s in f.waiting] == ["a", "b", "c"]


SAMPLED = SamplingParams(
    max_tokens=10, ignore_eos=True, presence_penalty=0.6, frequency_penalty=1.1, repetition_penalty=1.3, logprobs=2
)


@pytest.mark.parametrize("budget", [2048, 5], ids=["whole-prompts", "chunked-prompts"])
def test_penalties_and_logprobs_through_three_stages(ckpt: Checkpoint, budget: int) -> None:
    """The last stage samples: it holds the prompt (from the first chunk's frame) and the tokens
    it sampled, so penalties and logprobs come out as on a whole instance."""
    whole = Engine(model(ckpt, range(ckpt.config.num_units)), tok)
    for p in PROMPTS:
        whole.submit(p, "g", tok.encode(p), SAMPLED)
    expect = run_mesh({"F": whole})
    plain = whole_tokens(ckpt)
    assert {p: toks(v) for p, v in expect.items()} != plain  # the penalties matter here
    engines = {
        "A": Engine(model(ckpt, range(0, 2)), tok, worker_id="A", max_prefill_tokens=budget),
        "B": Engine(model(ckpt, range(2, 4)), tok, worker_id="B", max_prefill_tokens=budget),
        "C": Engine(model(ckpt, range(4, ckpt.config.num_units)), tok, worker_id="C", max_prefill_tokens=budget),
    }
    route = [RouteStage("A", 0, 1), RouteStage("B", 1, 3), RouteStage("C", 3, 4)]
    for p in PROMPTS:
        engines["A"].submit(p, "g", tok.encode(p), SAMPLED, route=route)
    got = run_mesh(engines)
    assert {p: toks(v) for p, v in got.items()} == {p: toks(v) for p, v in expect.items()}
    for p in PROMPTS:
        a = [x for e in got[p] for x in e.logprobs]
        b = [x for e in expect[p] for x in e.logprobs]
        assert [x.top_ids for x in a] == [x.top_ids for x in b]
        assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-4)


def test_penalty_counts_move_with_a_migrated_request(ckpt: Checkpoint) -> None:
    """A request resumed elsewhere with its first tokens appended to its prompt (what the gateway
    sends after a migration) goes on with the tokens an unbroken run gives: the streamed tokens
    count as output for the penalties, on a whole instance and at a route's last stage."""
    p = PROMPTS[2]
    whole = Engine(model(ckpt, range(ckpt.config.num_units)), tok)
    whole.submit(p, "g", tok.encode(p), SAMPLED)
    unbroken = toks(run_mesh({"F": whole})[p])
    cut = 4
    resumed = SamplingParams(
        max_tokens=10 - cut, ignore_eos=True, presence_penalty=0.6, frequency_penalty=1.1, repetition_penalty=1.3,
        resumed=cut,
    )  # fmt: skip
    again = Engine(model(ckpt, range(ckpt.config.num_units)), tok)
    again.submit(p, "g", tok.encode(p) + unbroken[:cut], resumed)
    assert toks(run_mesh({"F": again})[p]) == unbroken[cut:]
    L = ckpt.config.num_hidden_layers
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N")
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F")
    n.submit(p, "g", tok.encode(p) + unbroken[:cut], resumed, route=[RouteStage("N", 0, 2), RouteStage("F", 2, L)])
    assert toks(run_mesh({"N": n, "F": f})[p]) == unbroken[cut:]


def test_structured_output_through_a_route_and_after_a_migration(ckpt: Checkpoint) -> None:
    """The grammar's matcher lives where sampling happens (the route's last stage), and a
    migrated request's matcher is replayed from what it streamed: the same JSON as one whole run."""
    import json

    from cascade import structured

    grammar = structured.from_json_schema(
        {
            "type": "object",
            "properties": {
                "k": {"enum": ["x", "y", "z"]},
                "v": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            },
            "required": ["k", "v"],
            "additionalProperties": False,
        }
    )
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=9, grammar=grammar)
    p = PROMPTS[0]
    whole = Engine(model(ckpt, range(ckpt.config.num_units)), tok)
    whole.submit(p, "g", tok.encode(p), params)
    evs = run_mesh({"F": whole})[p]
    want = toks(evs)
    assert evs[-1].finish_reason == "stop"
    json.loads(tok.decode(want))
    L = ckpt.config.num_hidden_layers
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N")
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F")
    n.submit(p, "g", tok.encode(p), params, route=[RouteStage("N", 0, 2), RouteStage("F", 2, L)])
    routed = run_mesh({"N": n, "F": f})[p]
    assert toks(routed) == want and routed[-1].finish_reason == "stop"
    cut = 5
    resumed = SamplingParams(max_tokens=80 - cut, temperature=1.0, seed=9, grammar=grammar, resumed=cut)
    for engines, route in [
        ({"F": Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F")}, None),
        (
            {
                "N": Engine(model(ckpt, range(0, 3)), tok, worker_id="N"),
                "F": Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F"),
            },
            [RouteStage("N", 0, 2), RouteStage("F", 2, L)],
        ),
    ]:
        head = next(iter(engines.values()))
        head.submit(p, "g", tok.encode(p) + want[:cut], resumed, route=route)
        assert toks(run_mesh(engines)[p]) == want[cut:]


def test_n_choices_through_a_route_are_the_whole_instances_choices(ckpt: Checkpoint) -> None:
    """An n > 1 request on a partial-layer route runs as one sequence per choice under its id
    (what the gateway sends a route: n = 1 and the choice each): every stage keeps each choice
    apart, the last stage samples each from its own seed + choice stream with its own penalty
    counts and grammar, and the choices equal the whole instance's forked ones, token for token;
    a choice migrated onto the route mid-way goes on exactly too."""
    from cascade import structured

    grammar = structured.from_regex("[a-z]+( [a-z]+)*")
    params = SamplingParams(
        max_tokens=14, n=3, temperature=1.0, seed=5, presence_penalty=0.6, frequency_penalty=1.1,
        repetition_penalty=1.3, grammar=grammar, ignore_eos=True,
    )  # fmt: skip
    p = PROMPTS[2]
    whole = Engine(model(ckpt, range(ckpt.config.num_units)), tok)
    whole.submit(p, "g", tok.encode(p), params)
    evs = run_mesh({"F": whole})[p]
    want = {c: toks([e for e in evs if e.choice == c]) for c in range(3)}
    assert len({tuple(v) for v in want.values()}) == 3 and all(len(v) == 14 for v in want.values())
    L = ckpt.config.num_hidden_layers
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N")
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F")
    route = [RouteStage("N", 0, 2), RouteStage("F", 2, L)]
    cuts = {0: 0, 1: 0, 2: 3}  # choice 2 streamed three tokens elsewhere before it moved here
    for c, cut in cuts.items():
        one = dataclasses.replace(params, n=1, choice=c, max_tokens=params.max_tokens - cut, resumed=cut)
        n.submit(p, "g", tok.encode(p) + want[c][:cut], one, route=route)
    got = run_mesh({"N": n, "F": f})[p]
    for c, cut in cuts.items():
        mine = [e for e in got if e.choice == c]
        assert want[c][:cut] + toks(mine) == want[c], c
        assert mine[-1].finish_reason == [e for e in evs if e.choice == c][-1].finish_reason
    assert not f.relayed and not n.driven  # every choice's stage state was freed on both sides
    assert f.stats.relayed_steps > 0


@pytest.mark.parametrize("budget", [2048, 5], ids=["whole-prompts", "chunked-prompts"])
def test_prompt_logprobs_through_a_route_are_the_whole_instances(ckpt: Checkpoint, budget: int) -> None:
    """The route's last stage runs the head on every prompt chunk and sends the prompt's
    logprobs back with the first token: the same figures, ranks and top tokens as a whole
    instance's (which tests/test_sampling_api.py holds to transformers' log_softmax)."""
    params = SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    whole = Engine(model(ckpt, range(ckpt.config.num_units)), tok, max_prefill_tokens=budget)
    for p in PROMPTS:
        whole.submit(p, "g", tok.encode(p), params)
    expect = run_mesh({"F": whole})
    engines = {
        "A": Engine(model(ckpt, range(0, 2)), tok, worker_id="A", max_prefill_tokens=budget),
        "B": Engine(model(ckpt, range(2, 4)), tok, worker_id="B", max_prefill_tokens=budget),
        "C": Engine(model(ckpt, range(4, ckpt.config.num_units)), tok, worker_id="C", max_prefill_tokens=budget),
    }
    route = [RouteStage("A", 0, 1), RouteStage("B", 1, 3), RouteStage("C", 3, 4)]
    for p in PROMPTS:
        engines["A"].submit(p, "g", tok.encode(p), params, route=route)
    got = run_mesh(engines)
    for p in PROMPTS:
        assert toks(got[p]) == toks(expect[p])
        (ra,) = [e.prompt_logprobs for e in got[p] if e.prompt_logprobs is not None]
        (rb,) = [e.prompt_logprobs for e in expect[p] if e.prompt_logprobs is not None]
        assert len(ra) == len(rb) == len(tok.encode(p)) and ra[0] is None and rb[0] is None
        a, b = [x for x in ra if x is not None], [x for x in rb if x is not None]
        assert len(a) == len(b) == len(tok.encode(p)) - 1
        assert [(x.token, x.top_ids) for x in a] == [(x.token, x.top_ids) for x in b]
        # A rank deep in the tail counts near-ties, which float noise between the two ways of
        # computing the same logits may order either way.
        assert [x.rank for x in a] == pytest.approx([x.rank for x in b], abs=1)
        assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-4)
        assert [x.top_logprobs for x in a] == [pytest.approx(x.top_logprobs, abs=1e-4) for x in b]
    assert not engines["C"].relayed and not engines["A"].driven


def test_prefill_queued_counts_each_roles_prompt_work_by_its_layers(ckpt: Checkpoint) -> None:
    """The heartbeat's `prefill_queued` (what the gateway splits live routes by): prompt tokens not
    computed yet, a route's first stage and a relayed stage each weighed by its share of the layers."""
    L = ckpt.config.num_hidden_layers
    route = [RouteStage("N", 0, 2), RouteStage("F", 2, L)]
    # N drives two routes through half the layers; a budget of 8 full-model tokens a step is 16 of
    # theirs: the first prompt goes whole, the second in part.
    n = Engine(model(ckpt, range(0, 3)), tok, worker_id="N", max_prefill_tokens=8)
    prompts = [tok.encode("abcdefghij"), tok.encode("klmnopqrstuv")]
    for i, p in enumerate(prompts):
        n.submit(f"r{i}", "g", p, GREEDY, route=route, arrived_at=10.0 + i)
    first = n.step()
    sent = sum(t.shape[1] for o in first.outbox if (t := o.tensor) is not None)
    assert 0 < sent < sum(map(len, prompts))
    assert n.figures.prefill_queued == round((sum(map(len, prompts)) - sent) * 2 / L)
    # F: one batch slot, a budget of 4 tokens. Its own older prompt starts with a chunk of 4, the
    # next own one waits for the slot, and the relayed chunks that arrived wait behind them.
    f = Engine(model(ckpt, range(ckpt.config.num_units)), tok, worker_id="F", max_prefill_tokens=4, max_batch=1)
    own = [tok.encode("0123456789"), tok.encode("abcdef")]
    for i, p in enumerate(own):
        f.submit(f"own{i}", "g", p, GREEDY, arrived_at=1.0 + i)
    for o in first.outbox:
        h, t = wire(o)
        f.stage_frame(h, t)
    f.step()
    assert [s.request_id for s in f.prefilling] == ["own0"] and [s.request_id for s in f.waiting] == ["own1"]
    relayed = sum(p.hidden.shape[1] for r in f.relayed.values() for p in r.inputs if p.prefill)
    assert relayed == sent
    assert f.figures.prefill_queued == round(len(own[0]) - 4 + len(own[1]) + sent * (L - 2) / L)
    # Everything computed: nothing queued.
    run_mesh({"N": n, "F": f})
    assert n.figures.prefill_queued == 0 and f.figures.prefill_queued == 0
