"""GGUF conversion, with transformers as the oracle: transformers loading our folder must equal
transformers loading the same GGUF file (logits, token ids, chat template), for every supported
architecture and both tokenizer kinds; plus the cache, and the files that must be refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from cascade.models.gguf import convert_gguf, convert_gguf_cached, inspect_gguf
from cascade.models.source import GGUF_MANIFEST, GGUFError, gguf_cache_dir, resolve_model
from tests.ggufmaker import Q, TinySpec, write_tiny_gguf

transformers = pytest.importorskip("transformers")

CASES = {
    # byte-level BPE with Llama 3's split, BOS added, separate output head
    "llama": TinySpec(),
    # tied head, no pre-tokenizer name (GPT-2's split), no add_bos flag (byte-level default: none)
    "llama-tied": TinySpec(tied=True, pre=None, add_bos=None),
    # SentencePiece-style vocabulary with byte fallback, merges derived from scores
    "llama-spm": TinySpec(tokenizer="llama", pre=None, add_bos=None),
    # q/k/v biases, no rotary permutation
    "qwen2": TinySpec(arch="qwen2", pre="qwen2", add_bos=False),
    # q/k norms, and a head size that is not hidden / heads (transformers' Qwen3 default, 128)
    "qwen3": TinySpec(arch="qwen3", pre="qwen2", heads=2, kv_heads=1, head_dim=128, add_bos=False),
}
TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces, trailing  ",
    "Numbers 2024 and 3.14159, then 1,000,000",
    "<|im_start|>user\nhi<|im_end|>",
    "Über café naïve ✓ 中文 😀",
    "def f(x):\n\treturn x ** 2\n\n",
    "",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict[str, np.ndarray]]]:
    """case → (GGUF file, converted folder, expected tensors by GGUF name)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, spec in CASES.items():
        src = root / f"{name}.gguf"
        expected = write_tiny_gguf(src, spec)
        folder = root / f"{name}-converted"
        convert_gguf(src, folder)
        out[name] = (src, folder, expected)
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_on_the_gguf(converted: dict, case: str) -> None:
    src, folder, _ = converted[case]
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    assert ours.dtype == ref.dtype == torch.float32
    assert type(ours) is type(ref)
    ids = torch.tensor([[1, 5, 77, 200, 13, 99, 300, 42, 7, 256]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_token_ids_equal_transformers_on_the_gguf(converted: dict, case: str) -> None:
    src, folder, _ = converted[case]
    ours = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    for text in TEXTS:
        a, b = ours(text)["input_ids"], ref(text)["input_ids"]
        assert a == b, text
        assert ours.decode(a) == ref.decode(b)
        assert ours.decode(a, skip_special_tokens=True) == ref.decode(b, skip_special_tokens=True)
    a = ours.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    b = ref.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert a == b
    assert ours.decode(a).endswith("<|im_start|>assistant\n")


def test_bos_follows_the_file(converted: dict) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(converted["llama"][1])
    assert tok("hi")["input_ids"][0] == tok.bos_token_id == 1  # add_bos_token = true
    tok = transformers.AutoTokenizer.from_pretrained(converted["llama-tied"][1])
    assert tok("hi")["input_ids"][0] != 1  # byte-level, no flag: no BOS


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_weights_are_the_originals(converted: dict, case: str) -> None:
    """Independently of transformers: q/k rows back in transformers' order (llama.cpp permutes them
    for llama only), and every tensor exactly its stored values."""
    from safetensors.torch import load_file

    _, folder, expected = converted[case]
    got = load_file(folder / "model.safetensors")
    for gguf_name, hf_name in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight"),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
    ]:
        assert torch.equal(got[hf_name].float(), torch.from_numpy(expected[gguf_name])), gguf_name
    if case == "qwen2":
        bias = got["model.layers.0.self_attn.q_proj.bias"]
        assert torch.equal(bias, torch.from_numpy(expected["blk.0.attn_q.bias"]))


def test_storage_keeps_float32_only_where_values_need_it(converted: dict) -> None:
    from safetensors import safe_open

    _, folder, _ = converted["llama"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    assert dtypes["model.layers.0.self_attn.k_proj.weight"] == "F16"  # F16 in the file
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "BF16"  # BF16 in the file
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "F32"  # Q8_0: dequantized values
    assert dtypes["model.layers.0.self_attn.v_proj.weight"] == "F32"  # Q4_1
    assert dtypes["model.norm.weight"] == "F32"
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == "float32"  # computed in float32, as transformers does


def test_folder_is_complete(converted: dict) -> None:
    _, folder, _ = converted["llama"]
    assert {p.name for p in folder.iterdir()} >= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert "chat_template" not in tc  # one place for it: chat_template.jinja


def test_cascade_reads_the_converted_folder(converted: dict) -> None:
    """Cascade's own checkpoint reader and tokenizer accept the folder."""
    from cascade.models.checkpoint import Checkpoint
    from cascade.models.tokenizer import load_tokenizer

    _, folder, _ = converted["llama-tied"]
    ckpt = Checkpoint(folder)
    assert ckpt.config.tie_word_embeddings
    assert ckpt.config.num_hidden_layers == 2
    ckpt.close()
    tok = load_tokenizer(folder)
    assert tok.decode(tok.encode("Hello world", add_special_tokens=False)) == "Hello world"


def test_smollm_pre_tokenizer_splits_digits_like_llama_cpp(tmp_path: Path) -> None:
    """`smollm` (a llama.cpp name transformers does not know): digits one by one, then GPT-2's split,
    as llama.cpp and SmolLM's hub tokenizer do."""
    from tokenizers import Tokenizer

    src = tmp_path / "smollm.gguf"
    write_tiny_gguf(src, TinySpec(pre="smollm", add_bos=False))
    folder = tmp_path / "out"
    convert_gguf(src, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pieces = tok.encode("year 2024", add_special_tokens=False).tokens
    assert pieces[-4:] == ["2", "0", "2", "4"]
    # GPT-2's split alone keeps " 2024" together, and the trained vocabulary merges digits:
    plain = tmp_path / "plain.gguf"
    write_tiny_gguf(plain, TinySpec(pre=None, add_bos=False))
    convert_gguf(plain, tmp_path / "plain")
    other = Tokenizer.from_file(str(tmp_path / "plain" / "tokenizer.json"))
    assert other.encode("year 2024", add_special_tokens=False).tokens != pieces


# --------------------------------------------------------------------------- the cache


def test_cache_reuses_an_unchanged_file_and_reconverts_a_changed_one(tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    write_tiny_gguf(src, TinySpec(tied=True))
    home = tmp_path / "home"
    first = convert_gguf_cached(src, home=home, progress=False)
    assert first.parent == home / "models" / "gguf"
    stamp = (first / GGUF_MANIFEST).stat().st_mtime_ns
    assert convert_gguf_cached(src, home=home, progress=False) == first
    assert (first / GGUF_MANIFEST).stat().st_mtime_ns == stamp  # not written again

    write_tiny_gguf(src, TinySpec(tied=True, seed=1))  # same name, new content
    os.utime(src, ns=(stamp + 10**9, stamp + 10**9))  # and certainly a new mtime
    second = convert_gguf_cached(src, home=home, progress=False)
    assert second != first
    assert not first.exists()  # the stale conversion of the same file is gone
    assert [p.name for p in second.parent.iterdir()] == [second.name]


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "bad.gguf"
    write_tiny_gguf(src, TinySpec())
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    home = tmp_path / "home"
    with pytest.raises(GGUFError, match="truncated"):
        convert_gguf_cached(src, home=home, progress=False)
    root = home / "models" / "gguf"
    assert not root.exists() or not any(root.iterdir())


def test_partial_folder_of_a_dead_process_is_cleared(tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    write_tiny_gguf(src, TinySpec(tied=True))
    home = tmp_path / "home"
    final = gguf_cache_dir(src, home)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = final.parent / f".partial-{final.name}-{int(dead.stdout)}"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    assert convert_gguf_cached(src, home=home, progress=False) == final
    assert not leftover.exists()


def test_resolve_model_converts_a_gguf_file(tmp_path: Path) -> None:
    src = tmp_path / "Tiny-Model.Q8_0.gguf"
    write_tiny_gguf(src, TinySpec(tied=True))
    m = resolve_model(str(src), home=tmp_path / "home", progress=False)
    assert (m.kind, m.name) == ("gguf", "Tiny-Model.Q8_0")
    assert m.path == gguf_cache_dir(src, tmp_path / "home")
    assert (m.path / "model.safetensors").is_file()


# --------------------------------------------------------------------------- refused


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file"):
        resolve_model(str(tmp_path / "nope.gguf"), home=tmp_path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        resolve_model(str(src), home=tmp_path)


@pytest.mark.parametrize("keep", [30, 2000, 0.6, 0.999])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    src = tmp_path / "cut.gguf"
    write_tiny_gguf(src, TinySpec())
    data = src.read_bytes()
    src.write_bytes(data[: int(keep if keep > 1 else len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated") as e:
        inspect_gguf(src)
    assert str(src) in str(e.value)


def test_unsupported_architecture(tmp_path: Path) -> None:
    src = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(src, "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"architecture 'phi3' is not supported") as e:
        inspect_gguf(src)
    assert str(src) in str(e.value)


def test_quantization_the_gguf_package_cannot_dequantize(tmp_path: Path) -> None:
    # Q8_K is a type llama.cpp uses for intermediate results; gguf-py does not dequantize it.
    src = tmp_path / "q8k.gguf"
    types = {**TinySpec().types, "ffn_down": Q.Q8_K}
    write_tiny_gguf(src, TinySpec(hidden=256, ffn=256, layers=1, types=types))
    with pytest.raises(GGUFError, match=r"Q8_K, which the installed gguf package .* cannot dequantize") as e:
        inspect_gguf(src)
    assert str(src) in str(e.value)


def test_unknown_pre_tokenizer(tmp_path: Path) -> None:
    src = tmp_path / "pre.gguf"
    write_tiny_gguf(src, TinySpec(pre="some-new-bpe"))
    with pytest.raises(GGUFError, match=r"pre-tokenizer 'some-new-bpe'"):
        inspect_gguf(src)


def test_rope_scaling_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "rope.gguf"
    w = gguf.GGUFWriter(src, "llama")
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="rope scaling 'yarn'"):
        inspect_gguf(src)
