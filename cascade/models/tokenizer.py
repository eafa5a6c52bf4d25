"""Tokenizers: `tokenizer.json` through the `tokenizers` package when the model
ships one, else a byte-level tokenizer (ids 0-255 are bytes, 256 = BOS,
257 = EOS) for generated models. Shared by the gateway (prompt → ids, prompt
length checks) and workers (ids → streamed text, stop strings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

BYTE_BOS = 256
BYTE_EOS = 257


class Tokenizer(Protocol):
    bos_id: int | None
    eos_ids: list[int]

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str: ...


def _plain_chat(messages: list[dict[str, Any]]) -> str:
    # A plain template for models without their own: role tags on lines, ending where the
    # assistant speaks next.
    parts = [f"<|{m.get('role', 'user')}|>\n{_content_text(m.get('content'))}\n" for m in messages]
    return "".join(parts) + "<|assistant|>\n"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


class ByteTokenizer:
    def __init__(self) -> None:
        self.bos_id: int | None = BYTE_BOS
        self.eos_ids = [BYTE_EOS]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BYTE_BOS, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        return _plain_chat(messages)


class HFTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` package (optional dependency)."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer as _Tok  # optional: only models that ship tokenizer.json

        self._tok = _Tok.from_file(str(model_dir / "tokenizer.json"))
        cfg: dict[str, Any] = {}
        tc = model_dir / "tokenizer_config.json"
        if tc.is_file():
            cfg = json.loads(tc.read_text())
        self._template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        self._bos_text = _special(cfg.get("bos_token"))
        eos_text = _special(cfg.get("eos_token"))
        self.bos_id = self._tok.token_to_id(self._bos_text) if self._bos_text else None
        eos = self._tok.token_to_id(eos_text) if eos_text else None
        self.eos_ids = [eos] if eos is not None else []

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        if self._template:
            try:
                import jinja2  # optional: a Hugging Face chat template is Jinja
            except ImportError:
                return _plain_chat(messages)
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            text = env.from_string(self._template).render(
                messages=messages, add_generation_prompt=True, bos_token=self._bos_text or ""
            )
            # The template usually writes BOS itself; encode() would add a second one.
            if self._bos_text and text.startswith(self._bos_text):
                text = text[len(self._bos_text) :]
            return str(text)
        return _plain_chat(messages)


def _special(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def load_tokenizer(model_dir: Path) -> Tokenizer:
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return HFTokenizer(model_dir)
    return ByteTokenizer()


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back an incomplete
    UTF-8 sequence (or a partial BPE merge) until the next tokens complete it.

    Only the last few tokens are re-decoded each time (from a stable prefix), so a long
    output costs linear, not quadratic, time."""

    # A UTF-8 character spans at most 4 bytes, so 4 tokens that still end in U+FFFD will not
    # be completed by more tokens: they are invalid, and emitted as the replacement character.
    MAX_HOLD = 4

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self._ids: list[int] = []
        self._prefix = 0  # ids before this index are emitted and never re-decoded alone
        self._read = 0  # ids before this index are reflected in emitted text
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def push(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self._ids):
            return ""
        # Decode from a little before the unread part so tokenizers that merge across
        # token boundaries (leading spaces in SentencePiece) render the same as in full text.
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if not final and full.endswith("\ufffd") and len(self._ids) - self._read < self.MAX_HOLD:
            return ""
        delta = full[len(prefix_text) :] if full.startswith(prefix_text) else full
        self._prefix = self._read
        self._read = len(self._ids)
        if delta:
            self._emitted.append(delta)
        return delta
