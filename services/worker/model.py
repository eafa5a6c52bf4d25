"""A Llama-style decoder executed unit by unit (RMSNorm, RoPE, grouped-query
attention, SwiGLU), so a worker can hold and run any contiguous slice of it.

One decoder for every supported family: what a family changes (q/k/v/o and MLP
biases, Qwen3's per-head q/k norm, the rope type's frequencies, a sliding window)
comes as flags and parameters on the `ModelConfig` (cascade.models.config), and a
tensor a family lacks is simply None here.

Weights are plain tensors per unit rather than an nn.Module tree: units arrive
one at a time (from disk or a peer) and each becomes usable on its own. The
KV cache is per layer, so a worker that runs layers [a, b) keeps KV only for
those layers; a request split across workers keeps each part of its cache
where that part ran.

The KV cache is paged (`PagedKV`, bookkeeping in kvblocks.py): each sequence's
keys and values sit in fixed-size blocks listed by its block table, so memory
follows the tokens held; a decode step gathers the batch's blocks per layer.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from cascade.models.config import LAYER_TENSOR_SUFFIXES, ModelConfig, Rope, layer_tensor_suffixes, unit_tensor_names


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` takes CUDA when torch sees a GPU, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but torch sees no CUDA device")
    return dev


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    # CPUs have no fast half-precision matmul in most builds: compute in float32 there.
    # On a GPU keep the checkpoint's own dtype.
    if device.type == "cpu":
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.torch_dtype, torch.float32)


def rope_frequencies(rope: Rope, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (float32) and the factor cos/sin are multiplied by, for
    every supported rope type in one place. The arithmetic is transformers' own
    (`modeling_rope_utils`, float32 throughout), so the angles match it bit for bit."""
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    orig = rope.original_max_position_embeddings
    assert orig is not None, "llama3 and yarn carry original_max_position_embeddings"
    if rope.rope_type == "llama3":
        # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        low_wavelen = orig / rope.low_freq_factor
        high_wavelen = orig / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope.rope_type == "yarn":
        pos_freqs = rope.theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (rope.factor * pos_freqs)

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation_share = 1 - ramp
        inv = interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share
        return inv, rope.attention_factor
    raise ValueError(f"rope type {rope.rope_type!r} has no frequencies here")  # config.py refuses it first


@dataclass(slots=True)
class LayerWeights:
    # Kept unfused, in the checkpoint's own layout: when the compute dtype matches the
    # checkpoint's, these are the very buffers the data plane received into, so a serving
    # worker can forward them to a new instance without a second copy in memory.
    input_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    post_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    # Present only in the families that have them (see cascade.models.config.FAMILIES).
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


# Checkpoint name after "model.layers.{i}." -> LayerWeights field: the one mapping both ways
# (loading a unit, and `services.worker.dataplane.model_unit_tensors` sending it on).
LAYER_FIELDS: dict[str, str] = {
    "input_layernorm.weight": "input_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.v_proj.bias": "bv",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "self_attn.o_proj.weight": "wo",
    "self_attn.o_proj.bias": "bo",
    "post_attention_layernorm.weight": "post_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.gate_proj.bias": "b_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.up_proj.bias": "b_up",
    "mlp.down_proj.weight": "w_down",
    "mlp.down_proj.bias": "b_down",
}
assert set(LAYER_FIELDS) == set(LAYER_TENSOR_SUFFIXES)
assert set(LAYER_FIELDS.values()) == {f.name for f in fields(LayerWeights)}


def layer_unit_tensors(cfg: ModelConfig, layer: int, w: LayerWeights) -> dict[str, torch.Tensor]:
    """A held layer's tensors by checkpoint name, in unit order."""
    p = f"model.layers.{layer}."
    out: dict[str, torch.Tensor] = {}
    for s in layer_tensor_suffixes(cfg):
        t = getattr(w, LAYER_FIELDS[s])
        assert t is not None, s
        out[p + s] = t
    return out


class PagedKV:
    """Keys and values of layers `layers` in `num_blocks` blocks of `block_size` tokens: per layer,
    k[i] and v[i] are [kv_heads, num_blocks, block_size, head_dim]. Which block holds which tokens
    is the block tables' business (kvblocks.BlockManager); this is storage only.

    Heads first: gathering a batch's blocks along dim 1 gives [kv_heads, B * blocks, block_size,
    head_dim], which is [B, kv_heads, S, head_dim] as a view (no second copy) with each head's keys
    contiguous, the layout SDPA reads fastest (measured: 7 ms against 11 ms for blocks first, for
    32 sequences of 600 tokens at SmolLM2's shapes).

    On a CPU the storage is anonymous memory the kernel hands out as zero pages on first touch, so
    a budget of gigabytes costs resident memory only as blocks are written (and the lowest block
    ids are handed out first). Unwritten positions are then zeros, never a NaN that a masked-out
    key would still spread through the softmax's weighted sum."""

    def __init__(
        self, cfg: ModelConfig, layers: range, num_blocks: int, block_size: int, device: torch.device,
        dtype: torch.dtype,
    ) -> None:  # fmt: skip
        self.layers = layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.dim_per_head
        self._shape = (cfg.num_key_value_heads, num_blocks, block_size, cfg.dim_per_head)
        self._device, self._dtype = device, dtype
        self._maps: list[mmap.mmap] = []
        # A layer's storage is made when the layer first writes: a worker that runs only some
        # layers (a stage of a pipelined route, an instance still loading) holds only theirs.
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        # One gather buffer for whichever layer attends now (grown to the largest batch seen).
        self._gk: torch.Tensor | None = None
        self._gv: torch.Tensor | None = None

    def _zeros(self) -> torch.Tensor:
        shape, dtype = self._shape, self._dtype
        if self._device.type != "cpu":
            return torch.zeros(shape, device=self._device, dtype=dtype)
        n = math.prod(shape)
        m = mmap.mmap(-1, max(n * torch.empty((), dtype=dtype).element_size(), 1))
        self._maps.append(m)
        return torch.frombuffer(m, dtype=dtype, count=n).view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in (self.k, self.v) for t in s.values())

    @torch.inference_mode()
    def copy_block(self, src: int, dst: int) -> None:
        """Copy block `src`'s keys and values into `dst` in every layer held (a forked sequence's
        own copy of a part-filled block it shared)."""
        for store in (self.k, self.v):
            for t in store.values():
                t[:, dst].copy_(t[:, src])

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values [n, kv_heads, d] at flat slots (block * block_size + offset)."""
        h, d = self.kv_heads, self.head_dim
        if i not in self.k:
            if i not in self.layers:
                raise ValueError(f"layer {i} is outside this KV store's layers {self.layers}")
            self.k[i], self.v[i] = self._zeros(), self._zeros()
        self.k[i].view(h, -1, d)[:, slots] = k.transpose(0, 1)
        self.v[i].view(h, -1, d)[:, slots] = v.transpose(0, 1)

    def gather(self, i: int, tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, kv_heads, length, d] of the sequences whose block tables are `tables`
        [B, nb] (positions past a sequence's own length are whatever its blocks hold: mask them)."""
        B, nb = tables.shape
        h, bs, d = self.kv_heads, self.block_size, self.head_dim
        idx = tables.reshape(-1)
        k, v = self.k[i], self.v[i]
        need = h * B * nb * bs * d
        if self._gk is None or self._gk.numel() < need:
            self._gk = k.new_empty(need)
            self._gv = v.new_empty(need)
        assert self._gv is not None
        # Into a buffer kept across steps: a fresh tensor of this size per layer would be mapped
        # and faulted in anew each time.
        gk = torch.index_select(k, 1, idx, out=self._gk[:need].view(h, B * nb, bs, d))
        gv = torch.index_select(v, 1, idx, out=self._gv[:need].view(h, B * nb, bs, d))
        gk = gk.view(h, B, nb * bs, d).transpose(0, 1)[:, :, :length]
        gv = gv.view(h, B, nb * bs, d).transpose(0, 1)[:, :, :length]
        return gk, gv


class KVCache(PagedKV):
    """A paged cache for a fixed set of `slots` sequences, each with its own run of blocks: for
    running the model outside an engine (tests, the parity checks against transformers). The
    blocks are mapped for the whole context but touched only as positions are written."""

    def __init__(
        self, cfg: ModelConfig, layers: range, slots: int, device: torch.device, dtype: torch.dtype,
        block_size: int = 16,
    ) -> None:  # fmt: skip
        self.slots = slots
        self.max_len = cfg.max_position_embeddings
        self.per_slot = -(-self.max_len // block_size)
        super().__init__(cfg, layers, 1 + slots * self.per_slot, block_size, device, dtype)

    def tables(self, slot0: int, batch: int, device: torch.device) -> torch.Tensor:
        first = 1 + torch.arange(slot0, slot0 + batch) * self.per_slot
        return (first[:, None] + torch.arange(self.per_slot)[None, :]).to(device)


@dataclass(slots=True)
class Segment:
    """A batch of sequences that run the same layer range against one paged KV store.

    prefill: `positions` [B, T] are start..start+T-1 (right-padded) and `lengths` [B] the real
    lengths. `start` > 0 is a later part of one prompt (B == 1) whose first `start` tokens are
    in the cache already (a chunked prefill, or a prefix found in the prefix cache).
    decode: T == 1, `positions` [B, 1] the position of each sequence's new token.
    `tables` [B, nb]: each sequence's block table, covering every position it writes.
    `ids` [B, T] when the segment starts at the embedding, else `hidden` [B, T, H].
    """

    layers: range
    kv: PagedKV
    tables: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    prefill: bool
    head: bool
    ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    start: int = 0
    # With `head` on a prefill: also the logits at every position (prompt logprobs), left in
    # `logits_all` [B, T, V].
    all_logits: bool = False
    logits_all: torch.Tensor | None = None
    # Filled in by forward_segments:
    max_pos: int = 0
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    slots: torch.Tensor | None = None  # flat KV slot of each real token, in (b, t) order
    real: torch.Tensor | None = None  # [B, T] which tokens are real (None: all of them)


class LlamaModel:
    """The model's units as tensors, any subset of them present."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype or compute_dtype(cfg, self.device)
        self.embed: torch.Tensor | None = None
        self.layers: dict[int, LayerWeights] = {}
        self.norm: torch.Tensor | None = None
        self.lm_head: torch.Tensor | None = None
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # The dtype each tensor arrived in (checkpoint name -> dtype): what a live source sends on,
        # whatever this model computes in.
        self.source_dtypes: dict[str, torch.dtype] = {}

    # ---------------------------------------------------------------- units
    def load_unit(self, unit: int, tensors: dict[str, torch.Tensor], copy: bool = True) -> None:
        """Install one unit from its tensors. With `copy`, they are copied into memory this model
        owns (needed for views of a memory-mapped file); without, tensors already in the right
        device and dtype are used as they are (buffers the data plane filled)."""
        names = unit_tensor_names(self.cfg, unit)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"unit {unit} lacks {missing}")

        def get(name: str) -> torch.Tensor:
            self.source_dtypes[name] = tensors[name].dtype
            return tensors[name].to(device=self.device, dtype=self.dtype, copy=copy).contiguous()

        L = self.cfg.num_hidden_layers
        if unit == 0:
            self.embed = get(names[0])
        elif unit <= L:
            p = f"model.layers.{unit - 1}."
            self.layers[unit - 1] = LayerWeights(
                **{LAYER_FIELDS[s]: get(p + s) for s in layer_tensor_suffixes(self.cfg)}
            )
        else:
            self.norm = get(names[0])
            self.lm_head = get(names[1])

    def drop_unit(self, unit: int) -> None:
        L = self.cfg.num_hidden_layers
        if unit == 0:
            self.embed = None
        elif unit <= L:
            self.layers.pop(unit - 1, None)
        else:
            self.norm = None
            self.lm_head = None

    def has_unit(self, unit: int) -> bool:
        L = self.cfg.num_hidden_layers
        if unit == 0:
            return self.embed is not None
        if unit <= L:
            return (unit - 1) in self.layers
        return self.lm_head is not None

    def ready_units(self) -> list[int]:
        return [u for u in range(self.cfg.num_units) if self.has_unit(u)]

    def is_complete(self) -> bool:
        return len(self.ready_units()) == self.cfg.num_units

    # ---------------------------------------------------------------- pieces
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_cache is None:
            inv, scale = rope_frequencies(self.cfg.rope, self.cfg.dim_per_head)
            # float32 like transformers' rotary embedding (position * inv_freq, cos, sin, scale): the
            # same angles, so logits match it at every position, not only near 0.
            t = torch.arange(self.cfg.max_position_embeddings, dtype=torch.float32)
            freqs = t[:, None] * inv[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            self._rope_cache = (
                (emb.cos() * scale).to(device=self.device, dtype=self.dtype),
                (emb.sin() * scale).to(device=self.device, dtype=self.dtype),
            )
        cos, sin = self._rope_cache
        return cos[positions], sin[positions]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return w * xf.to(x.dtype)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            raise RuntimeError("embedding unit not loaded")
        return F.embedding(ids, self.embed)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is None or self.lm_head is None:
            raise RuntimeError("head unit not loaded")
        return F.linear(self._rms(h, self.norm), self.lm_head).float()

    def _attend(self, i: int, seg: Segment, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """RoPE, KV-cache write and attention for one segment at layer i; q/k/v are [B, T, heads*d].

        A sliding-window layer (Mistral, Qwen with use_sliding_window) lets each query see itself
        and the window - 1 keys before it, as transformers' `sliding_window_overlay`; the cache keeps
        every position. The band mask is built only once a sequence outgrows the window: below it,
        the window changes nothing and the causal paths stay as they are."""
        cfg = self.cfg
        B, T = seg.positions.shape
        nh, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        window = cfg.window(i)
        q = q.view(B, T, nh, d).transpose(1, 2)
        k = k.view(B, T, kvh, d).transpose(1, 2)
        v = v.view(B, T, kvh, d).transpose(1, 2)
        assert seg.rope is not None
        c, s = seg.rope
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        kv = seg.kv
        assert seg.slots is not None
        if seg.real is None:
            kv.write(i, seg.slots, k.transpose(1, 2).reshape(B * T, kvh, d), v.transpose(1, 2).reshape(B * T, kvh, d))
        else:
            kv.write(i, seg.slots, k.transpose(1, 2)[seg.real], v.transpose(1, 2)[seg.real])
        positions = seg.positions
        if seg.prefill and seg.start > 0:
            # A later part of one prompt: its queries see the cached tokens before it and,
            # causally, its own. SDPA's is_causal aligns the mask top-left, so it is explicit here.
            p0 = seg.start
            kc, vc = kv.gather(i, seg.tables, p0 + T)
            mask = torch.ones(T, p0 + T, dtype=torch.bool, device=q.device).tril(diagonal=p0)
            if window is not None and p0 + T > window:
                mask &= torch.ones_like(mask).triu(diagonal=p0 - window + 1)
            attn = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=nh != kvh)
            return attn.transpose(1, 2).reshape(B * T, nh * d)
        if seg.prefill:
            # Prompts from position 0 attend over their own keys and values, as computed: no read
            # of the cache. Each prompt attends causally over its own length through the fused
            # kernel: a [B, T, T] mask would send long prompts down the unfused path, which
            # materialises every attention matrix.
            lens = seg.lengths.tolist()
            band = _band(T, window, q.device) if window is not None and T > window else None
            if all(n == T for n in lens):
                attn = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=band, is_causal=band is None, enable_gqa=nh != kvh
                )
            else:
                attn = q.new_zeros(q.shape)
                for b, n in enumerate(lens):
                    m = band[:n, :n] if band is not None and n > (window or 0) else None
                    attn[b : b + 1, :, :n] = F.scaled_dot_product_attention(
                        q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], attn_mask=m,
                        is_causal=m is None, enable_gqa=nh != kvh,
                    )  # fmt: skip
            return attn.transpose(1, 2).reshape(B * T, nh * d)
        pos = positions[:, 0]
        S = seg.max_pos + 1
        kc, vc = kv.gather(i, seg.tables, S)
        key_pos = torch.arange(S, device=q.device)
        mask = key_pos[None, :] <= pos[:, None]
        if window is not None and S > window:
            mask &= key_pos[None, :] > pos[:, None] - window
        attn = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask[:, None, None, :], enable_gqa=nh != kvh)
        return attn.transpose(1, 2).reshape(B * T, nh * d)

    @torch.inference_mode()
    def forward_segments(self, segs: list[Segment]) -> list[torch.Tensor]:
        """Run several segments in one pass, each through its own layer range and KV cache.

        At every layer, the tokens of all segments that run it go through the linear layers
        as one matrix, so a worker running its own full requests and stage work relayed from
        other instances reads each weight once per step. Attention stays per segment (each has
        its own cache). Returns per segment its hidden states [B, T, H], or with `head` the
        logits [B, V] at each sequence's last real position.
        """
        H = self.cfg.hidden_size
        hs: list[torch.Tensor] = []
        for seg in segs:
            if seg.ids is not None:
                h = self.embed_tokens(seg.ids)
            elif seg.hidden is not None:
                h = seg.hidden.to(device=self.device, dtype=self.dtype)
            else:
                raise ValueError("a segment needs ids or hidden states")
            seg.max_pos = int(seg.positions.max().item())
            _place(seg)
            cos, sin = self._rope(seg.positions)
            seg.rope = (cos.unsqueeze(1), sin.unsqueeze(1))
            hs.append(h.reshape(-1, H))
        lo = min((s.layers.start for s in segs if len(s.layers)), default=0)
        hi = max((s.layers.stop for s in segs if len(s.layers)), default=0)
        for i in range(lo, hi):
            active = [j for j, s in enumerate(segs) if i in s.layers]
            if not active:
                continue
            w = self.layers.get(i)
            if w is None:
                raise RuntimeError(f"layer {i} not loaded")
            sizes = [hs[j].shape[0] for j in active]
            x_in = hs[active[0]] if len(active) == 1 else torch.cat([hs[j] for j in active])
            x = self._rms(x_in, w.input_norm)
            q, k, v = F.linear(x, w.wq, w.bq), F.linear(x, w.wk, w.bk), F.linear(x, w.wv, w.bv)
            if w.q_norm is not None and w.k_norm is not None:
                # Qwen3: RMSNorm over each head's vector, before RoPE.
                n = x.shape[0]
                q = self._rms(q.view(n, -1, self.cfg.dim_per_head), w.q_norm).view(n, -1)
                k = self._rms(k.view(n, -1, self.cfg.dim_per_head), w.k_norm).view(n, -1)
            if len(active) == 1:
                attn = self._attend(i, segs[active[0]], q, k, v)
            else:
                parts = zip(q.split(sizes), k.split(sizes), v.split(sizes), strict=True)
                attn = torch.cat(
                    [self._attend(i, segs[j], qq, kk, vv) for j, (qq, kk, vv) in zip(active, parts, strict=True)]
                )
            h = x_in + F.linear(attn, w.wo, w.bo)
            x = self._rms(h, w.post_norm)
            gate, up = F.linear(x, w.w_gate, w.b_gate), F.linear(x, w.w_up, w.b_up)
            h = h + F.linear(F.silu(gate) * up, w.w_down, w.b_down)
            if len(active) == 1:
                hs[active[0]] = h
            else:
                for j, part in zip(active, h.split(sizes), strict=True):
                    hs[j] = part
        outs: list[torch.Tensor] = []
        for seg, h in zip(segs, hs, strict=True):
            B, T = seg.positions.shape
            h3 = h.view(B, T, H)
            if not seg.head:
                outs.append(h3)
                continue
            if seg.prefill:
                if seg.all_logits:
                    seg.logits_all = self.logits(h3.reshape(B * T, H)).view(B, T, -1)
                last = (seg.lengths - 1).clamp(min=0)
                hl = h3[torch.arange(B, device=h3.device), last]
            else:
                hl = h3[:, -1]
            outs.append(self.logits(hl))
        return outs

    def forward(
        self,
        ids: torch.Tensor | None,
        hidden: torch.Tensor | None,
        layers: range,
        cache: KVCache,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        prefill: bool,
        head: bool,
        slot0: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        """One stage for sequences in slots slot0.. of a standalone cache: embed (when given ids)
        → layers → head (when asked). Returns hidden states, or logits at each sequence's last
        real position when `head`."""
        tables = cache.tables(slot0, positions.shape[0], positions.device)
        seg = Segment(layers, cache, tables, positions, lengths, prefill, head, ids=ids, hidden=hidden, start=start)
        return self.forward_segments([seg])[0]


def _place(seg: Segment) -> None:
    """Each real token's flat KV slot, from its position and its sequence's block table; the
    table is cut to the blocks the segment reaches (a decode gathers no more than that)."""
    bs = seg.kv.block_size
    seg.tables = seg.tables[:, : seg.max_pos // bs + 1]
    nb = seg.tables.shape[1]
    pos = seg.positions
    block = seg.tables.gather(1, (pos // bs).clamp(max=nb - 1))
    slots = block * bs + pos % bs
    T = pos.shape[1]
    if seg.prefill and T > 1 and int(seg.lengths.min().item()) < T:
        seg.real = torch.arange(T, device=pos.device)[None, :] < seg.lengths[:, None]
        seg.slots = slots[seg.real]
    else:
        seg.real = None
        seg.slots = slots.reshape(-1)


def _band(T: int, window: int, device: torch.device) -> torch.Tensor:
    """[T, T] causal sliding-window mask: query i sees keys i - window + 1 .. i."""
    ones = torch.ones(T, T, dtype=torch.bool, device=device)
    return ones.tril() & ones.triu(diagonal=1 - window)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def prefill_inputs(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompts into ids [B, T], positions [B, T] and lengths [B]."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    positions = torch.arange(T).expand(len(prompts), T)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), positions.to(device), lengths.to(device)
