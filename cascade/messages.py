"""Typed, versioned messages that cross NATS.

Each message is a frozen, slotted dataclass registered under a `type` name and
a version. On the wire: `{"type": ..., "v": ..., "body": {...}}` encoded with
orjson. `decode` rejects an unknown type, a newer version or a malformed body
with `MessageError`, so a service never acts on what it does not understand.
"""

from __future__ import annotations

import bisect
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import orjson


class MessageError(ValueError):
    """A payload that is not a message this build understands."""


_REGISTRY: dict[str, type[Any]] = {}
T = TypeVar("T")


@typing.dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(name: str, version: int = 1) -> typing.Callable[[type[T]], type[T]]:
    """Class decorator: a frozen slotted dataclass registered as wire type `name`."""

    def wrap(cls: type[T]) -> type[T]:
        dc = dataclass(frozen=True, slots=True)(cls)
        dc.TYPE = name  # type: ignore[attr-defined]
        dc.VERSION = version  # type: ignore[attr-defined]
        if name in _REGISTRY:
            raise RuntimeError(f"message type {name!r} registered twice")
        _REGISTRY[name] = dc
        return dc

    return wrap


def encode(msg: Any) -> bytes:
    return orjson.dumps({"type": msg.TYPE, "v": msg.VERSION, "body": msg})


def decode(data: bytes, expect: type[T] | None = None) -> T:
    """Decode a payload; with `expect`, also check it is that message type."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise MessageError(f"not JSON: {e}") from None
    return decode_object(obj, expect)


def decode_object(obj: Any, expect: type[T] | None = None) -> T:
    """`decode` for a payload already parsed from JSON (a frame header that carries one)."""
    if not isinstance(obj, dict) or "type" not in obj or "body" not in obj:
        raise MessageError("not a Cascade message (needs 'type' and 'body')")
    name = obj["type"]
    cls = _REGISTRY.get(name)
    if cls is None:
        raise MessageError(f"unknown message type {name!r}")
    version = obj.get("v", 1)
    if not isinstance(version, int) or version > cls.VERSION:
        raise MessageError(f"{name} version {version!r} is newer than this build understands ({cls.VERSION})")
    if expect is not None and cls is not expect:
        raise MessageError(f"expected {expect.TYPE}, got {name}")  # type: ignore[attr-defined]
    try:
        return typing.cast(T, _build(cls, obj["body"]))
    except (TypeError, ValueError, KeyError) as e:
        raise MessageError(f"malformed {name}: {e}") from None


# Decoding is compiled once per message type: a converter per field, built from its type hint,
# so a message is checked without inspecting hints on every call (token events arrive every step).
_BUILDERS: dict[type[Any], Callable[[Any], Any]] = {}
_Conv = Callable[[Any], Any]


def _build(cls: type[Any], body: Any) -> Any:
    b = _BUILDERS.get(cls)
    if b is None:
        b = _BUILDERS[cls] = _compile_builder(cls)
    return b(body)


def _compile_builder(cls: type[Any]) -> _Conv:
    names = {f.name for f in dataclasses.fields(cls)}
    fields = [(n, _converter(t)) for n, t in get_type_hints(cls).items() if n in names]

    def build(body: Any) -> Any:
        if not isinstance(body, dict):
            raise TypeError(f"{cls.__name__} body must be an object")
        return cls(**{name: conv(body[name]) for name, conv in fields if name in body})

    return build


def _converter(hint: Any) -> _Conv:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        target = typing.cast(type, hint)
        return lambda value: _build(target, value)
    if origin in (list, tuple):
        (inner, *_) = get_args(hint) or (Any,)
        item = _converter(inner)
        exact = inner if inner in (int, str) else None

        def seq(value: Any) -> Any:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            # Lists of plain ids or strings (token ids, worker ids) are checked without a call per item.
            if exact is not None and all(isinstance(v, exact) for v in value):
                out = list(value)
            else:
                out = [item(v) for v in value]
            return tuple(out) if origin is tuple else out

        return seq
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(hint) if a is not type(None)]
        inner_conv = _converter(arms[0]) if arms else (lambda v: v)
        return lambda value: None if value is None else inner_conv(value)
    if origin is Literal:
        allowed = get_args(hint)

        def literal(value: Any) -> Any:
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
            return value

        return literal
    if hint is float:

        def number(value: Any) -> Any:
            if isinstance(value, float):
                return value
            if isinstance(value, int):
                return float(value)
            raise TypeError(f"expected float, got {type(value).__name__}")

        return number
    if hint in (int, str, bool):

        def plain(value: Any) -> Any:
            if not isinstance(value, hint):
                raise TypeError(f"expected {hint.__name__}, got {type(value).__name__}")
            return value

        return plain
    return lambda value: value


# --------------------------------------------------------------------------- errors


@message("error")
class ErrorReply:
    """What a request handler answers when it fails: a code and a message."""

    code: str
    message: str


class RemoteError(RuntimeError):
    """A request that the other side answered with an `ErrorReply`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@message("ok")
class Ok:
    detail: str = ""


# --------------------------------------------------------------------------- workers

WorkerState = Literal["idle", "loading", "serving", "draining"]


@message("heartbeat")
class Heartbeat:
    worker_id: str
    state: WorkerState
    model: str | None
    units_ready: int  # count of model units (embedding, layers, head) ready
    num_units: int
    running: int  # sequences in the running batch
    waiting: int  # admitted, not yet prefetched into the batch
    max_batch: int
    tokens_per_s: float
    ready_seq: int  # sequence number of the last readiness event this worker sent
    pid: int
    host: str
    data_addr: str | None = None
    loading_mb_s: float = 0.0
    ts: float = 0.0
    stage_addr: str | None = None  # where peers send activations of pipelined routes
    stage_running: int = 0  # relayed stage sequences this worker computes for other drivers
    # Layers run for the routes it drives, summed over them (KV it holds for them, in sequence-layers).
    driven_layers: int = 0
    driven: int = 0  # routes it drives (counted in `running` too)
    # Prompt tokens one engine step starts at most (0: unknown): the gateway keeps about two
    # steps' worth of prompts waiting on an instance and the rest of a backlog itself.
    prefill_budget: int = 0
    # Prompt tokens queued here and not computed yet, every role weighed by the share of the layers
    # it runs here (full-model tokens): how far behind its prefill is. The gateway splits a live
    # route so the loading head's queue does not outgrow the busy instance's (router.head_split).
    prefill_queued: int = 0
    # The paged KV cache: blocks held over usable blocks (0..1), and the longest sequence it serves
    # (0: unknown): the gateway refuses a longer prompt itself, before any work.
    kv_cache_usage: float = 0.0
    max_model_len: int = 0
    # Sequences preempted for KV blocks since the worker started (vLLM's num_preemptions_total).
    num_preemptions: int = 0
    # "network": this worker reads no model store (--model-source network); the loader must send it
    # every model over the data plane, from the host cache or a live peer.
    model_source: str = "disk"
    # A stage of a pipeline-parallel instance (docs/pipelined-and-shared.md): the instance's id,
    # and the decoder layers [stage_start, stage_end) this worker runs for it. "" / 0, 0: a whole
    # instance of its own.
    group: str = ""
    stage_start: int = 0
    stage_end: int = 0
    # Sharing one worker (docs/pipelined-and-shared.md): the worker process (device) this instance
    # runs on when it shares it with others ("" when it has it alone), and its compute quota.
    shared_device: str = ""
    quota: float = 0.0


@message("worker_gone")
class WorkerGone:
    """A worker's process ended (its supervisor saw it exit): drop it now, not three heartbeats
    later. `pid` names the incarnation, so a worker restarted under the same id is not dropped."""

    worker_id: str
    pid: int
    reason: str = ""


@message("layer_ready")
class LayerReady:
    """Unit `unit` of `model` is usable on `worker_id`. Units: 0 = embedding,
    1..L = decoder layers 0..L-1, L+1 = final norm and head."""

    worker_id: str
    model: str
    unit: int
    num_units: int
    seq: int
    ts: float
    # A `reset` event (unit = -1) means: this worker dropped its model; forget its units.
    reset: bool = False


@message("snapshot_request")
class SnapshotRequest:
    requester: str = ""


@message("worker_snapshot")
class WorkerSnapshot:
    worker_id: str
    state: WorkerState
    model: str | None
    ready_units: list[int]
    num_units: int
    seq: int


@message("load_model")
class LoadModel:
    model: str
    path: str
    decision_id: str = ""
    # The deployment's KV settings for this model (None: the worker's own flag/env default).
    kv_cache_mb: float | None = None
    max_model_len: int | None = None
    # Load one stage of a pipeline-parallel instance: the decoder layers [stage_start, stage_end)
    # and the units they need (embedding on the first stage, head on the last), as instance
    # `group`. stage_end 0: the whole model.
    group: str = ""
    stage_start: int = 0
    stage_end: int = 0


@message("unload_model")
class UnloadModel:
    decision_id: str = ""


@message("transfer_order")
class TransferOrder:
    """Loader → worker: this worker's part in one transfer (one chain, or one star branch) of a plan.

    role "receive": accept one data-plane connection for `transfer_id` presenting `token`, receive
    `units` in this order, and forward each to `downstream` (a data address) if set, same token.
    role "send": connect to `downstream` and stream `units` of the model this worker holds, at most
    `rate_limit_bps` bytes/s (0 = unlimited; set when the source is serving requests).
    role "disk": read `units` from the checkpoint at `path` itself (nothing on the network)."""

    transfer_id: str
    token: str
    model: str
    role: Literal["send", "receive", "disk"]
    units: list[int]
    num_units: int
    downstream: str | None = None
    rate_limit_bps: float = 0.0
    path: str = ""
    # A receiver that sees no connection (or no progress) for this long gives up and reports it.
    timeout_s: float = 30.0
    # Bytes of each unit in `units` (same order): a receiver reserves its buffers before the
    # source starts, so page faults on fresh memory stay out of the transfer.
    unit_nbytes: list[int] = field(default_factory=list)
    # The plan this order belongs to (for logs and `cascade tap`; the transfer id is what counts).
    plan_id: str = ""
    # For an order that starts the model here ("receive", "disk"): the deployment's KV settings
    # for it, as in `LoadModel` (None: the worker's own flag/env default).
    kv_cache_mb: float | None = None
    max_model_len: int | None = None


@message("transfer_event")
class TransferEvent:
    """Worker → loader (and `cascade tap`): how this worker's part of one transfer ended.

    kind "complete": every unit of the order is in (receive, disk) or sent (send);
    "failed": the transfer stopped, `reason` says why. A receiver keeps the units it verified
    (`units_held`, front to back) for a while, so a re-plan can continue from there;
    "forward_failed": a receiver lost its downstream hop; it keeps receiving for itself."""

    worker_id: str
    transfer_id: str
    model: str
    role: Literal["send", "receive", "disk"]
    kind: Literal["complete", "failed", "forward_failed"]
    reason: str = ""
    units_held: int = 0  # units of the model this worker holds, all verified, front to back
    num_units: int = 0
    nbytes: int = 0  # moved by this worker for this transfer
    seconds: float = 0.0
    ts: float = 0.0


@message("planned_chain")
class PlannedChain:
    """One chain of a transfer plan as `cascade tap` shows it (no token: the plan is public)."""

    transfer_id: str
    source: str  # a worker id, "host-cache" or "disk" (each target reads the checkpoint itself)
    targets: list[str]
    units: list[int]
    rate_limit_bps: float = 0.0


@message("transfer_plan")
class TransferPlanned:
    """Loader → everyone: a transfer plan it is about to carry out (also every re-plan)."""

    plan_id: str
    decision_id: str
    model: str
    mode: str  # multicast | host-cache | disk | star
    chains: list[PlannedChain]
    num_units: int
    nbytes: int  # of the whole model
    note: str = ""  # why this shape: fallbacks taken, what a re-plan replaces
    replaces: str = ""  # for a re-plan: the transfer id of the chain it repairs
    ts: float = 0.0


@message("host_cache_request")
class HostCacheRequest:
    """Operator → loader: put a model in the host cache now, or release it now."""

    action: Literal["load", "release"]
    model: str


@message("host_copies")
class HostCopies:
    """Loader → loaders: the host-memory copies this loader holds, every pulse and after each
    change. The leader counts them against each model's `host_copies` and heads chains from any
    of them (a follower's copy sends when the leader orders it, on `loader_send`)."""

    loader_id: str
    host: str  # --host-id: copies on distinct hosts are preferred
    models: list[str]  # held and ready to send
    filling: list[str] = field(default_factory=list)  # being read into the cache now
    cache: bool = True  # False: --host-cache off, never a copy here


@message("host_copy_order")
class HostCopyOrder:
    """Leading loader → one loader: hold a copy of `model` (fill it from the checkpoint at `path`)
    or drop it. Answered `Ok` at once; the fill runs in the background and shows in `HostCopies`."""

    action: Literal["fill", "drop"]
    model: str
    path: str
    leader: str


@message("model_files_request")
class ModelFilesRequest:
    """Anyone → loaders: a piece of a model's small files (config, tokenizer, …; modelfiles.py's
    blob), for a service that cannot see the model store. `digest` pins the blob after the first
    piece: a loader holding another version of the files stays silent."""

    model: str
    offset: int = 0
    digest: str = ""


@message("model_files_chunk")
class ModelFilesChunk:
    """Loader → asker: `data` (base64) is the blob's bytes from `offset`; `total` its length."""

    model: str
    digest: str
    total: int
    offset: int
    data: str


# --------------------------------------------------------------------------- requests


@message("sampling")
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # A migrated request (its worker was lost mid-stream): how many output tokens an earlier
    # instance already streamed. They end the prompt; the worker resumes after them: a seeded
    # stream past their draws, the text and stop-string matching after their text.
    resumed: int = 0
    # Log probabilities: None asks for none; k >= 0 for each sampled token's own and the top k
    # (`logprobs`), for each prompt token's (`prompt_logprobs`, vLLM's; echo uses it too).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Penalties (OpenAI's presence/frequency over the output, transformers' repetition penalty
    # over prompt and output); neutral by default.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Choices: n sequences share the prompt's prefill and KV blocks, each decodes on its own.
    n: int = 1
    # Structured outputs: an llguidance grammar (cascade/structured.py) masking every token; "": none.
    grammar: str = ""
    # A migrated n > 1 request goes on as one sequence per unfinished choice (n = 1): which choice
    # this is (its events carry it; a seeded choice draws from seed + choice).
    choice: int = 0
    # Special tokens whose text the output keeps (a tool parser's markers, such as Mistral's
    # [TOOL_CALLS]); every other special token is left out of the text.
    keep_special: list[int] = field(default_factory=list)


@message("token_logprob")
class TokenLogprob:
    """A token's log probability and, when asked for, the top alternatives at its position
    (`top_ids[i]` has `top_logprobs[i]`, most likely first)."""

    token: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    rank: int = 0  # 1 + how many tokens were more likely (0: not computed)


@message("route_stage")
class RouteStage:
    """One stage of a pipelined route: `worker_id` runs decoder layers [start, end); the first
    stage also runs the embedding, the last the head. `stage_addr` is its stage link (host:port)."""

    worker_id: str
    start: int
    end: int
    stage_addr: str = ""


@message("generate_request")
class GenerateRequest:
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    # Empty: the receiving worker runs the whole model. Otherwise the pinned pipeline; the request
    # is sent to route[0], which drives it (owns the token loop).
    route: list[RouteStage] = field(default_factory=list)
    # Wall-clock time (epoch s) the gateway accepted it: workers start prompts oldest first across
    # their own and relayed work, so a pipelined route cannot overtake a backlog. 0: unknown (now).
    arrived_at: float = 0.0
    # The gateway's dispatch number for this request (1, 2, ... across retries and migrations),
    # echoed in its events: a late event of an earlier dispatch to the same worker is told apart.
    attempt: int = 0


@message("generate_batch")
class GenerateBatch:
    gateway_id: str
    requests: list[GenerateRequest]
    # Where the gateway takes token events directly (cascade/tokenlink.py), "host:port", and the
    # key a link must present; empty: publish them on its tokens subject (NATS), as before.
    token_addr: str = ""
    token_key: str = ""
    # The same listener's Unix socket in the abstract namespace ("@name"), for a worker in the
    # gateway's own network namespace to try first; empty: none (not Linux, or off).
    token_local: str = ""


@message("rejection")
class Rejection:
    request_id: str
    code: str  # "overloaded" | "wrong_model" | "too_long" | "draining" | "invalid"
    message: str


@message("batch_reply")
class BatchReply:
    accepted: list[str]
    rejected: list[Rejection] = field(default_factory=list)


@message("token_event")
class TokenEvent:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # Where its first token stands in the worker's output for this request (-1: not told): a
    # gateway that sees it run ahead knows events were lost (the broker restarted between them).
    index: int = -1
    # One per token of `token_ids` when the request asked for logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Once, on the request's first event, when it asked for prompt_logprobs: one per prompt
    # token, None for the first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Which of the request's n choices it belongs to (`index` counts within the choice).
    choice: int = 0
    # The dispatch it answers (GenerateRequest.attempt; 0: not told).
    attempt: int = 0


@message("token_events")
class TokenEvents:
    """All token events of one engine step for one gateway: one message per step, not per token."""

    worker_id: str
    events: list[TokenEvent]
    batch_size: int = 0


@message("cancel")
class Cancel:
    request_ids: list[str]


# --------------------------------------------------------------------------- scaling


@message("scale_decision")
class ScaleDecision:
    decision_id: str
    model: str
    action: Literal["up", "down"]
    count: int
    target_replicas: int
    reason: str
    figures: dict[str, float] = field(default_factory=dict)
    ts: float = 0.0
    # Where new instances get their parameters for this decision only ("multicast", "host-cache",
    # "disk"; "" = the deployment's `loading`). Benchmarks compare modes in one run with it.
    loading: str = ""
    # The model's scaling policy when it was decided, and what set the target: "load" (the
    # policy's reading of the load), "target" (an operator's target or the replica bounds),
    # "lend" (an instance given to a model that waits on an empty pool). Metrics count by these;
    # `reason` stays the free text.
    policy: str = ""
    trigger: str = ""
    # Workers the loader must not choose for an up: they failed this model lately and are in
    # the scaler's back-off for it (services/scaler/backoff.py).
    avoid: list[str] = field(default_factory=list)


@message("active_decisions_request")
class ActiveDecisionsRequest:
    """Scaler → loader: which decisions are you carrying out? (A scaler that (re)starts, or sees a
    loader start, takes them as its own in flight instead of deciding the same gap again.)"""

    requester: str = ""


@message("active_decisions")
class ActiveDecisions:
    """The loader's decisions not acked yet, oldest first."""

    decisions: list[ScaleDecision]
    loader_id: str = ""


@message("scale_ack")
class ScaleAck:
    decision_id: str
    model: str
    ok: bool
    workers: list[str] = field(default_factory=list)
    error: str = ""
    ts: float = 0.0
    # Per worker that failed this decision, why (the scaler backs off from that worker for the model).
    failed: dict[str, str] = field(default_factory=dict)


@message("scale_request")
class ScaleRequest:
    model: str
    replicas: int


@message("planned_model")
class PlannedModel:
    """One model of a placement plan as the scaler keeps it: `instances` pipelined instances of
    `stages` stages each (cascade/planapply.py)."""

    model: str
    instances: int
    stages: int


@message("apply_plan")
class ApplyPlan:
    """Operator (`cascade apply`) → scaler: make these models' planned counts their floor and
    target (min_replicas = target = instances, max_replicas raised to it if below) and their stage
    count the plan's. All or nothing: one model that cannot take it refuses the whole request."""

    models: list[PlannedModel]
    plan: str = ""  # where the plan came from (a file name), for the logs


@message("plan_applied")
class PlanApplied:
    """The scaler's answer to `ApplyPlan`: the models whose bounds, stages or target changed, and
    one line per model saying what it holds now."""

    changed: list[str]
    lines: list[str] = field(default_factory=list)


@message("set_batch_limit")
class SetBatchLimit:
    """Scaler → worker: run at most `max_batch` sequences per engine step from now on (the
    two-stage policy's vertical action). The worker bounds it by the KV slots it allocated;
    0 = back to the limit it was started with."""

    max_batch: int
    decision_id: str = ""
    reason: str = ""


@message("batch_limit")
class BatchLimit:
    """A worker's answer to `SetBatchLimit`: the limit now in force (bounded by `kv_slots`)."""

    worker_id: str
    model: str
    max_batch: int
    requested: int
    kv_slots: int


@message("deploy_request")
class DeployRequest:
    """Operator → scaler (`cascade deploy`): change a model's scaling policy and knobs at run
    time. An empty `policy` keeps the current one; `knobs` are merged into the current knobs
    unless the policy changes or `replace_knobs` is set (then they replace them). A request that
    changes nothing just reads the model's settings."""

    model: str
    policy: str = ""
    knobs: dict[str, float] = field(default_factory=dict)
    replace_knobs: bool = False
    # Deploy a new model: its deployment entry in the deployment file's JSON form (name, path,
    # min/max replicas, policy, knobs, loading, scaling, source), path already resolved by the CLI.
    add: dict[str, Any] | None = None


@message("deployment_changed")
class DeploymentChanged:
    """Scaler → every service: the deployment now holds these models (the JSON form of the
    deployment file's entries); `added` names the ones new in this change."""

    models: list[dict[str, Any]]
    added: list[str] = field(default_factory=list)


@message("deployment_request")
class DeploymentRequest:
    """Any service → scaler: what is the deployment now? (A service that starts after models were
    deployed at run time learns them from the answer.)"""

    requester: str = ""


@message("deployment_reply")
class DeploymentReply:
    """The scaler's deployment: every model's entry in the deployment file's JSON form."""

    models: list[dict[str, Any]]
    scaler_id: str = ""


@message("deploy_reply")
class DeployReply:
    """The model's scaling settings after a `DeployRequest`: `knobs` as set, `effective` with
    every knob the policy reads (defaults filled in)."""

    model: str
    policy: str
    knobs: dict[str, float]
    effective: dict[str, float]
    min_replicas: int
    max_replicas: int
    target_replicas: int
    changed: bool = False
    batch_limit: int = 0  # the vertical limit the policy holds its instances at (0 = none)


# --------------------------------------------------------------------------- load metrics

# Latency histograms in metrics messages share these bucket upper bounds (ms): geometric, ratio
# 2^(1/4) (each bucket about 19 % wide: a percentile read back is off by at most that), from
# 0.5 ms to about 2 minutes. Fixed bounds make histograms from several gateways and intervals add up by
# index, which raw percentiles cannot. Index len(LATENCY_BUCKETS_MS) is the overflow bucket.
LATENCY_BUCKETS_MS: tuple[float, ...] = tuple(0.5 * 2 ** (i / 4) for i in range(72))


def latency_bucket(ms: float) -> int:
    """Index of the histogram bucket that counts a latency of `ms` milliseconds."""
    return bisect.bisect_left(LATENCY_BUCKETS_MS, ms)


@message("model_metrics")
class ModelMetrics:
    """Gateway → scaler, every metrics interval, one per model it saw traffic for (or still holds
    requests of): what happened in (ts - interval_s, ts], plus gauges at ts.

    `ttft_hist` / `itl_hist` count time-to-first-token and inter-token gaps per
    `LATENCY_BUCKETS_MS` bucket; trailing empty buckets may be left out."""

    gateway_id: str
    model: str
    seq: int = 0
    ts: float = 0.0
    interval_s: float = 1.0
    arrivals: int = 0
    completions: int = 0
    errors: int = 0  # requests that ended with an error or were refused (429/503)
    prompt_tokens: int = 0  # of the requests that arrived
    generated_tokens: int = 0  # streamed to clients in the interval
    running: int = 0  # gauge: placed on a worker, not finished
    waiting: int = 0  # gauge: admitted, queued in the gateway (includes requests held for a model at zero)
    ttft_hist: list[int] = field(default_factory=list)
    itl_hist: list[int] = field(default_factory=list)
    last_arrival_ts: float = 0.0  # wall time of the latest arrival so far (0 = none yet)


@message("step_stat")
class StepStat:
    """Engine steps of one batch size in a metrics interval (the two-stage policy fits its
    step-latency model on these)."""

    batch: int
    steps: int
    total_ms: float
    prefill_tokens: int = 0


@message("instance_metrics")
class InstanceMetrics:
    """Worker → scaler, every metrics interval while it holds a model: its load and its engine
    steps in (ts - interval_s, ts]."""

    worker_id: str
    model: str
    seq: int = 0
    ts: float = 0.0
    interval_s: float = 1.0
    state: WorkerState = "serving"
    running: int = 0
    waiting: int = 0
    max_batch: int = 0  # the batch limit in force now (the two-stage policy may change it)
    tokens_per_s: float = 0.0  # generated tokens/s over the interval
    prompt_tokens: int = 0  # prefilled in the interval
    generated_tokens: int = 0
    steps: list[StepStat] = field(default_factory=list)
    kv_slots: int = 0  # the most `max_batch` can be raised to
    # The paged KV cache (names as vLLM's metrics): blocks held over usable blocks (0..1), free
    # blocks, preemptions since start, prompt tokens looked up in / found in the prefix cache since start.
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


# --------------------------------------------------------------------------- mesh


@message("status_request")
class StatusRequest:
    requester: str = ""


@message("service_status")
class ServiceStatus:
    service: str
    instance: str
    pid: int
    detail: dict[str, Any] = field(default_factory=dict)


@message("service_ready")
class ServiceReady:
    service: str
    instance: str
    pid: int


MESSAGE_TYPES: dict[str, type[Any]] = _REGISTRY


@message("set_quota")
class SetQuota:
    """Scaler (or an operator) → an instance on a shared worker: its compute quota from the next
    engine step on, a share relative to the quotas of the other instances on that worker
    (docs/pipelined-and-shared.md). Answered with `QuotaSet`, or `ErrorReply` `bad_quota`."""

    quota: float
    decision_id: str = ""
    reason: str = ""


@message("quota_set")
class QuotaSet:
    """A quota applied on a worker (the reply to `SetQuota`, also published as an event): the
    instance's quota, its share of the worker's steps while every instance there has work
    (quota / sum of quotas), and every instance's quota on that worker."""

    worker_id: str
    device: str
    quota: float
    share: float
    quotas: dict[str, float] = field(default_factory=dict)
    decision_id: str = ""
    reason: str = ""
    ts: float = 0.0


@message("placed_stage")
class PlacedStage:
    """One stage of a pipelined instance: the worker and its decoder layers [start, end)."""

    worker_id: str
    start: int
    end: int


@message("instance_placed")
class InstancePlaced:
    """Loader → everyone: where a pipelined instance's stages are (docs/pipelined-and-shared.md).
    `state`: "loading" when the stages are ordered, "serving" once every stage serves, "failed"
    (its stages are unloaded; `reason` says why) or "removed" (scaled down)."""

    decision_id: str
    model: str
    group: str
    stages: list[PlacedStage]
    state: Literal["loading", "serving", "failed", "removed"]
    reason: str = ""
    ts: float = 0.0
