"""The deployed models as the gateway needs them: tokenizer, context length, vocabulary size and
the sampling defaults of the model's generation_config.json.

Read from each model's folder off the event loop (a tokenizer.json of tens of MB takes a while),
once at start and again when asked (`refresh`: a deployment change, or a model whose files were
not there yet). `get` is a lookup only: a request never waits on the disk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.config import Deployment, ModelDeployment
from cascade.models.config import CheckpointError, read_config
from cascade.models.tokenizer import Tokenizer, load_tokenizer
from services.gateway.openai_api import ApiError

# generation_config.json fields this gateway applies to a request that does not set them, as vLLM
# does ("generation config: auto"); the others are read and kept for when they are supported.
REQUEST_DEFAULTS = ("temperature", "top_p", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    path: Path
    context_len: int
    vocab_size: int
    tokenizer: Tokenizer
    # From generation_config.json: defaults for what a request leaves out (REQUEST_DEFAULTS).
    defaults: Mapping[str, Any] = field(default_factory=dict)


class ModelCatalog:
    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._loaded: dict[str, ModelInfo] = {}
        self._errors: dict[str, str] = {m.name: "not read yet" for m in deployment.models}

    def names(self) -> list[str]:
        return self.deployment.names()

    def required(self) -> list[str]:
        """Models that must have an instance for the gateway to be healthy."""
        return [m.name for m in self.deployment.models if m.min_replicas > 0]

    def unavailable(self) -> dict[str, str]:
        """Deployed models whose files could not be read, with why."""
        return dict(self._errors)

    def get(self, name: str) -> ModelInfo:
        """The model's info; 404 when it is not deployed, 503 when its files could not be read
        (the gateway reads them again in the background)."""
        info = self._loaded.get(name)
        if info is not None:
            return info
        if self.deployment.get(name) is None:
            raise ApiError(404, f"the model `{name}` does not exist", param="model", code="model_not_found")
        why = self._errors.get(name, "not read yet")
        raise ApiError(503, f"model `{name}` is not available yet: {why}", code="model_unavailable", retry_after_s=1)

    async def refresh(self, names: list[str] | None = None) -> dict[str, str]:
        """Read the models named (default: every one not loaded yet) on a thread; returns the
        errors by model."""
        wanted = names if names is not None else [n for n in self.names() if n not in self._loaded]
        for name in wanted:
            dep = self.deployment.get(name)
            if dep is None:
                continue
            try:
                info = await asyncio.to_thread(_load, dep)
            except (CheckpointError, OSError, ValueError) as e:
                self._errors[name] = str(e)
                continue
            self._loaded[name] = info
            self._errors.pop(name, None)
        return {n: e for n, e in self._errors.items() if n in wanted}


def _load(dep: ModelDeployment) -> ModelInfo:
    cfg = read_config(dep.path)
    present = cfg.generation.present()
    return ModelInfo(
        name=dep.name,
        path=dep.path,
        context_len=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        tokenizer=load_tokenizer(dep.path),
        defaults={k: present[k] for k in REQUEST_DEFAULTS if k in present},
    )
