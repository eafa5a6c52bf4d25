"""The worker's execution engine: iteration-level (continuous) batching.

Each `step()` first admits waiting sequences (one padded prefill for all of
them, which also samples their first token), then runs one decode step for the
whole running batch. Sequences join between steps and leave as soon as they
finish, so a long request never holds a short one back.

`step()` is synchronous torch work: the worker calls it in one dedicated
executor thread. `submit()` and `cancel()` are called from the event loop
thread; they only touch thread-safe deques, which `step()` drains.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field

import torch

from cascade.messages import SamplingParams, TokenEvent
from cascade.tokenizer import IncrementalDecoder, Tokenizer
from services.worker.model import KVCache, LlamaModel, prefill_inputs
from services.worker.sampling import sample_next


@dataclass(slots=True)
class Sequence:
    request_id: str
    gateway_id: str
    prompt: list[int]
    params: SamplingParams
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    slot: int = -1
    held: str = ""  # text held back because it may be the start of a stop string
    max_stop: int = 0
    finish: str | None = None
    stop_hit: bool = False
    error: str | None = None
    first_token_at: float = 0.0
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)


@dataclass(slots=True)
class StepResult:
    events: list[tuple[str, TokenEvent]]  # (gateway id, event)
    batch_size: int
    prefilled: int
    decoded: int


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    tokens: int = 0
    batch_hist: collections.Counter[int] = field(default_factory=collections.Counter)
    max_batch_seen: int = 0
    finished: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens_per_s: float = 0.0
    _window: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def record(self, batch: int, tokens: int, now: float) -> None:
        self.steps += 1
        self.tokens += tokens
        if batch:
            self.batch_hist[batch] += 1
            self.max_batch_seen = max(self.max_batch_seen, batch)
        self._window.append((now, tokens))
        while self._window and now - self._window[0][0] > 5.0:
            self._window.popleft()
        span = now - self._window[0][0] if len(self._window) > 1 else 0.0
        self.tokens_per_s = sum(t for _, t in self._window) / span if span > 0 else 0.0


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        max_batch: int = 32,
        max_prefill_tokens: int = 4096,
    ) -> None:
        if not model.is_complete():
            raise ValueError("the engine needs every unit of the model")
        self.model = model
        self.tok = tokenizer
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.cfg = model.cfg
        L = self.cfg.num_hidden_layers
        self.layers = range(L)
        self.cache = KVCache(self.cfg, self.layers, max_batch, model.device, model.dtype)
        self.running: list[Sequence] = []  # index == KV slot
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._cancels: collections.deque[str] = collections.deque()
        self._eos = set(tokenizer.eos_ids) | set(self.cfg.eos_ids)
        self.stats = EngineStats()

    # ------------------------------------------------------------ loop-thread API
    def submit(self, request_id: str, gateway_id: str, prompt: list[int], params: SamplingParams) -> None:
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        gen = None if params.temperature == 0 else torch.Generator().manual_seed(seed)
        seq = Sequence(
            request_id=request_id,
            gateway_id=gateway_id,
            prompt=list(prompt),
            params=params,
            decoder=IncrementalDecoder(self.tok),
            generator=gen,
            max_stop=max((len(s) for s in params.stop), default=0),
        )
        self._inbox.append(seq)

    def cancel(self, request_id: str) -> None:
        self._cancels.append(request_id)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._inbox or self._cancels)

    def load(self) -> tuple[int, int]:
        """(running, waiting): read from the event loop for heartbeats and admission."""
        return len(self.running), len(self.waiting) + len(self._inbox)

    # ------------------------------------------------------------ executor-thread API
    def step(self) -> StepResult:
        events: list[tuple[str, TokenEvent]] = []
        while self._inbox:
            self.waiting.append(self._inbox.popleft())
        self._apply_cancels(events)
        prefilled = self._admit()
        batch = len(self.running)
        # Sequences that finished on their first token leave before the decode step computes them.
        self._retire_finished(events)
        decoded = self._decode() if self.running else 0
        self._retire_finished(events)
        for seq in self.running:
            if seq.pending_ids:
                events.append((seq.gateway_id, TokenEvent(seq.request_id, seq.pending_ids, seq.pending_text)))
                seq.pending_ids, seq.pending_text = [], ""
        self.stats.record(batch, prefilled + decoded, time.monotonic())
        return StepResult(events=events, batch_size=batch, prefilled=prefilled, decoded=decoded)

    def _apply_cancels(self, events: list[tuple[str, TokenEvent]]) -> None:
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
        for seq in self.running:
            if seq.request_id in ids and seq.finish is None:
                seq.finish = "cancelled"
        self._retire_finished(events)

    def _admit(self) -> int:
        """Prefill as many waiting sequences as fit (slots and a prefill token budget)."""
        new: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            seq = self.waiting[0]
            if new and len(seq.prompt) > budget:
                break
            self.waiting.popleft()
            budget -= len(seq.prompt)
            new.append(seq)
        if not new:
            return 0
        slot0 = len(self.running)
        for k, seq in enumerate(new):
            seq.slot = slot0 + k
        self.running.extend(new)
        try:
            ids, pos, lens = prefill_inputs([s.prompt for s in new], self.model.device)
            logits = self.model.forward(ids, None, self.layers, self.cache, pos, lens, True, True, slot0=slot0)
            self._accept_tokens(new, logits)
        except (RuntimeError, ValueError) as e:
            for seq in new:
                seq.finish, seq.error = "error", f"prefill failed: {e}"
        now = time.monotonic()
        for seq in new:
            seq.first_token_at = now
        return len(new)

    def _decode(self) -> int:
        # Batch row b is KV slot b: the running list is kept compact, so the cache is read as a view.
        B = len(self.running)
        last = torch.tensor([[s.generated[-1] if s.generated else s.prompt[-1]] for s in self.running])
        positions = torch.tensor([[s.length - 1] for s in self.running])
        lengths = positions[:, 0] + 1
        try:
            logits = self.model.forward(
                last.to(self.model.device),
                None,
                self.layers,
                self.cache,
                positions.to(self.model.device),
                lengths.to(self.model.device),
                False,
                True,
            )
        except (RuntimeError, ValueError) as e:
            for seq in self.running:
                seq.finish, seq.error = "error", f"decode failed: {e}"
            return 0
        self._accept_tokens(self.running, logits)
        return B

    def _accept_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        toks = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, tok in zip(seqs, toks, strict=True):
            if seq.finish is not None:
                continue
            if tok in self._eos and not seq.params.ignore_eos:
                seq.finish = "stop"
                continue
            seq.generated.append(tok)
            seq.pending_ids.append(tok)
            self._push_text(seq, seq.decoder.push([tok]))
            if seq.finish is None and len(seq.generated) >= seq.params.max_tokens:
                seq.finish = "length"
            if seq.finish is None and seq.length >= self.cfg.max_position_embeddings:
                seq.finish = "length"

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
            completion_tokens=len(seq.generated),
            error=seq.error,
        )
        seq.pending_ids, seq.pending_text, seq.held = [], "", ""
        return ev

    def _retire_finished(self, events: list[tuple[str, TokenEvent]]) -> None:
        """Send final events for finished sequences and compact them out of the KV slots."""
        for i in range(len(self.running) - 1, -1, -1):
            seq = self.running[i]
            if seq.finish is None:
                continue
            events.append((seq.gateway_id, self._final_event(seq)))
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.move(last, i, moved.length)
                moved.slot = i
                self.running[i] = moved
            self.running.pop()

    def drain_all(self, reason: str) -> list[tuple[str, TokenEvent]]:
        """End every sequence (worker shutting down): each gets a final event with the error."""
        events: list[tuple[str, TokenEvent]] = []
        while self._inbox:
            self.waiting.append(self._inbox.popleft())
        for seq in [*self.running, *self.waiting]:
            if seq.finish is None:
                seq.finish, seq.error = "error", reason
            events.append((seq.gateway_id, self._final_event(seq)))
        self.running.clear()
        self.waiting.clear()
        return events
