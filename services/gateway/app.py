"""HTTP routes: the OpenAI-compatible API, health, liveness and metrics.

Handlers validate (openai_api), ask the core to prepare and admit the request,
then turn its events into one JSON response or an SSE stream. Every error
leaves as an OpenAI error body; a middleware counts requests and latencies.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from services.gateway import openai_api as oai
from services.gateway.auth import api_key_middleware
from services.gateway.core import GatewayCore
from services.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from services.gateway.openai_api import ApiError, Kind
from services.gateway.streams import Failure, RequestState

GATEWAY = web.AppKey("gateway", GatewayCore)
STARTED = web.AppKey("started", int)
# Set by a handler whose client went away mid-stream (counted as status 499, as nginx does).
CLIENT_GONE = web.RequestKey("client_gone", bool)

_GENERATION_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(core: GatewayCore) -> web.Application:
    # aiohttp enforces the body limit itself while reading; the handler turns its 413 into an
    # OpenAI error body.
    keys = core.settings.api_keys
    middlewares: list[Middleware] = [_observe, api_key_middleware(keys)] if keys else [_observe]
    app = web.Application(middlewares=middlewares, client_max_size=core.settings.max_body_bytes)
    app[GATEWAY] = core
    app[STARTED] = int(time.time())
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/live", live)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_core_ctx)
    app.on_shutdown.append(_on_shutdown)
    return app


async def _core_ctx(app: web.Application) -> AsyncIterator[None]:
    core = app[GATEWAY]
    try:
        await core.start()
        yield
    finally:
        await core.close()


async def _on_shutdown(app: web.Application) -> None:
    # aiohttp calls this after it stopped listening and before it waits for running handlers.
    app[GATEWAY].begin_shutdown()


# --------------------------------------------------------------------------- middleware


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error_response(e: ApiError) -> web.Response:
    headers = None
    if e.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}
    return json_response(e.body(), e.status, headers)


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    core = request.app[GATEWAY]
    resource = request.match_info.route.resource
    # The route template, not the raw path: random paths must not grow the label set.
    endpoint = resource.canonical if resource is not None else "unmatched"
    start = time.monotonic()
    status = 500
    try:
        resp = await handler(request)
        status = 499 if request.get(CLIENT_GONE) else resp.status
        return resp
    except ApiError as e:
        status = e.status
        return error_response(e)
    except web.HTTPException as e:
        status = e.status
        return error_response(ApiError(e.status, e.reason, code=e.reason.lower().replace(" ", "_")))
    except asyncio.CancelledError:
        status = 499  # the client went away; aiohttp cancels the handler
        raise
    except Exception:
        core.log.exception("handler_failed", path=request.path)
        status = 500
        return error_response(ApiError(500, "internal error in the gateway", code="internal_error"))
    finally:
        core.metrics.requests.inc(endpoint=endpoint, status=str(status))
        if endpoint in _GENERATION_ENDPOINTS:
            core.metrics.latency.observe(time.monotonic() - start, endpoint=endpoint)


# --------------------------------------------------------------------------- generation


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _read_body(request: web.Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_big from None


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    core = request.app[GATEWAY]
    arrived = time.monotonic()
    body = oai.parse_json(await _read_body(request, core.settings.max_body_bytes))
    spec = oai.parse_completion(body) if kind == "completion" else oai.parse_chat(body)
    info = core.catalog.get(spec.model)
    prompt_ids, max_tokens = await core.prepare(info, spec)
    rid = oai.new_request_id(kind)
    with structlog.contextvars.bound_contextvars(request_id=rid):
        req = core.admit(rid, info, prompt_ids, spec, max_tokens)
        progress = _Progress(core, info.name, arrived)
        try:
            if spec.stream:
                return await _stream(request, core, req, spec, progress)
            return await _complete(core, req, spec, progress)
        except asyncio.CancelledError:
            progress.outcome = "gone"
            raise
        finally:
            core.release(req)
            progress.done()


def _failure_error(f: Failure) -> ApiError:
    return ApiError(f.status, f.message, code=f.code, retry_after_s=f.retry_after_s)


def _final_error(reason: str, error: str | None) -> ApiError | None:
    """The error a final worker event stands for, if any."""
    if reason == "error":
        return ApiError(502, f"the worker failed: {error or 'unknown error'}", code="worker_error")
    if reason == "cancelled":
        return ApiError(503, "the worker cancelled the request", code="cancelled")
    return None


class _Progress:
    """What a request produced and how it ended: feeds time to first token, inter-token gaps
    and the outcome to /metrics and the scaler's load reports."""

    def __init__(self, core: GatewayCore, model: str, arrived: float) -> None:
        self.core, self.model, self.arrived = core, model, arrived
        self.tokens = 0
        self.last_token_at: float | None = None
        self.outcome = "error"  # until the handler says otherwise: "ok" | "gone" | "error"

    def saw(self, token_ids: list[int], text: str) -> None:
        self.tokens += len(token_ids)
        if not (token_ids or text):
            return
        now = time.monotonic()
        if self.last_token_at is None:
            self.core.metrics.ttft.observe(now - self.arrived, model=self.model)
            self.core.load.first_token(self.model, now - self.arrived)
        else:
            self.core.load.token_gap(self.model, now - self.last_token_at)
        self.last_token_at = now

    def done(self) -> None:
        if self.outcome == "ok":
            self.core.load.completed(self.model)
        elif self.outcome == "error":
            self.core.load.failed(self.model)


async def _complete(
    core: GatewayCore, req: RequestState, spec: oai.GenerationSpec, progress: _Progress
) -> web.Response:
    parts: list[str] = []
    while True:
        ev = await core.next_event(req)
        if isinstance(ev, Failure):
            raise _failure_error(ev)
        progress.saw(ev.token_ids, ev.text)
        parts.append(ev.text)
        if ev.finish_reason is None:
            continue
        err = _final_error(ev.finish_reason, ev.error)
        if err is not None:
            raise err
        use = oai.usage(len(req.prompt_ids), ev.completion_tokens or progress.tokens)
        created = int(time.time())
        progress.outcome = "ok"
        return json_response(
            oai.full_response(spec.kind, req.request_id, created, spec.model, "".join(parts), ev.finish_reason, use)
        )


async def _stream(
    request: web.Request, core: GatewayCore, req: RequestState, spec: oai.GenerationSpec, progress: _Progress
) -> web.StreamResponse:
    kind, rid, created, model = spec.kind, req.request_id, int(time.time()), spec.model
    # Wait for the first event before answering: until then a failure is still a proper HTTP
    # status (503 queue timeout, 400 from the worker), which clients handle better than an
    # error inside a 200 stream.
    ev = await core.next_event(req)
    if isinstance(ev, Failure):
        raise _failure_error(ev)
    if ev.finish_reason is not None:
        err = _final_error(ev.finish_reason, ev.error)
        if err is not None:
            raise err
    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    await resp.prepare(request)
    first = True
    try:
        while True:
            if isinstance(ev, Failure):
                await resp.write(oai.sse(_failure_error(ev).body()))
                break
            progress.saw(ev.token_ids, ev.text)
            err = _final_error(ev.finish_reason, ev.error) if ev.finish_reason is not None else None
            if err is not None:
                await resp.write(oai.sse(err.body()))
                break
            if ev.text or first:
                await resp.write(
                    oai.sse(
                        oai.chunk(kind, rid, created, model, ev.text, first=first, include_usage=spec.include_usage)
                    )
                )
                first = False
            if ev.finish_reason is not None:
                await resp.write(
                    oai.sse(
                        oai.chunk(kind, rid, created, model, "", ev.finish_reason, include_usage=spec.include_usage)
                    )
                )
                if spec.include_usage:
                    use = oai.usage(len(req.prompt_ids), ev.completion_tokens or progress.tokens)
                    await resp.write(oai.sse(oai.usage_chunk(kind, rid, created, model, use)))
                progress.outcome = "ok"
                break
            ev = await core.next_event(req)
        await resp.write(oai.SSE_DONE)
        await resp.write_eof()
    except ConnectionResetError:
        # The client closed the stream; `release` (in the caller) cancels the request on its worker.
        request[CLIENT_GONE] = True
        progress.outcome = "gone"
        core.log.info("client_gone", request_id=rid)
    return resp


# --------------------------------------------------------------------------- the rest


async def list_models(request: web.Request) -> web.Response:
    core = request.app[GATEWAY]
    return json_response(oai.model_list(core.catalog.names(), request.app[STARTED]))


async def get_model(request: web.Request) -> web.Response:
    core = request.app[GATEWAY]
    name = request.match_info["model"]
    if name not in core.catalog.names():
        raise ApiError(404, f"the model `{name}` does not exist", param="model", code="model_not_found")
    return json_response(oai.model_list([name], request.app[STARTED])["data"][0])


async def health(request: web.Request) -> web.Response:
    ok, detail = request.app[GATEWAY].health()
    return json_response(detail, 200 if ok else 503)


async def live(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def metrics(request: web.Request) -> web.Response:
    text = request.app[GATEWAY].metrics.render()
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})
