"""GGUF files (llama.cpp's format) converted into a checkpoint folder in the transformers layout,
so a llama.cpp user's model serves as it is.

transformers is the reference: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` on the same file must give the same logits
and the same token ids as transformers on the folder written here. So, as transformers does:

* weights are dequantized with the `gguf` package; llama.cpp permutes the rows of the q and k
  projections of llama-family models (it pairs rotary halves differently) and we undo that;
* transformers computes a GGUF model in float32, so quantized tensors are stored as float32 (their
  dequantized values need it); F16 and BF16 tensors keep their 2 bytes, which upcast exactly;
* config.json comes from the `<arch>.*` metadata; tokenizer.json from the `tokenizer.ggml.*`
  vocabulary, merges and pre-tokenizer name (cascade.models.gguf_tokenizer); chat_template.jinja
  from `tokenizer.chat_template`.

Anything this cannot convert faithfully (another architecture, mixture of experts, rope scaling,
a quantization the `gguf` package cannot dequantize, an unknown pre-tokenizer) is refused with a
GGUFError naming the file and the reason: never a silent difference.

`convert_gguf_cached` keeps conversions under `$CASCADE_HOME/models/gguf/`, keyed by the file's
path, size and modification time, written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from cascade.console import Progress, human_bytes
from cascade.models.checkpoint import write_safetensors
from cascade.models.gguf_tokenizer import tokenizer_files
from cascade.models.source import GGUF_CONVERTER_VERSION, GGUF_MANIFEST, GGUFError, gguf_cache_dir

__all__ = [
    "GGUFError",
    "GGUFPlan",
    "convert_gguf",
    "convert_gguf_cached",
    "inspect_gguf",
]

# transformers' default shard size: large models still land in a few files.
SHARD_BYTES = 5_000_000_000

Q = gguf.GGMLQuantizationType


# --------------------------------------------------------------------------- architectures

# GGUF `general.architecture` → (transformers class, model_type).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# What each family adds to a layer: Qwen2 biases on q/k/v, Qwen3 RMSNorm on q and k per head.
_LAYER_EXTRAS = {
    "llama": {},
    "qwen2": {
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
    },
    "qwen3": {
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
    },
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# Types whose values are stored as they are; every other type is dequantized to float32.
_KEEP_DTYPE = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class TensorPlan:
    gguf_name: str
    name: str  # transformers name
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored in the folder
    qtype: gguf.GGMLQuantizationType
    # llama.cpp's rotary row permutation to undo: the head count it was applied with, or 0.
    unpermute_heads: int = 0


@dataclass(frozen=True, slots=True)
class GGUFPlan:
    """Everything a conversion writes, read and checked from the file's metadata and tensor table
    (no tensor data is touched), so a file is refused before anything is written."""

    path: Path
    arch: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    tensors: list[TensorPlan] = field(default_factory=list)
    # The open file, kept so writing does not parse it again (seconds for a large vocabulary).
    reader: gguf.GGUFReader | None = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(_numel(t.shape) * t.dtype.itemsize for t in self.tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def open_gguf(path: Path) -> gguf.GGUFReader:
    """The file's reader, or a GGUFError that says why it is not a usable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        # The reader walks lengths and offsets written in the file: a cut-off download or a damaged
        # file shows up as one of these while it does.
        raise GGUFError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path} is truncated: tensor {t.name} ends past the end of the file; download it again")
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise GGUFError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
    return reader


def inspect_gguf(path: Path) -> GGUFPlan:
    """Read and check a GGUF file's metadata and tensor table; raise GGUFError if it cannot be
    converted faithfully."""
    path = Path(path)
    reader = open_gguf(path)
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = f.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{path}: metadata {key} is corrupt ({e})") from None
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)}); "
            "Cascade runs Llama-style decoders"
        )
    if int(meta.get("split.count", 1) or 1) > 1:
        raise GGUFError(
            f"{path} is one part of a split GGUF ({meta['split.count']} files): merge them first "
            "with llama.cpp's `llama-gguf-split --merge`"
        )
    if int(meta.get(f"{arch}.expert_count", 0) or 0) > 0:
        raise GGUFError(f"{path} is a mixture-of-experts model ({meta[f'{arch}.expert_count']} experts): not supported")

    by_name = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in by_name:
        raise GGUFError(f"{path} scales its rotary frequencies (rope_freqs, Llama 3.1-style): not supported yet")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path} uses rope scaling {scaling!r}: not supported yet")

    unsupported = sorted({t.tensor_type.name for t in reader.tensors if not _can_dequantize(t.tensor_type)})
    if unsupported:
        raise GGUFError(
            f"{path} holds tensors in {', '.join(unsupported)}, which the installed gguf package "
            f"(version {_gguf_version()}) cannot dequantize: use a file quantized differently (Q8_0, Q4_K_M, F16...)"
        )

    config = _config(path, arch, meta, by_name)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    layers = config["num_hidden_layers"]
    tensors: list[TensorPlan] = []
    unknown: list[str] = []
    for t in reader.tensors:
        name = _hf_name(arch, t.name)
        if name is None:
            unknown.append(t.name)
            continue
        # ggml lists dimensions fastest-moving first; torch the other way round.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        unpermute = 0
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            unpermute = heads if ".attn_q." in t.name else kv_heads
        tensors.append(
            TensorPlan(t.name, name, shape, _KEEP_DTYPE.get(t.tensor_type, torch.float32), t.tensor_type, unpermute)
        )
    if unknown:
        raise GGUFError(
            f"{path} holds tensors a {arch} decoder does not have ({', '.join(unknown[:4])}"
            f"{', ...' if len(unknown) > 4 else ''}): not supported"
        )
    expected = {v for v in _GLOBAL_TENSORS.values() if v != "lm_head.weight" or not config["tie_word_embeddings"]}
    for i in range(layers):
        expected |= {f"model.layers.{i}.{leaf}" for leaf in _LAYER_TENSORS.values()}
        expected |= {f"model.layers.{i}.{leaf}" for leaf in _LAYER_EXTRAS[arch].values()}
    got = {t.name for t in tensors}
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise GGUFError(
            f"{path}: its tensors do not make a {layers}-layer {arch} decoder "
            f"(missing {missing[:3] or 'none'}, unexpected {extra[:3] or 'none'})"
        )
    _check_shapes(path, config, tensors)

    tokenizer, tokenizer_config, generation_config = tokenizer_files(path, meta, config)
    template = meta.get("tokenizer.chat_template")
    return GGUFPlan(
        path=path,
        arch=arch,
        config=config,
        generation_config=generation_config,
        tokenizer=tokenizer,
        tokenizer_config=tokenizer_config,
        chat_template=template if isinstance(template, str) else None,
        tensors=tensors,
        reader=reader,
    )


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the installed gguf package dequantizes this type: try it on one block of zeros,
    which is exact about what the package can do, release by release."""
    if qtype in (Q.F32, Q.F16):
        return True
    sizes = gguf.GGML_QUANT_SIZES.get(qtype)
    if sizes is None:
        return False
    try:
        out = gguf.quants.dequantize(np.zeros((1, sizes[1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return bool(np.issubdtype(out.dtype, np.floating))


def _hf_name(arch: str, name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _BLOCK.fullmatch(name)
    if m is None:
        return None
    leaf = _LAYER_TENSORS.get(m[2]) or _LAYER_EXTRAS[arch].get(m[2])
    return f"model.layers.{m[1]}.{leaf}" if leaf else None


def _one(path: Path, key: str, value: Any) -> int:
    """A per-model count that some files store per layer: refuse layers that differ."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"{path}: {key} differs between layers ({value[:4]}...): not supported")
        value = value[0]
    return int(value)


def _config(path: Path, arch: str, meta: dict[str, Any], by_name: dict[str, Any]) -> dict[str, Any]:
    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise GGUFError(f"{path}: metadata lacks {full}")
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = _one(path, f"{arch}.attention.head_count", need("attention.head_count"))
    kv_heads = _one(path, f"{arch}.attention.head_count_kv", meta.get(f"{arch}.attention.head_count_kv", heads))
    ffn = _one(path, f"{arch}.feed_forward_length", need("feed_forward_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    value_dim = int(meta.get(f"{arch}.attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{path}: key and value heads differ in size ({head_dim} vs {value_dim}): not supported")
    rope_dim = meta.get(f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise GGUFError(f"{path}: rotary embedding covers {rope_dim} of {head_dim} head dimensions: not supported")
    embd = by_name.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{path} has no token_embd.weight tensor")
    vocab = int(meta.get(f"{arch}.vocab_size") or embd.shape.tolist()[-1])
    arch_class, model_type = ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [arch_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        # The file's float32 value as it is (9.999999747378752e-06, not 1e-05): transformers reads it so.
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in by_name,
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2",
        # transformers computes a GGUF model in float32; so does this folder (see module docstring).
        "torch_dtype": "float32",
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    for key, hf in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[hf] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return config


def _check_shapes(path: Path, config: dict[str, Any], tensors: list[TensorPlan]) -> None:
    h, hd = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    i, v = config["intermediate_size"], config["vocab_size"]
    want = {
        "embed_tokens.weight": (v, h),
        "lm_head.weight": (v, h),
        "q_proj.weight": (q, h),
        "k_proj.weight": (kv, h),
        "v_proj.weight": (kv, h),
        "o_proj.weight": (h, q),
        "q_proj.bias": (q,),
        "k_proj.bias": (kv,),
        "v_proj.bias": (kv,),
        "gate_proj.weight": (i, h),
        "up_proj.weight": (i, h),
        "down_proj.weight": (h, i),
        "q_norm.weight": (hd,),
        "k_norm.weight": (hd,),
    }
    for t in tensors:
        leaf = ".".join(t.name.rsplit(".", 2)[-2:])
        expect = want.get(leaf, (h,))  # every other tensor is a norm over the hidden size
        if t.shape != expect:
            raise GGUFError(f"{path}: {t.gguf_name} has shape {t.shape}, its metadata implies {expect}")


# --------------------------------------------------------------------------- writing


def convert_gguf(
    path: Path, out_dir: Path, progress: Callable[[int, int], None] | None = None, plan: GGUFPlan | None = None
) -> GGUFPlan:
    """Write the checkpoint folder for a GGUF file into `out_dir` (not atomic: see convert_gguf_cached).

    `progress(done, total)` is called after each tensor."""
    plan = plan or inspect_gguf(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = plan.reader or open_gguf(plan.path)
    by_name = {t.name: t for t in reader.tensors}

    def produce(name: str) -> torch.Tensor:
        tp = plans[name]
        return _tensor(by_name[tp.gguf_name], tp)

    plans = {t.name: t for t in plan.tensors}
    shards = _shards(plan.tensors)
    total, done = len(plan.tensors), 0
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        base = done

        def shard_progress(n: int, _of: int, base: int = base) -> None:
            if progress:
                progress(base + n, total)

        write_safetensors(
            out_dir / fname,
            {t.name: (t.shape, t.dtype) for t in shard},
            produce,
            metadata={"format": "pt"},
            progress=shard_progress,
        )
        done += len(shard)
        weight_map.update(dict.fromkeys((t.name for t in shard), fname))
    if len(shards) > 1:
        _write_json(
            out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": plan.nbytes}, "weight_map": weight_map},
        )
    _write_json(out_dir / "config.json", plan.config)
    _write_json(out_dir / "generation_config.json", plan.generation_config)
    _write_json(out_dir / "tokenizer.json", plan.tokenizer, indent=None)
    _write_json(out_dir / "tokenizer_config.json", plan.tokenizer_config)
    if plan.chat_template:
        (out_dir / "chat_template.jinja").write_text(plan.chat_template)
    return plan


def _tensor(t: Any, tp: TensorPlan) -> torch.Tensor:
    if tp.qtype in (Q.F32, Q.F16):
        out = torch.from_numpy(np.array(t.data))  # a copy: the reader's arrays map the file read-only
    elif tp.qtype == Q.BF16:
        # numpy has no bfloat16: the reader hands raw bytes, which torch reinterprets.
        out = torch.from_numpy(np.array(t.data)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(gguf.quants.dequantize(t.data, tp.qtype))
    out = out.reshape(tp.shape).to(tp.dtype)
    if tp.unpermute_heads:
        out = _unpermute(out, tp.unpermute_heads)
    return out


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order: it stores each head's rows with the two rotary halves
    interleaved (pairs), transformers keeps them as two halves."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _shards(tensors: list[TensorPlan]) -> list[list[TensorPlan]]:
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        n = _numel(t.shape) * t.dtype.itemsize
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_json(path: Path, data: dict[str, Any], indent: int | None = 2) -> None:
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- the cache


def convert_gguf_cached(path: Path, *, home: Path | None = None, progress: bool = True) -> Path:
    """The checkpoint folder for a GGUF file: converted once, then reused until the file changes.

    The conversion is written into a temporary folder beside the final one and renamed into place,
    so a crash or a Ctrl-C never leaves a half-written folder that looks finished."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    final = gguf_cache_dir(path, home)
    if (final / GGUF_MANIFEST).is_file():
        return final
    t0 = time.monotonic()
    plan = inspect_gguf(path)  # refuse before writing anything
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(root, final.name)
    tmp = root / f".partial-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bar = Progress(f"converting {path.name}", len(plan.tensors)) if progress else None
    try:
        convert_gguf(path, tmp, bar.update if bar else None, plan=plan)
        st = path.resolve().stat()
        _write_json(
            tmp / GGUF_MANIFEST,
            {
                "source": str(path.resolve()),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "converter_version": GGUF_CONVERTER_VERSION,
                "architecture": plan.arch,
            },
        )
        try:
            tmp.rename(final)
        except OSError:
            # Another process converted the same file meanwhile; its folder is as good as ours.
            if not (final / GGUF_MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bar:
        bar.done(f"done in {time.monotonic() - t0:.1f} s: {human_bytes(plan.nbytes)} in {final}")
    _remove_stale(root, path.resolve(), keep=final)
    return final


def _remove_dead_partials(root: Path, name: str) -> None:
    """Temporary folders of this conversion left by processes that died mid-way."""
    for p in root.glob(f".partial-{name}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier call that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(root: Path, source: Path, keep: Path) -> None:
    """Earlier conversions of the same file (it changed since): they will never be used again."""
    for d in root.iterdir():
        if d == keep or not (d / GGUF_MANIFEST).is_file():
            continue
        try:
            if json.loads((d / GGUF_MANIFEST).read_text()).get("source") == str(source):
                shutil.rmtree(d, ignore_errors=True)
        except (OSError, json.JSONDecodeError):
            continue
