from __future__ import annotations

import pytest

from cascade.messages import (
    GenerateBatch,
    GenerateRequest,
    Heartbeat,
    MessageError,
    SamplingParams,
    TokenEvent,
    TokenEvents,
    decode,
    encode,
)
from cascade.subjects import Subjects, check_token


def test_roundtrip_nested() -> None:
    b = GenerateBatch("g1", [GenerateRequest("r1", "m", [1, 2, 3], SamplingParams(max_tokens=4, stop=["\n"]))])
    assert decode(encode(b), GenerateBatch) == b
    e = TokenEvents("w1", [TokenEvent("r1", [5], "a", finish_reason="stop")], batch_size=3)
    assert decode(encode(e)) == e


def test_rejects_unknown_and_malformed() -> None:
    with pytest.raises(MessageError, match="unknown message type"):
        decode(b'{"type": "nope", "body": {}}')
    with pytest.raises(MessageError, match="not JSON"):
        decode(b"{")
    with pytest.raises(MessageError, match="newer"):
        decode(b'{"type": "cancel", "v": 99, "body": {"request_ids": []}}')
    with pytest.raises(MessageError, match="expected"):
        decode(encode(TokenEvent("r", [], "")), GenerateBatch)
    bad = encode(Heartbeat("w", "idle", None, 0, 0, 0, 0, 1, 0.0, 0, 1, "h")).replace(b'"idle"', b'"sleepy"')
    with pytest.raises(MessageError, match="malformed heartbeat"):
        decode(bad)
    with pytest.raises(MessageError, match="malformed"):
        decode(b'{"type": "cancel", "body": {"request_ids": "x"}}')


def test_subject_tokens_validated() -> None:
    s = Subjects("cascade")
    assert s.heartbeat("w-1") == "cascade.worker.w-1.heartbeat"
    for bad in ("a.b", "a b", "*", ">", ""):
        with pytest.raises(ValueError):
            check_token(bad)
    with pytest.raises(ValueError):
        Subjects("bad prefix")
