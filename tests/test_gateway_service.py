"""The real gateway (in-process, free port) against the real nats-server fixture, with no
workers: everything the gateway answers by itself."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest

from cascade.config import Deployment, GenerateSpec, ModelDeployment
from cascade.messages import Heartbeat, ModelMetrics, ServiceReady, ServiceStatus, StatusRequest, decode, encode
from cascade.models.generate import generate_model
from cascade.subjects import Subjects
from services.gateway.main import GatewayService, add_arguments, host, settings_from_args
from services.gateway.settings import GatewaySettings
from services.gateway.testing import RunningGateway, parse_prometheus, running_gateway, sample

pytestmark = pytest.mark.e2e

MODEL = "tiny"
CONTEXT = 2048  # GenerateSpec's default max_position


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gateway-models") / MODEL
    generate_model(path, GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320))
    return path


@pytest.fixture(scope="session")
def deployment(tiny_model: Path) -> Deployment:
    return Deployment(
        models=(
            ModelDeployment(name=MODEL, path=tiny_model, min_replicas=1),
            # Deployed but not required to be up: /health must not wait for it.
            ModelDeployment(name="spare", path=tiny_model, min_replicas=0),
        )
    )


@pytest.fixture
async def gw(nats_url: str, prefix: str, deployment: Deployment) -> AsyncIterator[RunningGateway]:
    async with running_gateway(nats_url, prefix, deployment) as svc:
        yield svc


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def post(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else None
    js = None if isinstance(body, bytes) else body
    async with http.post(url, data=data, json=js, **kw) as r:
        return r.status, await r.json(content_type=None), r.headers


def assert_error(body: Any, code: str | None = None, param: str | None = None) -> None:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0) -> None:
    """Poll `check` until true, failing at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- 400 / 404


async def test_bad_json_and_bad_fields(gw: GatewayService, http: aiohttp.ClientSession) -> None:
    url = gw.url + "/v1/completions"
    status, body, _ = await post(http, url, b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400
    assert_error(body, code="invalid_json")
    for bad, param in [
        ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "n": 17}, "n"),
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL, "prompt": [1, 99999]}, "prompt"),  # outside the vocabulary
        ({"model": MODEL}, "prompt"),
    ]:
        status, body, _ = await post(http, url, bad)
        assert status == 400, bad
        assert_error(body, param=param)
    status, body, _ = await post(http, gw.url + "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert status == 400
    assert_error(body, param="messages")


async def test_unknown_model_is_404(gw: GatewayService, http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, gw.url + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404
    assert_error(body, code="model_not_found", param="model")
    chat = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    status, body, _ = await post(http, gw.url + "/v1/chat/completions", chat)
    assert status == 404
    async with http.get(gw.url + "/v1/models/nope") as r:
        assert r.status == 404
    async with http.get(gw.url + "/no/such/path") as r:
        assert r.status == 404
        assert_error(await r.json())


# --------------------------------------------------------------------------- 413


async def test_oversized_body_is_413(nats_url: str, prefix: str, deployment: Deployment) -> None:
    async with (
        running_gateway(nats_url, prefix, deployment, max_body_bytes=4096) as gw,
        aiohttp.ClientSession() as http,
    ):
        big = {"model": MODEL, "prompt": "x" * 5000}
        status, body, _ = await post(http, gw.url + "/v1/completions", big)
        assert status == 413
        assert_error(body, code="request_too_large")

        # Without a Content-Length (chunked), the limit holds while reading.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        async with http.post(gw.url + "/v1/completions", data=chunks()) as r:
            assert r.status == 413
            assert_error(await r.json(), code="request_too_large")


async def test_prompt_or_max_tokens_past_the_context_is_400_invalid_request(
    gw: GatewayService, http: aiohttp.ClientSession
) -> None:
    """As vLLM answers: a request asking for more than the model's context is the client's error
    (400 invalid_request_error), not a payload-size problem (413)."""
    url = gw.url + "/v1/completions"
    status, body, _ = await post(http, url, {"model": MODEL, "prompt": "x" * (CONTEXT + 10)})
    assert status == 400
    assert_error(body, code="context_length_exceeded")
    assert body["error"]["type"] == "invalid_request_error"
    # Fits alone, but not with the room asked for the answer (the byte tokenizer adds BOS).
    status, body, _ = await post(http, url, {"model": MODEL, "prompt": "x" * (CONTEXT - 50), "max_tokens": 100})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens is 100" in body["error"]["message"]
    # A short prompt with max_tokens beyond the whole context.
    status, body, _ = await post(http, url, {"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT + 1})
    assert status == 400
    assert_error(body, code="context_length_exceeded")
    assert body["error"]["type"] == "invalid_request_error"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x" * CONTEXT}]}
    status, body, _ = await post(http, gw.url + "/v1/chat/completions", chat)
    assert status == 400
    assert_error(body, code="context_length_exceeded", param="messages")


# --------------------------------------------------------------------------- API keys


async def test_api_keys_refuse_v1_requests_without_a_valid_bearer_key(
    nats_url: str, prefix: str, deployment: Deployment, http: aiohttp.ClientSession
) -> None:
    async with running_gateway(nats_url, prefix, deployment, api_keys=("key-one", "key-two")) as gw:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"}):
            async with http.get(gw.url + "/v1/models", headers=headers) as r:
                assert r.status == 401, headers
                body = await r.json()
            assert_error(body, code="invalid_api_key")
            assert body["error"]["type"] == "invalid_request_error"
            status, body, _ = await post(
                http, gw.url + "/v1/completions", {"model": MODEL, "prompt": "hi"}, headers=headers
            )
            assert status == 401
            assert_error(body, code="invalid_api_key")
        # Either key works; probes and scrapers need none.
        for key in ("key-one", "key-two"):
            async with http.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
                assert MODEL in {m["id"] for m in (await r.json())["data"]}
        async with http.get(gw.url + "/live") as r:
            assert r.status == 200
        async with http.get(gw.url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        assert 'status="401"' in text  # refusals are counted like any other answer


def test_api_key_flags_and_environment_are_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_API_KEYS", " b, c,,a ")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    s = settings_from_args(parser.parse_args(["--nats-url", "nats://x:1", "--api-key", "a", "--api-key", "z"]))
    assert s.api_keys == ("a", "z", "b", "c")


async def test_prompt_past_the_instances_max_model_len_is_400_before_any_work(
    nats_url: str, prefix: str, gw: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """A worker announces a max_model_len below the model's context (its KV budget caps it): the
    gateway refuses a longer prompt itself, and sends nothing to the worker."""
    subjects = Subjects(prefix)
    nc = await nats.connect(nats_url)
    dispatched: list[bytes] = []
    try:

        async def on_generate(msg: Any) -> None:
            dispatched.append(msg.data)

        await nc.subscribe(subjects.generate("wkv"), cb=on_generate)
        hb = Heartbeat("wkv", "serving", MODEL, 4, 4, 0, 0, 8, 0.0, 4, 1, "h", max_model_len=64)
        await nc.publish(subjects.heartbeat("wkv"), encode(hb))
        await eventually(lambda: gw.core.registry.max_model_len(MODEL) == 64)
        status, body, _ = await post(http, gw.url + "/v1/completions", {"model": MODEL, "prompt": "x" * 100})
        assert status == 400
        assert_error(body, code="context_length_exceeded", param="prompt")
        assert "64" in body["error"]["message"]
        await nc.flush()
        assert dispatched == []
    finally:
        await nc.drain()


# --------------------------------------------------------------------------- 429 / 503


async def test_full_queue_is_429_with_retry_after(nats_url: str, prefix: str, deployment: Deployment) -> None:
    async with (
        running_gateway(nats_url, prefix, deployment, max_queue=2, queue_timeout_s=60.0) as gw,
        aiohttp.ClientSession() as http,
    ):
        url = gw.url + "/v1/completions"
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
        waiting = [asyncio.ensure_future(post(http, url, body)) for _ in range(2)]
        try:
            await eventually(lambda: gw.core.queue_depths()[MODEL] == 2)
            status, err, headers = await post(http, url, body)
            assert status == 429
            assert_error(err, code="queue_full")
            assert int(headers["Retry-After"]) >= 1
            assert all(not t.done() for t in waiting)  # still queued, waiting for an instance
        finally:
            for t in waiting:
                t.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        # Clients that hang up leave the queue.
        await eventually(lambda: gw.core.queue_depths()[MODEL] == 0)
        await eventually(lambda: gw.core.in_flight_by_model()[MODEL] == 0)


async def test_no_instance_is_503_after_queue_timeout(nats_url: str, prefix: str, deployment: Deployment) -> None:
    async with (
        running_gateway(nats_url, prefix, deployment, queue_timeout_s=0.2) as gw,
        aiohttp.ClientSession() as http,
    ):
        for stream in (False, True):
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": stream}
            status, err, headers = await post(http, gw.url + "/v1/completions", body)
            assert status == 503, stream  # also for a stream: nothing was sent yet
            assert_error(err, code="no_instance")
            assert "Retry-After" in headers
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        status, err, _ = await post(http, gw.url + "/v1/chat/completions", chat)
        assert status == 503
        assert gw.core.queue_depths()[MODEL] == 0


async def test_requests_starting_to_wait_are_reported_before_the_interval(
    nats_url: str, prefix: str, deployment: Deployment
) -> None:
    """With no instance up, a request waits: the scaler hears of it from an early report, a quarter
    interval after the last one, not a whole interval later."""
    interval = 8.0
    nc = await nats.connect(nats_url)
    reports: list[ModelMetrics] = []
    try:
        async with (
            running_gateway(nats_url, prefix, deployment, metrics_interval_s=interval, queue_timeout_s=60.0) as gw,
            aiohttp.ClientSession() as http,
        ):

            async def on_report(m: Any) -> None:
                reports.append(decode(m.data, ModelMetrics))

            await nc.subscribe(Subjects(prefix).metrics("gateway", gw.core.id), cb=on_report)
            await nc.flush()
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
            waiting = asyncio.ensure_future(post(http, gw.url + "/v1/completions", body))
            try:
                await eventually(lambda: any(r.waiting == 1 for r in reports), timeout_s=2 * interval)
            finally:
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
            r = next(r for r in reports if r.waiting == 1)
            assert r.model == MODEL and r.arrivals == 1
            assert r.interval_s < 0.9 * interval  # an early report, not the regular one
    finally:
        await nc.close()


# --------------------------------------------------------------------------- the rest


async def test_live_health_models(gw: GatewayService, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/live") as r:
        assert r.status == 200
    async with http.get(gw.url + "/health") as r:
        assert r.status == 503
        body = await r.json()
        assert body["models_without_instance"] == [MODEL]  # "spare" has min_replicas 0
        assert MODEL in body["reason"]
    async with http.get(gw.url + "/v1/models") as r:
        assert r.status == 200
        models = await r.json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == [MODEL, "spare"]
        assert all(m["object"] == "model" for m in models["data"])
    async with http.get(gw.url + f"/v1/models/{MODEL}") as r:
        assert (await r.json())["id"] == MODEL


async def test_metrics_parse(gw: GatewayService, http: aiohttp.ClientSession) -> None:
    await post(http, gw.url + "/v1/completions", {"model": "nope", "prompt": "x"})
    await post(http, gw.url + "/v1/completions", b"{", headers={"Content-Type": "application/json"})
    async with http.get(gw.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse_prometheus(await r.text())
    total = "cascade_gateway_requests_total"
    assert sample(samples, total, endpoint="/v1/completions", status="404") == 1
    assert sample(samples, total, endpoint="/v1/completions", status="400") == 1
    assert sample(samples, "cascade_gateway_queue_depth", model=MODEL) == 0
    assert sample(samples, "cascade_gateway_requests_in_flight", model=MODEL) == 0
    assert sample(samples, "cascade_gateway_instances_serving", model=MODEL) == 0
    assert sample(samples, "cascade_gateway_request_duration_seconds_count", endpoint="/v1/completions") == 2
    for name in ("cascade_gateway_requests_in_flight", "cascade_gateway_queue_depth"):
        assert name in samples


async def test_status_and_ready_over_nats(nats_url: str, prefix: str, deployment: Deployment) -> None:
    subjects = Subjects(prefix)
    nc = await nats.connect(nats_url)
    try:
        ready: asyncio.Queue[ServiceReady] = asyncio.Queue()

        async def on_ready(msg: Any) -> None:
            ready.put_nowait(decode(msg.data, ServiceReady))

        await nc.subscribe(subjects.service_ready(), cb=on_ready)
        await nc.flush()
        async with running_gateway(nats_url, prefix, deployment, gateway_id="gw-test") as gw:
            announced = await asyncio.wait_for(ready.get(), 10.0)
            assert (announced.service, announced.instance, announced.pid) == ("gateway", "gw-test", os.getpid())
            reply = await nc.request(subjects.status(), encode(StatusRequest("test")), timeout=5.0)
            st = decode(reply.data, ServiceStatus)
            assert (st.service, st.instance) == ("gateway", "gw-test")
            assert st.detail["url"] == gw.url
            assert st.detail["queue_depth"] == {MODEL: 0, "spare": 0}
            assert st.detail["instances"] == []
    finally:
        await nc.close()


async def test_flags_build_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("CASCADE_GATEWAY_PORT", "0")
    monkeypatch.setenv("CASCADE_GATEWAY_HOST", "127.0.0.2")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--nats-url", "nats://x:1", "--max-queue", "2", "--batch-wait-timeout-s", "0.01"])
    s = settings_from_args(args)
    assert (s.nats_url, s.host, s.port, s.max_queue, s.batch_wait_timeout_s) == ("nats://x:1", "127.0.0.2", 0, 2, 0.01)
    assert s.gateway_id.startswith("gw-")
    assert (s.max_batch_size, s.queue_timeout_s, s.request_timeout_s, s.max_body_bytes) == (32, 30.0, 120.0, 1 << 20)


async def test_stop_is_idempotent_and_safe_after_failed_start(prefix: str, deployment: Deployment) -> None:
    # Nothing listens on port 1: connecting fails, and stop() after that must be harmless.
    settings = GatewaySettings(nats_url="nats://127.0.0.1:1", prefix=prefix, port=0, nats_connect_timeout_s=0.3)
    h = host(GatewayService(settings, deployment))
    with pytest.raises(ConnectionError):
        await h.start()
    await h.stop()
    await h.stop()


async def test_process_serves_and_stops_cleanly_on_sigterm(
    nats_url: str, prefix: str, deployment: Deployment, tmp_path: Path
) -> None:
    """`cascade gateway` as its own process: logs its real port, serves, exits 0 on SIGTERM."""
    config = tmp_path / "deploy.json"
    config.write_bytes(orjson.dumps(deployment.to_json()))
    env = {**os.environ, "CASCADE_LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cascade.cli", "gateway", "--nats-url", nats_url, "--prefix", prefix,
        "--config", str(config), "--port", "0", "--shutdown-grace-s", "1",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        url = None
        while url is None:
            line = await asyncio.wait_for(proc.stderr.readline(), 60.0)
            assert line, "the gateway exited before listening"
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if event.get("event") == "listening":
                    url = event["url"]
        assert not url.endswith(":0")
        async with aiohttp.ClientSession() as http, http.get(url + "/live") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30.0) == 0
    finally:
        if proc.returncode is None:  # the test failed midway: stop it the same graceful way first
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
