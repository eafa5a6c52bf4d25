"""The deployed models as the gateway needs them: tokenizer and context length,
read from each model directory without torch, once, on first use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cascade.config import Deployment, ModelDeployment
from cascade.models.config import CheckpointError, read_config
from cascade.models.tokenizer import Tokenizer, load_tokenizer
from services.gateway.openai_api import ApiError


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    path: Path
    context_len: int
    vocab_size: int
    tokenizer: Tokenizer


class ModelCatalog:
    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self._loaded: dict[str, ModelInfo] = {}

    def names(self) -> list[str]:
        return self.deployment.names()

    def required(self) -> list[str]:
        """Models that must have an instance for the gateway to be healthy."""
        return [m.name for m in self.deployment.models if m.min_replicas > 0]

    def get(self, name: str) -> ModelInfo:
        """The model's info; 404 when it is not deployed, 503 when its files cannot be read yet
        (`cascade up` may still be generating it; a later request tries again)."""
        info = self._loaded.get(name)
        if info is not None:
            return info
        dep = self.deployment.get(name)
        if dep is None:
            raise ApiError(404, f"the model `{name}` does not exist", param="model", code="model_not_found")
        try:
            info = _load(dep)
        except (CheckpointError, OSError, ValueError) as e:
            raise ApiError(503, f"model `{name}` is not available yet: {e}", code="model_unavailable") from None
        self._loaded[name] = info
        return info

    def preload(self) -> dict[str, str]:
        """Load every model now; returns the errors by model (they are retried on first use)."""
        errors = {}
        for name in self.names():
            try:
                self.get(name)
            except ApiError as e:
                errors[name] = e.message
        return errors


def _load(dep: ModelDeployment) -> ModelInfo:
    cfg = read_config(dep.path)
    return ModelInfo(
        name=dep.name,
        path=dep.path,
        context_len=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        tokenizer=load_tokenizer(dep.path),
    )
