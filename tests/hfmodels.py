"""Tiny random checkpoints written by transformers itself, the oracle of the family tests.

Each case is a transformers config (small sizes, a fixed seed); `build` makes the model with
`AutoModelForCausalLM.from_config`, gives every parameter random values (transformers initialises
biases to zero and norms to one, which would hide a missing bias or norm), saves it with
safetensors in the transformers 5 layout, and rewrites config.json into the transformers 4 layout
(`rope_theta` and `rope_scaling` at the top level, `torch_dtype`) beside it.

transformers is a test dependency only: nothing under cascade/ or services/ imports it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The hub is unreachable here, and nothing in these tests needs it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers

SMALL: dict[str, Any] = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    max_shard_size: str | None = None
    # A tied model that stores lm_head.weight anyway (some exporters do; transformers ignores it).
    store_tied_head: bool = False
    # transformers 4 wrote the rope type as "type" in older configs.
    legacy_type_key: bool = False
    seed: int = 0


CASES: list[Case] = [
    Case("llama", "llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}),
    Case(
        "llama-bias-headdim",
        "llama",
        {"attention_bias": True, "mlp_bias": True, "head_dim": 24, "rope_parameters": {"rope_theta": 5000.0}},
        seed=1,
    ),
    Case("llama-linear", "llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
    Case(
        "llama-llama3",
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
        seed=2,
    ),
    Case(
        "llama-yarn",
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
        legacy_type_key=True,
        seed=3,
    ),
    Case("mistral-window", "mistral", {"sliding_window": 6}, seed=4),
    Case("qwen2", "qwen2", {"tie_word_embeddings": True}, seed=5),
    Case(
        "qwen2-window-sharded",
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
        max_shard_size="40KB",
        seed=6,
    ),
    Case("qwen3", "qwen3", {"head_dim": 24, "rope_parameters": {"rope_theta": 1000000.0}}, seed=7),
    Case(
        "qwen3-tied-bias",
        "qwen3",
        {"tie_word_embeddings": True, "attention_bias": True},
        store_tied_head=True,
        seed=8,
    ),
    Case("llama-bf16", "llama", {"tie_word_embeddings": True}, dtype=torch.bfloat16, seed=9),
]


@dataclass
class Built:
    case: Case
    v5: Path
    v4: Path
    hf: Any  # the transformers model, float32, eval mode


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                # 1/sqrt(fan_in) keeps activations O(1), so logits are not degenerate.
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:  # norm weights
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def to_v4(cfg: dict[str, Any], legacy_type_key: bool = False) -> dict[str, Any]:
    """A transformers 5 config.json as transformers 4.x wrote it."""
    c = dict(cfg)
    rope = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") == "default":
        c["rope_scaling"] = None
    else:
        if legacy_type_key:
            rope["type"] = rope.pop("rope_type")
        c["rope_scaling"] = rope
    c["torch_dtype"] = str(c.pop("dtype"))
    # 4.x Qwen configs did not list layer_types: the reader derives them from max_window_layers.
    c.pop("layer_types", None)
    c["transformers_version"] = "4.46.0"
    return c


def build(case: Case, root: Path) -> Built:
    kwargs = {**SMALL, **case.config}
    config = transformers.AutoConfig.for_model(case.model_type, **kwargs)
    torch.manual_seed(case.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(model, case.seed)
    model = model.to(case.dtype)
    v5 = root / case.name / "v5"
    save: dict[str, Any] = {"safe_serialization": True}
    if case.max_shard_size:
        save["max_shard_size"] = case.max_shard_size
    model.save_pretrained(v5, **save)
    if case.store_tied_head:
        _add_tied_head(v5)
    v4 = root / case.name / "v4"
    v4.mkdir(parents=True)
    for f in v5.iterdir():
        if f.name != "config.json":
            (v4 / f.name).symlink_to(f)
    data = json.loads((v5 / "config.json").read_text())
    (v4 / "config.json").write_text(json.dumps(to_v4(data, case.legacy_type_key), indent=2))
    # The oracle computes in float32 from the very weights that were saved (bf16 ones upcast).
    hf = transformers.AutoModelForCausalLM.from_pretrained(v5, dtype=torch.float32)
    hf.eval()
    return Built(case, v5, v4, hf)


def _add_tied_head(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path, metadata={"format": "pt"})


@torch.no_grad()
def hf_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    """transformers' logits [T, V] at every position of one prompt."""
    return hf(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(hf: Any, ids: list[int], steps: int) -> list[int]:
    """transformers' greedy tokens, recomputing the whole sequence each step (no cache to trust)."""
    seq = list(ids)
    out = []
    for _ in range(steps):
        tok = int(hf(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
    return out
