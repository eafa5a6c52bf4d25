"""`cascade model pull`: a model obtained into $CASCADE_HOME and a deployment file that serves it,
as compose's one-shot `model-init` runs it. No network: HF_HUB_OFFLINE=1 and an unreachable
package index; the real default model runs from its GGUF file when one is on this machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from cascade import cli
from cascade.config import DEFAULT_MODEL, GenerateSpec, load_deployment
from cascade.models.checkpoint import validate_checkpoint
from cascade.models.default_model import DEFAULT_HUB_ID, default_gguf_path
from tests.ggufmaker import TinySpec, write_tiny_gguf
from tests.smollm2 import GGUF as SMOLLM2
from tests.smollm2 import SKIP_REASON

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fresh CASCADE_HOME and hub cache, the hub offline, and a package index nobody serves."""
    for k in [k for k in os.environ if k.startswith("CASCADE_")]:
        monkeypatch.delenv(k)
    home = tmp_path / "home"
    monkeypatch.setenv("CASCADE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Port 9 (discard) on loopback: refused at once, so the PyPI fallback fails in milliseconds.
    monkeypatch.setenv("CASCADE_PYPI_INDEX_URL", "http://127.0.0.1:9/simple")
    return home


def test_a_gguf_file_is_converted_and_the_deployment_names_it(
    tmp_path: Path, offline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "tiny.Q8_0.gguf"
    write_tiny_gguf(src, TinySpec())
    out = tmp_path / "shared" / "deployment.json"
    argv = ["model", "pull", "--model", str(src), "--served-model-name", "tiny", "--deployment", str(out)]
    code = cli.main([*argv, "--min-replicas", "2", "--kv-cache-mb", "64", "--max-model-len", "256"])
    assert code == 0, capsys.readouterr().err
    (m,) = load_deployment(out).models
    assert (m.name, m.min_replicas, m.max_replicas, m.kv_cache_mb, m.max_model_len) == ("tiny", 2, 8, 64.0, 256)
    # The converted folder lives under CASCADE_HOME (the shared volume), complete and readable.
    assert m.path.is_relative_to(offline) and m.source == str(src)
    validate_checkpoint(m.path)
    assert f"wrote {out}" in capsys.readouterr().out
    # Pulled again, the conversion is reused and the file says the same.
    before = out.read_bytes()
    assert cli.main([*argv, "--min-replicas", "2", "--kv-cache-mb", "64", "--max-model-len", "256"]) == 0
    assert out.read_bytes() == before


def test_a_named_model_that_cannot_be_had_fails_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deployment.json"
    assert cli.main(["model", "pull", "--model", "./nowhere", "--deployment", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "no such file or folder" in err
    assert not out.exists()
    assert cli.main(["model", "pull", "--model", "org/not-cached", "--deployment", str(out)]) == 1
    assert "org/not-cached" in capsys.readouterr().err and not out.exists()


def compose_init() -> tuple[list[str], dict[str, str]]:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    init = services["model-init"]
    return init["command"], init["environment"]


def test_composes_init_falls_back_to_the_test_model_when_nothing_is_reachable(
    tmp_path: Path, offline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command, env = compose_init()
    # The container's command, pointed at this test's home instead of /models.
    argv = [a.replace(env["CASCADE_HOME"], str(offline)) for a in command[1:]]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert f"serving the generated test model {DEFAULT_MODEL} instead" in captured.err
    assert "hub:" in captured.err and "PyPI (http://127.0.0.1:9/simple)" in captured.err
    (m,) = load_deployment(Path(env["CASCADE_CONFIG"].replace(env["CASCADE_HOME"], str(offline)))).models
    assert m.name == DEFAULT_MODEL and m.path == offline / "models" / DEFAULT_MODEL
    assert m.generate == GenerateSpec()  # the same model `cascade up` generates
    validate_checkpoint(m.path)


@pytest.mark.realmodel
@pytest.mark.skipif(SMOLLM2 is None, reason=SKIP_REASON)
def test_composes_init_serves_smollm2_from_a_copy_fetched_earlier(
    tmp_path: Path, offline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default model's second source (the GGUF an earlier run took from PyPI), offline."""
    assert SMOLLM2 is not None
    dest = default_gguf_path(offline)
    dest.parent.mkdir(parents=True)
    try:
        dest.symlink_to(SMOLLM2)
    except OSError:
        shutil.copyfile(SMOLLM2, dest)
    command, env = compose_init()
    argv = [a.replace(env["CASCADE_HOME"], str(offline)) for a in command[1:]]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "instead" not in capsys.readouterr().err
    (m,) = load_deployment(Path(env["CASCADE_CONFIG"].replace(env["CASCADE_HOME"], str(offline)))).models
    assert m.name == DEFAULT_HUB_ID and m.path.is_relative_to(offline)
    validate_checkpoint(m.path)
