"""Small real tokenizers for tests, trained here in milliseconds with the `tokenizers` library and
saved through transformers' PreTrainedTokenizerFast, so transformers (the reference) and Cascade
read the very same files. Two families, as real checkpoints have them:

- byte-level BPE (GPT-2 / Llama 3 / Qwen / SmolLM): every byte is a token, no unknowns;
- SentencePiece-style BPE (Llama 2 / Mistral): `▁` for spaces (a Metaspace pre-tokenizer, or the
  older Prepend+Replace normalizer), byte fallback `<0x..>` tokens for what the vocabulary lacks,
  and a decoder that strips the leading space.

Each knows the special tokens of the chat template it is paired with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# Enough text for a few hundred merges: English with spaces, code, digits, punctuation, and some
# accented letters so that both multi-byte tokens and byte fallbacks occur.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello, how are you today? I'm doing great, thanks for asking!",
    "What is the weather like in Paris, France? It is 22 degrees and sunny.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    '{"name": "get_current_temperature", "arguments": {"location": "Paris, France", "unit": "celsius"}}',
    "You are a helpful assistant. Answer briefly and clearly.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159",
    "Café, naïve, résumé, Zürich, São Paulo, Kraków, Ærøskøbing.",
    "Tools are functions the model may call; results come back as tool messages.",
    "  leading spaces, trailing spaces  \n\n\ttabs and\r\nnewlines\n",
]

# Texts that exercise the corners: leading and repeated spaces, newlines, digits, multi-byte
# UTF-8 the vocabularies have never seen (CJK, emoji with ZWJ, combining marks), empty text.
TEXTS = [
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing space ",
    "",
    " ",
    "\n",
    "line one\nline two\n\n  indented\ttab",
    "Numbers 12345 and 3.14, 2024-01-01",
    "Café naïve résumé",
    "日本語のテキスト",
    "emoji 😀 👍🏽 👨‍👩‍👧 end",
    "e\u0301 combining",
    "don't won't I'm you're",
    "<|not a token|> [NOT] <s>text",
]


@dataclass(frozen=True)
class Flavour:
    """One checkpoint family's tokenizer, as transformers 5 saves it."""

    name: str
    template: str | None  # file under TEMPLATES
    special: tuple[str, ...]  # special tokens (ids right after the base vocabulary, or first)
    bos: str | None
    eos: str
    unk: str | None = None
    pad: str | None = None
    add_bos: bool = False  # the post-processor prepends BOS to every encoded text
    sentencepiece: bool = False
    legacy_normalizer: bool = False  # Llama 2's Prepend+Replace normalizer instead of Metaspace
    digits: bool = False  # SmolLM's tokenizer.json splits digits before the byte-level split
    plain_added: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <tool_call>)
    model_type: str = "llama"
    tokenizer_class: str | None = None  # overrides what save_pretrained writes
    config_extra: tuple[tuple[str, Any], ...] = ()  # more tokenizer_config.json entries


LLAMA3 = Flavour(
    "llama3",
    "llama-3.1-8b-instruct.jinja",
    special=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|python_tag|>",
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    add_bos=True,
)
QWEN25 = Flavour(
    "qwen2.5",
    "qwen2.5-instruct.jinja",
    special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    plain_added=("<tool_call>", "</tool_call>"),
    model_type="qwen2",
)
SMOLLM2 = Flavour(
    "smollm2",
    "smollm2-135m-instruct.jinja",
    special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos="<|im_start|>",
    eos="<|im_end|>",
    unk="<|endoftext|>",
    pad="<|im_end|>",
    digits=True,
)
MISTRAL = Flavour(
    "mistral",
    "mistral-nemo-instruct-2407.jinja",
    special=(
        "<unk>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[TOOL_CALLS]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
    ),
    bos="<s>",
    eos="</s>",
    unk="<unk>",
    add_bos=True,
    sentencepiece=True,
    model_type="mistral",
)
LLAMA2 = Flavour(
    "llama2",
    None,
    special=("<unk>", "<s>", "</s>"),
    bos="<s>",
    eos="</s>",
    unk="<unk>",
    add_bos=True,
    sentencepiece=True,
    legacy_normalizer=True,
)


def _train(f: Flavour) -> Tokenizer:
    if f.sentencepiece:
        tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        if f.legacy_normalizer:
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    else:
        tok = Tokenizer(BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if f.digits
            else byte_level
        )
        tok.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if f.sentencepiece:
        tok = _with_byte_fallback_vocab(tok)
    return tok


def _with_byte_fallback_vocab(trained: Tokenizer) -> Tokenizer:
    """The SentencePiece layout: <unk> <s> </s>, then the 256 byte tokens, then the pieces."""
    data = json.loads(trained.to_str())
    pieces = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    order = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    order += [p for p in pieces if p not in order]
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    data["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(data))


def build(f: Flavour, out: Path, *, template: str | None = None) -> Path:
    """Train `f`'s tokenizer and save it to `out` the way transformers 5 saves one (tokenizer.json,
    tokenizer_config.json, chat_template.jinja), with a config.json naming the model type."""
    from transformers import PreTrainedTokenizerFast

    tok = _train(f)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in f.special])
    if f.plain_added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in f.plain_added])
    if f.add_bos:
        assert f.bos is not None
        bos_id = tok.token_to_id(f.bos)
        template_post = processors.TemplateProcessing(
            single=f"{f.bos} $A", pair=f"{f.bos} $A {f.bos} $B", special_tokens=[(f.bos, bos_id)]
        )
        tok.post_processor = (
            template_post
            if f.sentencepiece
            else processors.Sequence([processors.ByteLevel(trim_offsets=False), template_post])
        )
    elif not f.sentencepiece:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    text = template if template is not None else ((TEMPLATES / f.template).read_text() if f.template else None)
    kwargs: dict[str, Any] = {"eos_token": f.eos}
    for k, v in (("bos_token", f.bos), ("unk_token", f.unk), ("pad_token", f.pad)):
        if v is not None:
            kwargs[k] = v
    if text is not None:
        kwargs["chat_template"] = text
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(str(out))
    if f.tokenizer_class is not None or f.config_extra:
        edit_json(out / "tokenizer_config.json", tokenizer_class=f.tokenizer_class, **dict(f.config_extra))
    (out / "config.json").write_text(json.dumps({"model_type": f.model_type}))
    return out


def edit_json(path: Path, **changes: Any) -> None:
    """Set (or, with None, remove) top-level entries of a JSON file."""
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data, indent=2))


def hf_tokenizer(path: Path) -> Any:
    """transformers' own reading of the directory: the reference."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def hf_chat_ids(tok: Any, messages: Sequence[dict[str, Any]], tools: Any = None) -> list[int]:
    ids = tok.apply_chat_template(
        list(messages), tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(i) for i in ids]
