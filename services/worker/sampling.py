"""Next-token sampling: greedy, temperature, top-p, per-request seeded generators."""

from __future__ import annotations

import torch

from cascade.messages import SamplingParams


def sample_next(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of `logits` [B, V] (float32 on any device)."""
    out = logits.argmax(-1).tolist()  # greedy rows, computed for all at once
    for b, p in enumerate(params):
        if p.temperature == 0:
            continue
        row = logits[b].float().cpu() / p.temperature
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cum - sorted_p >= p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out[b] = int(torch.multinomial(probs, 1, generator=generators[b]).item())
    return [int(t) for t in out]


def skip_draws(generator: torch.Generator, n: int, vocab: int) -> None:
    """Advance `generator` past `n` draws of `sample_next` over a `vocab`-sized row, so a migrated
    request's seeded stream resumes where the lost instance left it. The same operation on the
    same shape and dtype: what multinomial consumes depends on those, not on the probabilities."""
    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float32)
    for _ in range(n):
        torch.multinomial(uniform, 1, generator=generator)
