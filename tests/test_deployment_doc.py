"""docs/deployment.md and examples/deploy.toml: the example in the document is the file, it parses
with policies and knobs the scaler accepts, and every policy's every knob is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from cascade.config import load_deployment
from services.scaler.controls import Controls
from services.scaler.policies import POLICIES

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "deployment.md").read_text()
EXAMPLE = ROOT / "examples" / "deploy.toml"


def test_the_documented_example_is_the_example_file() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOC, flags=re.S)
    assert EXAMPLE.read_text() in blocks


def test_the_example_parses_with_every_policy_and_valid_knobs(tmp_path: Path) -> None:
    dep = load_deployment(EXAMPLE, home=tmp_path)
    controls = Controls(dep)  # raises on an unknown policy or knob
    assert {c.policy.name for c in controls.models.values()} == set(POLICIES)
    assert {m.loading for m in dep.models} >= {"multicast", "disk"}
    assert {m.scaling for m in dep.models} == {"live", "stop-the-world"}
    assert all(m.generate is not None and m.path == tmp_path / "models" / m.name for m in dep.models)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_knob_is_documented(name: str) -> None:
    assert f"### `{name}`" in DOC
    for f in dataclasses.fields(POLICIES[name].knobs_type):
        if f.name not in ("min_replicas", "max_replicas"):
            assert f"| `{f.name}` | {f.default:g} |" in DOC, f"{name}: knob {f.name} (default {f.default})"
