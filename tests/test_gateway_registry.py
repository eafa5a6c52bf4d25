"""The gateway's routing picture over the shared worker table: what only the gateway knows
(its own in-flight requests, workers that turned work away) and the views the router reads."""

from __future__ import annotations

import dataclasses

from services.gateway.registry import Registry
from services.gateway.router import choose_instance
from tests.workerviews import NUM_UNITS, hb, ready, snap, view


def test_routable_only_when_full_and_serving() -> None:
    reg = Registry(heartbeat_s=1.0)
    reg.on_heartbeat(hb(state="loading", units=0), now=0.0)
    reg.table.on_snapshot(snap(0, []))
    for seq, unit in enumerate(range(NUM_UNITS), start=1):
        reg.table.on_layer_ready(ready(seq, unit), now=0.1)
    assert choose_instance(reg.views(), "m") is None  # all units, but the worker says loading
    reg.on_heartbeat(hb(state="serving", ready_seq=NUM_UNITS), now=1.0)
    assert choose_instance(reg.views(), "m") == "w1"
    reg.suspend("w1")  # turned a request away as draining
    assert choose_instance(reg.views(), "m") is None
    reg.on_heartbeat(hb(state="serving", ready_seq=NUM_UNITS), now=2.0)
    assert choose_instance(reg.views(), "m") == "w1"


def test_views_carry_load_and_inflight() -> None:
    reg = Registry(heartbeat_s=1.0)
    reg.on_heartbeat(hb(running=3, waiting=1, ready_seq=0), now=0.0, inflight=2)
    v = reg.views({"w1": 5})[0]
    assert (v.running, v.waiting, v.max_batch, v.inflight, v.inflight_at_heartbeat) == (3, 1, 8, 5, 2)


# --------------------------------------------------------------------------- feed


def test_views_carry_the_ready_prefix_and_stage_link() -> None:
    reg = Registry(heartbeat_s=1.0)
    reg.on_heartbeat(dataclasses.replace(hb(state="loading", units=0), stage_addr="h:9"), now=0.0)
    reg.table.on_snapshot(snap(0, []))
    for seq, unit in ((1, 0), (2, 1), (3, 3)):  # unit 2 is not there yet
        reg.table.on_layer_ready(ready(seq, unit), now=0.1)
    v = view(reg)
    assert (v.units_ready, v.prefix_units, v.stage_addr) == (3, 2, "h:9")


def test_views_carry_the_ready_unit_set_once_readiness_is_known() -> None:
    # An ordered load from zero fills units out of order: routes from zero need the set.
    reg = Registry(heartbeat_s=1.0)
    reg.on_heartbeat(hb(state="loading", units=2), now=0.0)
    assert view(reg).ready_units is None  # the heartbeat's count alone: only a prefix is implied
    reg.table.on_snapshot(snap(2, [2, 3]))
    v = view(reg)
    assert v.ready_units == frozenset({2, 3}) and v.prefix_units == 0
    reg.table.on_layer_ready(ready(3, 0), now=0.1)
    assert view(reg).ready_units == frozenset({0, 2, 3}) and view(reg).prefix_units == 1
