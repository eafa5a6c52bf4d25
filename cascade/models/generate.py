"""Deterministic random Llama-style models for tests and benchmarks: the same spec and seed
give the same bytes, so any tensor can be regenerated alone, in any order."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from cascade.config import GenerateSpec
from cascade.models.checkpoint import TORCH_DTYPE_BY_HF, write_safetensors
from cascade.models.config import CheckpointError, ModelConfig, unit_shapes


def config_for_spec(spec: GenerateSpec) -> ModelConfig:
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise CheckpointError("hidden must divide by heads, and heads by kv_heads")
    if (spec.hidden // spec.heads) % 2:
        raise CheckpointError("head dimension (hidden / heads) must be even for RoPE")
    if spec.vocab < 258:
        raise CheckpointError("vocab must be at least 258 (256 bytes + BOS + EOS) for the byte tokenizer")
    inter = spec.intermediate or 256 * math.ceil(int(8 * spec.hidden / 3) / 256)
    return ModelConfig(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=inter,
        vocab_size=spec.vocab,
        max_position_embeddings=spec.max_position,
        torch_dtype=spec.dtype,
        bos_token_id=256,
        eos_token_id=257,
    )


def generate_model(
    model_dir: Path, spec: GenerateSpec, progress: Callable[[int, int], None] | None = None
) -> ModelConfig:
    """Write a deterministic random Llama-style model (same spec and seed → same bytes)."""
    cfg = config_for_spec(spec)
    if spec.dtype not in TORCH_DTYPE_BY_HF:
        raise CheckpointError(f"dtype {spec.dtype!r}: use float32, float16 or bfloat16")
    dtype = TORCH_DTYPE_BY_HF[spec.dtype]
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for unit in range(cfg.num_units):
        for name, shape in unit_shapes(cfg, unit).items():
            shapes[name] = (shape, dtype)

    def produce(name: str) -> torch.Tensor:
        shape = shapes[name][0]
        if len(shape) == 1:
            return torch.ones(shape)
        # Seed per tensor name so any tensor can be regenerated alone, in any order.
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + _stable_hash(name))
        # 1/sqrt(fan_in) keeps activations O(1) through many random layers, so outputs are not degenerate.
        return torch.randn(shape, generator=g) / math.sqrt(shape[1])

    (model_dir / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    write_safetensors(
        model_dir / "model.safetensors",
        shapes,
        produce,
        metadata={"format": "pt", "generator": "cascade", "seed": str(spec.seed)},
        progress=progress,
    )
    return cfg


def _stable_hash(s: str) -> int:
    h = 2166136261
    for ch in s.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h
