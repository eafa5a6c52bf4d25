"""Stage-link frames: every type round-trips through the wire encoding, with and without a
tensor, and anything this build cannot read is refused with a clear StageWireError."""

from __future__ import annotations

import struct

import orjson
import pytest
import torch

from cascade.messages import Ok, RouteStage, SamplingParams, encode
from cascade.stagewire import (
    MAX_HEADER,
    PREFIX_SIZE,
    StageClose,
    StageError,
    StageFrame,
    StageInput,
    StageToken,
    StageWireError,
    decode_frame,
    encode_frame,
    split_prefix,
)

ROUTE = [RouteStage("a", 0, 3, "h:1"), RouteStage("b", 3, 8, "h:2")]


def roundtrip(frame: StageFrame, tensor: torch.Tensor | None = None) -> tuple[StageFrame, torch.Tensor | None]:
    raw = b"".join(bytes(p) for p in encode_frame(frame, tensor))
    hlen, plen = split_prefix(raw[:PREFIX_SIZE])
    assert len(raw) == PREFIX_SIZE + hlen + plen
    return decode_frame(raw[PREFIX_SIZE : PREFIX_SIZE + hlen], raw[PREFIX_SIZE + hlen :])


@pytest.mark.parametrize(
    "frame",
    [
        StageInput("r1", True, 4, start=0, final=False, sent_at=12.5, route=ROUTE, index=1,
                   params=SamplingParams(max_tokens=7, temperature=0.5, seed=3, stop=["x"]), arrived_at=99.0),
        StageInput("r1", False, 9),
        StageToken("r1", 42),
        StageClose("r1"),
        StageError("r1", "worker b lacks layers [3]"),
    ],
    ids=["prompt-chunk", "decode", "token", "close", "error"],
)  # fmt: skip
def test_every_frame_round_trips(frame: StageFrame) -> None:
    got, t = roundtrip(frame)
    assert got == frame and t is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_tensor_travels_bit_for_bit(dtype: torch.dtype) -> None:
    hidden = torch.randn(1, 5, 16).to(dtype)
    got, t = roundtrip(StageInput("r", True, 4), hidden)
    assert isinstance(got, StageInput) and t is not None
    assert t.dtype == dtype and t.shape == hidden.shape and torch.equal(t, hidden)
    _, empty = roundtrip(StageInput("r", True, 0), torch.empty(1, 0, 16))
    assert empty is not None and empty.shape == (1, 0, 16)


def header(obj: object) -> bytes:
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    ("raw", "payload", "match"),
    [
        (b"{not json", b"", "bad frame header"),
        (header({"kind": "token", "request_id": "r"}), b"", "needs 'type' and 'body'"),
        (header({"type": "stage_teleport", "v": 1, "body": {}}), b"", "unknown message type"),
        (header({"type": "stage_token", "v": 99, "body": {"request_id": "r", "token": 1}}), b"", "newer"),
        (header({"type": "stage_token", "v": 1, "body": {"request_id": "r", "token": "one"}}), b"", "malformed"),
        (header({"type": "stage_token", "v": 1, "body": {"token": 1}}), b"", "malformed"),
        (encode(Ok("x")), b"", "not a stage frame"),
        (header({"type": "stage_close", "v": 1, "body": {"request_id": "r"}, "tensor": None}), b"xx", "no tensor"),
        (
            header({"type": "stage_input", "v": 1, "body": {"request_id": "r", "prefill": True, "pos": 0},
                    "tensor": {"dtype": "float32", "shape": [1, 2]}}),
            b"\0" * 4,
            "needs 8 bytes",
        ),
        (
            header({"type": "stage_input", "v": 1, "body": {"request_id": "r", "prefill": True, "pos": 0},
                    "tensor": {"dtype": "int8", "shape": [1]}}),
            b"\0",
            "bad tensor description",
        ),
    ],
)  # fmt: skip
def test_a_bad_frame_is_refused_clearly(raw: bytes, payload: bytes, match: str) -> None:
    with pytest.raises(StageWireError, match=match):
        decode_frame(raw, payload)


def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    with pytest.raises(StageWireError, match="too large"):
        split_prefix(struct.pack("<IQ", MAX_HEADER + 1, 0))
