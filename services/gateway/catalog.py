"""The deployed models as the gateway needs them: tokenizer, context length, vocabulary size and
the sampling defaults of the model's generation_config.json.

Read from each model's folder off the event loop (a tokenizer.json of tens of MB takes a while),
once at start and again when asked (`refresh`: a deployment change, or a model whose files were
not there yet). `get` is a lookup only: a request never waits on the disk.

A gateway that cannot see a model's folder (another machine, a container without the store) takes
the same files from the mesh (`fetch`: a loader sends them, cascade/meshfiles.py) and reads them
from its own copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
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


# The model's files from the mesh, as a folder to read (raises when no loader has them).
Fetch = Callable[[ModelDeployment], Awaitable[Path]]


class ModelCatalog:
    def __init__(self, deployment: Deployment, fetch: Fetch | None = None) -> None:
        self.deployment = deployment
        self.fetch = fetch
        self._loaded: dict[str, ModelInfo] = {}
        self._errors: dict[str, str] = {m.name: "not read yet" for m in deployment.models}

    def names(self) -> list[str]:
        return self.deployment.names()

    def update(self, deployment: Deployment) -> list[str]:
        """Take a changed deployment (a model deployed at run time); returns the names that must be
        read. A model whose folder changed is read again; one that left is forgotten."""
        changed = []
        for m in deployment.models:
            old = self.deployment.get(m.name)
            if old is None or old.path != m.path:
                self._loaded.pop(m.name, None)
                self._errors[m.name] = "not read yet"
                changed.append(m.name)
        for name in set(self.deployment.names()) - set(deployment.names()):
            self._loaded.pop(name, None)
            self._errors.pop(name, None)
        self.deployment = deployment
        return changed

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
                fetched = await self._from_mesh(dep) if not (dep.path / "config.json").is_file() else None
                if isinstance(fetched, str) or fetched is None:
                    self._errors[name] = str(e) + (f"; from the mesh: {fetched}" if fetched else "")
                    continue
                info = fetched
            self._loaded[name] = info
            self._errors.pop(name, None)
        return {n: e for n, e in self._errors.items() if n in wanted}

    async def _from_mesh(self, dep: ModelDeployment) -> ModelInfo | str | None:
        """The model read from files a loader sends (None: no fetch configured; a string: why not)."""
        if self.fetch is None:
            return None
        try:
            folder = await self.fetch(dep)
            return await asyncio.to_thread(_load, dep, folder)
        except Exception as e:  # no loader answered, bad bytes, unreadable files: retried later
            return f"{type(e).__name__}: {e}"


def _load(dep: ModelDeployment, folder: Path | None = None) -> ModelInfo:
    """Read the model's config and tokenizer from its folder (or `folder`, a copy of its files)."""
    path = folder or dep.path
    cfg = read_config(path)
    present = cfg.generation.present()
    return ModelInfo(
        name=dep.name,
        path=dep.path,
        context_len=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        tokenizer=load_tokenizer(path),
        defaults={k: present[k] for k in REQUEST_DEFAULTS if k in present},
    )
