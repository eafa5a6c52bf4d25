"""HTTP routes: the OpenAI-compatible API, health, liveness and metrics.

Handlers validate (openai_api), ask the core to prepare and admit the request,
then turn its events into one JSON response or an SSE stream. Every error
leaves as an OpenAI error body; a middleware counts requests and latencies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from cascade import structured
from cascade.messages import TokenEvent, TokenLogprob
from cascade.models.tokenizer import Tokenizer
from services.gateway import dashboard, tools
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
# Set by a handler whose stream failed after its 200 went out: counted under the failure's
# status, since the client got an error, not an answer.
STREAM_FAILED = web.RequestKey("stream_failed", int)

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
    dashboard.add_routes(app, core.dashboard)
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
        status = 499 if request.get(CLIENT_GONE) else request.get(STREAM_FAILED, resp.status)
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
    parser: tools.Parser | None = None
    if spec.tools is not None and spec.tools.choice != "none":
        parser = core.tool_parser(info)
        tok = info.tokenizer
        keep = tools.special_markers(parser, lambda t: tok.encode(t, add_special_tokens=False), tok.special_ids)
        given = spec.tools
        spec = dataclasses.replace(spec, keep_special=keep)
        if given.forced:
            # required / a named function: only calls in the model's format can come out.
            try:
                grammar = tools.forced_grammar(given, parser, keep)
            except structured.GrammarError as e:
                raise ApiError(400, f"tools: a parameters schema cannot be compiled: {e}", param="tools") from None
            spec = dataclasses.replace(spec, grammar=grammar, grammar_param="tool_choice")
    prompt_ids, max_tokens = await core.prepare(info, spec)
    rid = oai.new_request_id(kind)
    with structlog.contextvars.bound_contextvars(request_id=rid):
        req = core.admit(rid, info, prompt_ids, spec, max_tokens)
        progress = _Progress(core, req, arrived)
        try:
            fmt = _Formatter(spec, info.tokenizer, req.prompt_ids, parser)
            if spec.stream:
                return await _stream(request, core, req, spec, progress, fmt)
            return await _complete(core, req, spec, progress, fmt)
        except ApiError as e:
            progress.failed(e.code or str(e.status), mid_stream=False)
            raise
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


class EventStream(web.StreamResponse):
    """A `text/event-stream` response whose status line and headers leave with its first chunk,
    in one write: `prepare` runs once the first token is here, so sending the headers on their own
    would wake the client once for them and again for the token a moment later (on a VM every
    wake of a halted vCPU goes through the host). aiohttp's own `Response` buffers its headers
    the same way (the class attribute below); should aiohttp drop that attribute, the headers go
    out on their own again, which is correct, only one wake-up dearer."""

    _send_headers_immediately = False


class _Progress:
    """What a request produced and how it ended: feeds the request metrics (vLLM's, labelled with
    the worker that served it) and the scaler's load reports."""

    def __init__(self, core: GatewayCore, req: RequestState, arrived: float) -> None:
        self.core, self.req, self.model, self.arrived = core, req, req.model, arrived
        self.tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.outcome = "error"  # until the handler says otherwise: "ok" | "gone" | "error"
        self.finish_reason = ""
        self.cause = "internal_error"  # the error code, when outcome is "error"
        self.mid_stream = False

    def saw(self, token_ids: list[int], text: str) -> None:
        self.tokens += len(token_ids)
        if not (token_ids or text):
            return
        now = time.monotonic()
        m = self.core.metrics
        worker = self.req.served_by
        if self.last_token_at is None:
            self.first_token_at = now
            m.ttft.observe(now - self.arrived, model=self.model, worker=worker)
            self.core.load.first_token(self.model, now - self.arrived)
            self.core.dashboard.stats.first_token(self.model, now - self.arrived)
        else:
            m.itl.observe(now - self.last_token_at, model=self.model, worker=worker)
            self.core.load.token_gap(self.model, now - self.last_token_at)
            self.core.dashboard.stats.token_gap(self.model, now - self.last_token_at)
        self.last_token_at = now

    def finished(self, reason: str) -> None:
        self.outcome = "ok"
        self.finish_reason = reason

    def failed(self, cause: str, mid_stream: bool) -> None:
        self.outcome = "error"
        self.cause = cause
        self.mid_stream = mid_stream

    def done(self) -> None:
        m, model, worker = self.core.metrics, self.model, self.req.served_by
        if self.outcome == "ok":
            self.core.load.completed(self.model)
            end = self.last_token_at or time.monotonic()
            m.e2e.observe(end - self.arrived, model=model, worker=worker)
            m.success.inc(model=model, worker=worker, finished_reason=self.finish_reason)
            dispatched = self.req.dispatched_at or self.arrived
            m.queue_time.observe(max(0.0, dispatched - self.arrived), model=model, worker=worker)
            if self.first_token_at is not None:
                m.prefill_time.observe(max(0.0, self.first_token_at - dispatched), model=model, worker=worker)
                decode = end - self.first_token_at
                m.decode_time.observe(decode, model=model, worker=worker)
                if self.tokens > 1:
                    m.tpot.observe(decode / (self.tokens - 1), model=model, worker=worker)
        elif self.outcome == "error":
            self.core.load.failed(self.model)
            m.failures.inc(model=model, worker=worker, cause=self.cause, mid_stream=str(self.mid_stream).lower())


class _Formatter:
    """Turns a request's token events into the OpenAI shapes it asked for: log probabilities
    (chat's or the completions' legacy shape), echo, vLLM's prompt_logprobs."""

    def __init__(
        self, spec: oai.GenerationSpec, tok: Tokenizer, prompt_ids: list[int], parser: tools.Parser | None = None
    ) -> None:
        self.spec, self.tok, self.prompt_ids = spec, tok, prompt_ids
        self.parser = parser  # tool calls are parsed out of the text in this format (None: no tools)
        self._texts: dict[int, str] = {}
        self.prompt_lps: list[TokenLogprob | None] | None = None
        self.offsets: dict[int, int] = {}  # completions' text_offset of each choice's next token

    def text_of(self, token: int) -> str:
        t = self._texts.get(token)
        if t is None:
            t = self._texts[token] = self.tok.decode([token])
        return t

    def saw(self, ev: TokenEvent) -> None:
        if ev.prompt_logprobs is not None and self.prompt_lps is None:
            self.prompt_lps = ev.prompt_logprobs

    def echo_text(self) -> str:
        if not self.spec.echo:
            return ""
        return self.spec.prompt if self.spec.prompt is not None else self.tok.decode(self.prompt_ids)

    def vllm_prompt_logprobs(self) -> list[Any] | None:
        if self.spec.prompt_logprobs is None:
            return None
        return oai.vllm_prompt_logprobs(self.prompt_ids, list(self.prompt_lps or []), self.text_of)

    def logprobs(self, lps: list[TokenLogprob], echo: bool = False, choice: int = 0) -> dict[str, Any] | None:
        """The `logprobs` of a choice (or of a chunk) with these tokens; with `echo`, the prompt's
        tokens lead (completions)."""
        if self.spec.logprobs is None:
            return None
        if self.spec.kind == "chat":
            return oai.chat_logprobs(lps, self.text_of)
        items: list[tuple[int, TokenLogprob | None]] = []
        if echo:
            plps = list(self.prompt_lps or [])
            items += [(t, plps[i] if i < len(plps) else None) for i, t in enumerate(self.prompt_ids)]
        items += [(e.token, e) for e in lps]
        out = oai.completion_logprobs(items, self.text_of, self.offsets.get(choice, 0))
        if items:
            self.offsets[choice] = out["text_offset"][-1] + len(out["tokens"][-1])
        return out


@dataclass
class _Choice:
    """What one of the request's choices produced so far."""

    parts: list[str] = field(default_factory=list)
    lps: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    completion_tokens: int = 0
    started: bool = False  # streaming: its first chunk (with the role) went out
    tool_stream: tools.StreamParser | None = None  # streaming with tools: what parses calls out


def _saw_final(c: _Choice, ev: TokenEvent) -> None:
    c.finish = ev.finish_reason
    c.completion_tokens = ev.completion_tokens or c.tokens


def _usage(req: RequestState, choices: dict[int, _Choice]) -> dict[str, int]:
    """The prompt once, each choice's tokens once (n choices share one prefill)."""
    return oai.usage(len(req.prompt_ids), sum(c.completion_tokens for c in choices.values()))


async def _complete(
    core: GatewayCore, req: RequestState, spec: oai.GenerationSpec, progress: _Progress, fmt: _Formatter
) -> web.Response:
    choices: dict[int, _Choice] = {}
    finished = 0
    while True:
        ev = await core.next_event(req)
        if isinstance(ev, Failure):
            raise _failure_error(ev)
        progress.saw(ev.token_ids, ev.text)
        fmt.saw(ev)
        c = choices.setdefault(ev.choice, _Choice())
        c.parts.append(ev.text)
        c.lps.extend(ev.logprobs)
        c.tokens += len(ev.token_ids)
        if ev.finish_reason is None:
            continue
        err = _final_error(ev.finish_reason, ev.error)
        if err is not None:
            raise err
        _saw_final(c, ev)
        finished += 1
        if finished < spec.n:
            continue
        created = int(time.time())
        progress.finished(ev.finish_reason)
        plps = fmt.vllm_prompt_logprobs()
        body = []
        for i in range(spec.n):
            c = choices.get(i, _Choice(finish="stop"))
            text = fmt.echo_text() + "".join(c.parts)
            message = None
            finish = c.finish
            if fmt.parser is not None:
                content, calls = tools.parse(text, fmt.parser)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    finish = "tool_calls" if finish == "stop" else finish
            body.append(
                oai.choice(
                    spec.kind,
                    text,
                    finish,
                    index=i,
                    logprobs=fmt.logprobs(c.lps, echo=spec.echo, choice=i),
                    prompt_logprobs=plps if spec.kind == "completion" else None,
                    message=message,
                )
            )
        return json_response(
            oai.full_response(
                spec.kind,
                req.request_id,
                created,
                spec.model,
                "",
                None,
                _usage(req, choices),
                choices=body,
                prompt_logprobs=plps if spec.kind == "chat" else None,
            )
        )


async def _stream(
    request: web.Request,
    core: GatewayCore,
    req: RequestState,
    spec: oai.GenerationSpec,
    progress: _Progress,
    fmt: _Formatter,
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
    resp = EventStream(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    await resp.prepare(request)
    iu = spec.include_usage
    choices: dict[int, _Choice] = {i: _Choice() for i in range(spec.n)}
    if fmt.parser is not None:
        for c in choices.values():
            c.tool_stream = tools.StreamParser(fmt.parser, forced=spec.tools is not None and spec.tools.forced)
    finished = 0

    def chunk(i: int, text: str, finish: str | None = None, **kw: Any) -> bytes:
        c = choices[i]
        first, c.started = not c.started, True
        return oai.sse(oai.chunk(kind, rid, created, model, text, finish, first=first, include_usage=iu, index=i, **kw))

    try:
        fmt.saw(ev)
        if spec.echo or spec.prompt_logprobs is not None:
            # The prompt's own chunk first: its text under echo, its logprobs when asked for.
            plps = fmt.vllm_prompt_logprobs()
            for i in range(spec.n):
                lp = fmt.logprobs([], echo=True, choice=i) if spec.echo else None
                await resp.write(chunk(i, fmt.echo_text(), logprobs=lp, prompt_logprobs=plps if i == 0 else None))
        while True:
            if isinstance(ev, Failure):
                _stream_failed(request, progress, _failure_error(ev))
                await resp.write(oai.sse(_failure_error(ev).body()))
                break
            progress.saw(ev.token_ids, ev.text)
            fmt.saw(ev)
            err = _final_error(ev.finish_reason, ev.error) if ev.finish_reason is not None else None
            if err is not None:
                _stream_failed(request, progress, err)
                await resp.write(oai.sse(err.body()))
                break
            c = choices[ev.choice]
            c.tokens += len(ev.token_ids)
            text, calls = ev.text, list[dict[str, Any]]()
            tp = c.tool_stream
            if tp is not None:
                text, calls = tp.feed(ev.text)
                if ev.finish_reason is not None:
                    rest, more = tp.finish()
                    text, calls = text + rest, calls + more
            # An event's chunks go out in one write (one send, one wake-up of the client): its
            # text, tool calls and finish, and after the last choice's finish the usage, [DONE]
            # and the end of the body.
            out: list[bytes] = []
            if text or not c.started or ev.logprobs:
                lp = fmt.logprobs(ev.logprobs, choice=ev.choice) if ev.logprobs else None
                out.append(chunk(ev.choice, text, logprobs=lp))
            if calls:
                out.append(chunk(ev.choice, "", delta={"tool_calls": calls}))
            if ev.finish_reason is not None:
                _saw_final(c, ev)
                finish = ev.finish_reason
                if tp is not None and tp.calls and finish == "stop":
                    finish = "tool_calls"
                out.append(chunk(ev.choice, "", finish))
                finished += 1
            if finished == spec.n:
                if spec.include_usage:
                    out.append(oai.sse(oai.usage_chunk(kind, rid, created, model, _usage(req, choices))))
                progress.finished(ev.finish_reason or "stop")
                out.append(oai.SSE_DONE)
                await resp.write_eof(b"".join(out))
                return resp
            if out:
                await resp.write(b"".join(out))
            ev = await core.next_event(req)
        await resp.write_eof(oai.SSE_DONE)
    except ConnectionResetError:
        # The client closed the stream; `release` (in the caller) cancels the request on its worker.
        request[CLIENT_GONE] = True
        progress.outcome = "gone"
        core.log.info("client_gone", request_id=rid)
    return resp


def _stream_failed(request: web.Request, progress: _Progress, err: ApiError) -> None:
    """A stream that breaks after its 200 is a failed request: counted under the error's status
    and code, never as a success."""
    request[STREAM_FAILED] = err.status
    progress.failed(err.code or str(err.status), mid_stream=True)


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
