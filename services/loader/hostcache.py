"""The O(1) host cache: at most one host-memory copy of each model in the whole mesh, kept by the
loader and used as a chain head only when no live worker holds the model (see planner).

Two ways to hold a model:
  * "mmap": the checkpoint's safetensors mapping, every page touched once (and mlock-ed where the
    process may lock memory), so a send reads RAM, never the disk; costs no copy, and the page
    cache is shared with any other reader of the same files;
  * "copy": the bytes copied into one anonymous buffer, for checkpoints on storage whose pages may
    be dropped (network file systems) or files that may change under us.

Release is decided by a pure policy (`keep_alive_decision`); `HostCache.sweep` applies it, and
`HostCache.release` frees on demand (an operator, or memory pressure).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cascade import shmhop
from cascade.framing import CheckpointSource, TensorMeta, UnitHeader, UnitSource, unit_frame_crc
from cascade.modelfiles import ModelFiles, WithModelFiles, pack_dir
from cascade.models.checkpoint import Checkpoint

CacheMode = Literal["mmap", "copy"]

# Idle time after which a cached model that live workers also hold is dropped: those workers are
# the sources now, the cache only matters again if they all go away.
DEFAULT_KEEP_ALIVE_S = 300.0
# Idle time after which a model nobody else holds is dropped: this copy is what makes a scale
# from zero fast, so it is kept much longer.
DEFAULT_KEEP_ALIVE_COLD_S = 3600.0


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class KeepAlive:
    release: bool
    reason: str


def keep_alive_decision(
    now: float,
    last_used: float,
    in_use: int,
    live_holders: int,
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
    keep_alive_cold_s: float = DEFAULT_KEEP_ALIVE_COLD_S,
) -> KeepAlive:
    """Whether to drop one cached model now. Pure: times are plain numbers."""
    if in_use > 0:
        return KeepAlive(False, f"sending to {in_use} chain(s)")
    idle = now - last_used
    if live_holders > 0:
        if idle >= keep_alive_s:
            return KeepAlive(True, f"idle {idle:.0f}s and {live_holders} live holder(s)")
        return KeepAlive(False, f"idle {idle:.0f}s < {keep_alive_s:.0f}s")
    if idle >= keep_alive_cold_s:
        return KeepAlive(True, f"idle {idle:.0f}s with no live holder")
    return KeepAlive(False, f"only copy in the mesh; idle {idle:.0f}s < {keep_alive_cold_s:.0f}s")


# --------------------------------------------------------------------------- held copies


class BufferSource:
    """A model's units copied into one anonymous buffer (the "copy" mode), in shared memory
    (`cascade.shmhop.SharedMap`: anonymous too, but a same-host receiver can map it and copy its
    units out itself)."""

    def __init__(self, ckpt: Checkpoint, model: str) -> None:
        self.model = model
        src = CheckpointSource(ckpt, model)
        layout: list[tuple[int, list[TensorMeta], list[int]]] = []
        total = 0
        for u in range(ckpt.config.num_units):
            metas = [m for m, _ in src.unit(u)]
            offsets, size = UnitHeader(u, tuple(metas)).layout()
            layout.append((total, metas, offsets))
            total += size
        self.buf = shmhop.shared_array(total, touch=False) if shmhop.available() else np.empty(total, dtype=np.uint8)
        for u, (base, _, offsets) in enumerate(layout):
            for (meta, data), off in zip(src.unit(u), offsets, strict=True):
                if meta.nbytes:
                    self.buf[base + off : base + off + meta.nbytes] = np.frombuffer(data, dtype=np.uint8)
        self._layout = layout
        self.nbytes = total
        self.crcs: dict[int, int] = {}

    def unit(self, unit: int) -> list[tuple[TensorMeta, memoryview]]:
        base, metas, offsets = self._layout[unit]
        view = self.buf.data
        return [(m, view[base + o : base + o + m.nbytes]) for m, o in zip(metas, offsets, strict=True)]


def _libc_mlock() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).mlock
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def _touch_and_lock(src: UnitSource, num_units: int, lock: bool) -> tuple[int, bool]:
    """Read every byte once, computing each unit's CRC on the way (so no send pays for it and the
    pages are faulted in); mlock if asked and allowed. Returns (bytes, locked)."""
    mlock = _libc_mlock() if lock else None
    locked = mlock is not None
    total = 0
    for u in range(num_units):
        pieces = src.unit(u)
        src.crcs[u] = unit_frame_crc(u, pieces)
        for meta, data in pieces:
            total += meta.nbytes
            if mlock is not None and locked and meta.nbytes:
                # mlock needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK; without, touched pages still
                # serve from RAM until memory pressure evicts them.
                locked = mlock(np.frombuffer(data, dtype=np.uint8).ctypes.data, meta.nbytes) == 0
    return total, locked


@dataclass
class CacheEntry:
    model: str
    path: Path
    mode: CacheMode
    nbytes: int
    locked: bool
    loaded_at: float
    last_used: float
    in_use: int
    _ckpt: Checkpoint
    _source: UnitSource
    unit_sizes: tuple[int, ...] = ()  # bytes per unit as the planner counts them


class HostCache:
    """At most one host-memory copy per model. Thread-safe: senders lease from their own threads."""

    def __init__(self, mode: CacheMode = "mmap", lock_pages: bool = True, clock: Callable[[], float] = time.monotonic):
        self.mode = mode
        self.lock_pages = lock_pages
        self._clock = clock
        self._entries: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()

    def load(self, model: str, path: Path) -> CacheEntry:
        """Hold `model` from the checkpoint at `path` (blocking: run it in a thread). Idempotent:
        a model already held is not loaded twice."""
        with self._lock:
            if model in self._entries:
                return self._entries[model]
        ckpt = Checkpoint(Path(path))
        try:
            sizes = tuple(ckpt.unit_nbytes(u) for u in range(ckpt.config.num_units))
            # Config, tokenizer and the rest go with unit 0, so a worker without the model store
            # can build the model from what it receives.
            files = pack_dir(Path(path))
            src: UnitSource
            if self.mode == "copy":
                buf = BufferSource(ckpt, model)
                src = WithModelFiles(buf, files)
                for u in range(ckpt.config.num_units):
                    src.crcs[u] = unit_frame_crc(u, src.unit(u))
                nbytes, locked = buf.nbytes + files.nbytes, False
                ckpt.close()
            else:
                src = WithModelFiles(CheckpointSource(ckpt, model), files)
                nbytes, locked = _touch_and_lock(src, ckpt.config.num_units, self.lock_pages)
                if shmhop.available():
                    # A same-host receiver maps the files' page cache itself and copies from it.
                    for f in {id(f): f for f in ckpt.index.values()}.values():
                        shmhop.register_file(f._mm, f.path)
        except BaseException:
            ckpt.close()
            raise
        now = self._clock()
        entry = CacheEntry(model, Path(path), self.mode, nbytes, locked, now, now, 0, ckpt, src, sizes)
        with self._lock:
            if model in self._entries:  # another thread won the race: keep one copy
                ckpt.close()
                return self._entries[model]
            self._entries[model] = entry
        return entry

    def has(self, model: str) -> bool:
        with self._lock:
            return model in self._entries

    def models(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._entries)

    def usage(self, model: str) -> tuple[float, int] | None:
        """(last used, leases now) of a held model, None if absent."""
        with self._lock:
            e = self._entries.get(model)
            return None if e is None else (e.last_used, e.in_use)

    def files(self, model: str) -> ModelFiles | None:
        """The small files (config, tokenizer, …) held with a model's copy."""
        with self._lock:
            e = self._entries.get(model)
        return e._source.files if e is not None and isinstance(e._source, WithModelFiles) else None

    def unit_nbytes(self, model: str) -> tuple[int, ...] | None:
        """Bytes of each unit as the planner counts them (the checkpoint's tensors), read from the
        held copy: a plan from the cache needs no look at the model store."""
        with self._lock:
            e = self._entries.get(model)
            return None if e is None else e.unit_sizes

    @contextlib.contextmanager
    def lease(self, model: str) -> Iterator[UnitSource]:
        """The model as a chain head for `send_units`; it is not released while leased."""
        with self._lock:
            e = self._entries.get(model)
            if e is None:
                raise KeyError(f"{model} is not in the host cache")
            e.in_use += 1
            e.last_used = self._clock()
        try:
            yield e._source
        finally:
            with self._lock:
                e.in_use -= 1
                e.last_used = self._clock()

    def release(self, model: str) -> bool:
        """Drop `model` now (on demand). False if absent or leased (then nothing changes)."""
        with self._lock:
            e = self._entries.get(model)
            if e is None or e.in_use:
                return False
            del self._entries[model]
        e._ckpt.close()
        return True

    def sweep(
        self,
        live_holders: Mapping[str, int],
        keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
        keep_alive_cold_s: float = DEFAULT_KEEP_ALIVE_COLD_S,
    ) -> list[tuple[str, str]]:
        """Apply the keep-alive policy to every model; returns (model, reason) for each released."""
        now = self._clock()
        with self._lock:
            views = [(e.model, e.last_used, e.in_use) for e in self._entries.values()]
        out = []
        for model, last_used, in_use in views:
            d = keep_alive_decision(now, last_used, in_use, live_holders.get(model, 0), keep_alive_s, keep_alive_cold_s)
            if d.release and self.release(model):
                out.append((model, d.reason))
        return out

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def status(self) -> dict[str, dict[str, object]]:
        """What `cascade status` shows: per model, size, mode, locked, idle time, leases."""
        now = self._clock()
        with self._lock:
            return {
                e.model: {
                    "nbytes": e.nbytes,
                    "mode": e.mode,
                    "locked": e.locked,
                    "idle_s": round(now - e.last_used, 1),
                    "in_use": e.in_use,
                }
                for e in self._entries.values()
            }

    def close(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            e._ckpt.close()
