"""The simulator drives the services' cores; no service (nor the common package) imports it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_service_or_common_module_imports_the_simulator() -> None:
    offenders = []
    for package in ("services", "cascade"):
        for path in (ROOT / package).rglob("*.py"):
            if path.parts[-2:] in {("cli", "sim.py"), ("cli", "place.py")}:
                continue  # `cascade sim` and `cascade place` (its scorer): the commands that run it
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                if any(n == "sim" or n.startswith("sim.") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
