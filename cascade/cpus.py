"""CPU lists (`0,2-3`, as taskset and cgroups write them) and pinning the calling thread to one.

A worker's engine thread can be given cores of its own (`--cpus`): on a CPU host the engine's
forward pass is the device, and a control-plane process the kernel wakes onto its core (the
broker, the gateway, whoever reads a socket the engine just wrote) delays its next step by as
long as that process runs there. Pinning is Linux-only (`os.sched_setaffinity`); elsewhere it is
refused with the reason, not ignored.
"""

from __future__ import annotations

import os

from cascade.config import ConfigError


def parse_cpu_list(text: str) -> frozenset[int]:
    """`"0,2-3"` -> {0, 2, 3}; "" -> empty (no pinning). ConfigError on anything else."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ConfigError(f"{text!r} is not a CPU list such as 0,2-3") from None
        if a < 0 or b < a:
            raise ConfigError(f"{part!r} in {text!r} is not a CPU or an ascending range")
        out.update(range(a, b + 1))
    return frozenset(out)


def available_cpus() -> frozenset[int]:
    """The CPUs this process may run on (its affinity mask, as a container's cpuset limits it)."""
    if not hasattr(os, "sched_getaffinity"):
        return frozenset(range(os.cpu_count() or 1))
    return frozenset(os.sched_getaffinity(0))


def check_cpus(cpus: frozenset[int]) -> None:
    """ConfigError unless every CPU of `cpus` is one this process may run on, on a platform that pins."""
    if not cpus:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("pinning to CPUs needs Linux (os.sched_setaffinity)")
    missing = cpus - available_cpus()
    if missing:
        raise ConfigError(f"CPUs {sorted(missing)} are not among this process's {sorted(available_cpus())}")


def pin_current_thread(cpus: frozenset[int]) -> None:
    """Run the calling thread (only it: Linux's affinity is per thread) on `cpus`; no-op when empty."""
    if cpus:
        os.sched_setaffinity(0, cpus)
