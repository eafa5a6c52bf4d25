"""Direct token links end to end: a real nats-server, a gateway and a worker in this process with
real torch. Tokens reach the client over the link (not NATS) and equal what the NATS path gives;
a link cut mid-stream never hangs a request; the off switch puts every event back on NATS; a bad
frame drops only its own connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import LoadModel, Ok, TokenEvents, decode
from cascade.natsutil import connect, request
from cascade.subjects import Subjects
from cascade.tokenlink import ACK_OK, ACK_REFUSED, hello
from services.gateway.router import serves_fully
from services.gateway.testing import RunningGateway, running_gateway
from services.worker import requestlinks
from services.worker.main import WorkerService
from services.worker.settings import WorkerSettings
from tests.inproc import model_dir_fixture, serving
from tests.waiting import wait_until

MODEL = "m"
HB_S = 0.2
model_dir = model_dir_fixture(GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, seed=7))


@dataclass
class Mesh:
    worker: WorkerService
    nc: Any
    subjects: Subjects
    http: aiohttp.ClientSession
    # Token ids by request id as the gateway handled them (its one handler for both paths).
    seen: dict[str, list[int]] = field(default_factory=dict)
    # Request ids whose events were published on NATS.
    on_nats: set[str] = field(default_factory=set)

    def spy(self, gw: RunningGateway) -> None:
        core = gw.core
        handle = core.on_tokens

        def on_tokens(msg: TokenEvents) -> None:
            for ev in msg.events:
                self.seen.setdefault(ev.request_id, []).extend(ev.token_ids)
            handle(msg)

        core.on_tokens = on_tokens  # type: ignore[method-assign]

    async def on_nats_msg(self, msg: Any) -> None:
        self.on_nats.update(ev.request_id for ev in decode(msg.data, TokenEvents).events)

    async def tap(self, gw: RunningGateway) -> None:
        await self.nc.subscribe(self.subjects.tokens(gw.id), cb=self.on_nats_msg)
        await self.nc.flush()

    async def stream(self, gw: RunningGateway, max_tokens: int, cut: int | None = None) -> tuple[str, str, str | None]:
        """A streamed completion: (its id, its finish reason or error, its text). With `cut`, every
        link the gateway holds is aborted once that many chunks arrived."""
        body = {"model": MODEL, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True}  # fmt: skip
        rid, finish, text, chunks = "", "", "", 0
        async with self.http.post(gw.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                d = orjson.loads(line[6:])
                if "error" in d:
                    return rid, "error: " + d["error"]["message"], text
                rid = d["id"]
                for c in d.get("choices", []):
                    text += c.get("text") or ""
                    finish = c.get("finish_reason") or finish
                chunks += 1
                if cut is not None and chunks == cut:
                    for t in list(gw.core._token_links):
                        t.abort()
        return rid, finish, text

    async def ready(self, gw: RunningGateway) -> None:
        views = gw.core.registry.views
        await wait_until(lambda: any(serves_fully(v, MODEL) for v in views()), 60, f"{gw.id} sees w1 serving")


@pytest.fixture
async def mesh(nats_url: str, subjects: Subjects, model_dir: Path) -> AsyncIterator[Mesh]:
    # Paced steps (an emulated accelerator): a stream lasts long enough to be cut.
    w = WorkerService(
        WorkerSettings(nats_url, subjects.prefix, "w1", heartbeat_s=HB_S, device_profile="llama2-7b-a100-80gb")
    )
    nc = await connect(nats_url, "test")
    beat = asyncio.Event()

    async def on_beat(_: Any) -> None:
        beat.set()

    await nc.subscribe(subjects.heartbeat("w1"), cb=on_beat)  # sent once it serves its subjects
    try:
        async with serving(nats_url, subjects.prefix, w, stop_s=30), aiohttp.ClientSession() as http:
            await asyncio.wait_for(beat.wait(), 30)
            await request(nc, subjects.load("w1"), LoadModel(MODEL, str(model_dir)), Ok, timeout=10)
            yield Mesh(w, nc, subjects, http)
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


def deployment(model_dir: Path) -> Deployment:
    return Deployment(models=(ModelDeployment(name=MODEL, path=model_dir, min_replicas=1),))


async def test_tokens_go_over_the_link_and_equal_the_nats_path(
    mesh: Mesh, nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    dep = deployment(model_dir)
    async with (
        running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S) as direct,
        running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S, direct_tokens=False) as tapped,
    ):
        assert direct.core.token_addr and not tapped.core.token_addr
        for gw in (direct, tapped):
            mesh.spy(gw)
            await mesh.tap(gw)
            await mesh.ready(gw)
        links = mesh.worker.runner.token_links
        assert links is not None
        # A gateway's first request starts the link's connect, off the engine thread: its own events
        # may still go by NATS. Once the connect is through, new requests take the link.
        await mesh.stream(direct, 2)
        assert await asyncio.to_thread(links.settle)
        await wait_until(lambda: mesh.worker.request_links.linked(direct.id), 10, "the request link is up")
        a, fa, text_a = await mesh.stream(direct, 16)
        b, fb, text_b = await mesh.stream(tapped, 16)
        assert fa == fb == "length" and text_a == text_b
        assert len(mesh.seen[a]) == 16 and mesh.seen[a] == mesh.seen[b]
        # The direct gateway's events came over its link, none through NATS; the off switch's all did.
        assert a not in mesh.on_nats and b in mesh.on_nats
        assert links.events_sent >= 16 and links.linked(direct.id) and not links.linked(tapped.id)
        # Two 16-token requests, each 16 steps back to back: at least 15 gaps between steps each.
        runner = mesh.worker.runner
        assert runner.gaps >= 30 and 0 < runner.gap_s < runner.busy_s
        st = direct.core.status()
        # Two connections from the worker: its token link and its request link.
        assert st["token_links"]["frames"] == links.frames and st["token_links"]["open"] == 2
        # The second request's batch came on the request link (the first one's, by NATS, opened it);
        # the gateway without a listener sent all of its by NATS.
        req_links = mesh.worker.request_links
        assert st["request_links"]["workers"] == ["w1"] and st["request_links"]["answered"] >= 1
        assert req_links.requests == st["request_links"]["sent"] >= 1 and req_links.linked(direct.id)
        assert not req_links.linked(tapped.id) and tapped.core.status()["request_links"] is None
        assert links.summary()["linked"] == [direct.id] and tapped.core.status()["token_addr"] == ""
        if sys.platform.startswith("linux"):
            # Worker and gateway share this host's network namespace: the link is the Unix socket.
            assert direct.core.token_local.startswith("@") and links.local_connects == links.connects == 1


async def test_a_link_cut_mid_stream_never_hangs_the_request(
    mesh: Mesh, nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    async with running_gateway(nats_url, subjects.prefix, deployment(model_dir), heartbeat_s=HB_S) as gw:
        mesh.spy(gw)
        await mesh.tap(gw)
        await mesh.ready(gw)
        links = mesh.worker.runner.token_links
        assert links is not None
        await mesh.stream(gw, 2)  # starts the link's connect
        assert await asyncio.to_thread(links.settle)
        want_id, want_finish, want = await mesh.stream(gw, 40)
        assert want_finish == "length" and want_id not in mesh.on_nats
        connects = links.connects
        rid, finish, text = await asyncio.wait_for(mesh.stream(gw, 40, cut=5), 60)
        # The rule (services/worker/tokenlinks.py): the request moved to NATS once the link failed
        # and the client got the unbroken run's text; an event the cut lost (in the gateway's
        # socket buffer when it aborted) made the gateway resume it from what the client had.
        assert links.failures >= 1 and rid in mesh.on_nats
        assert finish == "length" and text == want
        # A request after it is served too (by NATS during the link's back-off, then a new link).
        _, finish, _ = await mesh.stream(gw, 4)
        assert finish == "length" and links.connects >= connects


async def test_bad_hello_or_frame_drops_only_that_connection(
    mesh: Mesh, nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    async with running_gateway(nats_url, subjects.prefix, deployment(model_dir), heartbeat_s=HB_S) as gw:
        mesh.spy(gw)
        await mesh.ready(gw)
        host, _, port = gw.core.token_addr.rpartition(":")
        stats = gw.core.token_link_stats

        def talk(data: bytes) -> bytes:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(data)
                out = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := s.recv(64):
                        out += chunk
                return out

        assert await asyncio.to_thread(talk, hello("not-the-key", "w1")) == ACK_REFUSED
        assert stats["refused"] == 1
        # The right key, then a frame of an unknown kind: acked, then dropped (EOF or reset).
        bad = hello(gw.core.token_key, "w1") + struct.pack("!BI", 42, 3) + b"abc"
        assert await asyncio.to_thread(talk, bad) == ACK_OK
        await wait_until(lambda: stats.get("bad") == 1, 5, "the bad frame counted")
        # The worker's own link is unaffected.
        rid, finish, _ = await mesh.stream(gw, 6)
        assert finish == "length" and len(mesh.seen[rid]) == 6
        links = mesh.worker.runner.token_links
        assert links is not None and links.linked(gw.id) and links.failures == 0


async def test_batches_take_the_request_link_and_fall_back_to_nats_when_it_goes(
    mesh: Mesh, nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    async with running_gateway(nats_url, subjects.prefix, deployment(model_dir), heartbeat_s=HB_S) as gw:
        mesh.spy(gw)
        await mesh.ready(gw)
        req_links, rl = mesh.worker.request_links, gw.core.request_links
        assert rl is not None
        _, first, want = await mesh.stream(gw, 6)  # by NATS: it opens the request link
        await wait_until(lambda: rl.has("w1"), 10, "the gateway has w1's request link")
        sent = rl.sent
        _, finish, text = await mesh.stream(gw, 6)
        assert first == finish == "length" and text == want and rl.sent == sent + 1 == req_links.requests
        # The gateway loses the link (as in a restart of either end's network): the next batch goes
        # by NATS at once, and the worker opens the link again at a later batch, after its back-off.
        for t in list(gw.core._token_links):
            t.abort()
        await wait_until(lambda: not rl.has("w1") and not req_links.linked(gw.id), 10, "the links are gone")
        _, finish, text = await mesh.stream(gw, 6)
        assert finish == "length" and text == want and rl.sent == sent + 1

        async def linked_again() -> bool:
            await mesh.stream(gw, 2)
            return rl.has("w1")

        deadline = asyncio.get_running_loop().time() + 15
        while not await linked_again():
            assert asyncio.get_running_loop().time() < deadline, "the request link never came back"
        assert req_links.connects == 2 and req_links.failures >= 1
        _, finish, text = await mesh.stream(gw, 6)
        assert finish == "length" and text == want and rl.sent >= sent + 2


async def test_a_gateway_that_takes_no_request_links_refuses_them_and_keeps_nats(
    mesh: Mesh, nats_url: str, subjects: Subjects, model_dir: Path
) -> None:
    dep = deployment(model_dir)
    async with running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S, direct_requests=False) as gw:
        mesh.spy(gw)
        await mesh.ready(gw)
        req_links = mesh.worker.request_links
        for _ in range(2):
            _, finish, _ = await mesh.stream(gw, 4)
            assert finish == "length"
        await wait_until(lambda: req_links.failures >= 1, 10, "the refused request link counted")
        assert not req_links.linked(gw.id) and req_links.requests == 0
        assert gw.core.status()["request_links"] is None and gw.core.token_link_stats.get("connections", 0) >= 1


async def test_a_worker_silent_on_its_request_link_gets_a_clear_error_not_a_hang(
    mesh: Mesh, nats_url: str, subjects: Subjects, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = deployment(model_dir)
    async with running_gateway(nats_url, subjects.prefix, dep, heartbeat_s=HB_S, dispatch_timeout_s=0.5) as gw:
        mesh.spy(gw)
        await mesh.ready(gw)
        rl = gw.core.request_links
        assert rl is not None
        _, finish, _ = await mesh.stream(gw, 2)  # by NATS: it opens the request link
        assert finish == "length"
        await wait_until(lambda: rl.has("w1"), 10, "the gateway has w1's request link")
        # The worker reads its request link and never answers (a stuck loop, as far as the gateway
        # can tell): each dispatch times out, is cancelled there and retried, then the client is told.
        monkeypatch.setattr(requestlinks._Link, "data_received", lambda self, data: None)
        body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        async with mesh.http.post(gw.url + "/v1/completions", json=body) as r:
            assert r.status == 503, await r.text()
            err = (await r.json())["error"]
        assert "no reply on w1's request link" in err["message"] and err["code"] == "no_instance"
        assert rl.sent >= 3 and not rl._pending  # every attempt given up on, none kept
