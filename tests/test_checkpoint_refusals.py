"""What Cascade cannot compute exactly as transformers does is refused before any worker takes the
model, with an error that names the file and the field (or the tensor, and both shapes); a weight
file that is missing, truncated or corrupt is caught when the checkpoint is opened."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cascade.cli.supervisor import UpError
from cascade.cli.up import prepare_models
from cascade.config import Deployment, ModelDeployment
from cascade.models.checkpoint import Checkpoint, validate_checkpoint, write_safetensors
from cascade.models.config import (
    CheckpointError,
    GenerationDefaults,
    ModelConfig,
    read_config,
    read_generation_config,
    unit_shapes,
)

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "dtype": "float32",
}
QWEN2 = {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}


def config_with(**changes: Any) -> dict[str, Any]:
    c = {**BASE, **changes}
    return {k: v for k, v in c.items() if v is not DROP}


DROP = object()

# (config.json, the field the error must name)
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown model_type": (config_with(model_type="gemma", architectures=DROP), "model_type"),
    "no model_type": (config_with(model_type=DROP), "model_type"),
    "unknown architecture": (config_with(architectures=["LlamaForSequenceClassification"]), "architectures"),
    "architecture of another family": ({**QWEN2, "architectures": ["LlamaForCausalLM"]}, "architectures"),
    "dynamic rope (v5)": (
        config_with(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        "rope_parameters.rope_type",
    ),
    "dynamic rope (v4, legacy type key)": (
        config_with(rope_parameters=DROP, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
        "rope_scaling.type",
    ),
    "longrope": (
        config_with(
            rope_parameters=DROP,
            rope_theta=1e4,
            rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
        ),
        "rope_scaling.rope_type",
    ),
    "linear rope without factor": (
        config_with(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}),
        "rope_parameters.factor",
    ),
    "llama3 rope without low_freq_factor": (
        config_with(
            rope_parameters=DROP,
            rope_theta=5e5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0},
        ),
        "rope_scaling.low_freq_factor",
    ),
    "rope per layer type": (
        config_with(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        "rope_parameters",
    ),
    "multimodal rope": (
        config_with(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 4]}),
        "rope_parameters.mrope_section",
    ),
    "partial rotary (top level)": (config_with(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "partial rotary (in rope_parameters)": (
        config_with(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}),
        "rope_parameters.partial_rotary_factor",
    ),
    "quantized": (config_with(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
    "gelu": (config_with(hidden_act="gelu_pytorch_tanh"), "hidden_act"),
    "fp8 dtype": (config_with(dtype="float8_e4m3fn"), "dtype"),
    "int8 torch_dtype (v4)": (config_with(dtype=DROP, torch_dtype="int8"), "torch_dtype"),
    "unknown layer type": (
        {**QWEN2, "layer_types": ["full_attention", "chunked_attention"]},
        "layer_types",
    ),
    "sliding layers without a window": (
        {**QWEN2, "use_sliding_window": False, "layer_types": ["full_attention", "sliding_attention"]},
        "layer_types",
    ),
    "missing hidden_size": (config_with(hidden_size=DROP), "hidden_size"),
    "string head count": (config_with(num_attention_heads="4"), "num_attention_heads"),
    "kv heads not dividing heads": (config_with(num_key_value_heads=3), "num_key_value_heads"),
    "odd head_dim": (config_with(head_dim=15), "head_dim"),
    "theta not a number": (config_with(rope_parameters=DROP, rope_theta="big"), "rope_theta"),
    "eos not an id": (config_with(eos_token_id="</s>"), "eos_token_id"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_config_refusals_name_file_and_field(tmp_path: Path, case: str) -> None:
    data, fld = REFUSED[case]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and f": {fld}:" in msg, msg


def test_unreadable_configs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json does not parse"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_config(tmp_path)


# --------------------------------------------------------------------------- generation_config.json


def test_generation_config_sampling_defaults(tmp_path: Path) -> None:
    assert read_generation_config(tmp_path) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 128000,
                "eos_token_id": [128001, 128008, 128009],
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "top_k": 20,
                "repetition_penalty": 1.05,
                "transformers_version": "4.45.0",
            }
        )
    )
    g = read_generation_config(tmp_path)
    assert g.eos_token_ids == (128001, 128008, 128009)
    assert g.present() == {
        "eos_token_ids": [128001, 128008, 128009], "bos_token_id": 128000, "do_sample": True, "temperature": 0.6,
        "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05,
    }  # fmt: skip
    assert g.request_defaults() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    # Without do_sample, transformers decodes greedily whatever temperature says.
    assert GenerationDefaults(temperature=0.7, max_new_tokens=64).request_defaults() == {
        "temperature": 0.0,
        "max_new_tokens": 64,
    }


@pytest.mark.parametrize(
    ("content", "fld"),
    [({"eos_token_id": "</s>"}, "eos_token_id"), ({"temperature": "hot"}, "temperature"), ({"top_k": 1.5}, "top_k")],
)
def test_generation_config_refusals(tmp_path: Path, content: dict[str, Any], fld: str) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"generation_config.json: {fld}:"):
        read_generation_config(tmp_path)


# --------------------------------------------------------------------------- weights


Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def write_model(d: Path, config: dict[str, Any], edit: Callable[[Shapes], object] | None = None) -> ModelConfig:
    """config.json plus one safetensors file with every tensor the config implies (after `edit`)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig.from_hf(config)
    shapes = {n: (s, torch.float32) for u in range(cfg.num_units) for n, s in unit_shapes(cfg, u).items()}
    if edit is not None:
        edit(shapes)
    write_safetensors(d / "model.safetensors", shapes, lambda n: torch.full(shapes[n][0], 0.5))
    return cfg


def rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def refused(d: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as e:
        Checkpoint(d)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_a_good_checkpoint_validates(tmp_path: Path) -> None:
    cfg = write_model(tmp_path / "m", QWEN2)
    assert validate_checkpoint(tmp_path / "m") == read_config(tmp_path / "m") == cfg
    assert cfg.qkv_bias and "model.layers.1.self_attn.v_proj.bias" in Checkpoint(tmp_path / "m").index


def test_missing_tensor_names_it(tmp_path: Path) -> None:
    # qwen2's q/k/v biases are part of the model: a checkpoint without one is refused, not run without it.
    write_model(tmp_path / "m", QWEN2, lambda s: s.pop("model.layers.1.self_attn.k_proj.bias"))
    refused(tmp_path / "m", "model.layers.1.self_attn.k_proj.bias", "missing")


def test_untied_model_needs_its_head(tmp_path: Path) -> None:
    write_model(tmp_path / "m", BASE, lambda s: s.pop("lm_head.weight"))
    refused(tmp_path / "m", "lm_head.weight", "missing")
    # A tied model needs none: its head is the embedding.
    write_model(tmp_path / "t", config_with(tie_word_embeddings=True))
    assert "lm_head.weight" not in Checkpoint(tmp_path / "t").index
    validate_checkpoint(tmp_path / "t")


def test_wrong_shape_names_file_tensor_and_both_shapes(tmp_path: Path) -> None:
    def wider(s: Shapes) -> None:
        s["model.layers.0.mlp.up_proj.weight"] = ((50, 32), torch.float32)

    write_model(tmp_path / "m", BASE, wider)
    refused(tmp_path / "m", "model.safetensors", "model.layers.0.mlp.up_proj.weight", "[50, 32]", "[48, 32]")


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    def int8(s: Shapes) -> None:
        s["model.layers.0.self_attn.q_proj.weight"] = (s["model.layers.0.self_attn.q_proj.weight"][0], torch.int8)

    write_model(tmp_path / "m", BASE, int8)
    refused(tmp_path / "m", "model.layers.0.self_attn.q_proj.weight", "I8")


def test_truncated_file_is_caught_at_open(tmp_path: Path) -> None:
    write_model(tmp_path / "m", BASE)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    refused(tmp_path / "m", str(f), "truncated")
    f.write_bytes(f.read_bytes()[:6])
    refused(tmp_path / "m", str(f), "too short")


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda raw: raw[:8] + b"{garbage" + raw[16:], "header does not parse"),
        (lambda raw: struct.pack("<Q", 1 << 40) + raw[8:], "does not fit"),
    ],
)
def test_corrupt_header_is_caught_at_open(tmp_path: Path, corrupt: Callable[[bytes], bytes], needle: str) -> None:
    write_model(tmp_path / "m", BASE)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(corrupt(f.read_bytes()))
    refused(tmp_path / "m", str(f), needle)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: h["model.norm.weight"].__setitem__("dtype", "F8_E4M3"), "unsupported dtype 'F8_E4M3'"),
        (lambda h: h["model.norm.weight"].__setitem__("shape", [31]), "needs 124 bytes"),
        (lambda h: h["model.norm.weight"].__setitem__("data_offsets", [0, 128]), "overlap"),
        (lambda h: h["model.norm.weight"].__setitem__("data_offsets", "x"), "malformed data_offsets"),
    ],
)
def test_inconsistent_header_entries(tmp_path: Path, edit: Callable[[dict[str, Any]], None], needle: str) -> None:
    write_model(tmp_path / "m", BASE)
    f = tmp_path / "m" / "model.safetensors"
    rewrite_header(f, edit)
    refused(tmp_path / "m", str(f), "model.norm.weight", needle)


def test_no_weight_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    refused(tmp_path, "has no *.safetensors files")


def sharded(d: Path) -> dict[str, str]:
    """Split a written model into two shards plus model.safetensors.index.json; returns the map."""
    ck = Checkpoint(d)
    names = sorted(ck.index)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    tensors = {n: ck.tensor(n).clone() for n in names}
    ck.close()
    (d / "model.safetensors").unlink()
    weight_map = {}
    for shard, part in halves.items():
        write_safetensors(
            d / shard, {n: (tuple(tensors[n].shape), tensors[n].dtype) for n in part}, tensors.__getitem__
        )
        weight_map.update({n: shard for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_reads_through_its_index(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_model(d, QWEN2)
    wm = sharded(d)
    # A stray file the index does not name (e.g. a consolidated copy) is not read.
    (d / "consolidated.safetensors").write_bytes(b"not even safetensors")
    ck = Checkpoint(d)
    assert {n: f.path.name for n, f in ck.index.items()} == wm
    assert ck.tensor("model.layers.1.self_attn.q_proj.bias").shape == (32,)
    ck.close()


def test_missing_shard_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_model(d, BASE)
    sharded(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    refused(d, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_model(d, BASE)
    wm = sharded(d)
    name = next(n for n, s in wm.items() if s.startswith("model-00001"))
    wm[name] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    refused(d, "model.safetensors.index.json", name, "does not hold it")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    refused(d, "weight_map")


def test_a_tensor_in_two_files_without_an_index(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_model(d, BASE)
    write_safetensors(d / "extra.safetensors", {"model.norm.weight": ((32,), torch.float32)}, lambda n: torch.ones(32))
    refused(d, "model.norm.weight", "extra.safetensors", "model.safetensors")


def test_cascade_up_refuses_a_bad_checkpoint_before_starting(tmp_path: Path) -> None:
    d = tmp_path / "m"
    write_model(d, BASE, lambda s: s.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(UpError, match=r"model m: .*model\.layers\.0\.mlp\.down_proj\.weight"):
        prepare_models(Deployment((ModelDeployment("m", d),)))
