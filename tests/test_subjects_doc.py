"""docs/subjects.md documents every subject builder, with the subject it builds."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from cascade.subjects import METRICS_ROLES, Subjects

DOC = (Path(__file__).resolve().parent.parent / "docs" / "subjects.md").read_text()


def builders() -> list[str]:
    return sorted(name for name, fn in inspect.getmembers(Subjects, inspect.isfunction) if not name.startswith("_"))


def rendered(name: str) -> list[str]:
    """The subjects a builder makes under the default prefix, with its id arguments shown as
    `<param>` as the document writes them."""
    fn = getattr(Subjects(), name)
    params = list(inspect.signature(fn).parameters)
    if name == "metrics":
        return [fn(role, "SENDER").replace("SENDER", "<sender_id>") for role in METRICS_ROLES]
    placeholders = {p: p.upper().replace("_", "-") for p in params}
    out = fn(*placeholders.values())
    for p, ph in placeholders.items():
        out = out.replace(ph, f"<{p}>")
    return [out]


def test_there_are_builders_to_check() -> None:
    assert {"heartbeat", "status", "all"} <= set(builders())


@pytest.mark.parametrize("name", builders())
def test_every_builder_is_documented_with_its_subject(name: str) -> None:
    assert f"`{name}(" in DOC, f"docs/subjects.md does not name the builder {name}()"
    for subject in rendered(name):
        assert f"`{subject}`" in DOC, f"docs/subjects.md does not show {subject} (built by {name})"
