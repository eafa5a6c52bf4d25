"""Which prompt work a worker's engine step takes on: the admission rule, as a pure function.

The engine (engine.py) asks `admit` once per step and builds its torch segments from the answer;
the simulator (sim/) asks the same function about its modelled sequences. No torch, no clock.

One prefill budget per step, in whole-model prompt tokens (a prompt through k of L layers costs
k/L of its length), spent in this order:

1. prompts already under way (chunked), oldest first: each continues with as much as is left;
2. then, oldest arrival first whatever the role, the full prompts waiting here (each also needs a
   batch slot; a tie goes to them), the first stage of routes this worker drives, and relayed
   prompt chunks of routes other workers drive. A full prompt that fits what is left starts
   whole; one that does not starts as a chunk of what is left, and nothing younger starts in
   that step. The oldest full prompt waits for its slot and younger work waits behind it.
3. KV blocks (vLLM's admission by free blocks): a full prompt is taken only when `blocks` can
   reserve the blocks of its prompt, and stage work only when they can grow its block table;
   otherwise it waits, and everything younger waits behind it. A prompt whose front the prefix
   cache already holds computes only the rest, as a chunk; if that chunk ends the prompt,
   admission goes on with the next one.

Why each rule holds is told where the engine applies it (`Engine._admit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

TakeKind = Literal["whole", "start", "relayed", "driven"]
T_co = TypeVar("T_co", covariant=True)


class Rows(Protocol[T_co]):
    """What `admit` reads of a queue: its length and its items by position, front first (a list,
    or a view that builds items only as far as they are read)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> T_co: ...


class Blocks(Protocol):
    """The KV block gate `admit` asks before it takes work (the engine's paged cache; the
    simulator models none: `NO_BLOCK_LIMIT`). Called only for work `admit` then takes, in the order
    it takes it, so an implementation may allocate as it answers."""

    def reserve(self, w: int, /) -> int | None:
        """Blocks for the whole prompt of the `w`-th waiting prompt (the next one not yet taken).
        Returns the tokens at its front the prefix cache already holds (0: none), or None when
        the blocks are not free (nothing reserved)."""
        ...

    def grow(self, i: int, tokens: int, /) -> bool:
        """Blocks for `tokens` more prompt tokens of the `i`-th staged entry; False: not free."""
        ...


class _Unlimited:
    """No KV limit: every prompt's blocks are free and nothing is cached."""

    def reserve(self, w: int, /) -> int | None:
        return 0

    def grow(self, i: int, tokens: int, /) -> bool:
        return True


NO_BLOCK_LIMIT: Blocks = _Unlimited()


class Budget:
    """A step's prefill budget; the first take always succeeds (a prompt longer than the whole
    budget still gets its own step)."""

    def __init__(self, tokens: float) -> None:
        self.left = tokens
        self.used = False

    def take(self, cost: float) -> bool:
        if self.used and cost > self.left:
            return False
        self.left -= cost
        self.used = True
        return True


@dataclass(frozen=True, slots=True)
class Staged:
    """Stage work that competes for the budget: a relayed prompt chunk of another worker's route
    (`tokens`: the chunk the route's head cut), or the first stage of a route this worker drives
    (`tokens`: its prompt tokens not yet sent down the route). `share`: the layers it runs here
    over the model's."""

    arrived_at: float
    kind: Literal["relayed", "driven"]
    tokens: int
    share: float


@dataclass(slots=True)
class Admission:
    """`chunks[i]`: tokens the i-th prompt under way computes this step (those past the end of
    the list wait). `takes`: in order, (kind, index, tokens): "whole" and "start" take the
    front of `waiting` in turn ("start" with the chunk it computes now), "relayed" and
    "driven" the `staged` entry at `index`."""

    chunks: list[int] = field(default_factory=list)
    takes: list[tuple[TakeKind, int, int]] = field(default_factory=list)


def admit(
    budget_tokens: float,
    under_way: Sequence[int],
    waiting: Rows[tuple[float, int]] | Rows[tuple[float, int, int]],
    staged: Rows[Staged],
    free_slots: int,
    chunk_cap: int,
    blocks: Blocks = NO_BLOCK_LIMIT,
    idle: bool = False,
) -> Admission:
    """Spend one step's prefill budget.

    `under_way`: prompt tokens left of each prompt being prefilled in chunks, oldest first.
    `waiting`: (arrival, prompt tokens[, batch slots]) of the full prompts waiting for a slot, in
    arrival order; a request with n choices takes n slots (default 1). `idle`: no sequence holds
    a slot, so a request with more choices than `free_slots` may go alone.
    `staged`: stage work, sorted by arrival. `free_slots`: batch slots no running or prefilling
    sequence holds. `chunk_cap`: the most prompt tokens a driven route sends in one chunk.
    `blocks`: the KV block gate (default: no limit). A "start" take's tokens are computed after
    the prefix-cache hits `blocks.reserve` reported."""
    budget = Budget(budget_tokens)
    out = Admission()
    for left in under_way:
        n = min(left, int(budget.left))
        if n < 1:
            break
        budget.take(n)
        out.chunks.append(n)
    i = w = started = 0
    while budget.left >= 1:
        local = waiting[w] if w < len(waiting) else None
        if i >= len(staged) and local is None:
            break
        if local is not None and (i >= len(staged) or local[0] <= staged[i].arrived_at):
            need = local[2] if len(local) > 2 else 1
            if started + need > free_slots and not (idle and started == 0):
                break
            cached = blocks.reserve(w)
            if cached is None:
                break
            tokens = local[1]
            if cached == 0 and tokens <= budget.left:
                budget.take(tokens)
                out.takes.append(("whole", w, tokens))
                w += 1
                started += need
                continue
            rest = tokens - cached
            n = min(rest, int(budget.left))
            budget.take(n)
            out.takes.append(("start", w, n))
            w += 1
            started += need
            if n < rest:
                break
            continue
        st = staged[i]
        if st.kind == "relayed":
            # Its blocks first: a chunk that must wait for blocks does not spend the budget.
            if not blocks.grow(i, st.tokens) or not budget.take(st.tokens * st.share):
                break
            out.takes.append(("relayed", i, st.tokens))
        else:
            # Chunks are cut in whole-model tokens, so that later stages, which run more layers of
            # the same chunk, stay within their budget too.
            n = min(st.tokens, chunk_cap, int(budget.left / st.share) if st.share > 0 else chunk_cap)
            if n < 1 or not blocks.grow(i, n):
                break
            budget.take(n * st.share)
            out.takes.append(("driven", i, n))
        i += 1
    return out
