"""Tokenizers: the same ids and the same text as transformers 5, or a clear refusal.

A model that ships `tokenizer.json` is read with the `tokenizers` package, set up the way
`AutoTokenizer.from_pretrained(dir)` sets it up (see `HFTokenizer`); its chat template is
rendered as `apply_chat_template` renders it (`cascade.models.chat_template`). Cascade's
generated random models have no tokenizer files and use `ByteTokenizer` (ids 0-255 are bytes,
256 = BOS, 257 = EOS) with a plain chat template.

The gateway calls `encode` (a completion prompt) and `encode_chat` (a chat); workers call
`decode` through `IncrementalDecoder` (streamed text) and read `eos_ids`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cascade.models.chat_template import (
    ChatTemplateError,
    NoChatTemplate,
    Templates,
    join_text_parts,
    read_chat_templates,
    render,
    select_template,
    wants_content_parts,
)

__all__ = [
    "BYTE_BOS",
    "BYTE_EOS",
    "ByteTokenizer",
    "ChatTemplateError",
    "HFTokenizer",
    "IncrementalDecoder",
    "NoChatTemplate",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]

BYTE_BOS = 256
BYTE_EOS = 257

Messages = Sequence[Mapping[str, Any]]
Tools = Sequence[Mapping[str, Any]]


class TokenizerError(ValueError):
    """The model's tokenizer files cannot be read the way transformers reads them."""


class Tokenizer(Protocol):
    bos_id: int | None
    # A list because generation_config.json may add more (cascade/models/config.py reads those).
    eos_ids: list[int]
    # Ids that decoding leaves out (transformers' skip_special_tokens=True).
    special_ids: frozenset[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A completion prompt's ids: the tokenizer's own rules add BOS (or not)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """A token's own text, special tokens included (what decoding writes when it keeps them)."""
        ...

    def render_chat(
        self,
        messages: Messages,
        *,
        tools: Tools | None = None,
        documents: Tools | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat as the model's template writes it; ChatTemplateError when it cannot."""
        ...

    def encode_chat(
        self, messages: Messages, *, tools: Tools | None = None, documents: Tools | None = None
    ) -> list[int]:
        """A chat prompt's ids, ending where the assistant speaks next."""
        ...


# --------------------------------------------------------------------------- byte tokenizer


class ByteTokenizer:
    """For generated models: every prompt starts with BOS, text is its UTF-8 bytes."""

    def __init__(self) -> None:
        self.bos_id: int | None = BYTE_BOS
        self.eos_ids = [BYTE_EOS]
        self.special_ids = frozenset({BYTE_BOS, BYTE_EOS})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BYTE_BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return {BYTE_BOS: "<s>", BYTE_EOS: "</s>"}.get(token_id) or self.decode([token_id])

    def render_chat(
        self,
        messages: Messages,
        *,
        tools: Tools | None = None,
        documents: Tools | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        # Role tags on lines, ending where the assistant speaks next; tools are not shown to a
        # random model.
        parts = [f"<|{m.get('role', 'user')}|>\n{m.get('content') or ''}\n" for m in join_text_parts(messages)]
        return "".join(parts) + ("<|assistant|>\n" if add_generation_prompt else "")

    def encode_chat(
        self, messages: Messages, *, tools: Tools | None = None, documents: Tools | None = None
    ) -> list[int]:
        # BOS first, as for a completion: no text of the plain template can spell id 256.
        return self.encode(self.render_chat(messages, tools=tools, documents=documents))


# --------------------------------------------------------------------------- Hugging Face tokenizers

# The names transformers gives a tokenizer's named special tokens (SPECIAL_TOKENS_ATTRIBUTES).
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# How AutoTokenizer picks the class, for the model types Cascade runs: transformers 5's
# TOKENIZER_MAPPING_NAMES (`llama` has no class of its own) and the model types whose declared
# tokenizer_class it overrides (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS). Tests check both
# against the installed transformers.
_CLASS_OF_MODEL_TYPE: dict[str, str | None] = {
    "llama": None,
    "mistral": "TokenizersBackend",
    "qwen2": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
}
_DECLARED_CLASS_OVERRIDDEN = frozenset({"qwen2"})
# Classes that take tokenizer.json as it is.
_FROM_FILE = frozenset({"TokenizersBackend", "PreTrainedTokenizer", "PythonBackend"})
# Classes whose __init__ rebuilds the normalizer, pre-tokenizer and decoder from their own code,
# keeping only tokenizer.json's vocabulary, merges and post-processor; `_rebuild` mirrors each.
_REBUILT = frozenset({"LlamaTokenizer", "Qwen2Tokenizer", "GPT2Tokenizer"})


def _class_base(name: str) -> str:
    return name.removesuffix("Fast")  # transformers 5 has one class per tokenizer; "Fast" names alias it


def _tokenizer_class(tc: Mapping[str, Any], mc: Mapping[str, Any], tokenizer_json: str) -> str:
    """The class AutoTokenizer.from_pretrained (transformers 5, models/auto/tokenization_auto.py)
    instantiates for this directory; TokenizerError for one whose pipeline Cascade does not mirror."""
    model_type = str(mc.get("model_type") or "")
    registered = _CLASS_OF_MODEL_TYPE.get(model_type)
    overridden = model_type in _DECLARED_CLASS_OVERRIDDEN
    declared = tc.get("tokenizer_class") or mc.get("tokenizer_class")
    if not declared:
        chosen = registered or "TokenizersBackend"
    else:
        base = _class_base(str(declared))
        if base == "LlamaTokenizer" and not overridden and '"ByteLevel"' in tokenizer_json:
            # Llama 3 checkpoints declare LlamaTokenizer over a byte-level tokenizer.json.
            return "TokenizersBackend"
        if registered is not None and _class_base(registered) != base:
            if _class_base(registered) in _FROM_FILE:  # Mistral checkpoints declaring LlamaTokenizer
                return "TokenizersBackend"
            chosen = registered if overridden else str(declared)
        else:
            chosen = str(declared)
    chosen = _class_base(chosen)
    if chosen in _FROM_FILE:
        return "TokenizersBackend"
    if chosen in _REBUILT:
        return chosen
    raise TokenizerError(
        f"the tokenizer class is {chosen!r}, whose pipeline transformers builds in its own code and Cascade "
        "does not reproduce; if tokenizer.json is authoritative, set tokenizer_class to 'TokenizersBackend' "
        "in tokenizer_config.json"
    )


@dataclass
class _Specials:
    """The special tokens transformers collects from the tokenizer files, in its order."""

    named: dict[str, Any] = field(default_factory=dict)  # name -> str | AddedToken (bos_token, image_token, ...)
    extra: list[Any] = field(default_factory=list)  # extra_special_tokens (was additional_special_tokens)
    added: list[tuple[int, Any]] = field(default_factory=list)  # added_tokens_decoder, by id

    def all_tokens(self) -> list[str]:
        seen: dict[str, None] = {}
        for v in [*self.named.values(), *self.extra]:
            seen.setdefault(str(v), None)
        return list(seen)


def _added_token(d: Mapping[str, Any], **force: Any) -> Any:
    from tokenizers import AddedToken

    kw = {k: v for k, v in d.items() if k not in ("__type", "id")}
    kw.update(force)
    return AddedToken(**kw)


def _token_value(v: Any) -> Any:
    # tokenizer_config.json writes a token as a string or as {"__type": "AddedToken", ...}.
    if isinstance(v, dict) and "content" in v:
        return _added_token(v)
    return v


def _read_specials(model_dir: Path, tc: Mapping[str, Any], tokenizer_json: Mapping[str, Any]) -> _Specials:
    """As tokenization_utils_base `_from_pretrained` and `__init__` gather them."""
    sp = _Specials()
    # Model-specific tokens: other `*_token` keys holding a plain string (image_token, ...).
    model_specific = {k: v for k, v in tc.items() if k.endswith("_token") and k not in _NAMED and isinstance(v, str)}
    extra: Any = tc.get("extra_special_tokens") or tc.get("additional_special_tokens")
    if isinstance(extra, dict):
        model_specific.update({k: v for k, v in extra.items() if isinstance(v, str)})
        extra = None
    named: dict[str, Any] = {k: _token_value(tc[k]) for k in _NAMED if tc.get(k) is not None}
    if "added_tokens_decoder" in tc:
        sp.added = sorted((int(i), _added_token(d)) for i, d in tc["added_tokens_decoder"].items())
    else:
        # Older layouts: special_tokens_map.json names the tokens, tokenizer.json lists the added ones.
        stm_file = model_dir / "special_tokens_map.json"
        if stm_file.is_file():
            for k, v in json.loads(stm_file.read_text(encoding="utf-8")).items():
                if k in ("additional_special_tokens", "extra_special_tokens") and isinstance(v, list):
                    extra = [*(extra or []), *(_added_token(t, special=True) if isinstance(t, dict) else t for t in v)]
                elif isinstance(v, dict):
                    named[k] = _added_token(v, special=True)
                elif v is not None:
                    named[k] = v
        sp.added = sorted((int(t["id"]), _added_token(t)) for t in tokenizer_json.get("added_tokens", []))
    by_content = {str(t): t for _, t in sp.added}
    sp.named = {k: by_content.get(str(v), v) for k, v in named.items()}
    sp.named.update({k: v for k, v in model_specific.items() if k not in sp.named})
    sp.extra = list(extra or [])
    return sp


def _rebuild(cls: str, tj: Mapping[str, Any], tc: Mapping[str, Any]) -> Any:
    """The backend `cls.__init__` builds in transformers 5 from tokenizer.json's vocabulary and
    merges (models/llama/tokenization_llama.py, models/qwen2/tokenization_qwen2.py,
    models/gpt2/tokenization_gpt2.py)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    model = tj.get("model") or {}
    if model.get("type") not in (None, "BPE") or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{cls} expects a BPE tokenizer.json, this one is {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    merges: list[tuple[str, str]] = []
    for m in model.get("merges", []):
        a, b = m.split(" ") if isinstance(m, str) else m  # "a b" in older files, ["a", "b"] in newer ones
        merges.append((a, b))
    aps = tc.get("add_prefix_space")
    if cls == "LlamaTokenizer":
        add_prefix_space = True if aps is None else bool(aps)
        legacy = bool(tc.get("legacy", False))
        # transformers' _get_prepend_scheme: "first" unless the tokenizer asks for legacy behaviour.
        scheme = ("always" if legacy else "first") if add_prefix_space else "never"
        backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(steps)
    elif cls == "Qwen2Tokenizer":
        pattern = (
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
        )
        backend = Backend(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                unk_token=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
        )
        backend.decoder = decoders.ByteLevel()
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=bool(aps), use_regex=False),
            ]
        )
    elif cls == "GPT2Tokenizer":
        backend = Backend(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(aps))
        backend.decoder = decoders.ByteLevel()
    else:
        raise AssertionError(cls)
    # The post-processor (which adds BOS, or not) stays tokenizer.json's: transformers reads it from a
    # copy of the file without its vocabulary, as done here.
    bare = {**tj, "model": {**model, "vocab": {}, "merges": []}, "added_tokens": []}
    backend.post_processor = Backend.from_str(json.dumps(bare)).post_processor
    return backend


class HFTokenizer:
    """A model's `tokenizer.json` (and `tokenizer_config.json`, `config.json`,
    `special_tokens_map.json`, chat template files) read as transformers 5's
    `AutoTokenizer.from_pretrained` reads them:

    - the class AutoTokenizer picks decides the pipeline: most take tokenizer.json as it is;
      LlamaTokenizer (SentencePiece-style Llama 2 checkpoints), Qwen2Tokenizer and GPT2Tokenizer
      rebuild normalizer, pre-tokenizer and decoder in code, which `_rebuild` mirrors;
    - BOS/EOS are added by tokenizer.json's post-processor alone: with tokenizer.json present,
      transformers 5 drops tokenizer_config.json's add_bos_token/add_eos_token;
    - the config's added tokens and named special tokens are (re-)added, in transformers' order,
      so that the same strings split out as tokens and the same ids count as special;
    - `split_special_tokens` and `clean_up_tokenization_spaces` are honoured as transformers does.
    """

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as Backend

        model_dir = Path(model_dir)
        tc = _read_json(model_dir / "tokenizer_config.json")
        mc = _read_json(model_dir / "config.json")
        tj_text = (model_dir / "tokenizer.json").read_text(encoding="utf-8")
        tj: dict[str, Any] = json.loads(tj_text)
        self.tokenizer_class = _tokenizer_class(tc, mc, tj_text)
        try:
            if self.tokenizer_class in _REBUILT:
                backend = _rebuild(self.tokenizer_class, tj, tc)
            else:
                backend = Backend.from_str(tj_text)
        except TokenizerError:
            raise
        except Exception as e:  # the tokenizers package reports a malformed file as a bare Exception
            raise TokenizerError(f"{model_dir / 'tokenizer.json'} does not load: {e}") from None
        # transformers turns off padding and truncation for every call that does not ask for them.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(tc.get("split_special_tokens", False))

        sp = _read_specials(model_dir, tc, tj)
        named_strings = {str(v) for v in sp.named.values()}
        to_add = [t for _, t in sp.added]
        known = {str(k.content) for k in backend.get_added_tokens_decoder().values()} | {str(t) for t in to_add}
        for t in [*sp.named.values(), *sp.extra]:
            if str(t) not in known:
                to_add.append(t)
                known.add(str(t))
        tokens = []
        for t in to_add:
            if isinstance(t, str):
                t = AddedToken(t, special=True)
            elif not t.special and str(t) in named_strings:
                t.special = True
            tokens.append(t)
        if tokens:
            backend.add_tokens(tokens)
        if self.tokenizer_class == "Qwen2Tokenizer":  # its __init__ ends by adding these once more
            backend.add_tokens([AddedToken(t, special=True) for t in sp.all_tokens()])
        self._tok = backend

        self._clean_up = bool(tc.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(tc.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        )
        self.special_tokens: dict[str, str] = {k: str(v) for k, v in sp.named.items()}
        self.bos_id = self._id_of(self.special_tokens.get("bos_token"))
        eos = self._id_of(self.special_tokens.get("eos_token"))
        self.eos_ids = [eos] if eos is not None else []
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._templates: Templates | None = read_chat_templates(model_dir, tc)

    def backend_json(self) -> str:
        """The tokenizer as the `tokenizers` library serialises it (added tokens included): what
        other engines (the structured-output grammar engine) load the same tokenizer from."""
        return str(self._tok.to_str())

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        return int(i) if i is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        text = str(self._tok.decode(list(ids), skip_special_tokens=True))
        return _clean_up_tokenization(text) if self._clean_up else text

    def token_text(self, token_id: int) -> str:
        return str(self._tok.decode([token_id], skip_special_tokens=False))

    def render_chat(
        self,
        messages: Messages,
        *,
        tools: Tools | None = None,
        documents: Tools | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        if self._templates is None:
            raise NoChatTemplate("this model's tokenizer has no chat template")
        source = select_template(self._templates, tools)
        msgs: Messages = messages if wants_content_parts(source) else join_text_parts(messages)
        return render(
            source,
            msgs,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            context=self.special_tokens,
        )

    def encode_chat(
        self, messages: Messages, *, tools: Tools | None = None, documents: Tools | None = None
    ) -> list[int]:
        # The template writes every special token itself: transformers encodes the text without
        # adding any (add_special_tokens=False).
        return self.encode(self.render_chat(messages, tools=tools, documents=documents), add_special_tokens=False)


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, for WordPiece-era tokenizers that ask for it.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(a, b)
    for a, b in ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


# Tokenizer files transformers can convert but Cascade does not read: better refused by name
# than served with the byte tokenizer.
_UNREAD_TOKENIZER_FILES = ("tokenizer.model", "tekken.json", "vocab.json", "tokenizer.model.v3")


def load_tokenizer(model_dir: Path) -> Tokenizer:
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return HFTokenizer(model_dir)
    others = [n for n in _UNREAD_TOKENIZER_FILES if (model_dir / n).is_file()]
    if others:
        raise TokenizerError(
            f"{model_dir} has {', '.join(others)} but no tokenizer.json; save the tokenizer with transformers "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(dir)) to write one"
        )
    return ByteTokenizer()


# --------------------------------------------------------------------------- streaming


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas whose concatenation is the text of the
    whole list (`decode(ids)`, transformers' decode with skip_special_tokens=True).

    Each step decodes only a window that starts where the previous delta's tokens started, so a
    long output costs linear time. Special tokens are dropped on arrival (decoding skips them
    anyway), so a window never starts on one: decoders that strip a leading space (SentencePiece's
    Strip) then treat the window's first real token the same way in every decode of it.

    Text that ends in U+FFFD is a character still arriving byte by byte (byte-level BPE, or
    SentencePiece byte fallback, which renders a whole run of byte tokens as U+FFFD until the run
    is valid UTF-8, so even a character already seen). Such tokens are held back: the text is sent
    up to the last token boundary where it is settled (no U+FFFD at its end, extending what was
    sent). Only output that is not valid UTF-8 keeps tokens held; after `MAX_HELD_TOKENS` of them,
    or at `flush`, the text is sent as it decodes then.
    """

    MAX_HELD_TOKENS = 16
    # A character is at most 4 bytes, so a settled boundary is among the last few tokens.
    _BOUNDARY_SEARCH = 4

    def __init__(self, tok: Tokenizer, keep: Collection[int] = ()) -> None:
        self._tok = tok
        # Special tokens whose text stays in the output (a tool-call marker the parser looks for,
        # as vLLM decodes with skip_special_tokens=False for tool parsers); the rest are left out.
        self._keep = {i: tok.token_text(i) for i in keep if i in tok.special_ids}
        self._skip = tok.special_ids
        self._ids: list[int] = []
        self._start = 0  # the window: ids[_start:] is decoded at each step
        self._read = 0  # ids before this index are in the sent text; the next window starts here
        self._sent = ""  # decode(ids[_start:_read]): the window's text already emitted
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def push(self, ids: Sequence[int]) -> str:
        if self._keep and any(i in self._keep for i in ids):
            return self._push_kept(ids)
        self._ids.extend(i for i in ids if i not in self._skip)
        return self._step(final=False)

    def _push_kept(self, ids: Sequence[int]) -> str:
        """A kept special token ends the window: the text before it goes out whole (a special
        token never splits a character), then its own text; the next window starts after it."""
        out = ""
        for i in ids:
            if i in self._keep:
                out += self._step(final=True) + self._keep[i]
                self._emitted.append(self._keep[i])
                self._start = self._read = len(self._ids)
                self._sent = ""
            elif i not in self._skip:
                self._ids.append(i)
        return out + self._step(final=False)

    def flush(self) -> str:
        return self._step(final=True)

    def _settled(self, end: int) -> str | None:
        text = self._tok.decode(self._ids[self._start : end])
        return text if not text.endswith("\ufffd") and text.startswith(self._sent) else None

    def _step(self, final: bool) -> str:
        n = len(self._ids)
        if self._read >= n:
            return ""
        end, text = n, self._settled(n)
        if not final:
            for e in range(n - 1, max(self._read, n - 1 - self._BOUNDARY_SEARCH), -1):
                if text is not None:
                    break
                end, text = e, self._settled(e)
        if text is None:
            if not final and n - self._read <= self.MAX_HELD_TOKENS:
                return ""
            # Not valid UTF-8: bytes already sent as text may decode differently now. What was
            # sent stays sent; the rest keeps the length of the whole text right.
            end, text = n, self._tok.decode(self._ids[self._start :])
        delta = text[len(self._sent) :]
        # The next window starts at the first token of this step, so the decoders still see the
        # token before any new one (leading spaces, merges).
        self._start, self._read = self._read, end
        self._sent = self._tok.decode(self._ids[self._start : self._read])
        if delta:
            self._emitted.append(delta)
        return delta
