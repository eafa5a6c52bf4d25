"""Pipeline-parallel instances: how a model's decoder layers split into stages, and which model
units each stage holds. Pure; the deployment file (`stages = S`, `stage_layers = [[0, 4], [4, 8]]`),
the loader (which worker loads what) and the gateway (the route through an instance) share it.

Units are numbered as everywhere else: 0 the embedding, 1..L the decoder layers, L+1 the final
norm and head. Layer ranges are half-open over decoder layers, as in `RouteStage`. The first
stage also holds the embedding (it drives the token loop); the last also holds the head.
"""

from __future__ import annotations

from collections.abc import Sequence

LayerRange = tuple[int, int]


class StageError(ValueError):
    """Stage ranges that cannot serve a model (the message says why)."""


def even_split(num_layers: int, stages: int) -> tuple[LayerRange, ...]:
    """`stages` contiguous ranges over `num_layers` layers, sizes differing by one at most (the
    front stages take the extra layers: the first one also embeds, the last one also samples,
    so neither end is favoured)."""
    if stages < 1:
        raise StageError(f"stages must be at least 1 (got {stages})")
    if num_layers < stages:
        raise StageError(f"{stages} stages need at least {stages} layers; the model has {num_layers}")
    base, extra = divmod(num_layers, stages)
    out: list[LayerRange] = []
    start = 0
    for i in range(stages):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return tuple(out)


def check_ranges(ranges: Sequence[Sequence[int]], num_layers: int | None = None) -> tuple[LayerRange, ...]:
    """Explicit ranges checked: each [start, end) non-empty, contiguous from layer 0, and (when the
    layer count is known) ending at the last layer."""
    out: list[LayerRange] = []
    expect = 0
    for r in ranges:
        if len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
            raise StageError(f"a stage range is [start, end) of two whole numbers (got {list(r)!r})")
        a, b = int(r[0]), int(r[1])
        if a != expect:
            raise StageError(
                f"stage ranges must be contiguous from layer 0: expected one starting at {expect}, got [{a}, {b})"
            )
        if b <= a:
            raise StageError(f"stage range [{a}, {b}) is empty")
        out.append((a, b))
        expect = b
    if not out:
        raise StageError("no stage range given")
    if num_layers is not None and expect != num_layers:
        raise StageError(f"stage ranges end at layer {expect}; the model has {num_layers} layers")
    return tuple(out)


def stage_ranges(num_layers: int, stages: int, explicit: Sequence[Sequence[int]] = ()) -> tuple[LayerRange, ...]:
    """The ranges an instance of `stages` stages uses: the explicit ones when given, else an even split."""
    if explicit:
        ranges = check_ranges(explicit, num_layers)
        if len(ranges) != stages:
            raise StageError(f"{len(ranges)} stage ranges given for {stages} stages")
        return ranges
    return even_split(num_layers, stages)


def stage_units(start: int, end: int, num_layers: int) -> tuple[int, ...]:
    """The model units a stage running layers [start, end) holds."""
    if not 0 <= start < end <= num_layers:
        raise StageError(f"layers [{start}, {end}) are not a stage of a {num_layers}-layer model")
    units = list(range(start + 1, end + 1))
    if start == 0:
        units.insert(0, 0)
    if end == num_layers:
        units.append(num_layers + 1)
    return tuple(units)


def covers(ranges: Sequence[LayerRange], num_layers: int) -> bool:
    """The ranges, in order, run every layer once: a complete pipeline."""
    expect = 0
    for a, b in ranges:
        if a != expect or b <= a:
            return False
        expect = b
    return expect == num_layers and num_layers > 0
