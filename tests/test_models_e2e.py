"""Models named the way users name them, through `cascade up` and a real broker: `--model` with
`--served-model-name`, `cascade deploy --model` of a new model into the running mesh, and the
real SmolLM2-135M-Instruct (its GGUF, when this machine has it) answering exactly what
transformers answers, token for token, with requests batched together."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cascade.config import GenerateSpec
from cascade.models.generate import generate_model
from cascade.models.source import gguf_cache_dir
from tests.meshproc import cli, running_mesh
from tests.smollm2 import GGUF, SKIP_REASON

pytestmark = pytest.mark.e2e

SPEC = GenerateSpec(layers=2, hidden=64, heads=4, kv_heads=2, vocab=320, max_position=512)


class _Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.text = status, body.decode(errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.text)


def _http(method: str, url: str, body: Any = None, timeout: float = 30) -> _Reply:
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return _Reply(r.status, r.read())
    except urllib.error.HTTPError as e:
        return _Reply(e.code, e.read())


def _complete(url: str, model: str, prompt: str = "hello", max_tokens: int = 4, timeout: float = 120) -> Any:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return _http("POST", f"{url}/completions", body, timeout)


def _models(url: str) -> list[str]:
    return [m["id"] for m in _http("GET", f"{url}/models").json()["data"]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, seed in (("first", 1), ("second", 2)):
        generate_model(root / name, GenerateSpec(**{**_spec_fields(), "seed": seed}))
        out[name] = root / name
    return out


def _spec_fields() -> dict[str, Any]:
    return {k: getattr(SPEC, k) for k in GenerateSpec.__slots__}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path]) -> Iterator[dict[str, Any]]:
    args = ("--model", str(folders["first"]), "--served-model-name", "tiny")
    with running_mesh(tmp_path_factory.mktemp("home"), None, workers=2, args=args) as m:
        yield m


def test_model_flag_serves_under_its_served_name(mesh: dict[str, Any]) -> None:
    assert _models(mesh["url"]) == ["tiny"]
    r = _complete(mesh["url"], "tiny")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny" and r.json()["usage"]["completion_tokens"] == 4
    missing = _complete(mesh["url"], "first")
    assert missing.status_code == 404 and "does not exist" in missing.text


def test_deploy_adds_a_model_to_the_running_mesh(mesh: dict[str, Any], folders: dict[str, Path]) -> None:
    home, url = mesh["home"], mesh["url"]
    r = cli(home, "deploy", "second", "--model", str(folders["second"]), "--min-replicas", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "second: policy concurrency (changed)" in r.stdout
    deadline = time.monotonic() + 60
    while "second" not in _models(url):
        assert time.monotonic() < deadline, "the gateway never listed the deployed model"
        time.sleep(0.1)  # polling the gateway with a deadline
    # The request waits in the gateway's queue until the scaler has given the model a worker.
    got = _complete(url, "second", max_tokens=3)
    assert got.status_code == 200, got.text
    assert got.json()["model"] == "second" and got.json()["usage"]["completion_tokens"] == 3
    # The first model kept serving, and the new one survives a restart of the services.
    assert _complete(url, "tiny").status_code == 200
    saved = orjson.loads((home / "deployment.json").read_bytes())
    assert [m["name"] for m in saved["models"]] == ["tiny", "second"]
    assert saved["models"][1]["path"] == str(folders["second"].resolve())


def test_deploy_refuses_a_name_taken_by_another_folder(mesh: dict[str, Any], folders: dict[str, Path]) -> None:
    r = cli(mesh["home"], "deploy", "tiny", "--model", str(folders["second"]), timeout=120)
    assert r.returncode == 1
    assert "deployed already" in r.stderr and "--served-model-name" in r.stderr


def test_deploy_of_a_missing_model_fails_before_the_mesh_hears_of_it(mesh: dict[str, Any]) -> None:
    r = cli(mesh["home"], "deploy", "--model", "./no/such/folder", timeout=120)
    assert r.returncode == 1 and "no such file or folder" in r.stderr
    assert "folder" not in _models(mesh["url"])


# --------------------------------------------------------------------------- the real model


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
PROMPTS = ["The three primary colours are", "def fibonacci(n):"]
MAX_TOKENS = 24


@pytest.mark.skipif(GGUF is None, reason=SKIP_REASON)
def test_smollm2_through_the_mesh_answers_as_transformers_does(
    tmp_path_factory: pytest.TempPathFactory, smollm2_converted: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    assert GGUF is not None
    home = tmp_path_factory.mktemp("smol-home")
    # The session's conversion, linked where `cascade up --model` looks for it (converting here
    # again would only repeat tests/test_gguf_smollm2.py's ~10 s).
    shutil.copytree(smollm2_converted, gguf_cache_dir(GGUF, home), copy_function=os.link)
    with running_mesh(
        home, None, workers=1, timeout_s=300, args=("--model", str(GGUF), "--served-model-name", "smol")
    ) as m:
        url = m["url"]

        def chat(messages: list[dict[str, str]]) -> Any:
            body = {"model": "smol", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
            return _http("POST", f"{url}/chat/completions", body, 300)

        def complete(prompt: str) -> Any:
            return _complete(url, "smol", prompt, MAX_TOKENS, timeout=300)

        # All at once: they are batched on the worker, and each must still be exactly its own answer.
        with concurrent.futures.ThreadPoolExecutor(len(CHATS) + len(PROMPTS)) as pool:
            chat_f = [pool.submit(chat, c) for c in CHATS]
            comp_f = [pool.submit(complete, p) for p in PROMPTS]
            chat_r = [f.result() for f in chat_f]
            comp_r = [f.result() for f in comp_f]
        folder = next((home / "models" / "gguf").iterdir())

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    gen_eos = model.generation_config.eos_token_id
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}

    def reference(ids: list[int]) -> tuple[str, int, str]:
        """transformers' greedy generate: the text, the tokens generated (an end token counts) and why it ended."""
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=sorted(eos),
                pad_token_id=tok.pad_token_id or sorted(eos)[0],
            )  # fmt: skip
        new = [int(t) for t in out[0, len(ids) :]]
        finish = "stop" if new and new[-1] in eos else "length"
        return tok.decode(new, skip_special_tokens=True), len(new), finish

    for messages, r in zip(CHATS, chat_r, strict=True):
        assert r.status_code == 200, r.text
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
        text, n, finish = reference(ids)
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["choices"][0]["message"]["content"] == text, messages
        assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (n, finish)
    for prompt, r in zip(PROMPTS, comp_r, strict=True):
        assert r.status_code == 200, r.text
        ids = tok(prompt)["input_ids"]
        text, n, finish = reference(ids)
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["choices"][0]["text"] == text, prompt
        assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (n, finish)
