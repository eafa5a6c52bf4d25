"""Model configuration (Hugging Face `config.json`) and the split of a model into
*units*, without torch, so the gateway can read it cheaply.

A model is moved and made ready unit by unit, front to back:
unit 0 = token embedding, units 1..L = decoder layers 0..L-1,
unit L+1 = final norm and LM head. Loaders, workers and the gateway all count
readiness in these units.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message says what is wrong."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_units(self) -> int:
        return self.num_hidden_layers + 2

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
        }

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> ModelConfig:
        mt = data.get("model_type", "llama")
        if mt not in ("llama", "mistral", "qwen2"):
            raise CheckpointError(f"model_type {mt!r} is not a Llama-style decoder")
        if data.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act {data.get('hidden_act')!r} is not supported (need silu)")
        rs = data.get("rope_scaling")
        if rs:
            # Llama 3.x long-context scaling changes RoPE frequencies; refusing is better than wrong tokens.
            raise CheckpointError(f"rope_scaling {rs!r} is not supported yet")
        try:
            heads = int(data["num_attention_heads"])
            return cls(
                hidden_size=int(data["hidden_size"]),
                num_hidden_layers=int(data["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(data.get("num_key_value_heads") or heads),
                intermediate_size=int(data["intermediate_size"]),
                vocab_size=int(data["vocab_size"]),
                rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
                rope_theta=float(data.get("rope_theta", 10000.0)),
                max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
                torch_dtype=str(data.get("torch_dtype") or "float32"),
                bos_token_id=data.get("bos_token_id"),
                eos_token_id=data.get("eos_token_id"),
                head_dim=data.get("head_dim"),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r}") from None


def read_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir} has no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} does not parse: {e}") from None
    return ModelConfig.from_hf(data)


# --------------------------------------------------------------------------- units


def unit_tensor_names(cfg: ModelConfig, unit: int) -> list[str]:
    """Names of the tensors that make up one unit (see module docstring)."""
    L = cfg.num_hidden_layers
    if unit == 0:
        return ["model.embed_tokens.weight"]
    if 1 <= unit <= L:
        p = f"model.layers.{unit - 1}."
        return [
            p + "input_layernorm.weight",
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "post_attention_layernorm.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ]
    if unit == L + 1:
        # A tied head reuses the embedding matrix: the head unit carries it too, so a stage that
        # holds only the tail of the model can still produce logits.
        return [
            "model.norm.weight",
            "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",
        ]
    raise IndexError(f"unit {unit} out of range 0..{L + 1}")


def unit_shapes(cfg: ModelConfig, unit: int) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.dim_per_head
    q, kv, i, v = (
        cfg.num_attention_heads * d,
        cfg.num_key_value_heads * d,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for name in unit_tensor_names(cfg, unit):
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
        shapes[name] = {
            "embed_tokens": (v, h),
            "lm_head": (v, h),
            "norm": (h,),
            "input_layernorm": (h,),
            "post_attention_layernorm": (h,),
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }[leaf]
    return shapes
