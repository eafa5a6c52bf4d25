"""The worker's way of arming a reception: only the first unit's buffer is reserved before the
answer, the rest on a thread while the stream runs; the bytes and the order are the same."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from cascade.config import GenerateSpec
from cascade.messages import TransferOrder
from cascade.models.checkpoint import Checkpoint
from cascade.models.generate import generate_model
from services.worker.dataplane import CheckpointSource, DataPlaneServer, TransferError, send_units, tensor_bytes

MODEL = "ahead"
SPEC = GenerateSpec(layers=6, hidden=128, heads=4, kv_heads=2, vocab=320, seed=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checkpoint]:
    d = tmp_path_factory.mktemp("models") / MODEL
    generate_model(d, SPEC)
    c = Checkpoint(d)
    yield c
    c.close()


def _order(ckpt: Checkpoint, tid: str, first: int = 0) -> TransferOrder:
    n = ckpt.config.num_units
    units = list(range(first, n))
    return TransferOrder(tid, "tok", MODEL, "receive", units, n, unit_nbytes=[ckpt.unit_nbytes(u) for u in units])


async def test_reserve_ahead_receives_every_unit_in_order(ckpt: Checkpoint) -> None:
    got: dict[int, dict[str, torch.Tensor]] = {}
    failed: list[str] = []
    with DataPlaneServer() as srv:
        order = _order(ckpt, "ra-1")
        r = await asyncio.to_thread(
            srv.expect, order, lambda u, t: got.__setitem__(u, t), failed.append,
            loop=asyncio.get_running_loop(), reserve_ahead=True,
        )  # fmt: skip
        await asyncio.to_thread(send_units, CheckpointSource(ckpt, MODEL), srv.address, "ra-1", "tok", order.units)
        stats = await asyncio.wait_for(r.wait(), 30)
    assert not failed and list(got) == order.units
    for u, tensors in got.items():
        for name, t in tensors.items():
            assert bytes(tensor_bytes(t)) == bytes(ckpt.raw(name)), f"unit {u} {name}"
    assert stats.reserve_s > 0 and stats.reserve_ahead_s > 0


async def test_reserve_ahead_stops_when_the_reception_fails(ckpt: Checkpoint) -> None:
    with DataPlaneServer() as srv:
        failed: list[str] = []
        r = await asyncio.to_thread(
            srv.expect, _order(ckpt, "ra-2", first=1), lambda u, t: None, failed.append,
            loop=asyncio.get_running_loop(), reserve_ahead=True,
        )  # fmt: skip
        r.cancel("the loader re-planned")
        with pytest.raises(TransferError, match="re-planned"):
            await asyncio.wait_for(r.wait(), 30)
        # The transfer id is free again, and a duplicate arm is refused without side effects.
        again = await asyncio.to_thread(srv.expect, _order(ckpt, "ra-2"), lambda u, t: None, failed.append)
        with pytest.raises(ValueError, match="already expected"):
            await asyncio.to_thread(srv.expect, _order(ckpt, "ra-2"), lambda u, t: None, failed.append)
        again.cancel()
    assert failed[0] == "the loader re-planned"
