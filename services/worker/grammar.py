"""Token masks for structured outputs (llguidance), computed beside the model's forward pass.

`start` hands the step's guided sequences to one helper thread before the step's forward pass;
llguidance computes each mask in Rust with the interpreter lock released, so the masks are ready
(or nearly) when the logits are, and the sequences of the batch without a grammar never wait for
them. `finish` collects them. Only the helper thread touches a matcher between `start` and
`finish`; the engine thread consumes sampled tokens after `finish` returned, so each matcher has
one user at a time.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import llguidance
import torch

from cascade import structured
from cascade.messages import SamplingParams
from cascade.models.tokenizer import Tokenizer


class Guided(Protocol):
    """A sequence with a grammar (a full or driven Sequence, or a relayed last stage)."""

    params: SamplingParams
    prompt: list[int]
    matcher: Any


class GrammarMasks:
    def __init__(self, tok: Tokenizer, vocab: int, eos: list[int]) -> None:
        self._tok, self.vocab, self.eos = tok, vocab, eos
        self._lltok: llguidance.LLTokenizer | None = None
        self._lltok_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # One Rust call fills the whole step's masks (one interpreter-lock release, not one per
        # sequence); one thread: the model's torch threads have the other cores.
        self._executor: llguidance.LLExecutor | None = None
        self._shifts = torch.arange(32, dtype=torch.int32)

    def warm(self) -> Future[None]:
        """Build llguidance's view of the tokenizer now, on the helper thread (about half a second
        for a 50k vocabulary), so that the first guided request's step does not wait for it and
        hold up the rest of its batch. A worker calls it when it takes a model."""
        return self._helper().submit(self._build_tokenizer)

    def _build_tokenizer(self) -> None:
        try:
            self._tokenizer()
        except structured.GrammarError:
            # A tokenizer structured outputs cannot use: a guided request gets that error itself.
            return

    def _helper(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        return self._pool

    def start(self, seqs: list[Any]) -> Future[dict[int, torch.Tensor]] | None:
        if not seqs:
            return None
        return self._helper().submit(self._compute, list(seqs))

    def finish(self, pending: Future[dict[int, torch.Tensor]] | None) -> dict[int, torch.Tensor]:
        """The allowed tokens of each sequence started, by id(sequence): bool [vocab]."""
        return pending.result() if pending is not None else {}

    def consume(self, seq: Guided, token: int) -> bool | str:
        """Advance `seq`'s matcher past `token`: True when the grammar is complete with it, an
        error message when the grammar rejects it (the mask makes that impossible short of a bug)."""
        m = seq.matcher or self._matcher(seq)
        if token in self.eos:
            return True
        if not m.consume_token(token):
            return f"structured output: the grammar rejected token {token}: {m.get_error() or 'no detail'}"
        return bool(m.is_stopped())

    def _tokenizer(self) -> llguidance.LLTokenizer:
        # Built once, on first use (about half a second for a 50k vocabulary), on the helper thread.
        with self._lltok_lock:  # the helper thread, or the engine thread for a late matcher
            if self._lltok is None:
                self._lltok = structured.tokenizer_for(self._tok, self.vocab, self.eos)
            return self._lltok

    def _matcher(self, seq: Guided) -> Any:
        m = llguidance.LLMatcher(self._tokenizer(), seq.params.grammar, log_level=0)
        r = seq.params.resumed
        if 0 < r <= len(seq.prompt):
            # A migrated request: the grammar state moves with it, replayed from what it streamed.
            m.consume_tokens(seq.prompt[-r:])
        seq.matcher = m
        return m

    def _compute(self, seqs: list[Guided]) -> dict[int, torch.Tensor]:
        self._tokenizer()
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=1)
        words = (self.vocab + 31) // 32
        bitmask = torch.full((len(seqs), words), -1, dtype=torch.int32)
        # A matcher in error keeps the all-allowed row; consume() then ends the sequence with the error.
        todo = [(m, i) for i, seq in enumerate(seqs) if not (m := seq.matcher or self._matcher(seq)).is_error()]
        if todo:
            # (llguidance.torch.fill_next_token_bitmask_par does this, but importing that module sets
            # up torch.compile, seconds of a worker's start for one pointer call.)
            self._executor.unsafe_compute_mask_ptr(todo, bitmask.data_ptr(), words * 4, len(seqs))
        bits = (bitmask.unsqueeze(-1) >> self._shifts) & 1
        allowed = bits.view(len(seqs), -1)[:, : self.vocab].bool()
        eos = [e for e in self.eos if e < self.vocab]
        for i, seq in enumerate(seqs):
            if seq.params.ignore_eos and eos:
                # ignore_eos: the end-of-sequence token is not offered while the grammar can go on
                # (it still ends a grammar that admits nothing more).
                row = allowed[i].clone()
                row[eos] = False
                if bool(row.any()):
                    allowed[i] = row
        return {id(seq): allowed[i] for i, seq in enumerate(seqs)}

    def close(self) -> None:
        if self._pool is not None:
            # Without cancelling: a step still under way gets its masks; the thread ends after.
            self._pool.shutdown(wait=False)
