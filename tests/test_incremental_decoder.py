"""Streamed text: the deltas of IncrementalDecoder, concatenated, are exactly transformers'
`decode(ids, skip_special_tokens=True)` of the whole output, for byte-level BPE and for
SentencePiece-style tokenizers with byte fallback."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cascade.models.tokenizer import ByteTokenizer, IncrementalDecoder, Tokenizer, load_tokenizer
from tests.hf_fixtures import LLAMA2, LLAMA3, MISTRAL, QWEN25, SMOLLM2, build, hf_tokenizer

pytest.importorskip("transformers")

# Output a model may stream: leading and doubled spaces, newlines, multi-byte UTF-8 the tiny
# vocabularies lack (so byte tokens, several per character), emoji sequences with joiners and
# skin tones, combining marks.
OUTPUTS = [
    "Hello world",
    " Leading space and  double  spaces ",
    "Line one\nLine two\n\n  indented",
    "Café Zürich naïve",
    "日本語のテキストです。中文也可以。",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end",
    "e\u0301 a\u0308 combining",
    "😀",
    " 😀 ",
    "mixed: 12 + 3.5 = 15.5 ✓ → ∑ ∞",
]

FLAVOURS = [LLAMA3, QWEN25, SMOLLM2, MISTRAL, LLAMA2]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Tokenizer]]:
    root = tmp_path_factory.mktemp("dec")
    out = {}
    for f in FLAVOURS:
        d = build(f, root / f.name)
        out[f.name] = (hf_tokenizer(d), load_tokenizer(d))
    return out


def stream(tok: Tokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(dec.flush())
    assert dec.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("name", [f.name for f in FLAVOURS])
def test_streamed_text_equals_transformers_decode(pairs: dict[str, tuple[Any, Tokenizer]], name: str) -> None:
    hf, tok = pairs[name]
    specials = sorted(tok.special_ids)
    for text in OUTPUTS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        # A special token mid-output (skipped in the text) and EOS-like ones at the end.
        with_specials = [specials[0], *ids[: len(ids) // 2], specials[-1], *ids[len(ids) // 2 :], specials[0]]
        for seq in (ids, with_specials):
            want = hf.decode(seq, skip_special_tokens=True)
            for chunk in (1, 3):
                assert "".join(stream(tok, seq, chunk)) == want, (text, chunk)


@pytest.mark.parametrize("name", [f.name for f in FLAVOURS])
def test_long_random_outputs(pairs: dict[str, tuple[Any, Tokenizer]], name: str) -> None:
    """Outputs glued from many pieces (so every token boundary occurs), with special tokens."""
    hf, tok = pairs[name]
    rng = random.Random(name)
    pieces = [hf(t, add_special_tokens=False)["input_ids"] for t in OUTPUTS]
    for _ in range(20):
        ids: list[int] = []
        for _ in range(rng.randrange(3, 12)):
            ids += rng.choice(pieces)
            if rng.random() < 0.3:
                ids.append(rng.choice(sorted(tok.special_ids)))
        assert "".join(stream(tok, ids, rng.choice((1, 2, 5)))) == hf.decode(ids, skip_special_tokens=True)


def test_unfinished_characters_are_held_back(pairs: dict[str, tuple[Any, Tokenizer]]) -> None:
    """A character split over byte tokens is sent whole, never as U+FFFD first."""
    for name in ("llama3", "mistral"):  # byte-level BPE, and SentencePiece byte fallback
        hf, tok = pairs[name]
        ids = hf("日本😀", add_special_tokens=False)["input_ids"]
        assert len(ids) >= 6  # not in the tiny vocabulary: several byte tokens per character
        deltas = stream(tok, ids)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == "日本😀" and len([d for d in deltas if d]) == 3  # one character at a time


def test_leading_space_after_special_token_survives() -> None:
    """SentencePiece decoders strip one leading space from the text they decode; a window that
    started on a skipped special token would lose the space of the word after it."""
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        d = build(MISTRAL, Path(t) / "m")
        hf, tok = hf_tokenizer(d), load_tokenizer(d)
        a = hf("Hello", add_special_tokens=False)["input_ids"]
        b = hf(" world", add_special_tokens=False)["input_ids"]
        seq = [*a, tok.encode("[INST]", add_special_tokens=False)[0], *b]
        assert "".join(stream(tok, seq)) == hf.decode(seq, skip_special_tokens=True) == "Hello world"


def test_invalid_utf8_is_sent_at_flush() -> None:
    tok = ByteTokenizer()
    deltas = stream(tok, [0xE2, 0x82])  # the start of "€" and nothing more
    assert deltas[:-1] == ["", ""] and deltas[-1] == tok.decode([0xE2, 0x82])
    ids = [*"ok €".encode(), 0xFF, 0xFE, *b" fin"]
    assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_byte_tokenizer_streams_utf8(pairs: dict[str, tuple[Any, Tokenizer]]) -> None:
    tok = ByteTokenizer()
    for text in OUTPUTS:
        ids = [256, *text.encode(), 257]
        deltas = stream(tok, ids)
        assert "".join(deltas) == text
        assert all("\ufffd" not in d for d in deltas)


class _CountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.decoded = 0

    def decode(self, ids: Sequence[int]) -> str:
        self.decoded += len(ids)
        return super().decode(ids)


def test_cost_stays_linear() -> None:
    """Pushed two at a time, three-byte characters end every other step mid-character: the window
    must still move on, or each step would decode the whole output again."""
    tok = _CountingTokenizer()
    text = "日本語のテキスト" * 200
    ids = list(text.encode())
    assert "".join(stream(tok, ids, chunk=2)) == text
    assert tok.decoded < 20 * len(ids)
