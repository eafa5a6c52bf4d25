"""Where the tests find the real SmolLM2 GGUF: $CASCADE_SMOLLM2_GGUF, else where
`obtain_default_model` keeps it (`default_gguf_path()` under $CASCADE_HOME). CI machines may start
without it; the tests that need it skip then, saying where it would be."""

from __future__ import annotations

import os
from pathlib import Path

from cascade.models.default_model import default_gguf_path


def find_gguf() -> Path | None:
    env = os.environ.get("CASCADE_SMOLLM2_GGUF")
    p = Path(env) if env else default_gguf_path()
    return p if p.is_file() else None


GGUF = find_gguf()
SKIP_REASON = (
    "SmolLM2 GGUF not found: set CASCADE_SMOLLM2_GGUF, or fetch the default model once "
    f"(it lands at {default_gguf_path()})"
)
