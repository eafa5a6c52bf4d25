"""The worker's local host-memory cache: whole models in, LRU out by byte budget, a changed
checkpoint is a miss, a hit gives back the checkpoint's bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cascade.config import GenerateSpec
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from services.worker.localcache import DiskLoad, LocalCache, checkpoint_id


def make(root: Path, name: str, seed: int = 5) -> Path:
    d = root / name
    generate_model(d, GenerateSpec(layers=2, hidden=32, heads=4, kv_heads=2, vocab=300, seed=seed))
    return d


def model_bytes(d: Path) -> int:
    ck = Checkpoint(d)
    try:
        return ck.total_nbytes()
    finally:
        ck.close()


def read_all(dl: DiskLoad) -> list[dict[str, torch.Tensor]]:
    """What a load does with a DiskLoad: every unit's tensors, in order; then close it."""
    try:
        return [dl.unit_tensors(u) for u in range(dl.ckpt.config.num_units)]
    finally:
        dl.close()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_a_hit_gives_back_the_checkpoint_bytes_at_the_cache_pace(tmp_path: Path) -> None:
    d = make(tmp_path, "a")
    cache = LocalCache(10 * model_bytes(d), copy_mb_s=123.0)
    first = cache.open_load(d, "a", None, disk_mb_s=7.0)
    assert (first.source, first.mb_s) == ("disk", 7.0)
    from_disk = read_all(first)
    second = cache.open_load(d, "a", None, disk_mb_s=7.0)
    assert (second.source, second.mb_s, second.note) == ("local-cache", 123.0, "hit")
    n = second.ckpt.config.num_units
    nbytes = [second.unit_nbytes(u) for u in range(n)]
    from_cache = read_all(second)
    ck = Checkpoint(d)
    try:
        for u in range(n):
            truth = ck.unit_tensors(u)
            assert same(from_disk[u], truth) and same(from_cache[u], truth)
            assert nbytes[u] == ck.unit_nbytes(u)
    finally:
        ck.close()
    assert cache.used() == model_bytes(d)
    info = cache.describe()
    assert [m["model"] for m in info["models"]] == ["a"] and (info["hits"], info["misses"]) == (1, 1)


def test_lru_models_leave_whole_to_fit_the_budget(tmp_path: Path) -> None:
    dirs = {name: make(tmp_path, name, seed) for seed, name in enumerate("abc")}
    size = model_bytes(dirs["a"])
    cache = LocalCache(2 * size + size // 2)  # room for two models, not three
    read_all(cache.open_load(dirs["a"], "a", None, 0.0))
    read_all(cache.open_load(dirs["b"], "b", None, 0.0))
    assert cache.open_load(dirs["a"], "a", None, 0.0).close() is None  # a hit: "a" is now the most recent
    dl = cache.open_load(dirs["c"], "c", None, 0.0)
    assert dl.source == "disk" and "evicted ['b']" in dl.note
    read_all(dl)
    assert [m["model"] for m in cache.describe()["models"]] == ["c", "a"]
    assert cache.used() == 2 * size <= cache.budget
    again = cache.open_load(dirs["b"], "b", None, 0.0)
    assert again.source == "disk"
    again.close()


def test_a_model_larger_than_the_budget_is_read_but_not_kept(tmp_path: Path) -> None:
    d = make(tmp_path, "big")
    cache = LocalCache(model_bytes(d) - 1)
    dl = cache.open_load(d, "big", None, 0.0)
    assert dl.filling is None and "does not fit" in dl.note
    read_all(dl)
    assert cache.used() == 0
    again = cache.open_load(d, "big", None, 0.0)
    assert again.source == "disk"
    again.close()


def test_a_changed_checkpoint_is_a_miss_and_its_stale_copy_goes(tmp_path: Path) -> None:
    d = make(tmp_path, "m")
    cache = LocalCache(10 * model_bytes(d))
    read_all(cache.open_load(d, "m", None, 0.0))
    before = checkpoint_id(d)
    # Rewritten in place with other weights (same sizes): only the mtime tells.
    make(tmp_path, "m", seed=99)
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert checkpoint_id(d) != before and checkpoint_id(d).path == before.path
    assert cache.lookup(checkpoint_id(d)) is None
    assert cache.used() == 0  # the stale copy is not kept beside the new one
    dl = cache.open_load(d, "m", None, 0.0)
    assert dl.source == "disk"
    fresh = read_all(dl)
    hit = cache.open_load(d, "m", None, 0.0)
    assert hit.source == "local-cache"
    assert all(same(a, b) for a, b in zip(read_all(hit), fresh, strict=True))


def test_a_load_that_does_not_finish_caches_nothing(tmp_path: Path) -> None:
    d = make(tmp_path, "m")
    cache = LocalCache(10 * model_bytes(d))
    dl = cache.open_load(d, "m", None, 0.0)
    dl.unit_tensors(0)  # then cancelled: the rest never comes
    assert dl.close() is None and cache.used() == 0
    partial = cache.open_load(d, "m", [1, 2, 3], 0.0)  # finishing a re-planned load: not whole
    assert partial.filling is None and partial.source == "disk"
    read_all(partial)
    assert cache.used() == 0


def test_off_by_default_and_refuses_negative_budgets(tmp_path: Path) -> None:
    d = make(tmp_path, "m")
    cache = LocalCache(0)
    assert not cache.enabled
    read_all(cache.open_load(d, "m", None, 3.0))
    dl = cache.open_load(d, "m", None, 3.0)
    assert (dl.source, dl.mb_s, dl.note) == ("disk", 3.0, "off")
    dl.close()
    with pytest.raises(ValueError):
        LocalCache(-1)
