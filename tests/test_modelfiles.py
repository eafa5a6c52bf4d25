"""The small files of a checkpoint travelling with unit 0 (cascade/modelfiles.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade.framing import TensorMeta, iter_unit_frames, unit_frame_crc
from cascade.modelfiles import (
    FILES_TENSOR,
    ModelFilesError,
    WithModelFiles,
    pack,
    pack_dir,
    small_files,
    split_files,
    unpack,
    write_files,
)


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    (d / "additional_chat_templates").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer.json").write_text('{"model": {}}')
    (d / "generation_config.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (d / "chat_template.jinja").write_text("{{ messages }}")
    (d / "additional_chat_templates" / "tools.jinja").write_text("{{ tools }}")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    (d / "model.gguf").write_bytes(b"\0" * 64)
    (d / ".hidden").write_text("x")
    return d


def test_pack_dir_takes_every_small_file_and_no_weights(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    names = small_files(d)
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert "additional_chat_templates/tools.jinja" in names
    assert not any(n.endswith((".safetensors", ".gguf")) or n.startswith(".") for n in names)
    files = unpack(pack_dir(d).blob)
    assert set(files) == set(names)
    assert files["chat_template.jinja"] == b"{{ messages }}"


def test_round_trip_writes_the_same_files(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    out = write_files(unpack(pack_dir(d).blob), tmp_path / "out")
    for name in small_files(d):
        assert (out / name).read_bytes() == (d / name).read_bytes()


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        pack_dir(tmp_path)


def test_corrupt_blobs_are_refused() -> None:
    blob = bytearray(pack({"config.json": b"{}", "tokenizer.json": b"abc"}).blob)
    blob[-1] ^= 1
    with pytest.raises(ModelFilesError, match=r"tokenizer\.json: checksum mismatch"):
        unpack(bytes(blob))
    with pytest.raises(ModelFilesError, match="truncated"):
        unpack(bytes(blob[:-1]))
    with pytest.raises(ModelFilesError, match="magic"):
        unpack(b"XXXX" + bytes(blob[4:]))


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/b/c", ""])
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(ModelFilesError, match="plain relative path"):
        pack({name: b"x"})


class _Src:
    model = "m"

    def __init__(self) -> None:
        self.crcs: dict[int, int] = {1: 7}
        self.data = {u: memoryview(bytes([u]) * 8) for u in range(3)}

    def unit(self, unit: int) -> list[tuple[TensorMeta, memoryview]]:
        return [(TensorMeta(f"w{unit}", "U8", (8,), 8), self.data[unit])]


def test_unit_zero_carries_the_files_and_keeps_its_own_crc() -> None:
    files = pack({"config.json": b"{}"})
    src = WithModelFiles(_Src(), files)
    u0 = src.unit(0)
    assert [m.name for m, _ in u0] == ["w0", FILES_TENSOR]
    assert bytes(u0[1][1]) == files.blob
    assert [m.name for m, _ in src.unit(1)] == ["w1"]
    # Unit 0's CRC is the framed one with the files; the inner source's other CRCs carry over.
    assert 0 not in src.crcs and src.crcs[1] == 7
    frames = list(iter_unit_frames(0, u0))
    assert int.from_bytes(bytes(frames[-1]), "little") == unit_frame_crc(0, u0)
    rest, blob = split_files({m.name: bytes(v) for m, v in u0})
    assert list(rest) == ["w0"] and blob == files.blob
    assert split_files({"w1": b""}) == ({"w1": b""}, None)


@pytest.mark.parametrize("flavour", ["SMOLLM2", "MISTRAL", "QWEN25"])
def test_a_tokenizer_built_from_received_files_is_the_one_read_from_the_store(tmp_path: Path, flavour: str) -> None:
    """Real tokenizer files (saved by transformers): what a diskless worker rebuilds from the
    unpacked blob encodes and renders chats exactly as the original folder does."""
    from cascade.models.tokenizer import load_tokenizer
    from tests import hf_fixtures

    src = hf_fixtures.build(getattr(hf_fixtures, flavour), tmp_path / "store")
    got = write_files(unpack(pack_dir(src).blob), tmp_path / "received")
    a, b = load_tokenizer(src), load_tokenizer(got)
    text = "Hello, world! ünïcode\n  def f(x): return 42"
    assert a.encode(text) == b.encode(text)
    msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
    assert a.render_chat(msgs) == b.render_chat(msgs)
