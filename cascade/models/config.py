"""Model configuration (Hugging Face `config.json`, `generation_config.json`) and the split of a
model into *units*, without torch, so the gateway can read it cheaply.

A model is moved and made ready unit by unit, front to back:
unit 0 = token embedding, units 1..L = decoder layers 0..L-1,
unit L+1 = final norm and LM head. Loaders, workers and the gateway all count
readiness in these units.

`config.json` is read as transformers reads it, in both of its layouts: transformers 4 writes
`rope_theta` and `rope_scaling`, transformers 5 writes `rope_parameters` (with `rope_type` and
`rope_theta` inside). What differs between the supported model families (q/k/v bias, q/k norm,
sliding window, the defaults of keys a config may omit) is data in `FAMILIES`, read once here into
plain flags on `ModelConfig`; the decoder reads the flags, never the family name. Whatever would
change the math and is not implemented is refused with a `CheckpointError` that names the file and
the field: a refusal is better than tokens that silently differ from transformers'.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message says what is wrong."""


# --------------------------------------------------------------------------- families

BiasRule = bool | str  # fixed, or the name of the config key that switches it (default False)


@dataclass(frozen=True, slots=True)
class Family:
    """What one transformers model class changes in the Llama-style decoder, as transformers 5.25
    builds it. `defaults` are that class's values for keys a config.json may omit."""

    model_type: str
    architectures: tuple[str, ...]
    defaults: Mapping[str, Any]
    qkv_bias: BiasRule
    o_bias: BiasRule
    mlp_bias: BiasRule
    qk_norm: bool
    # "none": no window; "all": `sliding_window` on every layer (Mistral, null = none);
    # "per_layer": Qwen's `use_sliding_window` + `layer_types` / `max_window_layers`.
    sliding: Literal["none", "all", "per_layer"]


_COMMON_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "head_dim": None,
}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            ("LlamaForCausalLM",),
            {**_COMMON_DEFAULTS, "num_key_value_heads": None, "max_position_embeddings": 2048,
             "bos_token_id": 1, "eos_token_id": 2},
            qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias", qk_norm=False, sliding="none",
        ),
        # MistralAttention builds its projections without bias whatever attention_bias says.
        Family(
            "mistral",
            ("MistralForCausalLM",),
            {**_COMMON_DEFAULTS, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
             "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096},
            qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, sliding="all",
        ),
        # Qwen2Attention: q/k/v always biased, o never (attention_bias is not read).
        Family(
            "qwen2",
            ("Qwen2ForCausalLM",),
            {**_COMMON_DEFAULTS, "num_key_value_heads": 32, "max_position_embeddings": 32768,
             "bos_token_id": None, "eos_token_id": None, "use_sliding_window": False, "sliding_window": 4096,
             "max_window_layers": 28},
            qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False, sliding="per_layer",
        ),
        Family(
            "qwen3",
            ("Qwen3ForCausalLM",),
            {**_COMMON_DEFAULTS, "num_key_value_heads": 32, "max_position_embeddings": 32768, "head_dim": 128,
             "bos_token_id": None, "eos_token_id": None, "use_sliding_window": False, "sliding_window": 4096,
             "max_window_layers": 28},
            qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False, qk_norm=True, sliding="per_layer",
        ),
    )
}  # fmt: skip

# transformers' default_theta, for configs that name no theta at all.
DEFAULT_ROPE_THETA = 10000.0
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# transformers' ACT2FN maps both names to SiLU.
_SILU = ("silu", "swish")
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class Rope:
    """RoPE as transformers standardises it (`rope_parameters`), every default resolved.

    `factor`: linear/llama3/yarn scaling; `original_max_position_embeddings`: llama3/yarn;
    `low_freq_factor`/`high_freq_factor`: llama3; `beta_fast`/`beta_slow`/`truncate`: yarn;
    `attention_factor`: multiplies cos and sin (yarn's mscale; 1.0 for the other types)."""

    rope_type: str = "default"
    theta: float = DEFAULT_ROPE_THETA
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """What `generation_config.json` sets, as transformers' GenerationConfig reads it; None = absent.

    transformers decodes greedily unless `do_sample` is true (it then ignores temperature, top_p,
    top_k and min_p): `request_defaults()` applies that rule for a serving front end."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None

    def present(self) -> dict[str, Any]:
        """Every field the file set (EOS ids as a list)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and v != ():
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def request_defaults(self) -> dict[str, Any]:
        """Defaults for a request that does not set them, with transformers' meaning: sampling
        parameters only when `do_sample` is true, else temperature 0 (greedy)."""
        out: dict[str, Any] = {}
        if self.do_sample:
            for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
                v = getattr(self, name)
                if v is not None:
                    out[name] = v
        else:
            out["temperature"] = 0.0
        for name in ("repetition_penalty", "max_new_tokens"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        return out


@dataclass(frozen=True, slots=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None
    model_type: str = "llama"
    rope: Rope = Rope()
    # What the family changes in the decoder (see FAMILIES), resolved from the config.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Each query attends to itself and the sliding_window - 1 keys before it, in these layers.
    sliding_window: int | None = None
    sliding_layers: frozenset[int] = frozenset()
    generation: GenerationDefaults = field(default=GenerationDefaults())

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_units(self) -> int:
        return self.num_hidden_layers + 2

    @property
    def eos_ids(self) -> list[int]:
        """Every end-of-sequence id the model declares, in config.json and generation_config.json."""
        ids: list[int] = []
        if isinstance(self.eos_token_id, list):
            ids.extend(self.eos_token_id)
        elif self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        ids.extend(self.generation.eos_token_ids)
        return list(dict.fromkeys(ids))

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (0-based), None for full attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    def to_hf(self) -> dict[str, Any]:
        """config.json for a generated model (a Llama with default RoPE; transformers 4 layout)."""
        plain = not (self.qkv_bias or self.o_bias or self.mlp_bias or self.qk_norm or self.sliding_layers)
        if self.model_type != "llama" or self.rope != Rope(theta=self.rope.theta) or not plain:
            raise CheckpointError("to_hf writes plain Llama configs only")
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
            "rope_theta": self.rope.theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
        }

    @classmethod
    def from_hf(cls, data: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
        """Read a config.json dict; `source` names the file in errors."""
        return _Reader(data, source).config()


class _Reader:
    """One config.json read into a ModelConfig; every error names the file and the field."""

    def __init__(self, data: Any, source: str) -> None:
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: not a JSON object")
        self.data = data
        self.source = source

    def fail(self, fld: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {fld}: {why}")

    # ---------------------------------------------------------------- typed fields
    def get(self, key: str, fam: Family | None = None) -> Any:
        """The value in the file (null included: transformers keeps an explicit None), else the
        family's default."""
        if key in self.data or fam is None:
            return self.data.get(key)
        return fam.defaults.get(key)

    def int_(self, key: str, fam: Family | None = None, *, required: bool = False, minimum: int = 1) -> int | None:
        v = self.get(key, fam)
        if v is None:
            if required:
                raise self.fail(key, "missing")
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(key, f"{v!r} is not an integer >= {minimum}")
        return v

    def req_int(self, key: str, fam: Family | None = None) -> int:
        v = self.int_(key, fam, required=True)
        assert v is not None
        return v

    def float_(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(key, f"{value!r} is not a number")
        return float(value)

    def bool_(self, key: str, fam: Family) -> bool:
        v = self.get(key, fam)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise self.fail(key, f"{v!r} is not true or false")
        return v

    def token_ids(self, key: str, fam: Family) -> int | list[int] | None:
        v = self.get(key, fam)
        if v is None:
            return None
        return _token_ids(v, lambda why: self.fail(key, why))

    # ---------------------------------------------------------------- the config
    def family(self) -> Family:
        mt = self.data.get("model_type")
        if mt is None:
            raise self.fail("model_type", "missing (say which model family this is)")
        fam = FAMILIES.get(mt) if isinstance(mt, str) else None
        if fam is None:
            raise self.fail("model_type", f"{mt!r} is not supported (supported: {', '.join(FAMILIES)})")
        arch = self.data.get("architectures")
        if arch is not None:
            if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
                raise self.fail("architectures", f"{arch!r} is not a list of class names")
            unknown = [a for a in arch if a not in fam.architectures]
            if unknown:
                supported = ", ".join(fam.architectures)
                raise self.fail("architectures", f"{unknown} is not supported for {mt!r} (supported: {supported})")
        return fam

    def config(self) -> ModelConfig:
        fam = self.family()
        d = self.data
        if d.get("quantization_config") is not None:
            raise self.fail("quantization_config", "quantized checkpoints are not supported")
        act = self.get("hidden_act", fam)
        if act not in _SILU:
            raise self.fail("hidden_act", f"{act!r} is not supported (only silu)")
        prf = d.get("partial_rotary_factor")
        if prf is not None and prf != 1:
            raise self.fail("partial_rotary_factor", f"{prf!r}: partial rotary embeddings are not supported")

        hidden = self.req_int("hidden_size")
        heads = self.req_int("num_attention_heads")
        layers = self.req_int("num_hidden_layers")
        # transformers fills an explicit null with the number of attention heads (no GQA).
        kv = self.int_("num_key_value_heads", fam) or heads
        head_dim = self.int_("head_dim", fam)
        if fam.model_type == "llama" and hidden % heads:
            # LlamaConfig.validate_architecture refuses this whatever head_dim says.
            raise self.fail("hidden_size", f"{hidden} is not a multiple of num_attention_heads {heads}")
        if head_dim is None and hidden % heads:
            raise self.fail("hidden_size", f"{hidden} is not a multiple of num_attention_heads {heads}")
        if heads % kv:
            raise self.fail("num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
        dim = head_dim or hidden // heads
        if dim % 2:
            raise self.fail("head_dim", f"{dim} is odd; RoPE rotates pairs")
        max_pos = self.req_int("max_position_embeddings", fam)

        eps = self.get("rms_norm_eps", fam)
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        if dtype not in WEIGHT_DTYPES:
            key = "dtype" if d.get("dtype") else "torch_dtype"
            raise self.fail(key, f"{dtype!r} is not supported (one of {', '.join(WEIGHT_DTYPES)})")

        window, window_layers = self.sliding(fam, layers)
        return ModelConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=self.req_int("intermediate_size"),
            vocab_size=self.req_int("vocab_size"),
            rms_norm_eps=self.float_("rms_norm_eps", eps),
            max_position_embeddings=max_pos,
            tie_word_embeddings=self.bool_("tie_word_embeddings", fam),
            torch_dtype=dtype,
            bos_token_id=self.int_("bos_token_id", fam, minimum=0),
            eos_token_id=self.token_ids("eos_token_id", fam),
            head_dim=head_dim,
            model_type=fam.model_type,
            rope=self.rope(max_pos, dim),
            qkv_bias=self.bias(fam.qkv_bias, fam),
            o_bias=self.bias(fam.o_bias, fam),
            mlp_bias=self.bias(fam.mlp_bias, fam),
            qk_norm=fam.qk_norm,
            sliding_window=window,
            sliding_layers=window_layers,
        )

    def bias(self, rule: BiasRule, fam: Family) -> bool:
        return rule if isinstance(rule, bool) else self.bool_(rule, fam)

    def sliding(self, fam: Family, layers: int) -> tuple[int | None, frozenset[int]]:
        if fam.sliding == "none":
            return None, frozenset()
        if fam.sliding == "all":
            w = self.int_("sliding_window", fam)
            return (w, frozenset(range(layers))) if w is not None else (None, frozenset())
        # Qwen: the window is off unless use_sliding_window; then layer_types (as saved by
        # transformers 5) or, without them, every layer from max_window_layers on.
        use = self.bool_("use_sliding_window", fam)
        w = self.int_("sliding_window", fam) if use else None
        types = self.data.get("layer_types")
        if types is None:
            if w is None:
                return None, frozenset()
            first = self.int_("max_window_layers", fam, minimum=0) or 0
            return w, frozenset(range(first, layers))
        if not isinstance(types, list) or len(types) != layers:
            raise self.fail("layer_types", f"must list one type for each of the {layers} layers")
        kinds = {"full_attention": False, "attention": False, "sliding_attention": True}
        bad = sorted({t for t in types if t not in kinds}, key=str)
        if bad:
            raise self.fail("layer_types", f"{bad} is not supported (full_attention or sliding_attention)")
        sliding = frozenset(i for i, t in enumerate(types) if kinds[t])
        if sliding and w is None:
            raise self.fail("layer_types", "names sliding_attention layers but no sliding_window is in use")
        return (w, sliding) if sliding else (None, frozenset())

    def rope(self, max_pos: int, dim: int) -> Rope:
        """RoPE parameters as transformers' `convert_rope_params_to_dict` + `standardize_rope_params`
        leave them: `rope_scaling` (transformers 4) wins over `rope_parameters` (transformers 5);
        a theta inside the dict wins over the top-level `rope_theta`."""
        d = self.data
        key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        raw = d.get(key) or {}
        if not isinstance(raw, dict):
            raise self.fail(key, f"{raw!r} is not an object")
        if any(isinstance(v, dict) for v in raw.values()):
            raise self.fail(key, "RoPE parameters per layer type are not supported")
        p = dict(raw)
        type_key = "rope_type" if "rope_type" in p else "type"
        rope_type = p.get(type_key, "default")
        if rope_type not in ROPE_TYPES:
            raise self.fail(f"{key}.{type_key}", f"{rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        theta_key = f"{key}.rope_theta" if p.get("rope_theta") is not None else "rope_theta"
        theta = p["rope_theta"] if p.get("rope_theta") is not None else d.get("rope_theta", DEFAULT_ROPE_THETA)
        theta = self.float_(theta_key, theta)
        if theta <= 0:
            raise self.fail(theta_key, f"{theta} is not positive")
        prf = p.get("partial_rotary_factor")
        if prf is not None and prf != 1:
            raise self.fail(f"{key}.partial_rotary_factor", f"{prf!r}: partial rotary embeddings are not supported")
        if p.get("mrope_section") is not None:
            raise self.fail(f"{key}.mrope_section", "multimodal RoPE is not supported")
        if rope_type == "default":
            return Rope(theta=theta)

        def num(name: str, default: float | None = None) -> float:
            v = p.get(name)
            if v is None:
                if default is None:
                    raise self.fail(f"{key}.{name}", f"missing (rope type {rope_type!r} needs it)")
                return default
            return self.float_(f"{key}.{name}", v)

        if rope_type == "linear":
            return Rope("linear", theta, factor=num("factor"))
        # standardize_rope_params: a top-level original_max_position_embeddings (Phi-3 style) wins,
        # else the one in the dict, else max_position_embeddings.
        top = d.get("original_max_position_embeddings")
        orig_key = "original_max_position_embeddings" if top is not None else f"{key}.original_max_position_embeddings"
        orig_v = top if top is not None else p.get("original_max_position_embeddings", max_pos)
        if isinstance(orig_v, bool) or not isinstance(orig_v, int | float) or orig_v <= 0:
            raise self.fail(orig_key, f"{orig_v!r} is not a positive integer")
        orig = int(orig_v)
        if rope_type == "llama3":
            return Rope(
                "llama3", theta, factor=num("factor"), original_max_position_embeddings=orig,
                low_freq_factor=num("low_freq_factor"), high_freq_factor=num("high_freq_factor"),
            )  # fmt: skip
        # yarn (transformers' _compute_yarn_parameters)
        factor = num("factor", max_pos / orig)
        attention = p.get("attention_factor")
        if attention is None:
            mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
            if mscale and mscale_all:
                m1, m2 = self.float_(f"{key}.mscale", mscale), self.float_(f"{key}.mscale_all_dim", mscale_all)
                attention = _yarn_mscale(factor, m1) / _yarn_mscale(factor, m2)
            else:
                attention = _yarn_mscale(factor)
        truncate = p.get("truncate", True)
        if not isinstance(truncate, bool):
            raise self.fail(f"{key}.truncate", f"{truncate!r} is not true or false")
        return Rope(
            "yarn", theta, factor=factor, original_max_position_embeddings=orig,
            # transformers takes `get(...) or 32`: a 0 or null means the default too.
            beta_fast=num("beta_fast", 32.0) or 32.0, beta_slow=num("beta_slow", 1.0) or 1.0,
            truncate=truncate, attention_factor=self.float_(f"{key}.attention_factor", attention),
        )  # fmt: skip


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _token_ids(v: Any, fail: Any) -> int | list[int]:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return list(v)
    raise fail(f"{v!r} is not a token id or a list of token ids")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} does not parse: {e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from None


def read_generation_config(model_dir: Path) -> GenerationDefaults:
    """`generation_config.json` as transformers' GenerationConfig reads it (absent file: nothing set).
    EOS may be one id or a list (Llama 3 has three)."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return GenerationDefaults()
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")

    def fail(key: str) -> Any:
        return lambda why: CheckpointError(f"{path}: {key}: {why}")

    values: dict[str, Any] = {}
    for f in fields(GenerationDefaults):
        key = "eos_token_id" if f.name == "eos_token_ids" else f.name
        v = data.get(key)
        if v is None:
            continue
        if f.name == "eos_token_ids":
            ids = _token_ids(v, fail(key))
            values[f.name] = tuple(ids) if isinstance(ids, list) else (ids,)
        elif f.name in ("bos_token_id", "pad_token_id"):
            ids = _token_ids(v, fail(key))
            if isinstance(ids, list):
                raise fail(key)("is a list; one token id expected")
            values[f.name] = ids
        elif f.name == "do_sample":
            if not isinstance(v, bool):
                raise fail(key)(f"{v!r} is not true or false")
            values[f.name] = v
        elif f.name in ("top_k", "max_new_tokens", "max_length"):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise fail(key)(f"{v!r} is not a non-negative integer")
            values[f.name] = v
        else:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise fail(key)(f"{v!r} is not a non-negative number")
            values[f.name] = float(v)
    return GenerationDefaults(**values)


def read_config(model_dir: Path) -> ModelConfig:
    """config.json (plus the EOS ids and sampling defaults of generation_config.json) of a model
    directory, checked as `ModelConfig.from_hf` checks it."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    cfg = ModelConfig.from_hf(_read_json(path), source=str(path))
    return replace(cfg, generation=read_generation_config(Path(model_dir)))


# --------------------------------------------------------------------------- units

# The tensors of one decoder layer, by name after "model.layers.{i}.", with what makes each present
# (None: always). The order is the order of a layer unit on the wire.
_LAYER_TENSORS: tuple[tuple[str, str | None], ...] = (
    ("input_layernorm.weight", None),
    ("self_attn.q_proj.weight", None),
    ("self_attn.q_proj.bias", "qkv_bias"),
    ("self_attn.k_proj.weight", None),
    ("self_attn.k_proj.bias", "qkv_bias"),
    ("self_attn.v_proj.weight", None),
    ("self_attn.v_proj.bias", "qkv_bias"),
    ("self_attn.q_norm.weight", "qk_norm"),
    ("self_attn.k_norm.weight", "qk_norm"),
    ("self_attn.o_proj.weight", None),
    ("self_attn.o_proj.bias", "o_bias"),
    ("post_attention_layernorm.weight", None),
    ("mlp.gate_proj.weight", None),
    ("mlp.gate_proj.bias", "mlp_bias"),
    ("mlp.up_proj.weight", None),
    ("mlp.up_proj.bias", "mlp_bias"),
    ("mlp.down_proj.weight", None),
    ("mlp.down_proj.bias", "mlp_bias"),
)
LAYER_TENSOR_SUFFIXES = tuple(s for s, _ in _LAYER_TENSORS)


def layer_tensor_suffixes(cfg: ModelConfig) -> list[str]:
    """The names of one decoder layer's tensors after "model.layers.{i}.", for this config."""
    return [s for s, flag in _LAYER_TENSORS if flag is None or getattr(cfg, flag)]


def unit_tensor_names(cfg: ModelConfig, unit: int) -> list[str]:
    """Names of the tensors that make up one unit (see module docstring)."""
    L = cfg.num_hidden_layers
    if unit == 0:
        return ["model.embed_tokens.weight"]
    if 1 <= unit <= L:
        p = f"model.layers.{unit - 1}."
        return [p + s for s in layer_tensor_suffixes(cfg)]
    if unit == L + 1:
        # A tied head reuses the embedding matrix: the head unit carries it too, so a stage that
        # holds only the tail of the model can still produce logits.
        return [
            "model.norm.weight",
            "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",
        ]
    raise IndexError(f"unit {unit} out of range 0..{L + 1}")


def unit_shapes(cfg: ModelConfig, unit: int) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for each tensor of one unit."""
    h, d = cfg.hidden_size, cfg.dim_per_head
    q, kv, i, v = (
        cfg.num_attention_heads * d,
        cfg.num_key_value_heads * d,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    by_module: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {
        # module: (weight shape, bias shape)
        "embed_tokens": ((v, h), None),
        "lm_head": ((v, h), None),
        "norm": ((h,), None),
        "input_layernorm": ((h,), None),
        "post_attention_layernorm": ((h,), None),
        "q_norm": ((d,), None),
        "k_norm": ((d,), None),
        "q_proj": ((q, h), (q,)),
        "k_proj": ((kv, h), (kv,)),
        "v_proj": ((kv, h), (kv,)),
        "o_proj": ((h, q), (h,)),
        "gate_proj": ((i, h), (i,)),
        "up_proj": ((i, h), (i,)),
        "down_proj": ((h, i), (h,)),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name in unit_tensor_names(cfg, unit):
        module, kind = name.rsplit(".", 2)[-2:]
        weight, bias = by_module[module]
        shape = weight if kind == "weight" else bias
        assert shape is not None, name
        shapes[name] = shape
    return shapes
