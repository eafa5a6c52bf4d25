"""Model sources: local folders and hub ids resolve to one local checkpoint folder, or to an error
a user can act on. The hub cannot be reached from CI, so hub ids are resolved from a hub cache
laid out exactly as huggingface_hub writes it (blobs, snapshots/<commit> of symlinks, refs/),
in a temporary HF_HUB_CACHE; the hub's own answers to bad requests come from a local endpoint
that speaks its error headers."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cascade.config import GenerateSpec
from cascade.models.config import CheckpointError
from cascade.models.generate import generate_model
from cascade.models.source import ModelSourceError, parse_hub_id, resolve_model
from tests.hubcache import add_snapshot, closed_port, files_of

SPEC = GenerateSpec(layers=1, hidden=32, heads=2, kv_heads=1, vocab=260)
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    generate_model(d, SPEC)
    (d / "tokenizer_config.json").write_text("{}")
    return d


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> Path:
    cache = tmp_path / "hf" / "hub"
    ckpt = files_of(checkpoint)
    add_snapshot(cache, "org/tiny", COMMIT_MAIN, ckpt, refs=("main",))
    v1 = {**ckpt, "config.json": ckpt["config.json"].replace(b'"rms_norm_eps": 1e-05', b'"rms_norm_eps": 1e-06')}
    add_snapshot(cache, "org/tiny", COMMIT_V1, v1, refs=("v1",))
    # Downloaded by some tool that took only the config: not a checkpoint yet.
    add_snapshot(cache, "org/partial", COMMIT_MAIN, {"config.json": ckpt["config.json"]}, refs=("main",))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


# --------------------------------------------------------------------------- hub ids


def test_hub_id_from_the_cache(hub_cache: Path) -> None:
    m = resolve_model("org/tiny")
    assert (m.kind, m.name, m.revision) == ("hub", "org/tiny", COMMIT_MAIN)
    assert m.path == hub_cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN
    assert json.loads((m.path / "config.json").read_text())["rms_norm_eps"] == 1e-5


def test_hub_id_at_a_branch_or_tag(hub_cache: Path) -> None:
    m = resolve_model("org/tiny@v1")
    assert (m.name, m.revision, m.spec) == ("org/tiny", COMMIT_V1, "org/tiny@v1")
    assert json.loads((m.path / "config.json").read_text())["rms_norm_eps"] == 1e-6


def test_hub_id_at_a_commit(hub_cache: Path) -> None:
    m = resolve_model(f"org/tiny@{COMMIT_V1}")
    assert m.path.name == COMMIT_V1


def test_hub_cache_path_from_hf_hub_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub.
    moved = tmp_path / "elsewhere"
    shutil.copytree(hub_cache, moved, symlinks=True)
    shutil.rmtree(hub_cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    assert resolve_model("org/tiny").path.is_relative_to(moved)


def test_offline_and_not_cached(hub_cache: Path) -> None:
    with pytest.raises(ModelSourceError) as e:
        resolve_model("org/never-downloaded")
    msg = str(e.value)
    assert "org/never-downloaded is not in the hub cache" in msg
    assert str(hub_cache) in msg and "HF_HUB_OFFLINE" in msg


def test_offline_unknown_revision(hub_cache: Path) -> None:
    with pytest.raises(ModelSourceError, match="org/tiny@v9 is not in the hub cache"):
        resolve_model("org/tiny@v9")


def test_cached_but_not_a_checkpoint(hub_cache: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"org/partial .* has config.json but no \*.safetensors") as e:
        resolve_model("org/partial")
    assert "HF_HUB_OFFLINE is set" in str(e.value)


def test_unreachable_hub_falls_back_to_the_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_online(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    assert resolve_model("org/tiny").revision == COMMIT_MAIN
    with pytest.raises(ModelSourceError, match=r"not in the hub cache .* is unreachable"):
        resolve_model("org/elsewhere")


class HubErrors(BaseHTTPRequestHandler):
    """The hub's answers to requests it refuses, headers as huggingface.co sends them."""

    def do_GET(self) -> None:
        if "/gated" in self.path:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/gated is restricted.")
        elif "/revision/" in self.path and "/tiny/" in self.path:
            self.send_response(404)
            self.send_header("X-Error-Code", "RevisionNotFound")
            self.send_header("X-Error-Message", "Invalid rev id: nope")
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


def hub_online(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Online from here on. huggingface_hub read HF_HUB_OFFLINE once, when first imported (maybe by
    an earlier test, offline), and refuses every request while its copy says so."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)


@pytest.fixture
def hub_endpoint(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubErrors)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    hub_online(monkeypatch, url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_unknown_hub_id(hub_endpoint: str) -> None:
    with pytest.raises(ModelSourceError, match=r"org/no-such-model: no such model on the hub") as e:
        resolve_model("org/no-such-model")
    assert "nor a local file or folder" in str(e.value) and "HF_TOKEN" in str(e.value)


def test_gated_repo_without_a_token(hub_endpoint: str) -> None:
    with pytest.raises(ModelSourceError, match=r"org/gated is a gated model: accept its terms .* set HF_TOKEN"):
        resolve_model("org/gated")


def test_unknown_revision_online(hub_endpoint: str) -> None:
    with pytest.raises(ModelSourceError, match=r"org/tiny has no revision 'nope'"):
        resolve_model("org/tiny@nope")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("org/name", ("org/name", None)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        ("gpt2", ("gpt2", None)),
        ("org/name@", None),
        ("a/b/c", None),
        ("org/../x", None),
        ("has space/x", None),
    ],
)
def test_parse_hub_id(spec: str, expected: tuple[str, str | None] | None) -> None:
    assert parse_hub_id(spec) == expected


# --------------------------------------------------------------------------- local folders


def test_local_folder(checkpoint: Path) -> None:
    m = resolve_model(str(checkpoint))
    assert (m.kind, m.path, m.name) == ("local", checkpoint.resolve(), checkpoint.name)


def test_hub_cache_folders_are_named_after_their_repo(hub_cache: Path) -> None:
    repo = hub_cache / "models--org--tiny"
    m = resolve_model(str(repo))  # the repo folder: its main snapshot
    assert (m.kind, m.name, m.revision) == ("local", "org/tiny", COMMIT_MAIN)
    m = resolve_model(str(repo / "snapshots" / COMMIT_V1))  # one snapshot
    assert (m.name, m.revision) == ("org/tiny", COMMIT_V1)


def test_folder_with_pytorch_weights_only(tmp_path: Path, checkpoint: Path) -> None:
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(ModelSourceError, match=r"only PyTorch weights \(pytorch_model.bin\), no safetensors"):
        resolve_model(str(tmp_path))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_folder_with_gguf_files(tmp_path: Path) -> None:
    (tmp_path / "m.Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match=r"holds GGUF files \(m.Q4_K_M.gguf\).*pass the .gguf file"):
        resolve_model(str(tmp_path))


def test_folder_missing_a_shard(tmp_path: Path, checkpoint: Path) -> None:
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    shutil.copy(checkpoint / "model.safetensors", tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match=r"lacks shards its index names: model-00002-of-00002\.safetensors"):
        resolve_model(str(tmp_path))


def test_folder_whose_config_cascade_cannot_serve(tmp_path: Path, checkpoint: Path) -> None:
    shutil.copy(checkpoint / "model.safetensors", tmp_path)
    cfg = json.loads((checkpoint / "config.json").read_text()) | {"model_type": "gpt_neox"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gpt_neox"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/folder", "~/no-such-folder-here", "a/b/c", ""])
def test_nothing_there(spec: str, hub_cache: Path) -> None:
    with pytest.raises(ModelSourceError):
        resolve_model(spec)


def test_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"not a \.gguf file"):
        resolve_model(str(tmp_path / "model.safetensors"))
