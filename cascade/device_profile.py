"""Emulated accelerators: how long a step would take on a named GPU, so a CPU worker can pad its
real (small-model) torch step to that time and have a GPU's capacity of its own.

A *device profile* (JSON, format in docs/device-profiles/README.md) gives, for one model on one
device: the decode time of one decoder layer per step as a function of batch size (a table,
interpolated piecewise-linearly), the prefill time per prompt token per layer, the KV-cache read
time per context token per layer, and per-step overheads. `StepPadder` scales those to the share
of the model a worker runs: a worker holding `layers` of a real model of `model_layers` layers
stands for layers × profile.layers / model_layers layers of the profiled model, so a full
instance emulates the full model whatever the size of the small model it really computes.

Also: a disk bandwidth cap (bytes → seconds at a configured MB/s), for loads that stand for an
SSD. Everything here is pure arithmetic; the worker owns the clock and the sleeping.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson

from cascade.config import ConfigError

FORMAT = "cascade-device-profile"
FORMAT_VERSION = 1
PROFILES_DIR = Path(__file__).resolve().parent.parent / "docs" / "device-profiles"
MB = 1_000_000  # disk bandwidths are quoted in decimal megabytes per second, as SSD datasheets do


class ProfileError(ConfigError):
    """A device profile that cannot be used; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class LayerWork:
    """What one step does on the real layers [start, end): decode `batch` sequences whose KV
    caches hold `context_tokens` tokens in all, and compute `prefill_tokens` prompt tokens."""

    start: int
    end: int
    batch: int = 0
    prefill_tokens: int = 0
    context_tokens: int = 0


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    model_name: str
    layers: int  # decoder layers of the profiled model
    device_name: str
    decode_batch: tuple[int, ...]  # batch sizes of the decode table, increasing
    decode_ms_per_layer: tuple[float, ...]  # one layer's decode step at that batch (weights + compute)
    kv_ms_per_1k_tokens_per_layer: float = 0.0  # reading 1000 tokens of KV cache in one layer
    prefill_ms_per_token_per_layer: float = 0.0
    prefill_ms_fixed_per_layer: float = 0.0  # per layer, in a step that prefills anything
    step_overhead_ms: float = 0.0  # per step, whatever the stage holds (launches, scheduling)
    head_ms: float = 0.0  # final norm + LM head + sampling, in the stage that holds the head
    max_batch: int = 0  # the device's batch limit for this model (0 = unstated)
    disk_mb_s: float = 0.0  # suggested disk read bandwidth to go with it (0 = unstated)
    approximate: bool = True
    sources: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError("layers must be >= 1")
        if len(self.decode_batch) < 2 or len(self.decode_batch) != len(self.decode_ms_per_layer):
            # One point cannot say how a step grows with the batch, and that is the whole point.
            raise ValueError("decode batch and ms_per_layer need the same length, at least 2 points")
        if any(b < 1 for b in self.decode_batch) or any(
            b2 <= b1 for b1, b2 in zip(self.decode_batch, self.decode_batch[1:], strict=False)
        ):
            raise ValueError("decode batch sizes must be >= 1 and strictly increasing")
        if any(not (ms > 0 and math.isfinite(ms)) for ms in self.decode_ms_per_layer):
            raise ValueError("decode ms_per_layer must be positive and finite")
        if any(m2 < m1 for m1, m2 in zip(self.decode_ms_per_layer, self.decode_ms_per_layer[1:], strict=False)):
            raise ValueError("decode ms_per_layer must not fall as the batch grows")
        for name in (
            "kv_ms_per_1k_tokens_per_layer",
            "prefill_ms_per_token_per_layer",
            "prefill_ms_fixed_per_layer",
            "step_overhead_ms",
            "head_ms",
            "disk_mb_s",
        ):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be >= 0 and finite")

    # ---- per layer ---------------------------------------------------------
    def decode_layer_ms(self, batch: int) -> float:
        """One layer's decode step for `batch` sequences: piecewise-linear in the table, flat below
        its first point, extended along its last segment beyond its last point."""
        if batch <= 0:
            return 0.0
        xs, ys = self.decode_batch, self.decode_ms_per_layer
        if batch <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, batch)
        if i >= len(xs):
            i = len(xs) - 1  # extrapolate with the last segment
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (batch - x0) / (x1 - x0)

    def layer_step_ms(self, batch: int, prefill_tokens: int = 0, context_tokens: int = 0) -> float:
        """One layer's share of a step: decode `batch` sequences whose KV caches hold
        `context_tokens` tokens in all, and prefill `prefill_tokens` prompt tokens.

        A mixed step's weight work is the larger of the decode batch's (bound by reading the
        weights) and the compute of every token in it, prompt and decode alike: on a GPU the
        decode tokens ride along with a compute-bound prefill chunk (Sarathi-Serve's "piggybacking"),
        they do not add a second pass over the weights. Reading the KV cache adds to either."""
        ms = self.decode_layer_ms(batch)
        if prefill_tokens > 0:
            compute = self.prefill_ms_fixed_per_layer + self.prefill_ms_per_token_per_layer * (prefill_tokens + batch)
            ms = max(ms, compute)
        return ms + self.kv_ms_per_1k_tokens_per_layer * context_tokens / 1000

    # ---- whole model -------------------------------------------------------
    def step_ms(self, batch: int, prefill_tokens: int = 0, context_tokens: int = 0) -> float:
        """A step of the whole model on one device."""
        return (
            self.step_overhead_ms
            + self.head_ms
            + self.layers * self.layer_step_ms(batch, prefill_tokens, context_tokens)
        )

    def decode_tokens_per_s(self, batch: int, context_per_seq: int = 0) -> float:
        """Generated tokens/s of one instance decoding `batch` sequences of `context_per_seq`
        tokens each: a capacity figure for the `rate` policy's `capacity_tps` knob."""
        if batch <= 0:
            return 0.0
        return batch * 1000 / self.step_ms(batch, 0, batch * context_per_seq)

    def stage_step_ms(self, model_layers: int, parts: Iterable[LayerWork], head: bool) -> float:
        """A step of a worker whose real model has `model_layers` layers, doing `parts` of work
        on runs of them (each real layer stands for profile.layers / model_layers profiled ones):
        per layer, the batch, prompt tokens and KV tokens of every part that runs it are added up
        and priced together (one pass over the layer's weights serves them all), plus the step
        overhead and the head if the step ran it. Nothing to do costs no time.

        The engine prices its steps with this (services/worker/engine.py), and so does the
        simulator (sim/), so both use one step-time model."""
        work = [p for p in parts if p.end > p.start and (p.batch or p.prefill_tokens)]
        if not work:
            return 0.0
        scale = self.layers / model_layers
        ms = self.step_overhead_ms + (self.head_ms if head else 0.0)
        if len(work) == 1:
            p = work[0]
            return ms + scale * (p.end - p.start) * self.layer_step_ms(p.batch, p.prefill_tokens, p.context_tokens)
        # Runs of layers that the same parts cover are priced once, times their length.
        bounds = sorted({b for p in work for b in (p.start, p.end)})
        total = 0.0
        for lo, hi in pairwise(bounds):
            batch = prefill = ctx = 0
            for p in work:
                if p.start <= lo and hi <= p.end:
                    batch += p.batch
                    prefill += p.prefill_tokens
                    ctx += p.context_tokens
            if batch or prefill:
                total += (hi - lo) * self.layer_step_ms(batch, prefill, ctx)
        return ms + scale * total

    def describe(self) -> dict[str, Any]:
        """What a benchmark result records about the emulation."""
        return {
            "profile": self.name,
            "model": self.model_name,
            "device": self.device_name,
            "layers": self.layers,
            "approximate": self.approximate,
            "decode_step_ms_b1": round(self.step_ms(1), 3),
            "decode_tokens_per_s_b32_ctx1k": round(self.decode_tokens_per_s(32, 1000), 1),
            "prefill_ms_1k_tokens": round(self.step_ms(0, 1000), 2),
        }


# --------------------------------------------------------------------------- files


def _num(d: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    v = d.get(key, default)
    if v is None:
        raise ValueError(f"{where}.{key} is required")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{where}.{key} must be a number, got {v!r}")
    return float(v)


def profile_from_dict(data: Any) -> DeviceProfile:
    """Build a profile from its parsed JSON; ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("a device profile is a JSON object")
    if data.get("format") != FORMAT:
        raise ValueError(f"not a device profile: format must be {FORMAT!r}")
    version = data.get("version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"profile version {version!r} is newer than this build understands ({FORMAT_VERSION})")
    model, device = data.get("model"), data.get("device")
    decode, prefill = data.get("decode"), data.get("prefill", {})
    for key, v in (("model", model), ("device", device), ("decode", decode), ("prefill", prefill)):
        if not isinstance(v, dict):
            raise ValueError(f"{key} must be an object")
    assert isinstance(model, dict) and isinstance(device, dict) and isinstance(decode, dict)
    assert isinstance(prefill, dict)
    batch, ms = decode.get("batch"), decode.get("ms_per_layer")
    if not isinstance(batch, list) or not isinstance(ms, list):
        raise ValueError("decode.batch and decode.ms_per_layer must be lists")
    if any(isinstance(b, bool) or not isinstance(b, int) for b in batch):
        raise ValueError("decode.batch must hold whole numbers")
    if any(isinstance(m, bool) or not isinstance(m, int | float) for m in ms):
        raise ValueError("decode.ms_per_layer must hold numbers")
    sources = data.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ValueError("sources must be a list of strings")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("name is required")
    known = {"format", "version", "name", "model", "device", "decode", "prefill", "step_overhead_ms", "head_ms"}
    known |= {"max_batch", "disk_mb_s", "approximate", "sources"}
    return DeviceProfile(
        name=name,
        model_name=str(model.get("name", "")),
        layers=int(_num(model, "layers", "model")),
        device_name=str(device.get("name", "")),
        decode_batch=tuple(batch),
        decode_ms_per_layer=tuple(float(m) for m in ms),
        kv_ms_per_1k_tokens_per_layer=_num(decode, "kv_ms_per_1k_tokens_per_layer", "decode", 0.0),
        prefill_ms_per_token_per_layer=_num(prefill, "ms_per_token_per_layer", "prefill", 0.0),
        prefill_ms_fixed_per_layer=_num(prefill, "ms_fixed_per_layer", "prefill", 0.0),
        step_overhead_ms=_num(data, "step_overhead_ms", "profile", 0.0),
        head_ms=_num(data, "head_ms", "profile", 0.0),
        max_batch=int(_num(data, "max_batch", "profile", 0)),
        disk_mb_s=_num(data, "disk_mb_s", "profile", 0.0),
        approximate=bool(data.get("approximate", True)),
        sources=tuple(sources),
        extra={k: v for k, v in data.items() if k not in known},
    )


def available_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.json"))


def load_profile(name_or_path: str | Path, directory: Path = PROFILES_DIR) -> DeviceProfile:
    """A profile by file path, or by name from docs/device-profiles/. ProfileError if unusable."""
    path = Path(name_or_path)
    if not path.is_file():
        path = directory / f"{name_or_path}.json"
    try:
        raw = path.read_bytes()
    except OSError:
        have = ", ".join(available_profiles(directory)) or "none"
        raise ProfileError(f"no device profile {str(name_or_path)!r} (available: {have})") from None
    try:
        return profile_from_dict(orjson.loads(raw))
    except orjson.JSONDecodeError as e:
        raise ProfileError(f"device profile {path} is not JSON: {e}") from None
    except (ValueError, TypeError) as e:
        raise ProfileError(f"device profile {path}: {e}") from None


# --------------------------------------------------------------------------- padding


@dataclass(slots=True)
class PadStats:
    steps: int = 0
    padded_s: float = 0.0  # time added by padding
    overrun_steps: int = 0  # steps whose real compute already took longer than the emulated time
    overrun_s: float = 0.0  # by how much, in all: the emulation ran slower than the profile

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "padded_s": round(self.padded_s, 6),
            "overrun_steps": self.overrun_steps,
            "overrun_s": round(self.overrun_s, 6),
        }


class StepPadder:
    """How long each of a worker's steps should take on the emulated device, and how long to
    sleep after the real step to get there.

        padder = StepPadder(profile, model_layers=cfg.num_layers)
        t0 = clock(); run_step(); sleep(padder.pad(clock() - t0, layers=8, batch=b, prefill_tokens=p))

    Overruns are counted, not carried over: a step that was too slow is not made up by a shorter
    next one, because a GPU would not have been slow there either; the stats say how far the
    emulation fell behind, and a result with overruns says so."""

    def __init__(self, profile: DeviceProfile, model_layers: int) -> None:
        if model_layers < 1:
            raise ValueError("model_layers must be >= 1")
        self.profile = profile
        self.model_layers = model_layers
        self.stats = PadStats()

    def target_s(
        self,
        layers: int,
        batch: int,
        prefill_tokens: int = 0,
        context_tokens: int = 0,
        head: bool = True,
    ) -> float:
        """Seconds the step should take on the device: `layers` real layers run (standing for
        layers × profile.layers / model_layers profiled ones), `batch` sequences decoding,
        `prefill_tokens` prompt tokens, `context_tokens` KV-cache tokens read in all; `head` when
        this stage holds the LM head. A step with nothing to do takes no time."""
        if layers < 0 or batch < 0 or prefill_tokens < 0 or context_tokens < 0:
            raise ValueError("layers, batch and token counts must be >= 0")
        if batch == 0 and prefill_tokens == 0:
            return 0.0
        p = self.profile
        emulated_layers = layers * p.layers / self.model_layers
        ms = p.step_overhead_ms + (p.head_ms if head else 0.0)
        ms += emulated_layers * p.layer_step_ms(batch, prefill_tokens, context_tokens)
        return ms / 1000

    def pad(
        self,
        elapsed_s: float,
        layers: int,
        batch: int,
        prefill_tokens: int = 0,
        context_tokens: int = 0,
        head: bool = True,
    ) -> float:
        """Seconds to sleep after a real step that took `elapsed_s` (0 when it already overran)."""
        target = self.target_s(layers, batch, prefill_tokens, context_tokens, head)
        st = self.stats
        st.steps += 1
        if elapsed_s > target:
            st.overrun_steps += 1
            st.overrun_s += elapsed_s - target
            return 0.0
        st.padded_s += target - elapsed_s
        return target - elapsed_s


# --------------------------------------------------------------------------- disk


def disk_read_s(nbytes: int, mb_s: float) -> float:
    """Seconds to read `nbytes` at `mb_s` decimal MB/s (0 or less: uncapped, no time)."""
    if nbytes < 0:
        raise ValueError("nbytes must be >= 0")
    return nbytes / (mb_s * MB) if mb_s > 0 else 0.0


class DiskThrottle:
    """Paces a read to a bandwidth cap: after each chunk, `delay` says how long to sleep so the
    bytes read so far have taken at least as long as the cap allows. Pacing on the running total
    (not per chunk) keeps chunk-size rounding and scheduler jitter from adding up."""

    def __init__(self, mb_s: float) -> None:
        self.mb_s = mb_s
        self.bytes = 0

    def delay(self, chunk_bytes: int, elapsed_s: float) -> float:
        """Record `chunk_bytes` more read; `elapsed_s` since the read began. Seconds to sleep."""
        if chunk_bytes < 0:
            raise ValueError("chunk_bytes must be >= 0")
        self.bytes += chunk_bytes
        return max(0.0, disk_read_s(self.bytes, self.mb_s) - elapsed_s)
