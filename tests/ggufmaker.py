"""Tiny GGUF files written with gguf.GGUFWriter, the way llama.cpp's converter lays them out:
llama.cpp's q/k row permutation for llama models, a byte-level BPE vocabulary (trained here in
milliseconds with `tokenizers`) or a SentencePiece-style one, and tensors in a mix of F32, F16,
BF16 and quantized types, so a conversion has every path to get wrong."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "What is the capital of France? Paris is the capital of France.",
    "Hello world, hello there! Numbers: 1234, 2024, 3.14159 and 1,000,000.",
    "def f(x):\n    return x ** 2  # squares\n\n",
    "Über café naïve résumé, 中文 and emoji ✓.",
] * 10

# The type each tensor is stored in: every kind a real file mixes (F32 norms, half and quantized
# matrices), the quantized ones in types gguf-py can also write.
DEFAULT_TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q8_0,
    "attn_k": Q.F16,
    "attn_v": Q.Q4_1,
    "attn_output": Q.F32,
    "ffn_gate": Q.Q5_0,
    "ffn_up": Q.BF16,
    "ffn_down": Q.Q8_0,
    "output": Q.Q8_0,
}

# Types gguf-py cannot quantize (nor, for these, dequantize): written as zero blocks, for files
# that must be refused.
WRITE_ONLY_ZEROS = {Q.Q8_K}


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    tokenizer: str = "gpt2"  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None = "llama-bpe"
    tied: bool = False
    add_bos: bool | None = True
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    head_dim: int | None = None  # None: hidden // heads, and no attention.key_length key
    chat_template: str | None = CHATML
    types: dict[str, gguf.GGMLQuantizationType] = field(default_factory=lambda: dict(DEFAULT_TYPES))
    seed: int = 0


@functools.cache
def byte_level_vocab() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges) of a small byte-level BPE with ChatML special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@functools.cache
def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) laid out like a Llama-2 SentencePiece vocabulary: <unk>, <s>,
    </s>, 256 byte tokens, pieces best-first, then two ChatML control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.__getitem__)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, *([6] * 256), *([1] * len(pieces)), 3, 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return tokens, types, scores


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of what a loader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, spec: TinySpec = TinySpec()) -> dict[str, np.ndarray]:
    """Write the file; return each tensor as a loader must give it back, by GGUF name: in
    transformers' row order, with exactly the rounding its storage type imposes."""
    arch = spec.arch
    expected: dict[str, np.ndarray] = {}
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(spec.layers)
    w.add_context_length(512)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    head_dim = spec.head_dim or spec.hidden // spec.heads
    if spec.head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)

    if spec.tokenizer == "gpt2":
        tokens, merges = byte_level_vocab()
        w.add_tokenizer_model("gpt2")
        if spec.pre is not None:
            w.add_tokenizer_pre(spec.pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
    else:
        tokens, types, scores = sentencepiece_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    if spec.add_bos is not None:
        w.add_add_bos_token(spec.add_bos)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)
    vocab = len(tokens)
    w.add_vocab_size(vocab)

    rng = np.random.default_rng(spec.seed)

    def tensor(name: str, shape: tuple[int, ...], kind: str, permute_heads: int = 0) -> None:
        if len(shape) == 1:
            a = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            a = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        qtype = spec.types.get(kind, Q.F32) if len(shape) > 1 else Q.F32
        stored = _permute(a, permute_heads) if permute_heads else a
        if qtype == Q.F32:
            w.add_tensor(name, stored)
            expected[name] = a
        elif qtype == Q.F16:
            w.add_tensor(name, stored.astype(np.float16))
            expected[name] = a.astype(np.float16).astype(np.float32)
        elif qtype in WRITE_ONLY_ZEROS:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            # Blocks run along rows, so quantizing commutes with permuting rows.
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)

    h, q, kv = spec.hidden, spec.heads * head_dim, spec.kv_heads * head_dim
    llama = arch == "llama"
    tensor("token_embd.weight", (vocab, h), "token_embd")
    for i in range(spec.layers):
        p = f"blk.{i}."
        tensor(p + "attn_norm.weight", (h,), "norm")
        tensor(p + "attn_q.weight", (q, h), "attn_q", spec.heads if llama else 0)
        tensor(p + "attn_k.weight", (kv, h), "attn_k", spec.kv_heads if llama else 0)
        tensor(p + "attn_v.weight", (kv, h), "attn_v")
        if arch == "qwen2":
            for n, size in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                expected[p + n + ".bias"] = bias = (0.1 * rng.standard_normal(size)).astype(np.float32)
                w.add_tensor(p + n + ".bias", bias)
        if arch == "qwen3":
            tensor(p + "attn_q_norm.weight", (head_dim,), "norm")
            tensor(p + "attn_k_norm.weight", (head_dim,), "norm")
        tensor(p + "attn_output.weight", (h, q), "attn_output")
        tensor(p + "ffn_norm.weight", (h,), "norm")
        tensor(p + "ffn_gate.weight", (spec.ffn, h), "ffn_gate")
        tensor(p + "ffn_up.weight", (spec.ffn, h), "ffn_up")
        tensor(p + "ffn_down.weight", (h, spec.ffn), "ffn_down")
    tensor("output_norm.weight", (h,), "norm")
    if not spec.tied:
        tensor("output.weight", (vocab, h), "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
