"""Real checkpoints load exactly as transformers reads them, proven against transformers itself.

For each family and rope type (tests/hfmodels.py: llama with default/linear/llama3/yarn RoPE,
biases and head_dim; mistral with a sliding window; qwen2 with biases, a window and shards; qwen3
with q/k norm; tied and untied heads; bf16), a tiny random model made and saved by transformers,
in its transformers 5 layout and rewritten into the transformers 4 layout:
- transformers and Cascade each read both layouts the same;
- logits within 1e-4 of transformers' at every position of a prompt;
- 16 greedy tokens identical to transformers' through the real Engine, through a two-engine
  partial-layer route (chunked prefill), and after the units crossed the real TCP data plane
  from a checkpoint (what the loader's host cache sends) and then from a live model (what a
  serving worker sends).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hfmodels import CASES, Built, build, hf_greedy, hf_logits

import transformers  # isort: skip  (after tests.hfmodels, which sets the offline environment)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from cascade.messages import RouteStage, SamplingParams, TokenEvent, TransferOrder
from cascade.models.checkpoint import Checkpoint, validate_checkpoint
from cascade.models.config import ModelConfig, Rope, read_config, read_generation_config
from cascade.models.tokenizer import ByteTokenizer
from services.worker.dataplane import CheckpointSource, DataPlaneServer, LiveModelSource, UnitSource, send_units
from services.worker.engine import Engine
from services.worker.model import KVCache, LlamaModel, prefill_inputs, rope_frequencies
from tests.test_pipeline import run_mesh

STEPS = 16
PROMPT_LEN = 13  # longer than the sliding windows of the window cases
GREEDY = SamplingParams(max_tokens=STEPS, ignore_eos=True)
tok = ByteTokenizer()
NAMES = [c.name for c in CASES]


@dataclasses.dataclass
class Reference:
    prompt: list[int]
    logits: torch.Tensor  # [T, V]
    greedy: list[int]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("hf")
    return {c.name: build(c, root) for c in CASES}


@pytest.fixture(scope="module")
def refs(built: dict[str, Built]) -> dict[str, Reference]:
    out = {}
    for i, (name, b) in enumerate(built.items()):
        g = torch.Generator().manual_seed(100 + i)
        prompt = torch.randint(0, b.hf.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
        out[name] = Reference(prompt, hf_logits(b.hf, prompt), hf_greedy(b.hf, prompt, STEPS))
    return out


def load(model_dir: Path, units: range | None = None) -> LlamaModel:
    ck = Checkpoint(model_dir)
    try:
        m = LlamaModel(ck.config)
        for u in units if units is not None else range(ck.config.num_units):
            m.load_unit(u, ck.unit_tensors(u))
    finally:
        ck.close()
    return m


def all_logits(m: LlamaModel, prompt: list[int]) -> torch.Tensor:
    """Cascade's logits at every position: the layers as the engine runs them, the head on each."""
    L = m.cfg.num_hidden_layers
    cache = KVCache(m.cfg, range(L), 1, m.device, m.dtype)
    ids, pos, lens = prefill_inputs([prompt], m.device)
    h = m.forward(ids, None, range(L), cache, pos, lens, prefill=True, head=False)
    return m.logits(h[0])


def engine_tokens(
    engines: dict[str, Engine], first: str, prompt: list[int], route: list[RouteStage] | None
) -> list[int]:
    engines[first].submit("r", "g", prompt, GREEDY, route=route)
    evs: list[TokenEvent] = run_mesh(engines)["r"]
    assert evs[-1].finish_reason == "length", evs[-1]
    return [t for e in evs for t in e.token_ids]


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", NAMES)
def test_both_layouts_read_the_same(built: dict[str, Built], name: str) -> None:
    b = built[name]
    v4, v5 = (transformers.AutoConfig.from_pretrained(d) for d in (b.v4, b.v5))
    # transformers keeps a legacy "type" key beside the "rope_type" it derives from it.
    assert {k: v for k, v in v4.rope_parameters.items() if k != "type"} == v5.rope_parameters
    assert getattr(v4, "layer_types", None) == getattr(v5, "layer_types", None)
    assert getattr(v4, "sliding_window", None) == getattr(v5, "sliding_window", None)
    assert json.loads((b.v4 / "config.json").read_text()).get("rope_parameters") is None
    ours = read_config(b.v5)
    assert read_config(b.v4) == ours
    assert validate_checkpoint(b.v4) == ours


@pytest.mark.parametrize("name", NAMES)
def test_config_is_what_transformers_builds(built: dict[str, Built], name: str) -> None:
    """The flags Cascade derives are the modules transformers built."""
    b = built[name]
    cfg = read_config(b.v5)
    attn = b.hf.model.layers[0].self_attn
    mlp = b.hf.model.layers[0].mlp
    assert cfg.qkv_bias == (attn.q_proj.bias is not None)
    assert cfg.o_bias == (attn.o_proj.bias is not None)
    assert cfg.mlp_bias == (mlp.gate_proj.bias is not None)
    assert cfg.qk_norm == hasattr(attn, "q_norm")
    assert cfg.dim_per_head == attn.head_dim
    assert cfg.rope.attention_factor == pytest.approx(b.hf.model.rotary_emb.attention_scaling)
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in b.hf.model.layers]
    if b.case.model_type == "mistral":  # MistralAttention reads the config's window on each call
        windows = [b.hf.config.sliding_window] * len(windows)
    assert [cfg.window(i) for i in range(cfg.num_hidden_layers)] == windows
    assert cfg.tie_word_embeddings == (b.hf.lm_head.weight is b.hf.model.embed_tokens.weight)


@pytest.mark.parametrize("nulls", [False, True], ids=["omitted", "null"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_keys_a_config_leaves_out_take_transformers_defaults(tmp_path: Path, model_type: str, nulls: bool) -> None:
    """Each family's defaults are its transformers class's, for keys omitted or set to null."""
    data: dict[str, object] = {
        "model_type": model_type, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 32, "vocab_size": 300,
    }  # fmt: skip
    if nulls:
        data.update(eos_token_id=None, bos_token_id=None, sliding_window=None)
        # Only where transformers' config class takes a null (Mistral's kv heads and Qwen3's head_dim
        # are plain ints; Qwen2 has no head_dim field, so a null one breaks its attention).
        if model_type != "mistral":
            data["num_key_value_heads"] = None
        if model_type in ("llama", "mistral"):
            data["head_dim"] = None
    (tmp_path / "config.json").write_text(json.dumps(data))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = read_config(tmp_path)
    assert ours.dim_per_head == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.num_key_value_heads == hf.num_key_value_heads
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.rope == Rope(theta=hf.rope_parameters["rope_theta"])
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    window = hf.sliding_window if model_type == "mistral" else None  # qwen: off without use_sliding_window
    assert [ours.window(i) for i in range(2)] == [window, window]


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("layout", ["v5", "v4"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(built: dict[str, Built], refs: dict[str, Reference], name: str, layout: str) -> None:
    m = load(getattr(built[name], layout))
    got = all_logits(m, refs[name].prompt)
    assert got.shape == refs[name].logits.shape
    assert (got - refs[name].logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["llama-linear", "llama-llama3", "llama-yarn", "mistral-window", "qwen2"])
def test_each_difference_matters(built: dict[str, Built], refs: dict[str, Reference], name: str) -> None:
    """Without the family's difference (rope scaling, window, biases) the logits move far past the
    tolerance: the parity tests above could fail."""
    m = load(built[name].v5)
    cfg = m.cfg
    plain = dataclasses.replace(cfg, rope=Rope(theta=cfg.rope.theta), sliding_layers=frozenset())
    m.cfg = plain
    if name == "qwen2":
        for w in m.layers.values():
            w.bq = w.bk = w.bv = None
    assert (all_logits(m, refs[name].prompt) - refs[name].logits).abs().max().item() > 1e-2


ROPE_VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": 300000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.7,
                    "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
    "yarn-no-truncate-attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "truncate": False,
                                   "attention_factor": 0.9, "original_max_position_embeddings": 2048},
    "yarn-implicit-factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                             "original_max_position_embeddings": 32768},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_frequencies_equal_transformers(variant: str) -> None:
    """Every rope type's inverse frequencies and cos/sin factor, bit for bit transformers'."""
    params = dict(ROPE_VARIANTS[variant])
    hf_cfg = transformers.LlamaConfig(
        hidden_size=1024, num_attention_heads=8, num_hidden_layers=1, intermediate_size=64,
        vocab_size=10, max_position_embeddings=131072, rope_parameters=params,
    )  # fmt: skip
    data = json.loads(hf_cfg.to_json_string())
    cfg = ModelConfig.from_hf(data)
    inv, scale = rope_frequencies(cfg.rope, cfg.dim_per_head)
    rope_type = str(params["rope_type"])
    if rope_type == "default":
        rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
        ref_inv, ref_scale = rotary.compute_default_rope_parameters(hf_cfg)
    else:
        ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)
    assert torch.equal(inv, ref_inv)
    assert scale == ref_scale


# --------------------------------------------------------------------------- serving paths


@pytest.mark.parametrize("name", NAMES)
def test_engine_greedy_matches_transformers(built: dict[str, Built], refs: dict[str, Reference], name: str) -> None:
    e = Engine(load(built[name].v4), tok)
    assert engine_tokens({"F": e}, "F", refs[name].prompt, None) == refs[name].greedy


@pytest.mark.parametrize("name", NAMES)
def test_partial_route_matches_transformers(built: dict[str, Built], refs: dict[str, Reference], name: str) -> None:
    """A new instance holding the embedding and layer 0 runs the first stage, a full one the rest;
    prompts are prefilled in chunks of 5, so window masks span chunk boundaries."""
    d = built[name].v5
    L = read_config(d).num_hidden_layers
    n = Engine(load(d, range(0, 2)), tok, worker_id="N", max_prefill_tokens=5)
    f = Engine(load(d), tok, worker_id="F", max_prefill_tokens=5)
    route = [RouteStage("N", 0, 1), RouteStage("F", 1, L)]
    assert engine_tokens({"N": n, "F": f}, "N", refs[name].prompt, route) == refs[name].greedy
    assert f.stats.relayed_steps > 0


async def _receive(source: UnitSource, cfg: ModelConfig, nbytes: list[int], tid: str) -> LlamaModel:
    """Units over the real TCP data plane into a fresh model, installed as a worker installs them
    (the received buffers become the weights: no copy when the dtype matches)."""
    units = list(range(cfg.num_units))
    got: dict[int, dict[str, torch.Tensor]] = {}
    failed: list[str] = []
    order = TransferOrder(tid, "tok", "m", "receive", units, len(units), unit_nbytes=nbytes)
    with DataPlaneServer() as srv:
        r = await asyncio.to_thread(
            srv.expect, order, lambda u, t: got.__setitem__(u, t), failed.append, loop=asyncio.get_running_loop()
        )
        await asyncio.to_thread(send_units, source, srv.address, tid, "tok", units)
        await asyncio.wait_for(r.wait(), 30)
    assert not failed and list(got) == units
    m = LlamaModel(cfg)
    for u in units:
        m.load_unit(u, got[u], copy=False)
    return m


@pytest.mark.parametrize("name", NAMES)
async def test_units_over_the_data_plane_keep_the_tokens(
    built: dict[str, Built], refs: dict[str, Reference], name: str
) -> None:
    ck = Checkpoint(built[name].v5)
    try:
        n = ck.config.num_units
        nbytes = [ck.unit_nbytes(u) for u in range(n)]
        disk = CheckpointSource(ck, "m")
        first = await _receive(disk, ck.config, nbytes, f"{name}-disk")
        live = LiveModelSource("m", first)
        second = await _receive(live, ck.config, nbytes, f"{name}-live")
        # What the second hop received is the checkpoint's bytes, tensor for tensor.
        for u in range(n):
            want = [(meta, bytes(raw)) for meta, raw in disk.unit(u)]
            assert [(meta, bytes(raw)) for meta, raw in LiveModelSource("m", second).unit(u)] == want
    finally:
        ck.close()
    assert engine_tokens({"F": Engine(second, tok)}, "F", refs[name].prompt, None) == refs[name].greedy


# --------------------------------------------------------------------------- EOS


def test_engine_stops_on_every_generation_config_eos(
    built: dict[str, Built], refs: dict[str, Reference], tmp_path: Path
) -> None:
    """Llama 3 lists several EOS ids in generation_config.json: any of them ends a reply, beside
    config.json's own."""
    b, ref = built["llama"], refs["llama"]
    stop_at = next(i for i, t in enumerate(ref.greedy) if i >= 3 and t not in ref.greedy[:i])
    eos = ref.greedy[stop_at]
    d = tmp_path / "m"
    d.mkdir()
    for f in b.v5.iterdir():
        if f.name != "generation_config.json":
            (d / f.name).symlink_to(f)
    others = [x for x in range(250, 260) if x not in ref.greedy][:2]
    gen = {"bos_token_id": 1, "eos_token_id": [others[0], eos, others[1]], "do_sample": True, "temperature": 0.6,
           "top_p": 0.9, "transformers_version": "4.45.0"}  # fmt: skip
    (d / "generation_config.json").write_text(json.dumps(gen))
    assert read_generation_config(d).eos_token_ids == (others[0], eos, others[1])
    cfg = read_config(d)
    assert cfg.eos_ids == [2, others[0], eos, others[1]]  # config.json's (llama: 2), then the list
    # The byte tokenizer's own EOS (257) is an ordinary id of this random 300-token model: only the
    # model's EOS ids are under test.
    no_eos = ByteTokenizer()
    no_eos.eos_ids = []
    e = Engine(load(d), no_eos)
    e.submit("r", "g", ref.prompt, SamplingParams(max_tokens=STEPS))
    evs = run_mesh({"F": e})["r"]
    assert [t for ev in evs for t in ev.token_ids] == ref.greedy[:stop_at]
    assert evs[-1].finish_reason == "stop"


def test_transformers_generation_config_reads(built: dict[str, Built]) -> None:
    b = built["llama"]
    gen = read_generation_config(b.v5)
    hf = transformers.GenerationConfig.from_pretrained(b.v5)
    assert gen.eos_token_ids == (hf.eos_token_id,)
    assert gen.bos_token_id == hf.bos_token_id


def test_the_runtime_does_not_import_transformers() -> None:
    """transformers is the tests' oracle only: no service, nor checkpoint reading, loads it."""
    mods = "cascade.cli cascade.cli.up cascade.models.checkpoint services.worker.main services.gateway.main " + (
        "services.loader.main services.scaler.main"
    )
    code = f"import importlib, sys\nfor m in {mods.split()!r}: importlib.import_module(m)\n" + (
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'safetensors')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
