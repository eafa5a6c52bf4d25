"""The small files of a checkpoint (config, tokenizer, chat templates, generation config, the tensor
index), packed to travel over the data plane with a model's first unit.

A worker that cannot see the model store (another host, a container without the volume) still
needs these files to build a model and its tokenizer. Every data-plane source (the loader's host
cache, a live worker) adds them to unit 0 as one extra uint8 tensor named `FILES_TENSOR`, so they
are framed, forwarded and CRC-checked like the weights, and every hop of a chain gets them. The
blob also carries a SHA-256 per file, checked again when it is unpacked, so a file is never
written from bytes that differ from the source's.

Blob layout: magic "CSMF", u32 manifest length, the manifest (JSON: a list of {name, size,
sha256}), then the files' bytes back to back in manifest order.

No torch here (the loader and the gateway may import this cheaply).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from cascade.framing import TensorMeta, UnitSource

FILES_TENSOR = "__cascade__.model_files"
MAGIC = b"CSMF"
_HEAD = struct.Struct("<4sI")

# Weights travel as units, never as files; anything else in the folder is metadata a worker reads.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")
# Folders whose files a model reads besides the top level (named chat templates).
SUBDIRS = ("additional_chat_templates",)
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_TOTAL_BYTES = 256 * 1024 * 1024

T = TypeVar("T")


class ModelFilesError(ValueError):
    """A blob that does not unpack (corrupt, a checksum mismatch, a hostile file name)."""


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """The packed files of one checkpoint; `digest` names the set (the SHA-256 of the blob)."""

    blob: bytes
    names: tuple[str, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()

    @property
    def nbytes(self) -> int:
        return len(self.blob)


def small_files(model_dir: Path) -> list[str]:
    """The names (relative, posix) of the files a model reads besides its weights."""
    d = Path(model_dir)
    names = []
    for p in sorted(d.iterdir()):
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES):
            names.append(p.name)
    for sub in SUBDIRS:
        if (d / sub).is_dir():
            names += [f"{sub}/{p.name}" for p in sorted((d / sub).iterdir()) if p.is_file()]
    return names


def pack(files: Mapping[str, bytes]) -> ModelFiles:
    """Pack `files` (name → bytes) into one blob."""
    manifest = []
    for name, data in files.items():
        _check_name(name)
        manifest.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    head = json.dumps(manifest, separators=(",", ":")).encode()
    blob = _HEAD.pack(MAGIC, len(head)) + head + b"".join(files.values())
    return ModelFiles(blob, tuple(files))


def pack_dir(model_dir: Path) -> ModelFiles:
    """Read and pack the small files of the checkpoint at `model_dir` (blocking). Raises
    FileNotFoundError when the folder has no config.json, as reading the model would."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json")
    files: dict[str, bytes] = {}
    total = 0
    for name in small_files(d):
        size = (d / name).stat().st_size
        if size > MAX_FILE_BYTES:
            continue  # not metadata (a stray archive, a log); a model never reads it
        total += size
        if total > MAX_TOTAL_BYTES:
            raise ModelFilesError(f"{d}: the files besides the weights exceed {MAX_TOTAL_BYTES >> 20} MB")
        files[name] = (d / name).read_bytes()
    return pack(files)


def unpack(blob: bytes | memoryview) -> dict[str, bytes]:
    """The files of a blob, each checked against its SHA-256. Raises ModelFilesError."""
    raw = bytes(blob)
    if len(raw) < _HEAD.size:
        raise ModelFilesError("model files blob is truncated")
    magic, n = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise ModelFilesError(f"not a model files blob (magic {magic!r})")
    try:
        manifest = json.loads(raw[_HEAD.size : _HEAD.size + n])
    except (ValueError, UnicodeDecodeError):
        raise ModelFilesError("model files manifest is not JSON") from None
    pos = _HEAD.size + n
    out: dict[str, bytes] = {}
    for entry in manifest:
        name, size, sha = entry["name"], int(entry["size"]), entry["sha256"]
        _check_name(name)
        data = raw[pos : pos + size]
        if len(data) != size:
            raise ModelFilesError(f"model file {name} is truncated")
        if hashlib.sha256(data).hexdigest() != sha:
            raise ModelFilesError(f"model file {name}: checksum mismatch")
        out[name] = data
        pos += size
    if pos != len(raw):
        raise ModelFilesError(f"{len(raw) - pos} stray bytes after the model files")
    return out


def write_files(files: Mapping[str, bytes], dest: Path) -> Path:
    """Write unpacked files into `dest` (created; each file replaced atomically). Returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _check_name(name)
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def _check_name(name: str) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or len(p.parts) > 2:
        raise ModelFilesError(f"model file name {name!r} is not a plain relative path")


class WithModelFiles:
    """A unit source whose unit 0 carries the model's files as one more tensor (`FILES_TENSOR`).
    Unit 0's CRC differs from the inner source's, so this source keeps its own for it."""

    def __init__(self, inner: UnitSource, files: ModelFiles) -> None:
        self.inner = inner
        self.model = inner.model
        self.files = files
        # The inner source's CRCs as known now (a host cache computes them all up front).
        self.crcs: dict[int, int] = {u: c for u, c in inner.crcs.items() if u != 0}

    def unit(self, unit: int) -> list[tuple[TensorMeta, memoryview]]:
        out = self.inner.unit(unit)
        if unit == 0:
            n = self.files.nbytes
            out = [*out, (TensorMeta(FILES_TENSOR, "U8", (n,), n), memoryview(self.files.blob))]
        return out


def split_files(tensors: dict[str, T]) -> tuple[dict[str, T], T | None]:
    """Unit 0's tensors without the files tensor, and that tensor (None if absent)."""
    if FILES_TENSOR not in tensors:
        return tensors, None
    rest = {k: v for k, v in tensors.items() if k != FILES_TENSOR}
    return rest, tensors[FILES_TENSOR]
