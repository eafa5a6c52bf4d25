"""`--nats-url` as a comma-separated seed list: every service and command connects through
natsutil.connect, which gives nats-py the whole list; a dead seed is skipped."""

from __future__ import annotations

import pytest

from cascade.cli.embedded_nats import free_port
from cascade.natsutil import connect, server_list


def test_server_list() -> None:
    assert server_list("nats://a:4222") == ["nats://a:4222"]
    assert server_list(" nats://a:4222, nats://b:4223 ,") == ["nats://a:4222", "nats://b:4223"]
    with pytest.raises(ValueError):
        server_list(" , ")


async def test_a_seed_list_with_a_dead_server_connects_to_the_live_one(nats_url: str) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    nc = await connect(f"{dead},{nats_url}", "test-seeds", connect_timeout_s=10)
    try:
        sub = await nc.subscribe("seeds.echo")
        await nc.publish("seeds.echo", b"hi")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hi"
        assert nc.connected_url is not None and str(nc.connected_url.port) == nats_url.rsplit(":", 1)[1]
    finally:
        await nc.close()
