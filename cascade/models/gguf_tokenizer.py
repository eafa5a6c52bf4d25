"""tokenizer.json, tokenizer_config.json and generation_config.json for a GGUF file, built from its
`tokenizer.ggml.*` metadata (a GGUF file carries no tokenizer.json).

The result is the tokenizer transformers builds for the same file (`AutoTokenizer.from_pretrained(
dir, gguf_file=...)`), written out so that transformers, the `tokenizers` library and Cascade all
read it the same way: byte-level BPE ("gpt2") with the merges and the pre-tokenizer the file names,
or SentencePiece-style BPE ("llama") with byte fallback; CONTROL tokens special, USER_DEFINED tokens
matched whole; BOS / EOS added as `tokenizer.ggml.add_bos_token` / `add_eos_token` say.

One deliberate difference: for pre-tokenizer names llama.cpp defines and transformers does not
know (`smollm`, the StarCoder family), transformers falls back to GPT-2's split, while llama.cpp
and the models' own hub tokenizers split digits one by one first. The folder follows llama.cpp
and the hub (they differ from transformers' fallback only when a run of spaces precedes a digit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cascade.models.source import GGUFError

# --------------------------------------------------------------------------- tokenizers

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as transformers builds them for GGUF files
# (regex split, then byte-level without its own regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE_TOKENIZERS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# llama.cpp: digits one by one, then GPT-2's split. transformers has no entry for these names
# (it would fall back to GPT-2's split, which lets a run of spaces before a digit tokenize
# differently); the models' own hub tokenizers are Digits(individual) + ByteLevel, as here.
DIGIT_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "codeshell")
# GPT-2's own split, which byte-level BPE applies with no further instruction.
GPT2_PRE_TOKENIZERS = ("default", "gpt2", "gpt-2")

_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte spelled as a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tokenizer_files(
    path: Path, meta: dict[str, Any], config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """tokenizer.json, tokenizer_config.json and generation_config.json from the metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{path} has no vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    if types and len(types) != len(tokens):
        raise GGUFError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    if len(tokens) > config["vocab_size"]:
        raise GGUFError(f"{path}: {len(tokens)} tokens but an embedding of {config['vocab_size']} rows")

    def special(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is None:
            return None
        if not 0 <= int(tid) < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{key} = {tid} is outside the vocabulary")
        return str(tokens[int(tid)])

    specials = {
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
    }
    if kind == "gpt2":
        model, pre_tokenizer, decoder, vocab = _byte_level(path, meta, tokens)
        normalizer = None
        # llama.cpp and transformers agree: a byte-level vocabulary adds no BOS unless the file says so.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        model, pre_tokenizer, decoder, vocab = _sentencepiece(path, meta, tokens)
        normalizer = None
        # Older SentencePiece files carry no flag, and llama.cpp adds BOS to them.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise GGUFError(
            f"{path}: tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE, "
            "'llama' SentencePiece BPE)"
        )
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    # Tokens the file marks CONTROL (<|im_start|>) match whole and are special; USER_DEFINED
    # ones (<think>) match whole too but decode as text. In a byte-level vocabulary a CONTROL
    # token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
    alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
    added: dict[int, dict[str, Any]] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types, strict=False)):
        if ty == _TOKEN_CONTROL and (alphabet is None or set(tok) <= alphabet):
            added[i] = _added_token(i, tok, special=True)
        elif ty == _TOKEN_USER_DEFINED and tok in vocab:
            added.setdefault(i, _added_token(i, tok, special=False))
    for tok in specials.values():
        if tok is not None and tok in vocab and vocab[tok] not in added:
            added[vocab[tok]] = _added_token(vocab[tok], tok, special=True)

    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added[i] for i in sorted(added)],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _template(
            specials["bos_token"] if add_bos else None, specials["eos_token"] if add_eos else None, vocab
        ),
        "decoder": decoder,
        "model": model,
    }
    tokenizer_config: dict[str, Any] = {
        # The class that loads tokenizer.json as it is, in transformers 4 and 5 alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **specials,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    generation: dict[str, Any] = {}
    if config.get("bos_token_id") is not None:
        generation["bos_token_id"] = config["bos_token_id"]
    # llama.cpp stops at every end-of-generation token the file names (Llama 3's <|eot_id|> as
    # well as <|end_of_text|>); generation_config.json is where transformers reads that list.
    stops = list(
        dict.fromkeys(
            int(meta[f"tokenizer.ggml.{k}_token_id"])
            for k in ("eos", "eot", "eom")
            if f"tokenizer.ggml.{k}_token_id" in meta
        )
    )
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if config.get("pad_token_id") is not None:
        generation["pad_token_id"] = config["pad_token_id"]
    return tokenizer, tokenizer_config, generation


def _added_token(i: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _byte_level(
    path: Path, meta: dict[str, Any], tokens: list[str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, int]]:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not merges:
        raise GGUFError(f"{path}: a byte-level BPE vocabulary without merges (tokenizer.ggml.merges)")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet (a special token with a space, say) is respelled
    # into it, so BPE can produce it; transformers does the same.
    vocab = {
        (tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))): i
        for i, tok in enumerate(tokens)
    }
    pre = meta.get("tokenizer.ggml.pre")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre_tokenizer: dict[str, Any]
    if pre in SPLIT_PRE_TOKENIZERS:
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": SPLIT_PRE_TOKENIZERS[pre]},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {**byte_level, "use_regex": False},
            ],
        }
    elif pre in DIGIT_PRE_TOKENIZERS:
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        }
    elif pre is None or pre in GPT2_PRE_TOKENIZERS:
        pre_tokenizer = byte_level
    else:
        known = sorted([*SPLIT_PRE_TOKENIZERS, *DIGIT_PRE_TOKENIZERS, *GPT2_PRE_TOKENIZERS])
        raise GGUFError(
            f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported, so its text would split "
            f"differently from the model's own tokenizer; supported: {', '.join(known)}"
        )
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": "",
        "end_of_word_suffix": "",
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [m.split(" ", 1) for m in merges],
    }
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return model, pre_tokenizer, decoder, vocab


def _sentencepiece(
    path: Path, meta: dict[str, Any], tokens: list[str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, int]]:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list) and merges:
        pairs = [m.split(" ", 1) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise GGUFError(f"{path}: a SentencePiece vocabulary needs merges or one score per token")
        pairs = merges_from_scores(tokens, [float(s) for s in scores])
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": pairs,
    }
    # As transformers' LlamaTokenizer: a "▁" for each space and one before the first word.
    pre_tokenizer = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    decoder = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return model, pre_tokenizer, decoder, vocab


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best score first (ties: shorter left part, then vocabulary order), as transformers derives them."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    by_score = dict(zip(tokens, scores, strict=True))
    found: list[tuple[str, str, float]] = []
    for merged, score in by_score.items():
        local = [
            (merged[:k], merged[k:], score)
            for k in range(1, len(merged))
            if merged[:k] in vocab and merged[k:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        found.extend(local)
    found.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [[left, right] for left, right, _ in found]


def _template(bos: str | None, eos: str | None, vocab: dict[str, int]) -> dict[str, Any]:
    """The post-processor that adds BOS / EOS as the file asks, in transformers' layout."""

    def tok(t: str, type_id: int) -> dict[str, Any]:
        return {"SpecialToken": {"id": t, "type_id": type_id}}

    def seq(s: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": s, "type_id": type_id}}

    single = [*([tok(bos, 0)] if bos else []), seq("A", 0), *([tok(eos, 0)] if eos else [])]
    pair = [*single, *([tok(bos, 1)] if bos else []), seq("B", 1), *([tok(eos, 1)] if eos else [])]
    specials = {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in (bos, eos) if t}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}
