"""Configuration shared by every service: where the mesh lives, how to reach
NATS, and the deployment (which models exist and how many replicas each wants).

Every setting comes from, in order: a CLI flag, a `CASCADE_*` environment
variable, the deployment file, the built-in default. Services read only what
they need; nothing here does I/O beyond reading files it is pointed at.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

DEFAULT_NATS_PORT = 4222
DEFAULT_MODEL = "cascade-tiny"
LOADING_MODES = ("multicast", "host-cache", "disk")
SCALING_MODES = ("live", "stop-the-world")


def cascade_home() -> Path:
    """`CASCADE_HOME`, else `$XDG_CACHE_HOME/cascade`, else `~/.cache/cascade`."""
    env = os.environ.get("CASCADE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cascade"


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which and why."""


# --------------------------------------------------------------------------- mesh file


def mesh_file(home: Path | None = None) -> Path:
    """Where `cascade up` records the running mesh (NATS URL, gateway URL, prefix)."""
    return (home or cascade_home()) / "mesh.json"


def write_mesh_file(info: dict[str, Any], home: Path | None = None) -> Path:
    path = mesh_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
    tmp.replace(path)
    return path


def read_mesh_file(home: Path | None = None) -> dict[str, Any] | None:
    path = mesh_file(home)
    try:
        data = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def resolve_nats_url(flag: str | None, home: Path | None = None) -> str:
    """--nats-url, else CASCADE_NATS_URL, else the running mesh's, else localhost:4222."""
    if flag:
        return flag
    env = os.environ.get("CASCADE_NATS_URL")
    if env:
        return env
    info = read_mesh_file(home)
    if info and isinstance(info.get("nats_url"), str):
        return str(info["nats_url"])
    return f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"


def resolve_prefix(flag: str | None, home: Path | None = None) -> str:
    if flag:
        return flag
    env = os.environ.get("CASCADE_PREFIX")
    if env:
        return env
    info = read_mesh_file(home)
    if info and isinstance(info.get("prefix"), str):
        return str(info["prefix"])
    return "cascade"


# --------------------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class GenerateSpec:
    """How to generate a deterministic random model when its directory is missing."""

    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 320
    intermediate: int | None = None
    max_position: int = 2048
    seed: int = 0
    dtype: str = "float32"


@dataclass(frozen=True, slots=True)
class ModelDeployment:
    name: str
    path: Path
    min_replicas: int = 1
    max_replicas: int = 8
    # When set and `path` holds no model yet, `cascade up` generates it there.
    generate: GenerateSpec | None = None
    policy: str = "concurrency"
    knobs: dict[str, float] = field(default_factory=dict)
    # Where a new instance's parameters come from: "multicast" (chain from live holders, else the
    # host cache, else disk), "host-cache" (the one host copy, else disk) or "disk".
    loading: str = "multicast"
    # "live": a loading instance serves as the first stage of pipelined routes for the layers it
    # holds; "stop-the-world": nothing is routed to it until it holds every layer.
    scaling: str = "live"


@dataclass(frozen=True, slots=True)
class Deployment:
    models: tuple[ModelDeployment, ...]

    def get(self, name: str) -> ModelDeployment | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def to_json(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": m.name,
                    "path": str(m.path),
                    "min_replicas": m.min_replicas,
                    "max_replicas": m.max_replicas,
                    "policy": m.policy,
                    "knobs": m.knobs,
                    "loading": m.loading,
                    "scaling": m.scaling,
                    "generate": None
                    if m.generate is None
                    else {k: getattr(m.generate, k) for k in GenerateSpec.__slots__},
                }
                for m in self.models
            ]
        }


def default_deployment(home: Path | None = None, replicas: int = 1) -> Deployment:
    home = home or cascade_home()
    return Deployment(
        models=(
            ModelDeployment(
                name=DEFAULT_MODEL,
                path=home / "models" / DEFAULT_MODEL,
                min_replicas=replicas,
                generate=GenerateSpec(),
            ),
        )
    )


def _model_from_table(t: dict[str, Any], home: Path, base: Path) -> ModelDeployment:
    if "name" not in t:
        raise ConfigError("every [[models]] entry needs a name")
    name = str(t["name"])
    raw_path = t.get("path")
    path = Path(raw_path).expanduser() if raw_path else home / "models" / name
    if not path.is_absolute():
        path = base / path
    gen = t.get("generate")
    spec = None
    if gen is not None:
        if not isinstance(gen, dict):
            raise ConfigError(f"model {name}: generate must be a table")
        unknown = set(gen) - set(GenerateSpec.__slots__)
        if unknown:
            raise ConfigError(f"model {name}: unknown generate keys {sorted(unknown)}")
        spec = GenerateSpec(**gen)
    mn = int(t.get("min_replicas", 1))
    mx = int(t.get("max_replicas", max(mn, 8)))
    if mn < 0 or mx < mn:
        raise ConfigError(f"model {name}: need 0 <= min_replicas <= max_replicas (got {mn}, {mx})")
    knobs = {str(k): float(v) for k, v in dict(t.get("knobs", {})).items()}
    loading = str(t.get("loading", "multicast"))
    if loading not in LOADING_MODES:
        raise ConfigError(f"model {name}: loading must be one of {', '.join(LOADING_MODES)} (got {loading!r})")
    scaling = str(t.get("scaling", "live"))
    if scaling not in SCALING_MODES:
        raise ConfigError(f"model {name}: scaling must be one of {', '.join(SCALING_MODES)} (got {scaling!r})")
    return ModelDeployment(
        name=name,
        path=path,
        min_replicas=mn,
        max_replicas=mx,
        generate=spec,
        policy=str(t.get("policy", "concurrency")),
        knobs=knobs,
        loading=loading,
        scaling=scaling,
    )


def load_deployment(path: Path | None, home: Path | None = None) -> Deployment:
    """Read a deployment file (TOML, or JSON as written by `Deployment.to_json`); None → defaults."""
    home = home or cascade_home()
    if path is None:
        env = os.environ.get("CASCADE_CONFIG")
        if not env:
            return default_deployment(home)
        path = Path(env)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read deployment file {path}: {e.strerror}") from None
    try:
        data = orjson.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (orjson.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deployment file {path} does not parse: {e}") from None
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"deployment file {path} needs at least one [[models]] entry")
    dep = Deployment(models=tuple(_model_from_table(t, home, path.parent) for t in models))
    if len(set(dep.names())) != len(dep.names()):
        raise ConfigError(f"deployment file {path} names a model twice")
    return dep


def with_replicas(dep: Deployment, replicas: int) -> Deployment:
    return Deployment(models=tuple(replace(m, min_replicas=replicas) for m in dep.models))
