"""The stage link's contract: the frames workers of a pipelined (partial-layer) route send each
other over a direct TCP connection (never the broker), and their wire format.

Frames are typed and versioned like the NATS messages (cascade/messages.py): a frame this build
does not understand, or a malformed one, is a `StageWireError`, never a half-read dict.

    StageInput   driver/stage → next stage: hidden states of a prompt chunk or one decode token;
                 the first chunk of a request carries its route, sampling parameters and arrival
    StageToken   last stage → driver: the token it sampled
    StageClose   driver → later stages: the request ended, free its KV cache
    StageError   a stage → driver: this request cannot go on here (why)

On the wire: 4-byte header length, 8-byte payload length (both little-endian), an orjson header
`{"type", "v", "body", "tensor": {"dtype", "shape"} | null}`, then the raw tensor bytes.
"""

from __future__ import annotations

import struct
from dataclasses import field
from typing import Any

import orjson
import torch

from cascade.messages import MessageError, RouteStage, SamplingParams, TokenLogprob, decode_object, message

_PREFIX = struct.Struct("<IQ")
PREFIX_SIZE = _PREFIX.size
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 34

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}


class StageWireError(ValueError):
    """A frame that cannot be read: too large, not JSON, an unknown or malformed frame type."""


# --------------------------------------------------------------------------- frames


@message("stage_input")
class StageInput:
    """Hidden states for the next stage: a prompt chunk (positions start..start+T-1; `final` when
    it ends the prompt) or one decode token at `pos`. The first chunk of a request (the stage has
    no state for it yet) carries `route`, this stage's `index` in it, `params` and `arrived_at`."""

    request_id: str
    prefill: bool
    pos: int
    start: int = 0
    final: bool = True
    sent_at: float = 0.0  # sender's wall clock, for the link's latency figure
    route: list[RouteStage] = field(default_factory=list)
    index: int = 0
    params: SamplingParams | None = None
    arrived_at: float = 0.0
    # The first chunk of a request whose sampling counts its tokens (penalties): the prompt ids,
    # so that the last stage, which samples, holds the same history as a whole instance would.
    tokens: list[int] = field(default_factory=list)


@message("stage_token")
class StageToken:
    request_id: str
    token: int
    logprob: TokenLogprob | None = None  # when the request asked for logprobs
    # The request's grammar is complete with this token (structured outputs): the sequence ends.
    stop: bool = False
    # With a request's first token, when it asked for prompt_logprobs: one per prompt token, None
    # for the first (the last stage computed them from the prompt's logits).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@message("stage_close")
class StageClose:
    request_id: str


@message("stage_error")
class StageError:
    request_id: str
    message: str


StageFrame = StageInput | StageToken | StageClose | StageError
FRAME_TYPES: tuple[type[Any], ...] = (StageInput, StageToken, StageClose, StageError)


# --------------------------------------------------------------------------- wire


def encode_frame(frame: StageFrame, tensor: torch.Tensor | None = None) -> list[bytes | memoryview]:
    """Frame parts to write in order (the tensor's bytes are not copied into one buffer)."""
    payload: memoryview | bytes = b""
    described: dict[str, Any] | None = None
    if tensor is not None:
        t = tensor.detach().contiguous()
        if t.device.type != "cpu":
            # GPU activations are staged through host memory on this path; a CUDA IPC / NCCL
            # transport would send device memory directly (not exercised on CPU-only machines).
            t = t.cpu()
        described = {"dtype": _NAMES[t.dtype], "shape": list(t.shape)}
        payload = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else b""  # type: ignore[arg-type]
    hb = orjson.dumps({"type": frame.TYPE, "v": frame.VERSION, "body": frame, "tensor": described})  # type: ignore[union-attr]
    return [_PREFIX.pack(len(hb), len(payload)), hb, payload]


def split_prefix(prefix: bytes) -> tuple[int, int]:
    hlen, plen = _PREFIX.unpack(prefix)
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise StageWireError(f"frame too large (header {hlen}, payload {plen})")
    return hlen, plen


def decode_frame(header_bytes: bytes, payload: bytes | bytearray) -> tuple[StageFrame, torch.Tensor | None]:
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as e:
        raise StageWireError(f"bad frame header: {e}") from None
    try:
        frame: Any = decode_object(header)
    except MessageError as e:
        raise StageWireError(f"bad frame: {e}") from None
    if not isinstance(frame, FRAME_TYPES):
        raise StageWireError(f"{type(frame).__name__} is not a stage frame")
    described = header.get("tensor")
    if described is None:
        if payload:
            raise StageWireError(f"{frame.TYPE} frame carries {len(payload)} bytes but no tensor")
        return frame, None
    try:
        dtype = _DTYPES[described["dtype"]]
        shape = tuple(int(x) for x in described["shape"])
    except (KeyError, TypeError, ValueError):
        raise StageWireError(f"bad tensor description {described!r}") from None
    expect = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        expect *= d
    if expect != len(payload):
        raise StageWireError(
            f"tensor {list(shape)} {described['dtype']} needs {expect} bytes, frame has {len(payload)}"
        )
    if not payload:
        return frame, torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(payload) if isinstance(payload, bytes) else payload, dtype=dtype)
    return frame, t.reshape(shape)
