"""The paged KV cache's bookkeeping, as plain Python: which block holds what, who uses it, and how
many blocks a memory budget buys. No torch, no clock: the engine asks it once per step, and the
simulator and the tests can ask it too.

The anchor is vLLM's block manager. A sequence's keys and values live in fixed-size blocks of
`block_size` tokens (one block id covers every layer the worker's cache holds); its *block table*
lists them in position order. Memory then follows the tokens held, to within one partly filled
block per sequence, where a cache of `slots × longest sequence` followed the longest one.

Prefix caching: a full block is keyed by a digest of its tokens and of every token before it
(the digest of the previous block chained in), so two prompts that start alike map their common
full blocks to the same key. A block that its last user frees keeps its contents and its key,
and waits on an LRU list: a later prompt with that prefix takes it back (its refcount goes up
again) without computing it; allocation evicts the least recently used of them only when no
never-keyed block is free.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

# Block 0 is never handed out: block tables are padded with it, so it must always hold finite
# values (it stays zero), whatever garbage a fresh allocation would have.
NULL_BLOCK = 0


class NoFreeBlocks(RuntimeError):
    """Every block is in use: the caller admits less or preempts a sequence."""


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """A full block's prefix-cache key: a digest of its tokens and its parent block's key.

    128 bits of BLAKE2b, not Python's `hash`: a collision would silently give one prompt another
    prompt's keys and values, and vLLM moved to a cryptographic digest for that reason."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens))
    return h.digest()


def block_keys(tokens: Sequence[int], block_size: int, start: int = 0, parent: bytes = b"") -> list[bytes]:
    """Keys of the full blocks of `tokens` from block `start` on (`parent`: the key of block
    start - 1, or b"" from the beginning)."""
    out: list[bytes] = []
    for b in range(start, len(tokens) // block_size):
        parent = block_key(parent, tokens[b * block_size : (b + 1) * block_size])
        out.append(parent)
    return out


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """What one block costs: `layers` layers of K and V, each `block_size × kv_heads × head_dim`."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_size: int = 16

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    def blocks_in(self, budget_bytes: int) -> int:
        """Blocks a budget buys, the null block included (so at least two: one usable)."""
        return max(2, budget_bytes // self.bytes_per_block)


def default_budget_bytes(available: int, weights_left: int, device: str) -> int:
    """The KV budget when none is given: what is left after the weights still to arrive, with a
    margin. On a GPU, vLLM's rule (90 % of the memory, the weights taken out). On a CPU the host's
    memory is shared with other workers and every other process, so only half of what is left, and
    at most 4 GiB, vLLM's CPU default (VLLM_CPU_KVCACHE_SPACE); set --kv-cache-mb for more."""
    left = max(available - weights_left, 0)
    if device.startswith("cuda"):
        return int(left * 0.9)
    return min(left // 2, 4 << 30)


def cap_model_len(context: int, requested: int, usable_blocks: int, block_size: int) -> int:
    """--max-model-len: what was asked (0: the model's context), never above the context, and
    capped so that one sequence fits the whole budget."""
    want = requested if requested > 0 else context
    return max(1, min(want, context, usable_blocks * block_size))


@dataclass(frozen=True, slots=True)
class BlockStats:
    total: int  # usable blocks (the null block not counted)
    used: int  # blocks some sequence holds
    cached_free: int  # free blocks that keep a prefix-cache key (reusable until evicted)
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # and those found there

    @property
    def free(self) -> int:
        return self.total - self.used

    @property
    def usage(self) -> float:
        return self.used / self.total if self.total else 0.0

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class BlockManager:
    """Free blocks, reference counts and the prefix cache of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("a KV pool needs at least two blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Lowest ids first: the pool's memory is touched from its start, so a worker's resident
        # KV grows with the most blocks ever held at once, not with the pool's size.
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        # Keyed blocks nobody holds, least recently freed first: reusable until evicted.
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def total(self) -> int:
        return self.num_blocks - 1

    def free_count(self) -> int:
        return len(self._free) + len(self._lru)

    def used_count(self) -> int:
        return self.total - self.free_count()

    def can_allocate(self, n: int) -> bool:
        return n <= self.free_count()

    def stats(self) -> BlockStats:
        return BlockStats(self.total, self.used_count(), len(self._lru), self.prefix_queries, self.prefix_hits)

    def allocate(self) -> int:
        """A block for one more user; raises NoFreeBlocks when there is none. A fresh block may
        hold another sequence's old values: its user overwrites what it attends to."""
        if self._free:
            b = self._free.pop()
        elif self._lru:
            b, _ = self._lru.popitem(last=False)
            del self._block_of[self._key_of.pop(b)]
        else:
            raise NoFreeBlocks("no free KV block")
        self._refs[b] = 1
        return b

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block (a sequence's table, back to front: the tail of a
        prompt is the least likely to be shared, so it goes first when evicting)."""
        for b in reversed(blocks):
            if b == NULL_BLOCK:
                continue
            self._refs[b] -= 1
            if self._refs[b] > 0:
                continue
            if b in self._key_of:
                self._lru[b] = None
            else:
                self._free.append(b)

    def share(self, blocks: Sequence[int]) -> None:
        """One more user of each block (a sequence forked onto its parent's full blocks)."""
        for b in blocks:
            if b != NULL_BLOCK:
                self._refs[b] += 1

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The longest run of `keys` from the first that the cache holds, each block taken (its
        refcount raised; `free` gives them back)."""
        out: list[int] = []
        if not self.prefix_caching:
            return out
        for k in keys:
            b = self._block_of.get(k)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
            out.append(b)
        return out

    def record_query(self, tokens: int, hits: int) -> None:
        """A prompt of `tokens` tokens admitted, `hits` of them found in the prefix cache (vLLM's
        prefix_cache_queries and prefix_cache_hits)."""
        self.prefix_queries += tokens
        self.prefix_hits += hits

    def register(self, block: int, key: bytes) -> None:
        """A block just filled: others may reuse it under `key`. When another block already holds
        that key, this one stays private (it is freed as a plain block)."""
        if not self.prefix_caching or key in self._block_of or block in self._key_of:
            return
        self._block_of[key] = block
        self._key_of[block] = key

    def refs(self, block: int) -> int:
        return self._refs[block]


def max_concurrency(prompt_and_output: Sequence[int], usable_blocks: int, block_size: int) -> int:
    """How many of these sequences (taken in order) fit `usable_blocks` at their full length."""
    used = 0
    for n, tokens in enumerate(prompt_and_output):
        used += blocks_for(tokens, block_size)
        if used > usable_blocks:
            return n
    return len(prompt_and_output)


def contiguous_cache_bytes(slots: int, longest: int, bytes_per_token: int, context: int, initial: int = 256) -> int:
    """What the contiguous cache this replaced held: `slots` rows of a capacity that doubled from
    `initial` past the longest sequence (capped at the context). For the benchmark's baseline."""
    cap = min(initial, context)
    while cap < longest:
        cap *= 2
    return slots * min(cap, context) * bytes_per_token
