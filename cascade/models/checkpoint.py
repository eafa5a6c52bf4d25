"""Checkpoint format: safetensors files (one, or shards named by
`model.safetensors.index.json`) beside a Hugging Face-style `config.json` (see
cascade.models.config), read and written without extra packages.

Safetensors layout: 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}}` (offsets relative to the
byte buffer after the header), then the raw bytes. We read it through mmap so
opening a 2 GB file costs nothing until a layer is touched.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    "validate_checkpoint",
    "write_safetensors",
]

# torch is imported where tensors are made, not with this module: the loader reads checkpoints'
# layouts and bytes only, and a process that never imports torch starts seconds sooner and ~200 MB
# smaller. DTYPES, DTYPE_NAMES and TORCH_DTYPE_BY_HF (torch dtypes) are built on first use
# (`__getattr__` below).
# A safetensors dtype → (the torch dtype's attribute, bytes per item).
_DTYPE_TABLE = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}  # fmt: skip
_HF_DTYPES = ("float32", "float16", "bfloat16")


@functools.cache
def _torch_tables() -> dict[str, Any]:
    import torch

    dtypes = {k: getattr(torch, attr) for k, (attr, _) in _DTYPE_TABLE.items()}
    return {
        "DTYPES": dtypes,
        "DTYPE_NAMES": {v: k for k, v in dtypes.items()},
        "TORCH_DTYPE_BY_HF": {h: getattr(torch, h) for h in _HF_DTYPES},
    }


def __getattr__(name: str) -> Any:
    if name in ("DTYPES", "DTYPE_NAMES", "TORCH_DTYPE_BY_HF"):
        return _torch_tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    import torch

    DTYPES: dict[str, torch.dtype]
    DTYPE_NAMES: dict[torch.dtype, str]
    TORCH_DTYPE_BY_HF: dict[str, torch.dtype]


# --------------------------------------------------------------------------- safetensors

ITEM_SIZES: dict[str, int] = {k: size for k, (_, size) in _DTYPE_TABLE.items()}
# The dtypes a model's weights may have: anything else (int8, fp8, ...) is a quantization scheme
# the decoder does not implement.
WEIGHT_DTYPES = ("F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One safetensors file, memory-mapped; tensors are views into the mapping (read-only).

    The header is checked whole at open: every entry has a known dtype, a shape and offsets that
    agree with each other, lie inside the file and do not overlap. A truncated or corrupt file is
    refused here, before any tensor is read, not halfway through a load."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path} is too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header of {n} bytes does not fit a file of {size} bytes")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: header does not parse: {e}") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{path}: header is not a JSON object")
            self.data_start = 8 + n
            meta = header.pop("__metadata__", {}) or {}
            self.entries: dict[str, dict[str, Any]] = {k: _check_entry(path, k, e) for k, e in header.items()}
            self._check_layout(size)
            self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _check_layout(self, size: int) -> None:
        room = size - self.data_start
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in self.entries.items())
        prev_end, prev = 0, ""
        for begin, end, name in spans:
            if end > room:
                raise CheckpointError(
                    f"{self.path}: tensor {name} ends at byte {self.data_start + end} of a {size}-byte file "
                    "(truncated?)"
                )
            if begin < prev_end:
                raise CheckpointError(f"{self.path}: tensors {prev} and {name} overlap")
            prev_end, prev = end, name

    def names(self) -> list[str]:
        return list(self.entries)

    def raw(self, name: str) -> memoryview:
        e = self.entries[name]
        b, end = e["data_offsets"]
        return memoryview(self._mm)[self.data_start + b : self.data_start + end]

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        import torch

        dtype = _torch_tables()["DTYPES"][e["dtype"]]
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


def _check_entry(path: Path, name: str, e: Any) -> dict[str, Any]:
    """One header entry, checked: dtype known, shape a list of sizes, offsets covering exactly
    the bytes the dtype and shape need."""
    if not isinstance(e, dict):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if dtype not in ITEM_SIZES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
        raise CheckpointError(f"{path}: tensor {name} has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name} has malformed data_offsets {offsets!r}")
    need = math.prod(shape) * ITEM_SIZES[dtype]
    if offsets[1] - offsets[0] != need:
        raise CheckpointError(
            f"{path}: tensor {name} ({dtype} {shape}) needs {need} bytes, its data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return e


class Checkpoint:
    """A model directory: config plus every safetensors shard, indexed by tensor name.

    Opening validates everything a worker would otherwise find out mid-load: config.json (see
    `read_config`), the shard set (`model.safetensors.index.json` when present: each shard it names
    must exist and hold the tensors it maps there), every header, and every tensor the model needs
    (present, a float dtype, the shape config.json implies). Tensors the model does not use (e.g. a
    tied model's stored lm_head.weight) are ignored, as transformers ignores them."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        self.config = read_config(self.dir)
        self.files: list[SafetensorsFile] = []
        self.index: dict[str, SafetensorsFile] = {}
        try:
            self._open()
            self._check_tensors()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        index_path = self.dir / INDEX_FILE
        if index_path.is_file():
            weight_map = _read_weight_map(index_path)
            by_file: dict[str, SafetensorsFile] = {}
            for shard in sorted(set(weight_map.values())):
                p = self.dir / shard
                if Path(shard).name != shard or not p.is_file():
                    raise CheckpointError(f"{index_path}: shard {shard!r} is missing from {self.dir}")
                by_file[shard] = SafetensorsFile(p)
                self.files.append(by_file[shard])
            for name, shard in weight_map.items():
                f = by_file[shard]
                if name not in f.entries:
                    raise CheckpointError(f"{index_path} maps tensor {name} to {shard}, which does not hold it")
                self.index[name] = f
            return
        paths = sorted(self.dir.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"{self.dir} has no *.safetensors files")
        for p in paths:
            f = SafetensorsFile(p)
            self.files.append(f)
            for name in f.names():
                if name in self.index:
                    raise CheckpointError(
                        f"{self.dir}: tensor {name} is in both {self.index[name].path.name} and {p.name} "
                        f"(and there is no {INDEX_FILE} to say which counts)"
                    )
                self.index[name] = f

    def _check_tensors(self) -> None:
        cfg = self.config
        where = INDEX_FILE if (self.dir / INDEX_FILE).is_file() else "the *.safetensors files"
        for unit in range(cfg.num_units):
            for name, shape in unit_shapes(cfg, unit).items():
                f = self.index.get(name)
                if f is None:
                    raise CheckpointError(
                        f"{self.dir}: tensor {name} is missing (not in {where}); a {cfg.model_type} model "
                        "with this config.json needs it"
                    )
                e = f.entries[name]
                if e["dtype"] not in WEIGHT_DTYPES:
                    raise CheckpointError(
                        f"{f.path}: tensor {name} is {e['dtype']}; weights must be one of {', '.join(WEIGHT_DTYPES)}"
                    )
                if tuple(e["shape"]) != shape:
                    raise CheckpointError(
                        f"{f.path}: tensor {name} has shape {list(e['shape'])}, config.json implies {list(shape)}"
                    )

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


def _read_weight_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} does not parse: {e}") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{path}: weight_map is missing or not an object of tensor name -> file name")
    return wm


def validate_checkpoint(model_dir: Path) -> ModelConfig:
    """Check a model directory whole (config, shards, headers, every tensor's presence, dtype and
    shape) without reading tensor data; returns its config. Raises CheckpointError."""
    ckpt = Checkpoint(model_dir)
    ckpt.close()
    return ckpt.config


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
    import torch

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for name, (shape, dtype) in shapes.items():
        kind = _torch_tables()["DTYPE_NAMES"][dtype]
        n = math.prod(shape) * ITEM_SIZES[kind]
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [off, off + n]}
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
