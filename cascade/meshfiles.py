"""A model's small files (config, tokenizer, chat templates) fetched from the mesh, for a service
that cannot see the model store: a loader sends the blob modelfiles.py packs (what unit 0 carries
to diskless workers) in pieces small enough for a NATS message, and the blob's per-file SHA-256
is checked when it is unpacked here, so a file is never written from bytes that differ from the
loader's."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from nats.aio.client import Client as NATS

from cascade.messages import ModelFilesChunk, ModelFilesRequest
from cascade.modelfiles import ModelFilesError, unpack, write_files
from cascade.natsutil import request
from cascade.subjects import Subjects

# Raw bytes per piece: base64 makes it a third larger, under NATS's default 1 MB payload.
CHUNK_BYTES = 256 * 1024


def chunk(model: str, blob: bytes, digest: str, offset: int) -> ModelFilesChunk:
    """The piece of `blob` from `offset` (the loader's side)."""
    data = base64.b64encode(blob[offset : offset + CHUNK_BYTES]).decode()
    return ModelFilesChunk(model, digest, len(blob), offset, data)


async def fetch_model_files(nc: NATS, s: Subjects, model: str, dest_root: Path, timeout_s: float) -> Path:
    """The files of `model` from a loader, written under `dest_root/<model>-<digest>/` (a folder
    already there from an earlier fetch of the same files is reused). Raises RequestTimeout /
    NoResponders when no loader has them, ModelFilesError when the bytes do not check out."""
    first = await request(nc, s.model_files(), ModelFilesRequest(model), ModelFilesChunk, timeout_s)
    digest, total = first.digest, first.total
    dest = dest_root / f"{model.replace('/', '--')}-{digest[:16]}"
    if (dest / ".complete").is_file():
        return dest
    parts = [base64.b64decode(first.data)]
    got = len(parts[0])
    while got < total:
        piece = await request(nc, s.model_files(), ModelFilesRequest(model, got, digest), ModelFilesChunk, timeout_s)
        if piece.digest != digest or piece.offset != got or piece.total != total:
            raise ModelFilesError(f"{model}: a piece of another version of the files came back")
        data = base64.b64decode(piece.data)
        if not data:
            raise ModelFilesError(f"{model}: an empty piece at {got} of {total} bytes")
        parts.append(data)
        got += len(data)
    blob = b"".join(parts)
    if hashlib.sha256(blob).hexdigest() != digest:
        raise ModelFilesError(f"{model}: the files' blob does not match its digest")
    files = unpack(blob)  # checks every file's SHA-256 too
    write_files(files, dest)
    (dest / ".complete").write_text(digest)
    return dest
