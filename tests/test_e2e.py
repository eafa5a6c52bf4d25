"""End to end through `cascade up`: a real broker, gateway, scaler, loader and two workers
running real torch, driven over HTTP and with the official OpenAI client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.meshproc import mesh_status, running_mesh

pytestmark = pytest.mark.e2e

MODEL = "e2e-tiny"
DEPLOYMENT = f"""
[[models]]
name = "{MODEL}"
min_replicas = 2
max_replicas = 2
[models.generate]
layers = 2
hidden = 64
heads = 4
kv_heads = 2
vocab = 320
max_position = 512
seed = 5
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_mesh(tmp_path_factory.mktemp("home"), DEPLOYMENT, workers=2) as m:
        yield m


def status(mesh: dict[str, Any]) -> dict[str, Any]:
    return mesh_status(mesh["home"])


def workers(st: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in st.get("services", []) if s.get("service") == "worker"]


def test_completion(mesh: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=mesh["url"], api_key="unused")
    r = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(b"Hello") + 1  # byte tokenizer + BOS
    again = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic across instances


def test_chat_streaming_with_openai_client(mesh: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=mesh["url"], api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say something"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    full = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say something"}], max_tokens=10, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert full.choices[0].message.content == content


def test_models_and_health(mesh: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=mesh["url"], api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    base = mesh["url"].removesuffix("/v1")

    async def get() -> tuple[int, int, str]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/health") as h, s.get(f"{base}/live") as lv:
                async with s.get(f"{base}/metrics") as m:
                    return h.status, lv.status, await m.text()

    h, lv, metrics = asyncio.run(get())
    assert (h, lv) == (200, 200)
    assert "# TYPE" in metrics


def test_32_concurrent_requests_are_answered_and_batched(mesh: dict[str, Any]) -> None:
    async def run() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> dict[str, Any]:
                body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": 24, "ignore_eos": True}
                async with s.post(f"{mesh['url']}/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    return dict(await r.json())

            return await asyncio.gather(*(one(i) for i in range(32)))

    out = asyncio.run(run())
    assert len(out) == 32
    assert all(o["usage"]["completion_tokens"] == 24 for o in out)
    ws = workers(status(mesh))
    assert len(ws) == 2
    # Continuous batching: the workers ran many of these sequences in one batch.
    assert max(w["detail"]["max_batch_seen"] for w in ws) >= 8


def test_bad_inputs_through_the_mesh(mesh: dict[str, Any]) -> None:
    async def run() -> dict[str, tuple[int, Any]]:
        out: dict[str, tuple[int, Any]] = {}
        async with aiohttp.ClientSession() as s:
            url = f"{mesh['url']}/completions"
            cases: dict[str, Any] = {
                "bad_json": b"{not json",
                "bad_field": {"model": MODEL, "prompt": "x", "temperature": "hot"},
                "unknown_model": {"model": "nope", "prompt": "x"},
                "too_long_prompt": {"model": MODEL, "prompt": "x" * 600, "max_tokens": 4},
                "oversized_body": {"model": MODEL, "prompt": "x" * (2 * 1024 * 1024)},
            }
            for name, body in cases.items():
                kw = (
                    {"data": body, "headers": {"Content-Type": "application/json"}}
                    if isinstance(body, bytes)
                    else {"json": body}
                )
                async with s.post(url, **kw) as r:
                    out[name] = (r.status, await r.json())
        return out

    out = asyncio.run(run())
    expect = {"bad_json": 400, "bad_field": 400, "unknown_model": 404, "too_long_prompt": 400, "oversized_body": 413}
    assert {k: v[0] for k, v in out.items()} == expect
    for _, body in out.values():
        assert set(body["error"]) >= {"message", "type", "code"}


def test_client_disconnect_cancels_on_the_worker(mesh: dict[str, Any]) -> None:
    def cancelled() -> int:
        return sum(w["detail"].get("finished", {}).get("cancelled", 0) for w in workers(status(mesh)))

    before = cancelled()

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "go on", "max_tokens": 500, "stream": True, "ignore_eos": True}
            async with s.post(f"{mesh['url']}/completions", json=body) as r:
                assert r.status == 200
                await r.content.readuntil(b"\n\n")  # one chunk, then hang up

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ws = workers(status(mesh))
        if all(w["detail"]["running"] == 0 for w in ws):
            break
        time.sleep(0.05)  # polling status with a deadline
    else:
        raise AssertionError("the request kept running after the client left")
    assert cancelled() == before + 1, "the worker did not end the request of a client that had gone"
