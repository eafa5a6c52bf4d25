"""What the simulated mesh runs on: a model on an accelerator (a device profile), hosts of
accelerators with their links, and a network on which parameter transfers share bandwidth.

Steps are priced by the device profiles of docs/device-profiles (`DeviceProfile.stage_step_ms`,
the engine's own pricing). Transfers are flows over links, each link a capacity in bytes/s:

- inside a host: NVLink between accelerators (per accelerator, each way), PCIe from host memory
  to an accelerator, the host's SSD;
- between hosts: each host's RDMA NICs (egress and ingress, the sum of its NICs).

Concurrent flows share every link they cross max-min fairly (progressive filling), so a star
from one source to N targets splits that source's link N ways while a chain multicast
(source → T1 → T2 → …, each target forwarding as it receives) crosses every link once and costs
about one transfer, whatever N.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from cascade.device_profile import PROFILES_DIR, DeviceProfile, load_profile
from sim.engine import Event, Sim

GB = 1e9


# --------------------------------------------------------------------------- models on devices


@dataclass(frozen=True, slots=True)
class ModelShape:
    """One model as the simulator runs it: the profile that prices its steps, the engine's layer
    count (`layers`: the profile's own, or a small model's that stands for it, as the emulated
    benchmarks run), its parameter bytes per unit (embedding, each layer, head) and the width of
    the activations a pipelined route sends between stages."""

    name: str
    profile: DeviceProfile
    layers: int
    unit_nbytes: tuple[int, ...]
    hidden: int
    act_bytes: int = 2  # fp16 activations on the stage link
    accelerators: int = 1  # per instance (tensor parallelism)
    kv_capacity_tokens: int = 0

    @property
    def nbytes(self) -> int:
        return sum(self.unit_nbytes)

    @property
    def num_units(self) -> int:
        return len(self.unit_nbytes)


def profile_json(name: str) -> dict[str, Any]:
    path = Path(name)
    if not path.is_file():
        path = PROFILES_DIR / f"{name}.json"
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def model_shape(profile_name: str, name: str = "", layers: int = 0, unit_nbytes: Sequence[int] = ()) -> ModelShape:
    """The model a device profile describes. `layers` and `unit_nbytes` stand in for the
    engine's own model when it is a small one emulating the profiled one (0 / empty: the
    profile's layers and bytes)."""
    profile = load_profile(profile_name)
    raw = profile_json(profile_name)
    m = raw.get("model", {})
    if unit_nbytes:
        sizes = tuple(int(x) for x in unit_nbytes)
    elif {"bytes_per_layer", "bytes_embedding", "bytes_head"} <= set(m):
        sizes = (int(m["bytes_embedding"]), *([int(m["bytes_per_layer"])] * profile.layers), int(m["bytes_head"]))
    else:
        raise ValueError(f"profile {profile.name} states no model bytes (model.bytes_*)")
    n_layers = layers or profile.layers
    if len(sizes) != n_layers + 2:
        raise ValueError(f"{len(sizes)} unit sizes for {n_layers} layers (need embedding, layers, head)")
    return ModelShape(
        name=name or profile.name,
        profile=profile,
        layers=n_layers,
        unit_nbytes=sizes,
        hidden=int(m.get("hidden", 4096)),
        accelerators=int(raw.get("accelerators", 1)),
        kv_capacity_tokens=int(raw.get("kv_capacity_tokens", 0)),
    )


def device_links(profile_name: str) -> dict[str, float]:
    """The device's stated NVLink and PCIe bandwidths, GB/s (informational profile keys)."""
    d = profile_json(profile_name).get("device", {})
    return {"nvlink_gb_s": float(d.get("nvlink_gb_s", 0.0)), "pcie_gb_s": float(d.get("pcie_gb_s", 0.0))}


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True, slots=True)
class Topology:
    """Hosts of accelerators and their links, all in GB/s (decimal) unless said otherwise.

    `nvlink_gb_s` is per accelerator and per direction, at the rate a point-to-point copy
    achieves; `pcie_gb_s` per accelerator from host memory; `nic_gbps` per NIC in Gb/s, with
    `nics_per_host` of them (RDMA; a rail-optimised host has one per accelerator); `ssd_gb_s`
    per host. `flow_cap_gb_s` caps every single flow (0: none): the emulated benchmarks pace each
    send on its own, whatever else moves. Latencies in seconds."""

    hosts: int
    accelerators_per_host: int = 8
    nvlink_gb_s: float = 300.0
    pcie_gb_s: float = 25.0
    nic_gbps: float = 200.0
    nics_per_host: int = 8
    ssd_gb_s: float = 2.0
    flow_cap_gb_s: float = 0.0
    storage_hosts: int = 0  # hosts without accelerators (numbered after the others) that keep host copies
    link_latency_s: float = 10e-6  # one hop of the stage link or the data plane
    chunk_bytes: int = 1 << 20  # the data plane's chunk: a chain's per-hop pipeline delay

    @property
    def accelerators(self) -> int:
        return self.hosts * self.accelerators_per_host

    def nic_bytes_s(self) -> float:
        return self.nic_gbps / 8 * GB * self.nics_per_host

    def describe(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "accelerators_per_host": self.accelerators_per_host,
            "accelerators": self.accelerators,
            "nvlink_gb_s_per_accelerator": self.nvlink_gb_s,
            "pcie_gb_s_per_accelerator": self.pcie_gb_s,
            "nic": f"{self.nics_per_host} x {self.nic_gbps:g} Gb/s per host",
            "ssd_gb_s_per_host": self.ssd_gb_s,
            "flow_cap_gb_s": self.flow_cap_gb_s,
            "storage_hosts": self.storage_hosts,
        }


# --------------------------------------------------------------------------- the network


class Link:
    __slots__ = ("capacity", "flows", "name")

    def __init__(self, name: str, capacity: float) -> None:
        self.name = name
        self.capacity = capacity  # bytes/s
        self.flows: set[Flow] = set()


class Flow:
    """`nbytes` over `links` at a rate the network sets (at most `cap` bytes/s, 0: no cap).
    `marks` are byte counts (increasing) at which `on_mark(i)` fires; `on_done()` at the end."""

    __slots__ = (
        "cap",
        "done_bytes",
        "event",
        "links",
        "marks",
        "nbytes",
        "next_mark",
        "on_done",
        "on_mark",
        "rate",
        "since",
    )

    def __init__(
        self,
        links: Sequence[Link],
        nbytes: float,
        cap: float = 0.0,
        marks: Sequence[float] = (),
        on_mark: Callable[[int], None] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.links = tuple(links)
        self.nbytes = float(nbytes)
        self.cap = cap
        self.marks = tuple(marks)
        self.on_mark = on_mark
        self.on_done = on_done
        self.done_bytes = 0.0
        self.next_mark = 0
        self.rate = 0.0
        self.since = 0.0
        self.event: Event | None = None


class Network:
    """Flows over links with max-min fair rates, recomputed whenever a flow starts or ends."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.flows: set[Flow] = set()
        self.links: dict[str, Link] = {}
        self.bytes_moved = 0.0

    def link(self, name: str, capacity: float) -> Link:
        ln = self.links.get(name)
        if ln is None:
            ln = self.links[name] = Link(name, capacity)
        return ln

    def start(self, flow: Flow) -> None:
        self._advance()
        flow.since = self.sim.now
        self.flows.add(flow)
        for ln in flow.links:
            ln.flows.add(flow)
        self._rebalance()

    def stop(self, flow: Flow) -> None:
        """Abandon a flow (its remaining marks and end never fire)."""
        if flow not in self.flows:
            return
        self._advance()
        self._remove(flow)
        self._rebalance()

    # ---- internals ---------------------------------------------------------
    def _remove(self, flow: Flow) -> None:
        self.flows.discard(flow)
        for ln in flow.links:
            ln.flows.discard(flow)
        Sim.cancel(flow.event)
        flow.event = None

    def _advance(self) -> None:
        now = self.sim.now
        for f in self.flows:
            moved = f.rate * (now - f.since)
            f.done_bytes = min(f.nbytes, f.done_bytes + moved)
            self.bytes_moved += moved
            f.since = now

    def _rebalance(self) -> None:
        """Progressive filling: raise every unfrozen flow's rate together until a link fills or a
        flow reaches its cap; freeze those flows; repeat."""
        left = {ln: ln.capacity for f in self.flows for ln in f.links}
        users = {ln: sum(1 for _ in ln.flows) for ln in left}
        unfrozen = set(self.flows)
        rates: dict[Flow, float] = {}
        while unfrozen:
            share = math.inf
            for ln, n in users.items():
                if n > 0:
                    share = min(share, left[ln] / n)
            capped = min((f.cap for f in unfrozen if f.cap > 0), default=math.inf)
            level = min(share, capped)
            if level == math.inf:
                level = 0.0  # no link and no cap: cannot happen with real links; never divide by it
            frozen = {f for f in unfrozen if f.cap > 0 and f.cap <= level + 1e-9}
            for ln, n in users.items():
                if n > 0 and left[ln] / n <= level + 1e-9:
                    frozen |= {f for f in ln.flows if f in unfrozen}
            if not frozen:
                frozen = set(unfrozen)
            for f in frozen:
                rates[f] = level
                unfrozen.discard(f)
                for ln in f.links:
                    left[ln] -= level
                    users[ln] -= 1
        for f, r in rates.items():
            f.rate = r
            self._schedule(f)

    def _schedule(self, f: Flow) -> None:
        Sim.cancel(f.event)
        f.event = None
        if f.rate <= 0:
            return
        target = f.marks[f.next_mark] if f.next_mark < len(f.marks) else f.nbytes
        dt = max(0.0, (target - f.done_bytes) / f.rate)
        f.event = self.sim.after(dt, self._reach, f)

    def _reach(self, f: Flow) -> None:
        f.event = None
        self._advance()
        if f.next_mark < len(f.marks):
            i = f.next_mark
            f.done_bytes = max(f.done_bytes, f.marks[i])
            f.next_mark += 1
            if f.on_mark is not None:
                f.on_mark(i)
            if f in self.flows:
                self._schedule(f)
            return
        f.done_bytes = f.nbytes
        self._remove(f)
        self._rebalance()
        if f.on_done is not None:
            f.on_done()
