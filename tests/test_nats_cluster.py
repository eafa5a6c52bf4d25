"""A 3-node NATS cluster loses two of its nodes under streaming load and no request fails.

`cascade up --nats-url` with the cluster's seed list runs the gateway, scaler, loader and a worker;
each of two more workers (real processes) is given only its own node, so when that node dies it fails over to
the servers the cluster announced. Once the model serves on all three, clients stream short greedy
completions without pause while the test kills (SIGKILL) the node one serving worker is on, then
the node the gateway is on: every stream completes with all its tokens, none fails, and the mesh
serves on from the last node.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest

from cascade.config import GenerateSpec
from cascade.models.generate import generate_model
from cascade.natsauth import read_mesh_credentials
from tests.meshproc import cli, mesh_status, running_mesh
from tests.natscluster import Node, nats_cluster
from tests.workerprocs import WorkerProcs

pytestmark = pytest.mark.e2e

MODEL = "cluster-e2e"
CLIENTS = 6
MAX_TOKENS = 24
# Paced like a 7B model on an A100, so streams are long enough to be cut by a node's loss.
PACED = ("--device-profile", "llama2-7b-a100-80gb", "--heartbeat-s", "0.5")
# Each worker on its own node (index in the cluster).
WORKERS = {"wb": 1, "wc": 2}


def _deployment(path: Path) -> str:
    return f"""
[[models]]
name = "{MODEL}"
path = "{path}"
min_replicas = 0
max_replicas = 3
policy = "manual"
"""


def _serving(home: Path) -> set[str]:
    st = mesh_status(home)
    return {
        i["worker_id"]
        for i in st["instances"]
        if i["model"] == MODEL and i["state"] == "serving" and i["units_ready"] == i["num_units"]
    }


async def _poll(pred: Callable[[], object], timeout: float, what: str) -> None:
    """Poll a condition no event announces (a log line, a node's client list) with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(pred):
        assert loop.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.2)


def _on(node: Node, prefix: str) -> bool:
    """Whether a client whose name starts with `prefix` is connected to `node` (False if it is down)."""
    if node.proc is None or node.proc.poll() is not None:
        return False
    try:
        return any(n.startswith(prefix) for n in node.client_names())
    except OSError:
        return False


def _kill(node: Node) -> None:
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait(30)


class Load:
    """CLIENTS clients streaming greedy completions back to back until stopped; every outcome kept."""

    def __init__(self, url: str) -> None:
        self.url = url + "/completions"
        self.done = 0
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def one(self, http: aiohttp.ClientSession, k: int) -> None:
        body = {
            "model": MODEL, "prompt": f"node loss {k}", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        try:
            async with http.post(self.url, json=body) as r:
                if r.status != 200:
                    self.failures.append(f"HTTP {r.status}: {(await r.text())[:300]}")
                    return
                finish, usage, done, tokens = None, None, False, 0
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    obj = orjson.loads(line[6:])
                    if "error" in obj:
                        self.failures.append(f"stream error: {obj['error']}")
                        return
                    for ch in obj.get("choices") or ():
                        tokens += 1 if ch.get("text") else 0
                        finish = ch.get("finish_reason") or finish
                    usage = obj.get("usage") or usage
            complete = usage is not None and usage.get("completion_tokens") == MAX_TOKENS
            if not (done and finish == "length" and complete):
                self.failures.append(f"incomplete stream: done={done} finish={finish} usage={usage} chunks={tokens}")
                return
            self.done += 1
        except (aiohttp.ClientError, TimeoutError) as e:
            self.failures.append(f"{type(e).__name__}: {e}")

    async def client(self, http: aiohttp.ClientSession, c: int) -> None:
        k = 0
        while not self.stop.is_set():
            await self.one(http, c * 100_000 + k)
            k += 1

    async def progressed(self, n: int, timeout: float, what: str) -> None:
        """Until `n` more requests completed (failing fast if any failed)."""
        target = self.done + n
        await _poll(lambda: self.failures or self.done >= target, timeout, what)
        assert not self.failures, self.failures[:5]


async def test_the_cluster_loses_two_nodes_under_load_with_no_failed_request(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    model = tmp_path / MODEL
    generate_model(model, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=4096))
    (tmp_path / "nats").mkdir()
    with nats_cluster(tmp_path / "nats") as nodes:
        seeds = ",".join(n.url for n in nodes)
        args = ("--nats-url", seeds, "--stop-timeout", "10")
        with running_mesh(home, _deployment(model), workers=1, args=args) as mesh:
            info = mesh["info"]
            found = read_mesh_credentials(home)
            creds = found[1].env() if found else {}
            procs = WorkerProcs("", info.get("prefix") or "cascade", tmp_path)
            try:
                for wid, i in WORKERS.items():
                    # Its own node only: failing over relies on the servers the cluster announces.
                    procs.nats_url = nodes[i].url
                    procs.start(wid, *PACED, env=creds)
                for wid, i in WORKERS.items():
                    node, name = nodes[i], f"cascade-worker-{wid}"
                    await _poll(functools.partial(_on, node, name), 120, f"{wid} on {node.name}")
                # `cascade up` starts one worker of its own (on whichever seed it picked): all three serve.
                r = cli(home, "scale", MODEL, "--replicas", "3")
                assert r.returncode == 0, r.stderr
                await _poll(lambda: len(_serving(home)) == 3 and set(WORKERS) <= _serving(home), 180, "serving on 3")
                everyone = _serving(home)

                load = Load(mesh["url"])
                timeout = aiohttp.ClientTimeout(total=120)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    clients = [asyncio.ensure_future(load.client(http, c)) for c in range(CLIENTS)]
                    try:
                        await load.progressed(2 * CLIENTS, 120, "load before any loss")

                        # The node a serving worker is on: that worker moves to a surviving node.
                        lost = nodes[WORKERS["wb"]]
                        _kill(lost)
                        await _poll(lambda: "nats_reconnected" in procs.log("wb"), 60, "wb reconnected")
                        await _poll(
                            lambda: any(_on(n, "cascade-worker-wb") for n in nodes if n is not lost),
                            60,
                            "wb on a surviving node",
                        )
                        await load.progressed(3 * CLIENTS, 120, "load after the worker's node died")

                        # Then the node the gateway is on now.
                        # (It may itself be reconnecting if it was on the lost node.)
                        await _poll(lambda: any(_on(n, "cascade-gateway") for n in nodes), 60, "the gateway on a node")
                        (gw_node,) = [n for n in nodes if _on(n, "cascade-gateway")]
                        _kill(gw_node)
                        (last,) = [n for n in nodes if n.proc is not None and n.proc.poll() is None]
                        await _poll(lambda: _on(last, "cascade-gateway"), 60, "the gateway on the last node")
                        await _poll(lambda: _on(last, "cascade-worker-wb"), 60, "wb on the last node")
                        await _poll(lambda: _on(last, "cascade-worker-wc"), 60, "wc on the last node")
                        await load.progressed(3 * CLIENTS, 120, "load after the gateway's node died")
                    finally:
                        load.stop.set()
                        await asyncio.gather(*clients, return_exceptions=True)
                assert load.failures == [], load.failures[:5]
                assert load.done >= 8 * CLIENTS
                # The workers came through, and the mesh still serves on all three from the last node.
                assert all(p.poll() is None for p in procs.procs.values())
                assert _serving(home) == everyone
            finally:
                procs.stop_all()
