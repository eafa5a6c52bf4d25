"""Wire format of the stage link: activations and tokens between the workers of a
pipelined (partial-layer) route, over a direct TCP connection, never the broker.

A frame: 4-byte header length, 8-byte payload length (both little-endian),
an orjson header, then the raw tensor bytes (may be empty). The header holds
`kind` and the tensor's dtype and shape; what each kind carries is listed in
docs/live-scaling.md.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
import torch

_PREFIX = struct.Struct("<IQ")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 34

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}


class StageWireError(ValueError):
    pass


def encode_frame(header: dict[str, Any], tensor: torch.Tensor | None = None) -> list[bytes | memoryview]:
    """Frame parts to write in order (the tensor's bytes are not copied into one buffer)."""
    payload: memoryview | bytes = b""
    if tensor is not None:
        t = tensor.detach().contiguous()
        if t.device.type != "cpu":
            # GPU activations are staged through host memory on this path; a CUDA IPC / NCCL
            # transport would send device memory directly (not exercised on CPU-only machines).
            t = t.cpu()
        header = {**header, "dtype": _NAMES[t.dtype], "shape": list(t.shape)}
        payload = memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else b""  # type: ignore[arg-type]
    hb = orjson.dumps(header)
    return [_PREFIX.pack(len(hb), len(payload)), hb, payload]


def split_prefix(prefix: bytes) -> tuple[int, int]:
    hlen, plen = _PREFIX.unpack(prefix)
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise StageWireError(f"frame too large (header {hlen}, payload {plen})")
    return hlen, plen


PREFIX_SIZE = _PREFIX.size


def decode_frame(header_bytes: bytes, payload: bytes | bytearray) -> tuple[dict[str, Any], torch.Tensor | None]:
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as e:
        raise StageWireError(f"bad frame header: {e}") from None
    if not isinstance(header, dict) or "kind" not in header:
        raise StageWireError("frame header lacks 'kind'")
    if "dtype" not in header:
        return header, None
    dtype = _DTYPES.get(header["dtype"])
    if dtype is None:
        raise StageWireError(f"unsupported dtype {header['dtype']!r}")
    shape = tuple(int(x) for x in header["shape"])
    if not payload:
        return header, torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(payload) if isinstance(payload, bytes) else payload, dtype=dtype)
    return header, t.reshape(shape)
