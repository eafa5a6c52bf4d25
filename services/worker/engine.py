"""The worker's execution engine: iteration-level (continuous) batching, with
stage work for pipelined (partial-layer) routes batched into the same steps.

Three kinds of sequences live here:

- **full**: this worker runs the embedding, every layer and the head.
- **driven**: the first stage of a pipelined route. This worker runs the
  embedding and layers [0, k), sends the hidden states to the next stage, and
  gets the sampled token back from the last stage. It owns the token loop:
  detokenising, stop strings, max_tokens, events to the gateway, cancellation.
- **relayed**: a later stage of somebody else's route. Hidden states come in,
  this worker runs its layers (and the head and sampling when it is the last
  stage) and sends the result on.

Prompts are prefilled in chunks: a step computes at most `max_prefill_tokens`
prompt tokens, so a long prompt takes several steps and the sequences decoding
beside it keep their pace (Sarathi-Serve's chunked prefill, on by default in
vLLM); a driven sequence sends each chunk's hidden states down its route as it
goes. `step()` runs every segment in one `forward_segments` pass so a busy full
instance reads each weight once per step for its own and the relayed work.

KV memory is paged (vLLM's block manager; kvblocks.py): every sequence, in any
role, holds a block table into the one pool of this worker, over the layers it
runs here. A full sequence is admitted when the blocks of its prompt are free
(less what the prefix cache already holds); when a decode step needs a block and
none is free, the most recently admitted full sequence is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed (its
prompt and the tokens it generated, prefilled again) and to go on from there, so
its stream pauses and resumes with no gap and no repeat. Stage sequences are not
preempted (their route spans other workers); they wait for blocks instead.

Threads: `step()`, `set_max_batch()` and everything that touches sequences or
the model run on the worker's engine thread (runner.py), the only thread that
writes this state. The event loop calls `submit`, `cancel`, `stage_frame` and
`peer_failed`, which only append to thread-safe deques that `step()` drains,
and reads `figures` (an immutable snapshot the engine thread replaces after
every step) and `load()`.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch

from cascade.device_profile import LayerWork
from cascade.messages import RouteStage, SamplingParams, TokenEvent, TokenLogprob
from cascade.models.tokenizer import IncrementalDecoder, Tokenizer
from cascade.stagewire import StageClose, StageError, StageFrame, StageInput, StageToken
from services.worker.admission import Staged, admit
from services.worker.grammar import GrammarMasks
from services.worker.kvblocks import (
    NULL_BLOCK,
    BlockManager,
    KVGeometry,
    block_key,
    block_keys,
    blocks_for,
    cap_model_len,
)
from services.worker.model import LlamaModel, PagedKV, Segment, prefill_inputs
from services.worker.sampling import LogprobsMode, SampleRow, prompt_logprobs, sample, skip_draws

if TYPE_CHECKING:
    from cascade.device_profile import StepPadder


def _generator(params: SamplingParams, vocab: int, choice: int = 0) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    if params.seed is None:
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    # Each choice of a seeded request draws from its own stream, reproducibly.
    gen = torch.Generator().manual_seed(params.seed + choice)
    skip_draws(gen, params.resumed, vocab)
    return gen


def history_row(
    params: SamplingParams, generator: torch.Generator | None, prompt: list[int], output: list[int]
) -> SampleRow:
    """A sequence's row of the sampler. A migrated request's streamed tokens end its prompt here
    but were its output: the penalties count them as output, so its sampling state moves with it."""
    r = params.resumed
    if 0 < r <= len(prompt):
        return SampleRow(params, generator, prompt[:-r], prompt[-r:] + output)
    return SampleRow(params, generator, prompt, output)


def _counts_history(params: SamplingParams) -> bool:
    """Its sampling depends on the tokens so far (a later stage must be told the prompt)."""
    return (
        params.presence_penalty != 0
        or params.frequency_penalty != 0
        or params.repetition_penalty != 1
        or bool(params.grammar)
    )


def _needs_prompt_ids(params: SamplingParams) -> bool:
    """A route's last stage must be told the prompt: its sampling counts tokens, or it scores
    the prompt (prompt_logprobs)."""
    return _counts_history(params) or (params.prompt_logprobs is not None and params.resumed == 0)


def _resume_text(seq: Sequence, streamed: list[int]) -> None:
    """A migrated request: its detokeniser and stop matching pick up after the output the lost
    instance streamed. That instance held back the same tail (the last max_stop - 1 characters,
    and any incomplete character), so the client sees it once, from here."""
    text = seq.decoder.push(streamed)
    keep = seq.max_stop - 1
    if seq.params.stop and keep > 0:
        seq.held = text[-keep:]


# Identity, not value, equality: `seq in self.running` compared every field of every sequence (a
# step's worth of list compares at batch 32), and n choices forked off one prompt are alike in
# nearly every field.
@dataclass(slots=True, eq=False)
class Sequence:
    """A request this worker drives (full, or the first stage of a route)."""

    request_id: str
    gateway_id: str
    prompt: list[int]
    params: SamplingParams
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    route: list[RouteStage] = field(default_factory=list)  # empty: full
    generated: list[int] = field(default_factory=list)
    held: str = ""  # text held back because it may be the start of a stop string
    max_stop: int = 0
    finish: str | None = None
    stop_hit: bool = False
    # Ended by an end-of-sequence token: it is not text, but it was generated, and usage counts it
    # (as vLLM and transformers' generate do).
    eos_hit: bool = False
    error: str | None = None
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_lps: list[TokenLogprob] = field(default_factory=list)
    # Prompt logprobs (asked for with prompt_logprobs): filled as its prompt is computed, sent
    # once with its first event.
    prompt_lps: list[TokenLogprob | None] | None = None
    prompt_lps_sent: bool = False
    arrived_at: float = 0.0  # wall clock at the gateway: prompts start oldest first
    attempt: int = 0  # the gateway's dispatch number, echoed in every event
    done: int = 0  # prompt tokens computed so far (prefilled in chunks, or found in the prefix cache)
    chunk: int = 0  # prompt tokens in the step being computed
    # The KV blocks it holds here, in position order (any role).
    table: list[int] = field(default_factory=list)
    # full only: tokens prefilled before the first new token (its prompt, and after a preemption
    # the tokens it had generated too); prefix-cache keys of its full blocks, and how many of its
    # blocks are registered under theirs; its admission's number (preemption takes the highest).
    target: int = 0
    keys: list[bytes] = field(default_factory=list)
    registered: int = 0
    admitted: int = 0
    # n > 1: which choice this is; whether the choices were forked off it yet (until then it
    # holds a batch slot per choice, and a spare block per other choice when its prompt ends
    # in a part-filled block, so the fork never waits for memory).
    choice: int = 0
    forked: bool = False
    fork_blocks: list[int] = field(default_factory=list)
    # Structured outputs: its llguidance matcher (made on first use, from params.grammar), which
    # has consumed every token it generated.
    matcher: Any = None
    # driven only
    next_ids: list[int] | None = None  # input of the next stage-0 pass; None while awaiting a token
    prefilled: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    def ids(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def stage_key(self) -> str:
        """Its name on a route's stage link. An n > 1 request on a route runs as one sequence
        per choice under the request's id; the stages hold one state per key, so a choice other
        than the first is named with its number."""
        return self.request_id if self.choice == 0 else f"{self.request_id}#{self.choice}"

    @property
    def slots(self) -> int:
        """Batch slots it holds: one per choice it will fork into."""
        return 1 if self.forked else self.params.n

    @property
    def wants_prompt_lps(self) -> bool:
        return self.params.prompt_logprobs is not None and not self.prompt_lps_sent

    def sample_row(self) -> SampleRow:
        return history_row(self.params, self.generator, self.prompt, self.generated)


class Pending(NamedTuple):
    """Hidden states for a relayed stage: a prompt chunk (positions start..start+T-1, `final`
    when it ends the prompt) or one decode token at `pos`."""

    prefill: bool
    pos: int
    hidden: torch.Tensor
    start: int = 0
    final: bool = True


@dataclass(slots=True)
class Relayed:
    """Stage work for a route another worker drives."""

    request_id: str
    driver: RouteStage
    route: list[RouteStage]
    index: int  # this worker's stage in the route
    params: SamplingParams
    generator: torch.Generator | None
    inputs: collections.deque[Pending] = field(default_factory=collections.deque)
    length: int = 0
    computing: Pending | None = None  # the input of the step under way
    arrived_at: float = 0.0  # the request's arrival at the gateway (wall clock)
    table: list[int] = field(default_factory=list)  # its KV blocks here
    # For sampling that counts tokens (penalties): the prompt, from the first chunk's frame, and
    # at the last stage the tokens it sampled.
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    matcher: Any = None  # structured outputs, at the last stage
    # prompt_logprobs, at the last stage: filled chunk by chunk (the head runs on every prompt
    # chunk), sent back to the driver once with the first token.
    prompt_lps: list[TokenLogprob | None] | None = None

    @property
    def stage(self) -> RouteStage:
        return self.route[self.index]

    @property
    def last(self) -> bool:
        return self.index == len(self.route) - 1


@dataclass(slots=True)
class Outgoing:
    """A stage-link frame to send, with its tensor if it carries one."""

    to: RouteStage
    frame: StageFrame
    tensor: torch.Tensor | None = None


@dataclass(slots=True)
class StepResult:
    events: list[tuple[str, TokenEvent]]  # (gateway id, event)
    outbox: list[Outgoing]
    batch_size: int
    prefilled: int
    decoded: int
    relayed: int
    # With an emulated device: how long this step would take there (the worker pads to it).
    target_s: float = 0.0
    prefill_tokens: int = 0  # prompt tokens of the sequences admitted in this step


@dataclass(frozen=True, slots=True)
class EngineFigures:
    """What the event loop may read of the engine (heartbeats, metrics, admission): replaced as a
    whole by the engine thread, never mutated."""

    running: int = 0  # full sequences in the batch or prefilling, and routes this worker drives
    waiting: int = 0  # admitted full sequences waiting for a slot (the inbox not counted)
    driven: int = 0  # routes it drives
    driven_layers: int = 0  # layers run for the routes it drives, summed over them
    relayed: int = 0  # stage sequences it computes for routes other workers drive
    # Prompt tokens queued and not computed yet, each role weighed by its share of the layers.
    prefill_queued: int = 0
    max_batch: int = 1
    tokens_per_s: float = 0.0
    # The paged KV cache, as vLLM names its metrics: kv_cache_usage_perc (blocks held / usable,
    # 0..1), num_free_blocks, num_preemptions_total, prefix_cache_queries/hits (in tokens).
    kv_cache_usage: float = 0.0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    max_model_len: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


# Generated tokens/s is measured over this trailing window.
_RATE_WINDOW_S = 5.0


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    tokens: int = 0
    relayed_steps: int = 0
    batch_hist: collections.Counter[int] = field(default_factory=collections.Counter)
    max_batch_seen: int = 0
    tokens_per_s: float = 0.0
    finished: collections.Counter[str] = field(default_factory=collections.Counter)
    prefilled: int = 0  # prompt tokens computed (a prefix found in the prefix cache is not)
    preemptions: int = 0
    _window: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def record(self, batch: int, tokens: int, now: float) -> None:
        self.steps += 1
        self.tokens += tokens
        if batch:
            self.batch_hist[batch] += 1
            self.max_batch_seen = max(self.max_batch_seen, batch)
        with self._lock:
            self._window.append((now, tokens))
            while self._window and now - self._window[0][0] > _RATE_WINDOW_S:
                self._window.popleft()
            span = now - self._window[0][0] if len(self._window) > 1 else 0.0
            self.tokens_per_s = sum(t for _, t in self._window) / span if span > 0 else 0.0

    def rate(self, now: float) -> float:
        """Generated tokens/s over the last few seconds up to `now` (monotonic). Unlike
        `tokens_per_s`, which only steps update, it falls to 0 when the engine goes quiet; safe
        to call from the event loop while the engine thread steps."""
        with self._lock:
            recent = [(t, n) for t, n in self._window if now - t <= _RATE_WINDOW_S]
        if not recent:
            return 0.0
        # At least a second: a first step alone must not read as a burst of thousands of tokens/s.
        return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)

    # ---- per metrics interval: written by the step (engine thread), taken by the metrics task
    interval: dict[int, list[float]] = field(default_factory=dict)  # batch → [steps, total ms, prefill tokens]
    interval_prompt: int = 0
    interval_generated: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def step_timed(self, batch: int, ms: float, prefill_tokens: int, generated: int) -> None:
        """One step's duration (padded to the emulated device, if any): the two-stage policy fits
        step latency against batch size on these."""
        with self._lock:
            self.interval_prompt += prefill_tokens
            self.interval_generated += generated
            if batch <= 0:
                return
            acc = self.interval.setdefault(batch, [0, 0.0, 0])
            acc[0] += 1
            acc[1] += ms
            acc[2] += prefill_tokens

    def take_interval(self) -> tuple[dict[int, list[float]], int, int]:
        """(steps by batch size, prompt tokens, generated tokens) since the last call; resets them."""
        with self._lock:
            out = (self.interval, self.interval_prompt, self.interval_generated)
            self.interval, self.interval_prompt, self.interval_generated = {}, 0, 0
        return out


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        max_batch: int = 32,
        max_prefill_tokens: int = 4096,
        worker_id: str = "",
        padder: StepPadder | None = None,
        kv_slots: int | None = None,
        emulated_token_scale: float = 1.0,
        kv_cache_bytes: int = 0,
        block_size: int = 16,
        prefix_caching: bool = True,
        max_model_len: int = 0,
        logprobs_mode: LogprobsMode = "raw",
        kv_layers: int = 0,
    ) -> None:
        self.model = model
        self.logprobs_mode: LogprobsMode = logprobs_mode
        self.padder = padder
        # With an emulated device, each real prompt/context token is priced as this many: a small
        # model's short prompts stand for a real model's long ones, so the CPU work stays well under
        # the device time it pads to (long real prompts would overrun it on a 2-core machine).
        self.token_scale = emulated_token_scale
        self.tok = tokenizer
        self.worker_id = worker_id
        self.max_batch = max_batch
        # The most the batch limit may be raised to at run time (vertical scaling). KV memory is
        # the block budget's business, not the slots'.
        self.kv_slots = max(kv_slots or max_batch, max_batch)
        self.max_prefill_tokens = max_prefill_tokens
        self.cfg = model.cfg
        self.L = self.cfg.num_hidden_layers
        ctx = self.cfg.max_position_embeddings
        # A stage of a pipelined instance keeps K/V for its own layers only (`kv_layers`; 0: all),
        # so its budget buys blocks of that many layers.
        self.geometry = KVGeometry(
            kv_layers or self.L, self.cfg.num_key_value_heads, self.cfg.dim_per_head,
            torch.empty((), dtype=model.dtype).element_size(), block_size,
        )  # fmt: skip
        # Without a budget (an engine built by hand), room for kv_slots sequences at full context:
        # what the contiguous cache this replaced could grow to.
        budget = kv_cache_bytes or self.kv_slots * blocks_for(ctx, block_size) * self.geometry.bytes_per_block
        self.blocks = BlockManager(self.geometry.blocks_in(budget) + 1, block_size, prefix_caching)
        self.max_model_len = cap_model_len(ctx, max_model_len, self.blocks.total, block_size)
        # vLLM's watermark: a prompt is admitted only if 1 % of the blocks stay free after it, so
        # a fresh admission does not force a preemption at the very next decode step.
        self._watermark = self.blocks.total // 100
        self._kv: PagedKV | None = None  # made when the first sequence needs it
        self._admissions = 0
        self.running: list[Sequence] = []  # full sequences decoding, in admission order
        self.waiting: collections.deque[Sequence] = collections.deque()
        # Full sequences whose prompts are part-computed, oldest first; each holds a batch slot.
        self.prefilling: list[Sequence] = []
        self.driven: dict[str, Sequence] = {}
        self.relayed: dict[str, Relayed] = {}
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._cancels: collections.deque[str] = collections.deque()
        # Stage frames from peers, and peers lost (worker id, why), in arrival order.
        self._stage_in: collections.deque[tuple[StageFrame | tuple[str, str], torch.Tensor | None]] = (
            collections.deque()
        )
        self._eos = set(tokenizer.eos_ids) | set(self.cfg.eos_ids)
        # Structured outputs: the step's token masks are computed on this thread while the model
        # runs the step (llguidance releases the interpreter lock), so the sequences of the batch
        # do not wait for the grammar work.
        self._grammar = GrammarMasks(tokenizer, self.cfg.vocab_size, sorted(self._eos))
        self._masks: dict[int, torch.Tensor] = {}
        self.stats = EngineStats()
        self.figures = self._figures()

    @property
    def kv(self) -> PagedKV:
        if self._kv is None:
            self._kv = PagedKV(
                self.cfg, range(self.L), self.blocks.num_blocks, self.geometry.block_size, self.model.device,
                self.model.dtype,
            )  # fmt: skip
        return self._kv

    def kv_bytes_held(self) -> int:
        """Bytes of the blocks sequences hold now (what the budget is spent on)."""
        return self.blocks.used_count() * self.geometry.bytes_per_block

    def set_max_batch(self, limit: int) -> int:
        """Set the batch limit, bounded by the KV slots; returns the limit in force. Running
        sequences above a lowered limit finish where they are; new ones wait for a free slot."""
        self.max_batch = max(1, min(limit, self.kv_slots))
        self.figures = self._figures()
        return self.max_batch

    # ------------------------------------------------------------ loop-thread API
    def submit(
        self,
        request_id: str,
        gateway_id: str,
        prompt: list[int],
        params: SamplingParams,
        route: list[RouteStage] | None = None,
        arrived_at: float = 0.0,
        attempt: int = 0,
    ) -> None:
        seq = Sequence(
            request_id=request_id,
            gateway_id=gateway_id,
            prompt=list(prompt),
            params=params,
            decoder=IncrementalDecoder(self.tok, params.keep_special),
            generator=_generator(params, self.cfg.vocab_size, params.choice),
            route=list(route or []) if route and len(route) > 1 else [],
            max_stop=max((len(s) for s in params.stop), default=0),
            arrived_at=arrived_at or time.time(),
            attempt=attempt,
            # One choice of an n > 1 request sent as one sequence per choice (migrated, or on a
            # pipelined route; n = 1 here): it goes on as that choice.
            choice=params.choice,
        )
        if 0 < params.resumed <= len(prompt):
            _resume_text(seq, prompt[-params.resumed :])
        self._inbox.append(seq)

    def warm_grammar(self) -> Future[None]:
        """Prepare structured outputs' tokenizer on their helper thread (the worker does it when it
        takes the model), so the first guided request's step does not stall its batch for it."""
        return self._grammar.warm()

    def cancel(self, request_id: str) -> None:
        self._cancels.append(request_id)

    def stage_frame(self, frame: StageFrame, tensor: torch.Tensor | None) -> None:
        """A frame from the stage link (input for a relayed sequence, a token for a driven one, a close)."""
        self._stage_in.append((frame, tensor))

    def peer_failed(self, worker_id: str, reason: str) -> None:
        """The stage link to `worker_id` broke: its routes cannot go on."""
        self._stage_in.append(((worker_id, reason), None))

    def prefill_budget(self) -> int:
        """Real prompt tokens one step computes at most (an emulated device prices each token at
        `token_scale`, so fewer real ones fit); never below one."""
        return max(1, int(self.max_prefill_tokens / (self.token_scale if self.padder is not None else 1.0)))

    def prefill_queued(self) -> int:
        """Prompt tokens waiting to be computed here, in full-model tokens (a prompt through k of L
        layers counts k/L of its length, as `_admit`'s budget does): full prompts waiting and the
        rest of those under way, driven routes' first stages not sent on yet, relayed prompt chunks
        arrived and not computed. A loading head's steps go to the routes it drives, so this is how
        long a new route's first stage would wait there (the gateway splits routes by it)."""
        tokens = float(sum(len(s.prompt) + len(s.generated) for s in self.waiting))
        tokens += sum(s.target - s.done for s in self.prefilling)
        for seq in self.driven.values():
            if seq.next_ids is not None and not seq.prefilled and seq.finish is None:
                first = seq.route[0]
                tokens += len(seq.next_ids) * (first.end - first.start) / max(self.L, 1)
        for rel in self.relayed.values():
            pending = sum(int(p.hidden.shape[1]) for p in rel.inputs if p.prefill)
            tokens += pending * self._share(rel)
        return round(tokens)

    def _figures(self) -> EngineFigures:
        b = self.blocks.stats()
        return EngineFigures(
            kv_cache_usage=b.usage,
            kv_blocks_free=b.free,
            kv_blocks_total=b.total,
            num_preemptions=self.stats.preemptions,
            prefix_cache_queries=b.prefix_queries,
            prefix_cache_hits=b.prefix_hits,
            max_model_len=self.max_model_len,
            running=len(self.running) + len(self.prefilling) + len(self.driven),
            waiting=len(self.waiting),
            driven=len(self.driven),
            # The gateway weighs a loading instance's room by it.
            driven_layers=sum(s.route[0].end - s.route[0].start for s in self.driven.values()),
            relayed=len(self.relayed),
            prefill_queued=self.prefill_queued(),
            max_batch=self.max_batch,
            tokens_per_s=self.stats.tokens_per_s,
        )

    def has_work(self) -> bool:
        """Something a step would compute or finish now."""
        return bool(
            self.running
            or (self.waiting and self._fits(self.waiting[0]))
            or self.prefilling
            or self._inbox
            or self._cancels
            or self._stage_in
            or any(s.next_ids is not None for s in self.driven.values())
            or any(r.inputs for r in self.relayed.values())
        )

    def in_flight(self) -> int:
        """Sequences alive here in any role (drain waits for zero)."""
        return (
            len(self.running)
            + len(self.prefilling)
            + len(self.waiting)
            + len(self._inbox)
            + len(self.driven)
            + len(self.relayed)
        )

    def load(self) -> tuple[int, int]:
        """(running, waiting) for heartbeats and admission, from any thread: the last step's
        figures, plus what was submitted since."""
        f = self.figures
        return f.running, f.waiting + len(self._inbox)

    # ------------------------------------------------------------ executor-thread API
    def step(self) -> StepResult:
        t0 = time.monotonic()
        events: list[tuple[str, TokenEvent]] = []
        outbox: list[Outgoing] = []
        while self._inbox:
            seq = self._inbox.popleft()
            if seq.route:
                self._start_driven(seq)
            else:
                self._enqueue(seq)
        self._apply_cancels(events, outbox)
        self._apply_stage_frames(events, outbox)

        segs: list[Segment] = []
        jobs: list[tuple[str, Any]] = []
        # Every decode's next block first, before any segment is built: this is where a full
        # sequence may be preempted, and a preempted one must not be in this step.
        decoding = self._grow_decodes()
        # The sequences the decode segment computes, row by row: stage work admitted below may
        # still preempt one of them (its row is then dropped, not given to another sequence).
        batch_rows = list(self.running)
        old = len(batch_rows)
        if old:
            segs.append(self._decode_segment())
            jobs.append(("decode", None))
        # Stage work past its prompt (one decode token each) goes every step: it is under way, and
        # holding it would stall a token loop on another worker. Routes that run the same layers
        # go as one segment: one attention call per layer for all of them, not one per route (a
        # busy instance relays for dozens of routes while a new one loads).
        for group in _stage_decode_groups(decoding):
            segs.append(self._stage_decode_segment(group))
            jobs.append(("stage_decode", group))
        new = self._admit(segs, jobs)
        chunked = sum(s.chunk for k, s in jobs if k == "chunk")
        if new:
            ids, pos, lens = prefill_inputs([s.ids() for s in new], self.model.device)
            seg = Segment(range(self.L), self.kv, self._tables(new), pos, lens, True, True, ids=ids)
            seg.all_logits = any(s.wants_prompt_lps for s in new)
            segs.append(seg)
            jobs.append(("prefill", new))
        batch = len(self.running)
        relayed = sum(1 for k, _ in jobs if k == "relayed") + sum(
            1 for k, g in jobs if k == "stage_decode" for r in g if isinstance(r, Relayed)
        )
        decoded = 0
        pending = self._grammar.start(self._guided(old, jobs))
        if segs:
            try:
                outs = self.model.forward_segments(segs)
            except (RuntimeError, ValueError) as e:
                self._fail_step(jobs, f"step failed: {e}")
                outs = []
            self._masks = self._grammar.finish(pending)
            for (kind, obj), seg, out in zip(jobs, segs, outs, strict=False):
                if kind == "decode":
                    rows = [k for k, q in enumerate(batch_rows) if q in self.running]
                    if len(rows) < old:
                        out = out[rows]
                    self._accept_sampled([batch_rows[k] for k in rows], out)
                    decoded += len(rows)
                elif kind == "prefill":
                    for b, s in enumerate(obj):
                        if s.wants_prompt_lps and seg.logits_all is not None:
                            self._record_prompt_lps(s, seg.logits_all[b], 0, len(s.ids()))
                    self._accept_sampled(obj, out)
                elif kind == "chunk":
                    if obj.wants_prompt_lps and seg.logits_all is not None:
                        self._record_prompt_lps(obj, seg.logits_all[0], obj.done, obj.chunk)
                    self._chunk_done(obj, out)
                elif kind == "driven":
                    self._send_driven(obj, out, outbox)
                elif kind == "stage_decode":
                    for b, one in enumerate(obj):
                        if isinstance(one, Relayed):
                            self._finish_relayed(one, out[b : b + 1], outbox)
                        else:
                            self._send_driven(one, out[b : b + 1], outbox)
                else:
                    if seg.logits_all is not None:
                        self._record_relayed_prompt_lps(obj, seg.logits_all[0])
                    self._finish_relayed(obj, out, outbox)
        self._retire_finished(events, outbox)
        for seq in [*self.running, *self.driven.values()]:
            plps = self._take_prompt_lps(seq)
            if seq.pending_ids or plps is not None:
                first = len(seq.generated) - len(seq.pending_ids)
                ev = TokenEvent(
                    seq.request_id, seq.pending_ids, seq.pending_text, index=first, logprobs=seq.pending_lps,
                    prompt_logprobs=plps, choice=seq.choice, attempt=seq.attempt,
                )  # fmt: skip
                events.append((seq.gateway_id, ev))
                seq.pending_ids, seq.pending_text, seq.pending_lps = [], "", []
        self.stats.record(batch + relayed, len(new) + decoded, time.monotonic())
        self.stats.relayed_steps += relayed
        target = self._emulated_s(segs) if self.padder is not None and segs else 0.0
        prompt = sum(s.target for s in new) + chunked
        self.stats.prefilled += prompt
        self._register_full_blocks()
        # With an emulated device the step lasts its target (the runner pads to it) unless compute overran.
        took = max(time.monotonic() - t0, target)
        self.stats.step_timed(batch + relayed, took * 1000, prompt, len(new) + decoded)
        self.figures = self._figures()
        return StepResult(events, outbox, batch, len(new), decoded, relayed, target, prompt)

    def _guided(self, old: int, jobs: list[tuple[str, Any]]) -> list[Sequence | Relayed]:
        """The sequences with a grammar that sample in this step: the decode batch, prompts that
        end in it, and relayed last stages."""
        out: list[Sequence | Relayed] = [s for s in self.running[:old] if s.params.grammar and s.finish is None]
        for kind, obj in jobs:
            if kind == "prefill":
                out += [s for s in obj if s.params.grammar]
            elif kind == "chunk" and obj.params.grammar and obj.done + obj.chunk >= obj.target:
                out.append(obj)
            elif kind == "relayed" and obj.params.grammar and obj.last:
                out.append(obj)
            elif kind == "stage_decode":
                out += [r for r in obj if isinstance(r, Relayed) and r.params.grammar and r.last]
        return out

    def _mask(self, obj: Sequence | Relayed) -> torch.Tensor | None:
        if not obj.params.grammar:
            return None
        m = self._masks.get(id(obj))
        if m is None:  # not foreseen before the step (cannot happen in order; computed here then)
            m = self._grammar.finish(self._grammar.start([obj]))[id(obj)]
        return m

    def _emulated_s(self, segs: list[Segment]) -> float:
        """The step's time on the emulated device: the decode batch, prompt tokens and KV tokens
        of each segment on the layers it ran, priced by the profile (`stage_step_ms`: each real
        layer stands for profile.layers / L profiled ones); plus per-step overhead and the head if
        one ran."""
        assert self.padder is not None
        parts = []
        head = False
        for seg in segs:
            head = head or seg.head
            if seg.prefill:
                # A later chunk also reads the prompt's cached keys and values once.
                n, c = int(seg.lengths.sum().item() * self.token_scale), int(seg.start * self.token_scale)
            else:
                n, c = 0, int(seg.positions.sum().item() * self.token_scale)
            b = 0 if seg.prefill else seg.positions.shape[0]
            parts.append(LayerWork(seg.layers.start, seg.layers.stop, b, n, c))
        return self.padder.profile.stage_step_ms(self.L, parts, head) / 1000

    # ------------------------------------------------------------ full sequences
    def _enqueue(self, seq: Sequence) -> None:
        """Add a full sequence to the waiting queue, kept in arrival order (a retry or a batch
        from a slower gateway may come in behind younger requests)."""
        w = self.waiting
        if not w or w[-1].arrived_at <= seq.arrived_at:
            w.append(seq)
            return
        i = len(w)
        while i > 0 and w[i - 1].arrived_at > seq.arrived_at:
            i -= 1
        w.insert(i, seq)

    def _admit(self, segs: list[Segment], jobs: list[tuple[str, Any]]) -> list[Sequence]:
        """Spend the step's prefill budget, oldest arrival first, whatever the role: full prompts
        waiting here (they also need a batch slot and the KV blocks of their prompt), the first
        stage of routes this worker drives, and relayed prompt chunks of routes other workers
        drive. Prompts already under way go first. A prompt that does not fit whole starts as a
        chunk of what is left. Returns the full sequences admitted whole; chunks and stage prompts
        are added to `segs`/`jobs`. The rule itself is `admission.admit` (the simulator runs it
        too); `_KVGate` answers its block questions from the paged cache, and this applies its answer.

        One budget for every role, in full-model prompt tokens (a prompt through k of L layers costs
        k/L of its length): without it a burst of prompts would make one giant step and stall every
        sequence's decode. Oldest first, because a pipelined route that jumped this worker's queue
        would push its backlog's latency up by just what it took off its own (measured in
        bench/scaleup.py: the window's p99 TTFT). The oldest prompt waits for its slot and its
        blocks, and younger ones wait behind it: letting stage work past would starve this
        worker's own backlog.

        Relayed stages do not take this worker's batch slots. Their compute is in every step they
        join (and in the emulated device's time), and the route's head admitted them under its own
        limit. Counting them here by their share of the layers was measured to make things worse
        (bench/scaleup.py): a two-stage route's decode joins every other step of this worker, so
        each one held its share twice as long, and a busy instance relaying for a new one admitted
        fewer of its own requests than it would have alone.
        """
        staged: list[tuple[float, int, str, Any]] = []
        for n, rel in enumerate(self.relayed.values()):
            if rel.inputs and rel.inputs[0].prefill:
                staged.append((rel.arrived_at, n, "relayed", rel))
        for n, seq in enumerate(self.driven.values()):
            if seq.next_ids is not None and seq.finish is None and not seq.prefilled:
                staged.append((seq.arrived_at, n, "driven", seq))
        staged.sort(key=lambda t: (t[0], t[1]))
        under = list(self.prefilling)
        gate = _KVGate(self, [obj for *_, obj in staged])
        cap = self.prefill_budget()
        plan = admit(
            cap,
            [s.target - s.done for s in under],
            gate,
            _StagedRows(staged, self),
            self.max_batch - len(self.running) - sum(s.slots for s in self.prefilling),
            cap,
            gate,
            idle=not self.running and not self.prefilling,
        )
        for seq, n in zip(under, plan.chunks, strict=False):
            if seq in self.prefilling:  # not preempted by stage work's blocks meanwhile
                self._take_chunk(seq, n, segs, jobs)
        new: list[Sequence] = []
        taken = iter(gate.taken)
        for kind, index, n in plan.takes:
            if kind == "whole":
                new.append(next(taken))
            elif kind == "start":
                # Part of its prompt is cached already, or it does not fit the step: in chunks.
                local = next(taken)
                self.prefilling.append(local)
                self._take_chunk(local, n, segs, jobs)
            elif kind == "relayed":
                # Chunked by the route's head, which holds chunks to this worker's budget.
                rel = staged[index][3]
                segs.append(self._relayed_segment(rel))
                jobs.append((kind, rel))
            else:
                seq = staged[index][3]
                seq.chunk = n
                segs.append(self._driven_segment(seq))
                jobs.append((kind, seq))
        self.running.extend(new)
        return new

    def _take_chunk(self, seq: Sequence, n: int, segs: list[Segment], jobs: list[tuple[str, Any]]) -> None:
        """Add the next `n` tokens of a full prompt under way as a chunk."""
        seq.chunk = n
        end = seq.done + n
        dev = self.model.device
        ids = torch.tensor([seq.ids()[seq.done : end]], device=dev)
        seg = prompt_chunk(range(self.L), self.kv, self._tables([seq]), seq.done, n, end == seq.target, dev, ids=ids)
        # Prompt logprobs need every position's logits, so every chunk runs the head then.
        seg.head = seg.head or seq.wants_prompt_lps
        seg.all_logits = seq.wants_prompt_lps
        segs.append(seg)
        jobs.append(("chunk", seq))

    def _chunk_done(self, seq: Sequence, out: torch.Tensor) -> None:
        """A chunk of a full prompt is computed; with the last one the sequence samples its next
        token and joins the batch (its blocks stay where they are)."""
        seq.done += seq.chunk
        seq.chunk = 0
        if seq.done < seq.target or seq.finish is not None:
            return
        self.prefilling.remove(seq)
        self.running.append(seq)
        self._accept_sampled([seq], out)

    # ------------------------------------------------------------ KV blocks
    def _fits(self, seq: Sequence) -> bool:
        """The blocks of `seq`'s prompt could be had now (not counting its prefix-cache hits)."""
        return self.blocks.can_allocate(blocks_for(len(seq.prompt) + len(seq.generated), self.geometry.block_size))

    def _reserve(self, seq: Sequence, busy: bool) -> bool:
        """Admit `seq` to the KV cache: take the blocks of its prompt that the prefix cache holds,
        allocate the rest; False (nothing taken) when they are not free. `busy`: other sequences
        hold blocks and will grow (vLLM's watermark then applies)."""
        bs = self.geometry.block_size
        ids = seq.ids()
        target = len(ids)
        hits: list[int] = []
        if self.blocks.prefix_caching:
            seq.keys = block_keys(ids, bs)
        # Prompt logprobs need the logits at every prompt position: a cached prefix has none
        # (vLLM recomputes such prompts too).
        if self.blocks.prefix_caching and not seq.wants_prompt_lps:
            # One token at least is computed, for the logits of the next one.
            hits = self.blocks.match(seq.keys[: (target - 1) // bs])
        need = blocks_for(target, bs) - len(hits)
        spare = (seq.params.n - 1) if not seq.forked and target % bs else 0
        if not self.blocks.can_allocate(need + spare + (self._watermark if busy else 0)):
            self.blocks.free(hits)
            return False
        self.blocks.record_query(target, len(hits) * bs)
        seq.table = hits + [self.blocks.allocate() for _ in range(need)]
        seq.fork_blocks = [self.blocks.allocate() for _ in range(spare)]
        seq.registered = len(hits)
        seq.done = len(hits) * bs
        seq.target = target
        self._admissions += 1
        seq.admitted = self._admissions
        return True

    def _grow(self, table: list[int], tokens: int, own: Sequence | None = None) -> bool:
        """Blocks in `table` for `tokens` tokens, preempting the most recently admitted full
        sequences while none is free. False when that is not possible (or `own` itself was the
        one preempted)."""
        need = blocks_for(tokens, self.geometry.block_size) - len(table)
        while need > 0:
            if self.blocks.can_allocate(1):
                table.append(self.blocks.allocate())
                need -= 1
                continue
            victim = max([*self.running, *self.prefilling], key=lambda q: q.admitted, default=None)
            if victim is None:
                return False
            self._preempt(victim)
            if victim is own:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a full sequence's blocks and queue it again, to be recomputed (vLLM's preemption
        by recompute): its prompt and what it generated are prefilled anew when blocks free up,
        and it samples on from there. Its stream just pauses: every token sent stays sent."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.prefilling.remove(seq)
        self.blocks.free(seq.table + seq.fork_blocks)
        seq.table, seq.keys, seq.registered, seq.done, seq.chunk, seq.fork_blocks = [], [], 0, 0, 0, []
        self.stats.preemptions += 1
        self._enqueue(seq)

    def _grow_decodes(self) -> list[Relayed | Sequence]:
        """A block for every decode that starts a new one: full sequences oldest first, then the
        stage work past its prompt. Returns that stage work, less what must wait for a block."""
        for seq in sorted(self.running, key=lambda q: q.admitted):
            if seq in self.running:  # not preempted meanwhile
                self._grow(seq.table, seq.length, own=seq)
        out: list[Relayed | Sequence] = []
        for rel in self.relayed.values():
            if rel.inputs and not rel.inputs[0].prefill and self._grow(rel.table, rel.inputs[0].pos + 1):
                out.append(rel)
        for seq in self.driven.values():
            if seq.next_ids is not None and seq.finish is None and seq.prefilled and self._grow(seq.table, seq.length):
                out.append(seq)
        return out

    def _register_full_blocks(self) -> None:
        """Offer every block that filled up in this step to the prefix cache, under the key of its
        tokens and all before them."""
        if not self.blocks.prefix_caching:
            return
        bs = self.geometry.block_size
        for seq in [*self.running, *self.prefilling]:
            computed = seq.done if seq in self.prefilling else seq.length - 1
            full = min(computed // bs, len(seq.table))
            if full <= seq.registered:
                continue
            ids = seq.ids()
            while len(seq.keys) < full:
                b = len(seq.keys)
                seq.keys.append(block_key(seq.keys[-1] if b else b"", ids[b * bs : (b + 1) * bs]))
            for b in range(seq.registered, full):
                self.blocks.register(seq.table[b], seq.keys[b])
            seq.registered = full

    def _tables(self, seqs: list[Sequence] | list[Relayed]) -> torch.Tensor:
        """Block tables [B, longest], padded with the null block."""
        width = max(len(s.table) for s in seqs)
        rows = [s.table + [NULL_BLOCK] * (width - len(s.table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.model.device)

    def _share(self, rel: Relayed) -> float:
        """A relayed stage's share of a full sequence's work: its layers over the model's."""
        return (rel.stage.end - rel.stage.start) / max(self.L, 1)

    def _decode_segment(self) -> Segment:
        dev = self.model.device
        last = torch.tensor([[s.generated[-1] if s.generated else s.prompt[-1]] for s in self.running])
        positions = torch.tensor([[s.length - 1] for s in self.running])
        return Segment(
            range(self.L),
            self.kv,
            self._tables(self.running),
            positions.to(dev),
            (positions[:, 0] + 1).to(dev),
            False,
            True,
            ids=last.to(dev),
        )

    def _accept_sampled(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        if any(not s.forked and s.params.n > 1 for s in seqs):
            # Prompts just computed for n choices: fork them here, so every choice samples its
            # first token from the same logits (one prefill, n decodes).
            rows: list[int] = []
            out: list[Sequence] = []
            for b, s in enumerate(seqs):
                group = self._fork(s) if not s.forked and s.params.n > 1 else [s]
                out += group
                rows += [b] * len(group)
            seqs, logits = out, logits[rows]
        sample_rows = [s.sample_row() for s in seqs]
        for s, r in zip(seqs, sample_rows, strict=True):
            r.allowed = self._mask(s)
        toks, lps = sample(logits, sample_rows, self.logprobs_mode)
        for seq, tok, lp in zip(seqs, toks, lps, strict=True):
            self._accept_token(seq, tok, lp)

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """`seq` (choice 0) and its n - 1 other choices, which share its full prompt blocks (their
        refcounts go up) and each get their own copy of a part-filled last block. They join the
        running batch right behind it."""
        bs = self.geometry.block_size
        full = seq.length // bs
        out = [seq]
        seq.forked = True
        spare = seq.fork_blocks
        seq.fork_blocks = []
        for i in range(1, seq.params.n):
            table = seq.table[:full]
            self.blocks.share(table)
            if len(seq.table) > full:
                table = [*table, spare[i - 1]]
                self.kv.copy_block(seq.table[full], spare[i - 1])
            child = Sequence(
                request_id=seq.request_id, gateway_id=seq.gateway_id, prompt=seq.prompt, params=seq.params,
                decoder=IncrementalDecoder(self.tok, seq.params.keep_special),
                generator=_generator(seq.params, self.cfg.vocab_size, i),
                max_stop=seq.max_stop, arrived_at=seq.arrived_at, done=seq.done, table=table, target=seq.target,
                keys=list(seq.keys), registered=min(seq.registered, full), admitted=seq.admitted, choice=i,
                forked=True, prompt_lps_sent=True, attempt=seq.attempt,
                matcher=seq.matcher.deep_copy() if seq.matcher is not None else None,
            )  # fmt: skip
            if id(seq) in self._masks:  # the same state as its parent's: the same first mask
                self._masks[id(child)] = self._masks[id(seq)]
            out.append(child)
        at = self.running.index(seq) + 1 if seq in self.running else len(self.running)
        self.running[at:at] = out[1:]
        return out

    def _record_prompt_lps(self, seq: Sequence, logits: torch.Tensor, start: int, n: int) -> None:
        """Prompt logprobs from the logits of positions start..start+n-1 [>= n, V]: position p
        predicts prompt token p + 1."""
        if start == 0:
            seq.prompt_lps = [None]  # nothing predicts the first token (a recompute starts over)
        if seq.prompt_lps is None or len(seq.prompt_lps) != start + 1:
            return
        targets = seq.prompt[start + 1 : min(start + n + 1, len(seq.prompt))]
        seq.prompt_lps.extend(prompt_logprobs(logits[: len(targets)], targets, seq.params.prompt_logprobs or 0))

    def _take_prompt_lps(self, seq: Sequence) -> list[TokenLogprob | None] | None:
        """Its prompt logprobs, once, when every prompt token has one."""
        lps = seq.prompt_lps
        if not seq.wants_prompt_lps or lps is None or len(lps) < len(seq.prompt):
            return None
        seq.prompt_lps_sent = True
        seq.prompt_lps = None
        return lps

    def _accept_token(
        self, seq: Sequence, tok: int, lp: TokenLogprob | None = None, grammar_done: bool = False
    ) -> None:
        if seq.finish is not None:
            return
        eos = tok in self._eos
        if seq.params.grammar and seq.route:
            # A route's last stage holds the matcher and said whether the grammar ended here.
            if eos and grammar_done:
                seq.finish, seq.eos_hit = "stop", True
                return
        elif seq.params.grammar:
            ended = self._grammar.consume(seq, tok)
            if isinstance(ended, str):
                seq.finish, seq.error = "error", ended
                return
            if eos:  # the mask allowed EOS: the grammar accepts what came before it
                seq.finish, seq.eos_hit = "stop", True
                return
            grammar_done = ended
        if eos and not seq.params.ignore_eos:
            seq.finish = "stop"
            seq.eos_hit = True
            return
        seq.generated.append(tok)
        seq.pending_ids.append(tok)
        if lp is not None:
            seq.pending_lps.append(lp)
        if grammar_done:
            # The grammar admits nothing more (the JSON value is closed): OpenAI's finish "stop".
            self._push_text(seq, seq.decoder.push([tok]))
            seq.finish = "stop"
            return
        self._push_text(seq, seq.decoder.push([tok]))
        if seq.finish is None and len(seq.generated) >= seq.params.max_tokens:
            seq.finish = "length"
        if seq.finish is None and seq.length >= self.max_model_len:
            seq.finish = "length"

    # ------------------------------------------------------------ driven (first stage)
    def _start_driven(self, seq: Sequence) -> None:
        seq.next_ids = list(seq.prompt)
        self.driven[seq.stage_key] = seq

    def _driven_segment(self, seq: Sequence) -> Segment:
        """The next chunk of a driven route's prompt through this worker's first stage (decodes go
        by `_stage_decode_segment`)."""
        assert seq.next_ids is not None and not seq.prefilled
        first = seq.route[0]
        n = seq.chunk or len(seq.next_ids)
        ids = torch.tensor([seq.next_ids[:n]], device=self.model.device)
        return prompt_chunk(
            range(first.start, first.end), self.kv, self._tables([seq]), seq.done, n, False, self.model.device, ids=ids
        )

    def _stage_decode_segment(self, group: list[Relayed] | list[Sequence]) -> Segment:
        """One decode token for each of a group of stage sequences that run the same layers (see
        `_stage_decode_groups`): driven routes' first stages from their sampled ids, relayed
        stages from the hidden states their previous stage sent."""
        dev = self.model.device
        if isinstance(group[0], Relayed):
            rels = cast(list[Relayed], group)
            hidden, pos = [], []
            for rel in rels:
                inp = rel.computing = rel.inputs.popleft()
                rel.length = inp.pos + 1
                hidden.append(inp.hidden)
                pos.append(inp.pos)
            st = rels[0].stage
            return Segment(
                range(st.start, st.end), self.kv, self._tables(rels), torch.tensor([[p] for p in pos], device=dev),
                torch.tensor([p + 1 for p in pos], device=dev), False, rels[0].last,
                hidden=hidden[0] if len(hidden) == 1 else torch.cat(hidden),
            )  # fmt: skip
        seqs = cast(list[Sequence], group)
        first = seqs[0].route[0]
        ids: list[list[int]] = []
        for seq in seqs:
            assert seq.next_ids is not None and len(seq.next_ids) == 1
            ids.append(seq.next_ids)
        pos = [s.length - 1 for s in seqs]
        return Segment(
            range(first.start, first.end), self.kv, self._tables(seqs), torch.tensor([[p] for p in pos], device=dev),
            torch.tensor([p + 1 for p in pos], device=dev), False, False, ids=torch.tensor(ids, device=dev),
        )  # fmt: skip

    def _send_driven(self, seq: Sequence, hidden: torch.Tensor, outbox: list[Outgoing]) -> None:
        frame = StageInput(seq.stage_key, prefill=not seq.prefilled, pos=seq.length - 1, sent_at=time.time())
        rest: list[int] = []
        if not seq.prefilled:
            assert seq.next_ids is not None
            n = seq.chunk or len(seq.next_ids)
            rest = seq.next_ids[n:]
            # A prompt chunk tells the next stage everything it needs to take the request on.
            frame = StageInput(
                seq.stage_key, True, seq.length - 1, start=seq.done, final=not rest, sent_at=frame.sent_at,
                route=list(seq.route), index=1, params=seq.params, arrived_at=seq.arrived_at,
                tokens=seq.prompt if seq.done == 0 and _needs_prompt_ids(seq.params) else [],
            )  # fmt: skip
            seq.done += n
            seq.chunk = 0
        if rest:
            seq.next_ids = rest  # the next chunk, in the next step: stages keep a route's chunks in order
        else:
            seq.prefilled = True
            seq.next_ids = None  # wait for the token from the last stage
        outbox.append(Outgoing(seq.route[1], frame, hidden))

    # ------------------------------------------------------------ relayed (later stages)
    def _relayed_segment(self, rel: Relayed) -> Segment:
        """A relayed prompt chunk (decodes go by `_stage_decode_segment`)."""
        inp = rel.computing = rel.inputs.popleft()
        assert inp.prefill
        T = inp.hidden.shape[1]
        rel.length = inp.start + T
        st = rel.stage
        scores = rel.last and rel.params.prompt_logprobs is not None and rel.params.resumed == 0
        seg = prompt_chunk(
            range(st.start, st.end), self.kv, self._tables([rel]), inp.start, T, rel.last and (inp.final or scores),
            self.model.device, hidden=inp.hidden,
        )  # fmt: skip
        seg.all_logits = scores
        return seg

    def _finish_relayed(self, rel: Relayed, out: torch.Tensor, outbox: list[Outgoing]) -> None:
        inp = rel.computing
        assert inp is not None
        rel.computing = None
        if rel.last:
            if not inp.final:
                return  # a prompt chunk before the last: its keys and values are all it leaves
            row = history_row(rel.params, rel.generator, rel.prompt, rel.output)
            row.allowed = self._mask(rel)
            toks, lps = sample(out, [row], self.logprobs_mode)
            if _counts_history(rel.params):
                rel.output.append(toks[0])
            done = False
            if rel.params.grammar:
                ended = self._grammar.consume(rel, toks[0])
                if isinstance(ended, str):
                    outbox.append(Outgoing(rel.driver, StageError(rel.request_id, ended)))
                    return
                done = ended or toks[0] in self._eos
            plps, rel.prompt_lps = rel.prompt_lps, None
            outbox.append(
                Outgoing(rel.driver, StageToken(rel.request_id, toks[0], lps[0], stop=done, prompt_logprobs=plps))
            )
            return
        frame = StageInput(
            rel.request_id, inp.prefill, rel.length - 1, start=inp.start, final=inp.final, sent_at=time.time(),
            route=rel.route, index=rel.index + 1, params=rel.params, arrived_at=rel.arrived_at,
            tokens=rel.prompt if inp.prefill and inp.start == 0 else [],
        )  # fmt: skip
        outbox.append(Outgoing(rel.route[rel.index + 1], frame, out))

    def _record_relayed_prompt_lps(self, rel: Relayed, logits: torch.Tensor) -> None:
        """Prompt logprobs at a route's last stage from a chunk's logits (positions start..start+T-1
        predict prompt tokens start+1..start+T), as a whole instance records them."""
        inp = rel.computing
        assert inp is not None
        start, T = inp.start, int(inp.hidden.shape[1])
        if start == 0:
            rel.prompt_lps = [None]
        if rel.prompt_lps is None or len(rel.prompt_lps) != start + 1:
            return
        targets = rel.prompt[start + 1 : min(start + T + 1, len(rel.prompt))]
        rel.prompt_lps.extend(prompt_logprobs(logits[: len(targets)], targets, rel.params.prompt_logprobs or 0))

    # ------------------------------------------------------------ stage messages
    def _apply_stage_frames(self, events: list[tuple[str, TokenEvent]], outbox: list[Outgoing]) -> None:
        while self._stage_in:
            f, tensor = self._stage_in.popleft()
            if isinstance(f, tuple):
                self._peer_lost(*f)
            elif isinstance(f, StageInput):
                self._stage_input(f, tensor, outbox)
            elif isinstance(f, StageToken):
                seq = self.driven.get(f.request_id)
                if seq is not None and seq.finish is None:
                    if f.prompt_logprobs is not None and seq.wants_prompt_lps:
                        seq.prompt_lps = list(f.prompt_logprobs)
                    self._accept_token(seq, f.token, f.logprob, grammar_done=f.stop)
                    if seq.finish is None:
                        seq.next_ids = [f.token]
            elif isinstance(f, StageClose):
                self._drop_relayed(f.request_id)
            else:
                seq = self.driven.get(f.request_id)
                if seq is not None and seq.finish is None:
                    seq.finish, seq.error = "error", f"stage failed: {f.message}"

    def _peer_lost(self, wid: str, why: str) -> None:
        """The stage link to `wid` broke: the routes through it cannot go on."""
        for seq in self.driven.values():
            if seq.finish is None and any(s.worker_id == wid for s in seq.route[1:]):
                seq.finish, seq.error = "error", f"stage worker {wid} failed: {why}"
        for r in [r for r in self.relayed.values() if r.driver.worker_id == wid]:
            self._drop_relayed(r.request_id)

    def _drop_relayed(self, request_id: str) -> None:
        rel = self.relayed.pop(request_id, None)
        if rel is not None:
            self.blocks.free(rel.table)
            rel.table = []

    def _stage_input(self, f: StageInput, tensor: torch.Tensor | None, outbox: list[Outgoing]) -> None:
        rid = f.request_id
        rel = self.relayed.get(rid)
        if rel is None:
            if not f.prefill or not f.route or f.params is None or not 0 < f.index < len(f.route):
                # An input for a request we do not hold (closed, or this worker restarted).
                if f.route:
                    outbox.append(Outgoing(f.route[0], StageError(rid, "unknown request")))
                return
            st = f.route[f.index]
            missing = [i for i in range(st.start, st.end) if i not in self.model.layers]
            if missing or (f.index == len(f.route) - 1 and self.model.lm_head is None):
                msg = f"worker {self.worker_id} lacks layers {missing[:3]} for stage [{st.start}, {st.end})"
                outbox.append(Outgoing(f.route[0], StageError(rid, msg)))
                return
            rel = Relayed(
                request_id=rid,
                driver=f.route[0],
                route=list(f.route),
                index=f.index,
                params=f.params,
                generator=_generator(f.params, self.cfg.vocab_size, f.params.choice),
                arrived_at=f.arrived_at or time.time(),
                prompt=list(f.tokens),
            )
            self.relayed[rid] = rel
        if tensor is None:
            outbox.append(Outgoing(rel.driver, StageError(rid, "a stage input without hidden states")))
            return
        rel.inputs.append(Pending(f.prefill, f.pos, tensor, f.start, f.final))

    # ------------------------------------------------------------ endings
    def _apply_cancels(self, events: list[tuple[str, TokenEvent]], outbox: list[Outgoing]) -> None:
        if not self._cancels:
            return
        ids = set()
        while self._cancels:
            ids.add(self._cancels.popleft())
        kept: collections.deque[Sequence] = collections.deque()
        for seq in self.waiting:
            if seq.request_id in ids:
                seq.finish = "cancelled"
                events.append((seq.gateway_id, self._final_event(seq)))
            else:
                kept.append(seq)
        self.waiting = kept
        for seq in [*self.running, *self.prefilling, *self.driven.values()]:
            if seq.request_id in ids and seq.finish is None:
                seq.finish = "cancelled"
        self._retire_finished(events, outbox)

    def _fail_step(self, jobs: list[tuple[str, Any]], reason: str) -> None:
        for kind, obj in jobs:
            if kind == "decode":
                for seq in self.running:
                    seq.finish, seq.error = "error", reason
            elif kind == "prefill":
                for seq in obj:
                    seq.finish, seq.error = "error", reason
            elif kind in ("driven", "chunk"):
                obj.finish, obj.error = "error", reason
            elif kind == "stage_decode":
                for one in obj:
                    if isinstance(one, Relayed):
                        self._drop_relayed(one.request_id)
                    else:
                        one.finish, one.error = "error", reason
            else:
                self._drop_relayed(obj.request_id)

    def _push_text(self, seq: Sequence, delta: str) -> None:
        if not seq.params.stop:
            seq.pending_text += delta
            return
        cand = seq.held + delta
        hit = -1
        for s in seq.params.stop:
            if s:
                i = cand.find(s)
                if i >= 0 and (hit < 0 or i < hit):
                    hit = i
        if hit >= 0:
            seq.pending_text += cand[:hit]
            seq.held = ""
            seq.finish = "stop"
            seq.stop_hit = True
            return
        # Hold back what could still grow into a stop string; OpenAI never returns the stop text.
        keep = seq.max_stop - 1
        cut = max(0, len(cand) - keep)
        seq.pending_text += cand[:cut]
        seq.held = cand[cut:]

    def _final_event(self, seq: Sequence) -> TokenEvent:
        self.stats.finished[seq.finish or "unknown"] += 1
        text = seq.pending_text
        if not seq.stop_hit:
            # Text held back for stop matching, and any incomplete UTF-8 tail, belong to the output.
            text += seq.held + seq.decoder.flush()
        ev = TokenEvent(
            request_id=seq.request_id,
            token_ids=seq.pending_ids,
            text=text,
            finish_reason=seq.finish,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.generated) + seq.eos_hit,
            error=seq.error,
            index=len(seq.generated) - len(seq.pending_ids),
            logprobs=seq.pending_lps,
            prompt_logprobs=self._take_prompt_lps(seq),
            choice=seq.choice,
            attempt=seq.attempt,
        )
        seq.pending_ids, seq.pending_text, seq.held, seq.pending_lps = [], "", "", []
        return ev

    def _retire_finished(self, events: list[tuple[str, TokenEvent]], outbox: list[Outgoing]) -> None:
        """Final events for finished sequences, whose blocks go back to the pool (the prefix
        cache keeps the full ones' contents until it needs the room); driven ones tell their later
        stages to free theirs."""
        for group in (self.running, self.prefilling):
            for seq in [s for s in group if s.finish is not None]:
                events.append((seq.gateway_id, self._final_event(seq)))
                group.remove(seq)
                self._release(seq)
        for seq in [s for s in self.driven.values() if s.finish is not None]:
            events.append((seq.gateway_id, self._final_event(seq)))
            del self.driven[seq.stage_key]
            self._release(seq)
            for st in seq.route[1:]:
                outbox.append(Outgoing(st, StageClose(seq.stage_key)))

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.table + seq.fork_blocks)
        seq.table, seq.fork_blocks = [], []

    def close(self) -> None:
        """Let the structured-output helper thread go (the engine is being dropped)."""
        self._grammar.close()

    def drain_all(self, reason: str) -> list[tuple[str, TokenEvent]]:
        """End every sequence (worker shutting down): each gets a final event with the error."""
        events: list[tuple[str, TokenEvent]] = []
        while self._inbox:
            self.waiting.append(self._inbox.popleft())
        for seq in [*self.running, *self.prefilling, *self.waiting, *self.driven.values()]:
            if seq.finish is None:
                seq.finish, seq.error = "error", reason
            events.append((seq.gateway_id, self._final_event(seq)))
            self._release(seq)
        for rid in list(self.relayed):
            self._drop_relayed(rid)
        self.running.clear()
        self.prefilling.clear()
        self.waiting.clear()
        self.driven.clear()
        self.figures = self._figures()
        return events


class _KVGate:
    """`admission.admit`'s view of the engine's waiting queue and its KV block gate (`Blocks`).

    As a queue: the prompts not yet taken in this step, front first, read live, so a sequence
    that stage work preempted during admission (re-queued by arrival) is seen where it now
    stands. As a gate: `reserve` allocates the front prompt's blocks (prefix-cache hits first)
    and takes it off the queue; `grow` extends a staged entry's block table, which may preempt
    the most recently admitted full sequence, as decoding does."""

    def __init__(self, engine: Engine, staged: list[Any]) -> None:
        self.engine = engine
        self.staged = staged
        self.taken: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.taken) + len(self.engine.waiting)

    def __getitem__(self, w: int, /) -> tuple[float, int, int]:
        seq = self.engine.waiting[w - len(self.taken)]
        return seq.arrived_at, seq.length, seq.slots

    def reserve(self, w: int, /) -> int | None:
        eng = self.engine
        assert w == len(self.taken), "admit takes waiting prompts front first"
        seq = eng.waiting[0]
        # The watermark applies when others hold blocks, those admitted earlier in this step too.
        if not eng._reserve(seq, bool(eng.running or eng.prefilling or self.taken)):
            return None
        eng.waiting.popleft()
        self.taken.append(seq)
        return seq.done

    def grow(self, i: int, tokens: int, /) -> bool:
        obj = self.staged[i]
        if isinstance(obj, Relayed):
            return self.engine._grow(obj.table, obj.inputs[0].start + tokens)
        return self.engine._grow(obj.table, obj.done + tokens)


class _StagedRows:
    """Stage work as `admit` reads it, built only as far as it reads."""

    def __init__(self, staged: list[tuple[float, int, str, Any]], engine: Engine) -> None:
        self.staged = staged
        self.engine = engine

    def __len__(self) -> int:
        return len(self.staged)

    def __getitem__(self, i: int, /) -> Staged:
        _, _, kind, obj = self.staged[i]
        if kind == "relayed":
            return Staged(obj.arrived_at, "relayed", int(obj.inputs[0].hidden.shape[1]), self.engine._share(obj))
        first = obj.route[0]
        return Staged(obj.arrived_at, "driven", len(obj.next_ids), (first.end - first.start) / self.engine.L)


def prompt_chunk(
    layers: range,
    kv: PagedKV,
    tables: torch.Tensor,
    start: int,
    n: int,
    head: bool,
    dev: torch.device,
    ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
) -> Segment:
    """One sequence's prompt positions start..start+n-1 (its first `start` already cached)."""
    return Segment(
        layers,
        kv,
        tables,
        torch.arange(start, start + n, device=dev).unsqueeze(0),
        torch.tensor([n], device=dev),
        True,
        head,
        ids=ids,
        hidden=hidden,
        start=start,
    )


def _stage_decode_groups(decoding: list[Relayed | Sequence]) -> list[list[Relayed] | list[Sequence]]:
    """Stage decodes that can share one segment: the same layers, the same inputs (ids for a
    driven route's first stage, hidden states for a relayed stage) and the same end (with the head
    or without). In first-seen order, so steps stay deterministic."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for one in decoding:
        if isinstance(one, Relayed):
            key: tuple[Any, ...] = ("relayed", one.stage.start, one.stage.end, one.last)
        else:
            key = ("driven", one.route[0].start, one.route[0].end)
        groups.setdefault(key, []).append(one)
    return list(groups.values())
