"""Device profiles, the step padder and the disk bandwidth cap: pure arithmetic, checked against
hand-computed figures (no sleeping, no clocks)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cascade.device_profile import (
    PROFILES_DIR,
    DeviceProfile,
    DiskThrottle,
    ProfileError,
    StepPadder,
    available_profiles,
    disk_read_s,
    load_profile,
    profile_from_dict,
)

SIMPLE: dict[str, Any] = {
    "format": "cascade-device-profile",
    "version": 1,
    "name": "simple",
    "model": {"name": "toy", "layers": 4},
    "device": {"name": "toy-gpu"},
    "decode": {"batch": [1, 9], "ms_per_layer": [1.0, 3.0], "kv_ms_per_1k_tokens_per_layer": 0.5},
    "prefill": {"ms_per_token_per_layer": 0.01, "ms_fixed_per_layer": 0.2},
    "step_overhead_ms": 2.0,
    "head_ms": 1.0,
    "sources": ["made up for the test"],
    "note": "kept as extra",
}


def simple() -> DeviceProfile:
    return profile_from_dict(SIMPLE)


def test_decode_table_interpolates_and_extrapolates() -> None:
    p = simple()
    assert p.decode_layer_ms(0) == 0.0
    assert p.decode_layer_ms(1) == 1.0
    assert p.decode_layer_ms(5) == pytest.approx(2.0)
    assert p.decode_layer_ms(9) == pytest.approx(3.0)
    assert p.decode_layer_ms(17) == pytest.approx(5.0)  # along the last segment
    assert p.extra == {"note": "kept as extra"}


def test_step_time_is_a_roofline_of_its_parts() -> None:
    p = simple()
    # A short prompt rides along with the decode batch's pass over the weights:
    # 4 layers × (max(decode 2.0, prefill 0.2 + 0.01 × (100 + 5)) + kv 0.5 × 2) + overhead 2 + head 1
    assert p.layer_step_ms(5, prefill_tokens=100, context_tokens=2000) == pytest.approx(2.0 + 1.0)
    assert p.step_ms(5, 100, 2000) == pytest.approx(3 + 4 * 3.0)
    # A long one is compute-bound, and the decode tokens are five more tokens of it.
    assert p.layer_step_ms(5, prefill_tokens=1000) == pytest.approx(0.2 + 0.01 * 1005)
    assert p.layer_step_ms(0, prefill_tokens=1000) == pytest.approx(0.2 + 0.01 * 1000)
    # batch 1 at no context: 1 ms per layer, 4 layers, + 3 ms → 7 ms/step → 142.9 tokens/s
    assert p.decode_tokens_per_s(1) == pytest.approx(1000 / 7)
    assert p.decode_tokens_per_s(0) == 0.0


def test_padder_scales_to_the_share_of_the_model() -> None:
    p = simple()
    full = StepPadder(p, model_layers=8)
    # 8 real layers stand for the profile's 4: the full model.
    assert full.target_s(8, batch=1) == pytest.approx(p.step_ms(1) / 1000)
    # A stage with half the layers and no head: overhead + 2 emulated layers.
    assert full.target_s(4, batch=1, head=False) == pytest.approx((2.0 + 2 * 1.0) / 1000)
    assert full.target_s(8, batch=0) == 0.0  # nothing to do, no time
    assert full.target_s(8, batch=0, prefill_tokens=10) > 0
    with pytest.raises(ValueError):
        full.target_s(-1, 1)
    with pytest.raises(ValueError):
        StepPadder(p, model_layers=0)


def test_padder_pads_and_counts_overruns() -> None:
    pad = StepPadder(simple(), model_layers=4)
    target = pad.target_s(4, batch=1)  # 7 ms
    assert pad.pad(0.002, 4, 1) == pytest.approx(target - 0.002)
    assert pad.pad(0.010, 4, 1) == 0.0  # real compute took longer than the device would
    st = pad.stats.as_dict()
    assert st["steps"] == 2 and st["overrun_steps"] == 1
    assert st["overrun_s"] == pytest.approx(0.003) and st["padded_s"] == pytest.approx(0.005)


def test_disk_cap() -> None:
    assert disk_read_s(2_000_000_000, 2000) == pytest.approx(1.0)
    assert disk_read_s(123, 0) == 0.0  # uncapped
    with pytest.raises(ValueError):
        disk_read_s(-1, 10)
    th = DiskThrottle(100)  # 100 MB/s
    assert th.delay(50_000_000, elapsed_s=0.1) == pytest.approx(0.4)
    # Pacing is on the running total: a fast second chunk still waits for the first's share.
    assert th.delay(50_000_000, elapsed_s=0.6) == pytest.approx(0.4)
    assert th.delay(0, elapsed_s=5.0) == 0.0


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("format",), "nope", "format"),
        (("version",), 9, "newer"),
        (("decode", "batch"), [1], "at least 2"),
        (("decode", "batch"), [4, 2], "increasing"),
        (("decode", "ms_per_layer"), [3.0, 1.0], "must not fall"),
        (("decode", "ms_per_layer"), [1.0, "x"], "numbers"),
        (("model", "layers"), "many", "number"),
        (("prefill", "ms_per_token_per_layer"), -1, ">= 0"),
        (("name",), "", "name"),
    ],
)
def test_bad_profiles_rejected(path: tuple[str, ...], value: Any, match: str) -> None:
    data = copy.deepcopy(SIMPLE)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=match):
        profile_from_dict(data)


def test_load_by_name_and_path(tmp_path: Path) -> None:
    assert "llama2-7b-a100-80gb" in available_profiles()
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(SIMPLE))
    assert load_profile(f).name == "simple"
    assert load_profile("mine", directory=tmp_path).name == "simple"
    with pytest.raises(ProfileError, match="available: mine"):
        load_profile("missing", directory=tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ProfileError, match="not JSON"):
        load_profile("broken", directory=tmp_path)


def test_shipped_profiles_load_and_are_plausible() -> None:
    for name in available_profiles():
        p = load_profile(name)
        assert p.sources and p.approximate, f"{name}: say where the figures come from"
        assert (PROFILES_DIR / f"{name}.json").is_file()
    a100 = load_profile("llama2-7b-a100-80gb")
    # The figures the README quotes.
    assert a100.step_ms(1) == pytest.approx(11.06, abs=0.05)
    assert a100.decode_tokens_per_s(32, 1000) == pytest.approx(1426, rel=0.01)
    assert 140 < a100.step_ms(0, 2048) < 180
    # Throughput grows with batch, and so does step time: no free lunch anywhere in the table.
    tps = [a100.decode_tokens_per_s(b, 1000) for b in (1, 8, 32, 64, 128)]
    assert tps == sorted(tps)
    d = a100.describe()
    assert d["profile"] == "llama2-7b-a100-80gb" and d["approximate"] is True


def test_stage_step_ms_prices_layer_runs_like_the_whole_model() -> None:
    from cascade.device_profile import LayerWork

    p = load_profile("llama2-7b-a100-80gb")
    whole = [LayerWork(0, 8, batch=4, prefill_tokens=0, context_tokens=400)]
    assert p.stage_step_ms(8, whole, head=True) == pytest.approx(p.step_ms(4, 0, 400))
    # Two parts on overlapping runs: layers 0-3 carry both, 4-7 one; each run is priced on its sums.
    parts = [LayerWork(0, 8, batch=4), LayerWork(0, 4, prefill_tokens=256)]
    want = p.step_overhead_ms + 4 * (4 * p.layer_step_ms(4, 256, 0) + 4 * p.layer_step_ms(4, 0, 0))
    assert p.stage_step_ms(8, parts, head=False) == pytest.approx(want)
    assert p.stage_step_ms(8, [LayerWork(0, 8)], head=True) == 0.0  # nothing to do, no time
