"""Next-token sampling for a whole batch: penalties, temperature, top-p, per-request seeded
generators, and the log probabilities OpenAI's `logprobs` asks for.

One call per engine step takes the logits of every sequence that samples in it ([B, V]) and
works on them as one matrix where it can: penalties are a scatter of the batch's token counts,
log-softmax runs once for every row that wants log probabilities. Only the random draw is per
row (each request has its own seeded generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from cascade.messages import SamplingParams, TokenLogprob

# vLLM's `--logprobs-mode`: "raw" (the default) reports the model's own distribution, before any
# penalty or temperature; "processed" the one the token was drawn from (after penalties, the
# structured-output mask and temperature; top-p does not change it).
LogprobsMode = Literal["raw", "processed"]
# OpenAI accepts top_logprobs up to 20; vLLM caps it at the same figure by default.
MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class SampleRow:
    """What one row of the batch samples with: the request's knobs, its generator, and the token
    history the penalties count (the prompt for repetition_penalty, the output for the OpenAI
    presence and frequency penalties)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt: Sequence[int] = ()
    output: Sequence[int] = ()
    # Tokens structured outputs allow next (None: all); a bool tensor [V].
    allowed: torch.Tensor | None = None


def _penalised(p: SamplingParams) -> bool:
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _counts(seqs: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's list: [B, V] float32, one scatter for the batch."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.zeros((len(seqs), vocab + 1), dtype=torch.float32, device=device)
    if width:
        ids = torch.full((len(seqs), width), vocab, dtype=torch.long)  # padding counts in column V
        for b, s in enumerate(seqs):
            if s:
                ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        out.scatter_add_(1, ids.to(device), torch.ones(ids.shape, dtype=torch.float32, device=device))
    return out[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """The logits after each row's penalties, as vLLM (and before it transformers and OpenAI)
    define them:

    - repetition_penalty r (transformers' CTRL rule) over prompt and output tokens: a positive
      logit is divided by r, a negative one multiplied by r;
    - frequency_penalty f and presence_penalty p (OpenAI) over output tokens only:
      logit -= f * count + p * (count > 0).

    Rows without penalties are left as they are; `logits` itself is not modified."""
    idx = [b for b, r in enumerate(rows) if _penalised(r.params)]
    if not idx:
        return logits
    out = logits.clone()
    V = logits.shape[1]
    sub = out[idx]
    params = [rows[b].params for b in idx]
    dev = logits.device
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=sub.dtype, device=dev).unsqueeze(1)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _counts([[*rows[b].prompt, *rows[b].output] for b in idx], V, dev) > 0
        scaled = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, scaled, sub)
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        counts = _counts([rows[b].output for b in idx], V, dev).to(sub.dtype)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=sub.dtype, device=dev).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in params], dtype=sub.dtype, device=dev).unsqueeze(1)
        sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
    out[idx] = sub
    return out


def _logprob_entries(lp: torch.Tensor, chosen: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Entries for rows of log-probabilities `lp` [B, V]. A token the mask ruled out has -inf,
    which JSON cannot carry: it is reported as -9999.0, as vLLM does."""
    lp = lp.clamp(min=-9999.0)
    top = max(ks)
    vals, ids = lp.topk(top, dim=-1) if top else (None, None)
    at = lp.gather(1, torch.tensor(chosen, device=lp.device).unsqueeze(1))
    ranks = ((lp > at).sum(1) + 1).tolist()
    picked = at[:, 0].tolist()
    out = []
    for b, (tok, k) in enumerate(zip(chosen, ks, strict=True)):
        if k and vals is not None and ids is not None:
            out.append(TokenLogprob(tok, picked[b], ids[b, :k].tolist(), vals[b, :k].tolist(), ranks[b]))
        else:
            out.append(TokenLogprob(tok, picked[b], rank=ranks[b]))
    return out


def sample(
    logits: torch.Tensor, rows: list[SampleRow], mode: LogprobsMode = "raw"
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of `logits` [B, V] (float on any device), and for the rows whose
    request asked for `logprobs`, the chosen token's log probability and the top ones."""
    raw = logits.float()
    want = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
    lps: list[TokenLogprob | None] = [None] * len(rows)
    raw_lp = torch.log_softmax(raw[want], dim=-1) if want and mode == "raw" else None
    x = apply_penalties(raw, rows)
    masked = [b for b, r in enumerate(rows) if r.allowed is not None]
    if masked:
        x = x.clone() if x is raw else x
        allowed = torch.stack([r.allowed for r in rows if r.allowed is not None]).to(x.device)
        idx = torch.tensor(masked, device=x.device)
        x[idx] = x[idx].masked_fill(~allowed, float("-inf"))
    out = x.argmax(-1).tolist()  # greedy rows, computed for all at once
    temps = [r.params.temperature for r in rows]
    for b, r in enumerate(rows):
        p = r.params
        if p.temperature == 0:
            continue
        row = x[b].cpu() / p.temperature
        if 0 < p.top_k < row.shape[0]:
            kth = row.topk(p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cum - sorted_p >= p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        if p.min_p > 0:
            # vLLM's min_p: drop what is less likely than min_p times the most likely token.
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        out[b] = int(torch.multinomial(probs, 1, generator=r.generator).item())
    toks = [int(t) for t in out]
    if want:
        chosen = [toks[b] for b in want]
        ks = [min(int(rows[b].params.logprobs or 0), MAX_TOP_LOGPROBS) for b in want]
        if raw_lp is None:
            t = torch.tensor([temps[b] if temps[b] > 0 else 1.0 for b in want], device=x.device).unsqueeze(1)
            raw_lp = torch.log_softmax(x[want] / t, dim=-1)
        for b, e in zip(want, _logprob_entries(raw_lp, chosen, ks), strict=True):
            lps[b] = e
    return toks, lps


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Log probabilities of `targets` [T] under the logits that predict them [T, V] (raw: the
    model's own distribution, as vLLM reports prompt logprobs), with the top `k` of each."""
    if not targets:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    return _logprob_entries(lp, targets, [min(k, MAX_TOP_LOGPROBS)] * len(targets))


def skip_draws(generator: torch.Generator, n: int, vocab: int) -> None:
    """Advance `generator` past `n` draws of `sample` over a `vocab`-sized row, so a migrated
    request's seeded stream resumes where the lost instance left it. The same operation on the
    same shape and dtype: what multinomial consumes depends on those, not on the probabilities."""
    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float32)
    for _ in range(n):
        torch.multinomial(uniform, 1, generator=generator)
