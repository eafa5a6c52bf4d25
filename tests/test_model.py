"""Model math: slices give the whole model's tokens; KV-cached decoding gives the tokens of
recomputing the full sequence every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cascade.config import GenerateSpec
from cascade.models.checkpoint import Checkpoint
from cascade.models.config import ModelConfig
from cascade.models.generate import generate_model
from services.worker.model import KVCache, LlamaModel, prefill_inputs

SPEC = GenerateSpec(layers=5, hidden=64, heads=4, kv_heads=2, vocab=320, seed=7)
PROMPTS = [[256, *b"The quick brown fox"], [256, *b"jumps"], [256, *b"over the lazy dog, twice over"]]
STEPS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    d = tmp_path_factory.mktemp("model")
    generate_model(d, SPEC)
    return Checkpoint(d)


def load(ckpt: Checkpoint, units: range) -> LlamaModel:
    m = LlamaModel(ckpt.config)
    for u in units:
        m.load_unit(u, ckpt.unit_tensors(u))
    return m


def recompute_greedy(m: LlamaModel, prompt: list[int], steps: int) -> list[int]:
    """Reference: no KV reuse, the whole sequence through the whole model for every token."""
    seq = list(prompt)
    out = []
    for _ in range(steps):
        cache = KVCache(m.cfg, range(m.cfg.num_hidden_layers), 1, m.device, m.dtype)
        ids, pos, lens = prefill_inputs([seq], m.device)
        logits = m.forward(ids, None, range(m.cfg.num_hidden_layers), cache, pos, lens, True, True)
        tok = int(logits.argmax(-1)[0])
        out.append(tok)
        seq.append(tok)
    return out


def staged_greedy(
    stages: list[tuple[LlamaModel, range]], cfg: ModelConfig, prompts: list[list[int]], steps: int
) -> list[list[int]]:
    """Batched prefill + KV-cached decode with the layers split over stages, hidden states handed on."""
    caches = [KVCache(cfg, layers, len(prompts), m.device, m.dtype) for m, layers in stages]
    ids, pos, lens = prefill_inputs(prompts, torch.device("cpu"))
    outs: list[list[int]] = [[] for _ in prompts]
    positions, lengths, prefill = pos, lens, True
    last = ids
    for _ in range(steps):
        h: torch.Tensor | None = None
        for k, ((m, layers), cache) in enumerate(zip(stages, caches, strict=True)):
            first, final = k == 0, k == len(stages) - 1
            h = m.forward(last if first else None, h, layers, cache, positions, lengths, prefill, final)
        assert h is not None
        toks = h.argmax(-1)
        for b, t in enumerate(toks.tolist()):
            outs[b].append(t)
        positions = lengths.unsqueeze(1) if prefill else positions + 1
        prefill = False
        last = toks.unsqueeze(1)
    return outs


def test_kv_cache_matches_recompute(ckpt: Checkpoint) -> None:
    m = load(ckpt, range(ckpt.config.num_units))
    for prompt in PROMPTS:
        cached = staged_greedy([(m, range(ckpt.config.num_hidden_layers))], ckpt.config, [prompt], STEPS)[0]
        assert cached == recompute_greedy(m, prompt, STEPS)


def test_output_is_not_degenerate(ckpt: Checkpoint) -> None:
    # A random model whose greedy output is one repeated token would make every equality above trivial.
    m = load(ckpt, range(ckpt.config.num_units))
    outs = staged_greedy([(m, range(ckpt.config.num_hidden_layers))], ckpt.config, PROMPTS, STEPS)
    assert len({t for o in outs for t in o}) > 5
    assert len({tuple(o) for o in outs}) == len(outs)


def test_batched_matches_single(ckpt: Checkpoint) -> None:
    m = load(ckpt, range(ckpt.config.num_units))
    L = ckpt.config.num_hidden_layers
    batched = staged_greedy([(m, range(L))], ckpt.config, PROMPTS, STEPS)
    singles = [staged_greedy([(m, range(L))], ckpt.config, [p], STEPS)[0] for p in PROMPTS]
    assert batched == singles


@pytest.mark.parametrize("cuts", [(2,), (1,), (4,), (1, 3), (2, 4)])
def test_slices_match_whole(ckpt: Checkpoint, cuts: tuple[int, ...]) -> None:
    cfg = ckpt.config
    L = cfg.num_hidden_layers
    whole = staged_greedy([(load(ckpt, range(cfg.num_units)), range(L))], cfg, PROMPTS, STEPS)
    bounds = [0, *cuts, L]
    stages = []
    for k in range(len(bounds) - 1):
        a, b = bounds[k], bounds[k + 1]
        # Each stage holds only its own units: embedding on the first, head on the last.
        units = range(0 if k == 0 else a + 1, (b + 1) if k < len(bounds) - 2 else cfg.num_units)
        stages.append((load(ckpt, units), range(a, b)))
    assert staged_greedy(stages, cfg, PROMPTS, STEPS) == whole


def test_missing_unit_is_a_clear_error(ckpt: Checkpoint) -> None:
    m = load(ckpt, range(0, 3))
    cache = KVCache(ckpt.config, range(ckpt.config.num_hidden_layers), 1, m.device, m.dtype)
    ids, pos, lens = prefill_inputs([PROMPTS[0]], m.device)
    with pytest.raises(RuntimeError, match="layer 2 not loaded"):
        m.forward(ids, None, range(ckpt.config.num_hidden_layers), cache, pos, lens, True, True)


def test_generated_model_is_deterministic(tmp_path: Path, ckpt: Checkpoint) -> None:
    generate_model(tmp_path, SPEC)
    again = Checkpoint(tmp_path)
    for u in range(ckpt.config.num_units):
        for name, t in ckpt.unit_tensors(u).items():
            assert torch.equal(t, again.tensor(name))
