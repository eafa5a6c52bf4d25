"""A worker's own host-memory copy of the checkpoints it read from disk, as ServerlessLLM keeps
models in each server's DRAM: the copy outlives the instance (a scale-down returns the worker to
the idle pool, the copy stays), so a later disk load of the same checkpoint on this worker installs
from memory, paced like a host-to-GPU copy instead of a disk read.

Unlike the loader's host cache (one copy in the whole mesh, a chain head on the data plane), this
copy serves only the worker that holds it and nothing crosses the network. A byte budget bounds it;
whole models leave it least recently used first. A checkpoint is known by its resolved path and a
fingerprint (size and mtime of `config.json` and every shard), so a rewritten checkpoint is read
again instead of served stale.

Used from the worker's torch thread (copies) and its event loop (status), hence the lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cascade.models.checkpoint import Checkpoint
from cascade.models.config import unit_tensor_names

_PAGE = 4096

Unit = dict[str, torch.Tensor]
LoadSource = Literal["disk", "local-cache"]


async def pace(started: float, nbytes: int, mb_s: float) -> None:
    """Wait until `nbytes`, counted from `started` (monotonic), could have moved at `mb_s` MB/s
    (0 = no wait). Callers wait before they install and announce a unit, so an emulated link never
    makes a unit usable before it could have arrived."""
    if mb_s > 0:
        await asyncio.sleep(max(0.0, started + nbytes / (mb_s * 1e6) - time.monotonic()))


@dataclass(frozen=True, slots=True)
class CheckpointId:
    path: str  # resolved
    fingerprint: tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) of config.json and each shard


def checkpoint_id(model_dir: Path) -> CheckpointId:
    """Stat the checkpoint's files. Taken before the files are opened: a checkpoint rewritten in
    between is cached under the old fingerprint, so the next load misses rather than serving it stale."""
    d = Path(model_dir).resolve()
    files = [d / "config.json", *sorted(d.glob("*.safetensors"))]
    fp = []
    for f in files:
        st = f.stat()
        fp.append((f.name, st.st_size, st.st_mtime_ns))
    return CheckpointId(str(d), tuple(fp))


def unit_nbytes(tensors: Unit) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True, slots=True)
class CachedModel:
    """One checkpoint held whole: each unit's tensors in the checkpoint's dtype, in host memory."""

    model: str
    key: CheckpointId
    units: tuple[Unit, ...]
    unit_bytes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(self.unit_bytes)


class Filling:
    """A model copied in unit by unit while a disk load reads it; it joins the cache on `close`
    only if every unit came in (a cancelled or failed load leaves nothing half-cached)."""

    def __init__(self, cache: LocalCache, key: CheckpointId, model: str, num_units: int, reserved: int) -> None:
        self.cache = cache
        self.key = key
        self.model = model
        self.reserved = reserved
        self.units: list[Unit | None] = [None] * num_units
        self.closed = False

    def add(self, unit: int, tensors: Unit) -> Unit:
        """Copy one unit (views of the checkpoint's mapping) into memory the cache owns; returns the copy."""
        copy = {n: t.clone() for n, t in tensors.items()}
        if not self.closed:
            self.units[unit] = copy
        return copy

    def close(self) -> CachedModel | None:
        """Hand the copy to the cache if whole (returns it), else release the reservation."""
        return self.cache._settle(self)


@dataclass
class DiskLoad:
    """Where one disk load takes its units from, and at what pace: the local copy when the cache
    holds the checkpoint whole, else the checkpoint itself (copied into the cache on the way when
    the load reads every unit and the budget allows). Owns the open checkpoint."""

    ckpt: Checkpoint
    source: LoadSource
    mb_s: float  # the pace of this load (0 = unpaced)
    note: str  # the cache's part in it, for the log
    hit: CachedModel | None = None
    filling: Filling | None = None

    def unit_nbytes(self, unit: int) -> int:
        return self.hit.unit_bytes[unit] if self.hit is not None else self.ckpt.unit_nbytes(unit)

    def prefetch(self, unit: int) -> None:
        """Bring the unit's bytes from disk into memory without torch (any thread): the engine
        thread's copy then reads RAM, not the disk, while it holds up the steps."""
        if self.hit is None:
            for name in unit_tensor_names(self.ckpt.config, unit):
                view = np.frombuffer(self.ckpt.raw(name), dtype=np.uint8)
                if view.size:
                    int(view[::_PAGE].sum())  # one read per page faults the page in

    def unit_tensors(self, unit: int) -> Unit:
        """The unit's tensors (blocking, torch: run it on the engine thread). Never the cache's
        own tensors to keep: install them with a copy."""
        if self.hit is not None:
            return self.hit.units[unit]
        tensors = self.ckpt.unit_tensors(unit)
        return self.filling.add(unit, tensors) if self.filling is not None else tensors

    def close(self) -> CachedModel | None:
        """Close the checkpoint; returns the model this load put into the cache, if it did."""
        stored = self.filling.close() if self.filling is not None else None
        self.ckpt.close()
        return stored


class LocalCache:
    """Checkpoints held in this worker's host memory, within `budget_bytes` (0 = off), LRU first out.
    `copy_mb_s` is the pace of a load from here (the host-to-GPU link; 0 = unpaced)."""

    def __init__(self, budget_bytes: int, copy_mb_s: float = 0.0) -> None:
        if budget_bytes < 0 or copy_mb_s < 0:
            raise ValueError("the local cache's budget and pace must be >= 0")
        self.budget = budget_bytes
        self.copy_mb_s = copy_mb_s
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()  # by resolved path, LRU first
        self._reserved = 0  # bytes of fillings under way
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def used(self) -> int:
        with self._lock:
            return self._used()

    def _used(self) -> int:
        return self._reserved + sum(e.nbytes for e in self._entries.values())

    def lookup(self, key: CheckpointId) -> CachedModel | None:
        """The copy of this checkpoint if held whole and current; a stale copy is dropped."""
        with self._lock:
            e = self._entries.get(key.path)
            if e is not None and e.key != key:
                del self._entries[key.path]
                self.evicted += 1
                e = None
            if e is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key.path)
            self.hits += 1
            return e

    def begin(self, key: CheckpointId, model: str, num_units: int, nbytes: int) -> tuple[Filling | None, list[str]]:
        """Reserve room for a copy of `nbytes`, evicting least recently used models first. Returns the
        filling (None when the model alone exceeds the budget) and the models evicted for it.
        Evicting before the copy keeps memory within the budget while it fills."""
        with self._lock:
            old = self._entries.pop(key.path, None)  # a stale copy of the same path goes either way
            evicted = [old.model] if old is not None else []
            fits = nbytes <= self.budget
            while fits and self._entries and self._used() + nbytes > self.budget:
                evicted.append(self._entries.popitem(last=False)[1].model)
            # What may be left are other fillings' reservations: never overcommit for them.
            fits = fits and self._used() + nbytes <= self.budget
            self.evicted += len(evicted)
            if not fits:
                return None, evicted
            self._reserved += nbytes
            return Filling(self, key, model, num_units, nbytes), evicted

    def _settle(self, f: Filling) -> CachedModel | None:
        with self._lock:
            if f.closed:
                return None
            f.closed = True
            self._reserved -= f.reserved
            units = f.units
            if any(u is None for u in units):
                return None
            whole = tuple(u for u in units if u is not None)
            entry = CachedModel(f.model, f.key, whole, tuple(unit_nbytes(u) for u in whole))
            self._entries[f.key.path] = entry
            self._entries.move_to_end(f.key.path)
            return entry

    def open_load(self, model_dir: Path, model: str, units: Collection[int] | None, disk_mb_s: float) -> DiskLoad:
        """Open a disk load of `units` (None: all) of the checkpoint at `model_dir` (blocking: stats
        and maps files). Raises what `Checkpoint` raises for a checkpoint it cannot read."""
        if not self.enabled:
            return DiskLoad(Checkpoint(model_dir), "disk", disk_mb_s, "off")
        key = checkpoint_id(model_dir)
        ckpt = Checkpoint(model_dir)
        try:
            n = ckpt.config.num_units
            hit = self.lookup(key)
            if hit is not None:
                return DiskLoad(ckpt, "local-cache", self.copy_mb_s, "hit", hit=hit)
            if units is not None and set(units) != set(range(n)):
                # A re-plan finishing a partial load: the copy would not be whole.
                return DiskLoad(ckpt, "disk", disk_mb_s, "miss; a partial read is not cached")
            nbytes = ckpt.total_nbytes()
            filling, evicted = self.begin(key, model, n, nbytes)
            if filling is None:
                note = f"miss; {nbytes / 1e6:.1f} MB does not fit the {self.budget / 1e6:.1f} MB budget"
            else:
                note = "miss; copying in" + (f", evicted {evicted}" if evicted else "")
            return DiskLoad(ckpt, "disk", disk_mb_s, note, filling=filling)
        except BaseException:
            ckpt.close()
            raise

    def describe(self) -> dict[str, Any]:
        """For the worker's status: the budget, what is held (most recently used first) and the counts."""
        with self._lock:
            models = [
                {"model": e.model, "path": e.key.path, "mb": round(e.nbytes / 1e6, 1)}
                for e in reversed(self._entries.values())
            ]
            return {
                "budget_mb": round(self.budget / 1e6, 1),
                "used_mb": round(self._used() / 1e6, 1),
                "copy_mb_s": self.copy_mb_s,
                "models": models,
                "hits": self.hits,
                "misses": self.misses,
                "evicted": self.evicted,
            }
