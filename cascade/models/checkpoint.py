"""Checkpoint format: safetensors files beside a Hugging Face-style
`config.json` (see cascade.models.config), read and written without extra
packages.

Safetensors layout: 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}}` (offsets relative to the
byte buffer after the header), then the raw bytes. We read it through mmap so
opening a 2 GB file costs nothing until a layer is touched.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cascade.models.config import (
    CheckpointError,
    ModelConfig,
    read_config,
    unit_shapes,
    unit_tensor_names,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ModelConfig",
    "SafetensorsFile",
    "is_model_dir",
    "read_config",
    "unit_shapes",
    "unit_tensor_names",
    "write_safetensors",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
TORCH_DTYPE_BY_HF = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- safetensors


class SafetensorsFile:
    """One safetensors file, memory-mapped; tensors are views into the mapping (read-only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path} is too short to be safetensors")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 1024 * 1024:
                raise CheckpointError(f"{path}: header of {n} bytes is not plausible")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: header does not parse: {e}") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + n

    def names(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str) -> memoryview:
        e = self.entries[name]
        b, end = e["data_offsets"]
        return memoryview(self._mm)[self.data_start + b : self.data_start + end]

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = DTYPES.get(e["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        buf = self.raw(name)
        shape = tuple(e["shape"])
        if len(buf) == 0:
            return torch.empty(shape, dtype=dtype)
        # frombuffer warns on read-only buffers; the tensor is only read (copied on load).
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            # Tensors still view the mapping; it is freed when they go.
            pass


class Checkpoint:
    """A model directory: config plus every safetensors shard, indexed by tensor name."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        self.config = read_config(self.dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{model_dir} has no *.safetensors files")
        self.files = [SafetensorsFile(p) for p in files]
        self.index: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.names():
                self.index[name] = f
        for unit in range(self.config.num_units):
            for name in unit_tensor_names(self.config, unit):
                if name not in self.index:
                    raise CheckpointError(f"{model_dir}: tensor {name} is missing")

    def tensor(self, name: str) -> torch.Tensor:
        return self.index[name].tensor(name)

    def raw(self, name: str) -> memoryview:
        return self.index[name].raw(name)

    def unit_tensors(self, unit: int) -> dict[str, torch.Tensor]:
        return {n: self.tensor(n) for n in unit_tensor_names(self.config, unit)}

    def unit_nbytes(self, unit: int) -> int:
        return sum(len(self.raw(n)) for n in unit_tensor_names(self.config, unit))

    def total_nbytes(self) -> int:
        return sum(self.unit_nbytes(u) for u in range(self.config.num_units))

    def close(self) -> None:
        for f in self.files:
            f.close()


def is_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and any(Path(path).glob("*.safetensors"))


def write_safetensors(
    path: Path,
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Stream tensors into a safetensors file one at a time (memory stays at one tensor)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for name, (shape, dtype) in shapes.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # keep tensor data 8-byte aligned for frombuffer
    tmp = Path(str(path) + ".partial")
    done = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, (shape, dtype) in shapes.items():
            t = produce(name).to(dtype).contiguous()
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: produced {tuple(t.shape)}, header says {shape}")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            done += 1
            if progress:
                progress(done, len(shapes))
    tmp.replace(path)
