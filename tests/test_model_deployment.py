"""Naming models to serve: `cascade up --model` / `--served-model-name`, the deployment file's
`model = "..."` entries, and their resolution into local folders before any service starts;
the gateway's catalog taking a changed deployment."""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from cascade.cli.supervisor import UpError
from cascade.cli.up import add_arguments, chosen_deployment, prepare_models
from cascade.config import (
    ConfigError,
    Deployment,
    GenerateSpec,
    ModelDeployment,
    deployment_from_message,
    entry_json,
    load_deployment,
    model_from_entry,
    model_from_spec,
    unresolved,
)
from cascade.messages import DeploymentChanged, encode
from cascade.models.generate import generate_model
from cascade.models.source import ModelSourceError, resolve_deployment, served_name_of
from services.gateway.catalog import ModelCatalog
from services.gateway.openai_api import ApiError

SPEC = GenerateSpec(layers=1, hidden=32, heads=2, kv_heads=1, vocab=260)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpts") / "my-model"
    generate_model(d, SPEC)
    return d


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("CASCADE_CONFIG", raising=False)


def up_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("org/name@v1.2", "org/name"),
        ("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),
        ("gpt2", "gpt2"),
    ],
)
def test_served_names_without_the_network(spec: str, name: str) -> None:
    assert served_name_of(spec) == name


def test_served_name_of_a_folder_and_a_hub_cache_folder(tmp_path: Path, ckpt: Path) -> None:
    assert served_name_of(str(ckpt)) == "my-model"
    cache = tmp_path / "models--org--tiny"
    (cache / "snapshots").mkdir(parents=True)
    assert served_name_of(str(cache)) == "org/tiny"


# --------------------------------------------------------------------------- cascade up flags


def test_model_flags_pair_with_served_names(tmp_path: Path, ckpt: Path) -> None:
    dep = chosen_deployment(up_args("--model", str(ckpt), "--model", "org/x", "--served-model-name", "a",
                                    "--served-model-name", "b"), tmp_path)  # fmt: skip
    assert dep is not None
    assert [(m.name, m.source) for m in dep.models] == [("a", str(ckpt)), ("b", "org/x")]
    assert unresolved(dep) == list(dep.models)
    plain = chosen_deployment(up_args("--model", "org/x"), tmp_path)
    assert plain is not None and plain.names() == ["org/x"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--model", "a/b", "--served-model-name", "x", "--served-model-name", "y"), "one name per --model"),
        (("--served-model-name", "x"), "one name per --model"),
        (("--model", "a/b", "--config", "d.toml"), "use one of them"),
        (("--model", "a/b", "--model", "c/d", "--served-model-name", "x", "--served-model-name", "x"), "twice"),
        (("--model", " "), "--model is empty"),
    ],
)
def test_model_flags_refuse_what_cannot_be_meant(tmp_path: Path, argv: tuple[str, ...], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        chosen_deployment(up_args(*argv), tmp_path)


def test_no_flags_means_the_default_model_and_the_env_file_yields_to_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert chosen_deployment(up_args(), tmp_path) is None
    cfg = tmp_path / "d.toml"
    cfg.write_text('[[models]]\nname = "from-file"\npath = "x"\n')
    monkeypatch.setenv("CASCADE_CONFIG", str(cfg))
    from_env = chosen_deployment(up_args(), tmp_path)
    assert from_env is not None and from_env.names() == ["from-file"]
    flagged = chosen_deployment(up_args("--model", "org/x"), tmp_path)
    assert flagged is not None and flagged.names() == ["org/x"]


# --------------------------------------------------------------------------- the deployment file


def test_deployment_file_takes_the_same_forms(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "local.gguf").write_bytes(b"")
    cfg = tmp_path / "d.toml"
    cfg.write_text(
        f'[[models]]\nmodel = "HuggingFaceTB/SmolLM2-135M-Instruct"\nmin_replicas = 0\n\n'
        f'[[models]]\nname = "mine"\nmodel = "{ckpt}"\n\n'
        f'[[models]]\nmodel = "local.gguf"\n'
    )
    dep = load_deployment(cfg, tmp_path)
    assert dep.names() == ["HuggingFaceTB/SmolLM2-135M-Instruct", "mine", "local"]
    # A relative file is relative to the deployment file, as `path` is.
    assert dep.models[2].source == str(tmp_path / "local.gguf")
    assert dep.models[0].min_replicas == 0 and len(unresolved(dep)) == 3


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[[models]]\nname = "a"\nmodel = "o/x"\npath = "p"\n', "not both"),
        ('[[models]]\nmodel = ""\n', "empty model"),
        ("[[models]]\nmin_replicas = 1\n", "needs a name"),
        ('[[models]]\nmodel = "o/x"\n\n[[models]]\nmodel = "o/x@v2"\n', "twice"),
    ],
)
def test_deployment_file_errors_name_the_problem(tmp_path: Path, toml: str, needle: str) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=needle):
        load_deployment(cfg, tmp_path)


def test_entries_travel_as_json_and_back(ckpt: Path) -> None:
    m = ModelDeployment("m", ckpt, 0, 3, policy="rate", knobs={"target": 2.0}, source="org/m")
    assert model_from_entry(entry_json(m)) == m
    with pytest.raises(ConfigError, match="no resolved path"):
        model_from_entry({**entry_json(m), "path": ""})


def test_kv_settings_per_model_travel_through_every_form(tmp_path: Path, ckpt: Path) -> None:
    """kv_cache_mb / max_model_len in the TOML reach the JSON file `cascade up` writes, the
    entries of deploy requests and deployment.changed, and the orders the loader builds from them."""
    cfg = tmp_path / "d.toml"
    cfg.write_text(
        f'[[models]]\nname = "small"\npath = "{ckpt}"\nkv_cache_mb = 64\nmax_model_len = 256\n\n'
        f'[[models]]\nname = "plain"\npath = "{ckpt}"\n'
    )
    dep = load_deployment(cfg, tmp_path)
    small, plain = dep.models
    assert (small.kv_cache_mb, small.max_model_len) == (64.0, 256)
    assert (plain.kv_cache_mb, plain.max_model_len) == (None, None)
    as_json = tmp_path / "d.json"
    as_json.write_bytes(orjson.dumps(dep.to_json()))
    assert load_deployment(as_json, tmp_path) == dep
    assert [model_from_entry(entry_json(m)) for m in dep.models] == list(dep.models)
    msg = encode(DeploymentChanged([entry_json(m) for m in dep.models], ["small"]))
    assert deployment_from_message(msg) == (dep, ["small"])
    m = model_from_spec(str(ckpt), name="x", kv_cache_mb=8.5, max_model_len=0)
    assert (m.kv_cache_mb, m.max_model_len) == (8.5, 0)
    assert model_from_entry({**entry_json(m), "path": str(ckpt)}) == replace(m, path=ckpt)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("kv_cache_mb = -1", "kv_cache_mb must be a number"),
        ('kv_cache_mb = "64"', "kv_cache_mb must be a number"),
        ("max_model_len = 1.5", "max_model_len must be a whole number"),
        ("max_model_len = -2", "max_model_len must be a whole number"),
    ],
)
def test_kv_settings_that_cannot_be_used_are_refused(tmp_path: Path, line: str, needle: str) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[[models]]\nname = "m"\npath = "p"\n{line}\n')
    with pytest.raises(ConfigError, match=f"model m: {needle}"):
        load_deployment(cfg, tmp_path)


# --------------------------------------------------------------------------- resolution


def test_resolution_fills_paths_and_names_the_model_that_fails(tmp_path: Path, ckpt: Path) -> None:
    dep = chosen_deployment(up_args("--model", str(ckpt), "--served-model-name", "ok"), tmp_path)
    assert dep is not None
    done = resolve_deployment(dep, home=tmp_path, progress=False)
    assert done.models[0].path == ckpt.resolve() and unresolved(done) == []
    bad = chosen_deployment(up_args("--model", "org/not-cached", "--served-model-name", "nope"), tmp_path)
    assert bad is not None
    with pytest.raises(ModelSourceError, match=r"model nope: .*org/not-cached"):
        resolve_deployment(bad, home=tmp_path, progress=False)
    with pytest.raises(UpError, match="model nope"):
        prepare_models(bad, tmp_path)


def test_up_with_a_missing_model_fails_before_starting_anything(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run(
        [sys.executable, "-m", "cascade.cli", "up", "--model", "./nowhere", "--port", "0", "--nats-port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert "model nowhere: ./nowhere: no such file or folder" in r.stderr
    assert not (tmp_path / "home" / "mesh.json").exists()


# --------------------------------------------------------------------------- the gateway's catalog


def test_catalog_takes_a_changed_deployment(tmp_path: Path, ckpt: Path) -> None:
    first = Deployment((ModelDeployment("a", ckpt),))
    cat = ModelCatalog(first)

    async def go() -> None:
        assert await cat.refresh() == {}
        assert cat.update(first.with_model(ModelDeployment("b", tmp_path / "missing"))) == ["b"]
        with pytest.raises(ApiError) as e:
            cat.get("b")
        assert e.value.status == 503
        errors = await cat.refresh()
        assert list(errors) == ["b"] and cat.get("a").name == "a"
        assert cat.update(Deployment((ModelDeployment("b", ckpt),))) == ["b"]
        assert await cat.refresh() == {} and cat.names() == ["b"]
        with pytest.raises(ApiError) as gone:
            cat.get("a")
        assert gone.value.status == 404

    asyncio.run(go())


def test_up_passes_kv_flags_to_every_worker(tmp_path: Path) -> None:
    from cascade.cli.supervisor import Supervisor
    from services.worker.settings import add_arguments as worker_arguments

    dep = Deployment((ModelDeployment("a", tmp_path),))
    sup = Supervisor(up_args("--workers", "2", "--kv-cache-mb", "96", "--max-model-len", "1024"), tmp_path, dep,
                     tmp_path / "d.json", "nats://127.0.0.1:1", 8000, None)  # fmt: skip
    sup._plan_children()
    workers = [c for c in sup.children if c.service == "worker"]
    assert len(workers) == 2
    p = argparse.ArgumentParser()
    worker_arguments(p)
    for c in workers:
        argv = c.argv[c.argv.index("worker") + 1 :]
        known, _ = p.parse_known_args(argv)
        assert (known.kv_cache_mb, known.max_model_len) == (96.0, 1024)
    plain = Supervisor(up_args(), tmp_path, dep, tmp_path / "d.json", "nats://127.0.0.1:1", 8000, None)
    plain._plan_children()
    assert not any("--kv-cache-mb" in c.argv for c in plain.children)


def test_deploy_model_carries_its_kv_settings_in_the_entry_it_sends(ckpt: Path) -> None:
    from cascade import cli
    from cascade.cli.common import CliError
    from cascade.cli.deploy import new_model_entry

    args = cli.parse_args(["deploy", "small", "--model", str(ckpt), "--kv-cache-mb", "48", "--max-model-len", "512"])
    entry = new_model_entry(args)
    m = model_from_entry(entry)
    assert (m.name, m.path, m.kv_cache_mb, m.max_model_len) == ("small", ckpt, 48.0, 512)
    args = cli.parse_args(["deploy", "small", "--model", str(ckpt), "--kv-cache-mb", "-1"])
    with pytest.raises(CliError, match="kv_cache_mb must be a number"):
        new_model_entry(args)
