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

from cascade.stages import StageError, check_ranges

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
    write_json_atomic(path, info)
    return path


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


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
    # How many loaders keep a host-memory copy of this model (on distinct hosts where they can):
    # 1 is the O(1) cache; 2 or more let a loader that takes the lease over find a warm copy.
    host_copies: int = 1
    # "live": a loading instance serves as the first stage of pipelined routes for the layers it
    # holds; "stop-the-world": nothing is routed to it until it holds every layer.
    scaling: str = "live"
    # What the user named (a folder, a `.gguf` file, a hub id[@revision]) when `path` was not given
    # directly; `cascade up` / `cascade deploy` resolve it into `path` before any service reads it.
    source: str = ""
    # The paged KV cache of each instance of this model, carried to workers in the loader's orders
    # (None: the worker's own --kv-cache-mb / --max-model-len, else its measured default). 0 means
    # the worker's default explicitly: the measured budget, the model's context.
    kv_cache_mb: float | None = None
    max_model_len: int | None = None
    # Pipeline-parallel instances (docs/pipelined-and-shared.md): each instance is `stages` workers,
    # each holding a contiguous range of decoder layers; `stage_layers` gives the ranges explicitly
    # ([start, end) per stage), else the layers are split evenly.
    stages: int = 1
    stage_layers: tuple[tuple[int, int], ...] = ()
    # 2-D co-scaling (docs/pipelined-and-shared.md): on shared workers the scaler moves this model's
    # compute quotas first and its instance count second, instead of its policy's replica target.
    coscale: bool = False


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
        return {"models": [entry_json(m) for m in self.models]}

    def with_model(self, m: ModelDeployment) -> Deployment:
        """This deployment plus `m` (replacing an entry of the same name)."""
        return Deployment(models=(*(x for x in self.models if x.name != m.name), m))


def entry_json(m: ModelDeployment) -> dict[str, Any]:
    """One model's entry as the deployment file's JSON form (what `DeployRequest.add` and
    `DeploymentChanged` carry)."""
    return {
        "name": m.name,
        "path": str(m.path),
        "min_replicas": m.min_replicas,
        "max_replicas": m.max_replicas,
        "policy": m.policy,
        "knobs": m.knobs,
        "loading": m.loading,
        "host_copies": m.host_copies,
        "scaling": m.scaling,
        "source": m.source,
        "kv_cache_mb": m.kv_cache_mb,
        "max_model_len": m.max_model_len,
        "stages": m.stages,
        "stage_layers": [list(r) for r in m.stage_layers],
        "coscale": m.coscale,
        "generate": None if m.generate is None else {k: getattr(m.generate, k) for k in GenerateSpec.__slots__},
    }


def deployment_from_message(data: bytes) -> tuple[Deployment, list[str]]:
    """A `DeploymentChanged` message → (the deployment, the names it added). Raises ConfigError,
    or MessageError for a message that does not decode."""
    from cascade.messages import DeploymentChanged, decode

    msg = decode(data, DeploymentChanged)
    return deployment_from_entries(msg.models, "the deployment.changed message"), list(msg.added)


def deployment_from_entries(models: list[dict[str, Any]], where: str) -> Deployment:
    """The deployment a `DeploymentChanged` or `DeploymentReply` carries (entries validated as a
    deployment file's would be). Raises ConfigError."""
    if not models:
        raise ConfigError(f"{where} holds no model")
    dep = Deployment(models=tuple(model_from_entry(t) for t in models))
    check_names(dep, where)
    return dep


def model_from_entry(t: dict[str, Any], home: Path | None = None) -> ModelDeployment:
    """Parse one entry in the JSON form (validated as a deployment file's would be)."""
    if not isinstance(t, dict):
        raise ConfigError("a model entry must be an object")
    t = {k: v for k, v in t.items() if v is not None}
    if not t.get("path"):
        raise ConfigError(f"model {t.get('name', '?')}: the entry has no resolved path")
    return _model_from_table(t, home or cascade_home(), Path("/"))


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
    # `model` is the user's form (what `cascade up --model` takes); `source` is how a resolved
    # deployment (deployment.json) remembers it next to the `path` it resolved to.
    source = str(t.get("model") or t.get("source") or "").strip()
    if "model" in t and not source:
        raise ConfigError("a [[models]] entry has an empty model: name a folder, a .gguf file or a hub id")
    if "model" in t and ("path" in t or "generate" in t):
        raise ConfigError(
            f"model {t.get('name') or source}: give either model = (folder, .gguf file or hub id) or path/generate, "
            "not both"
        )
    if source and "model" in t:
        source = _relative_spec(source, base)
    if "name" not in t and not source:
        raise ConfigError("every [[models]] entry needs a name (or a model = folder, .gguf file or hub id)")
    name = str(t["name"]) if "name" in t else default_served_name(source)
    if not name.strip():
        raise ConfigError("a [[models]] entry has an empty name")
    raw_path = t.get("path")
    if raw_path:
        path = Path(raw_path).expanduser()
    elif source:
        path = Path()  # filled in from `source` by resolve_deployment()
    else:
        path = home / "models" / name
    if raw_path and not path.is_absolute():
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
    host_copies = _host_copies(name, t.get("host_copies", 1))
    scaling = str(t.get("scaling", "live"))
    if scaling not in SCALING_MODES:
        raise ConfigError(f"model {name}: scaling must be one of {', '.join(SCALING_MODES)} (got {scaling!r})")
    kv_cache_mb, max_model_len = kv_limits(name, t.get("kv_cache_mb"), t.get("max_model_len"))
    stages, stage_layers = stage_settings(name, t.get("stages"), t.get("stage_layers"))
    return ModelDeployment(
        name=name,
        path=path,
        min_replicas=mn,
        max_replicas=mx,
        generate=spec,
        policy=str(t.get("policy", "concurrency")),
        knobs=knobs,
        loading=loading,
        host_copies=host_copies,
        scaling=scaling,
        source=source,
        kv_cache_mb=kv_cache_mb,
        max_model_len=max_model_len,
        stages=stages,
        stage_layers=stage_layers,
        coscale=_coscale(name, t.get("coscale", False)),
    )


def kv_limits(name: str, kv_cache_mb: Any, max_model_len: Any) -> tuple[float | None, int | None]:
    """A model's KV settings checked: numbers >= 0 (a whole number for max_model_len), or None."""
    mb: float | None = None
    if kv_cache_mb is not None:
        if isinstance(kv_cache_mb, bool) or not isinstance(kv_cache_mb, int | float) or kv_cache_mb < 0:
            raise ConfigError(f"model {name}: kv_cache_mb must be a number of MB >= 0 (got {kv_cache_mb!r})")
        mb = float(kv_cache_mb)
    n: int | None = None
    if max_model_len is not None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 0:
            raise ConfigError(f"model {name}: max_model_len must be a whole number >= 0 (got {max_model_len!r})")
        n = max_model_len
    return mb, n


def _relative_spec(spec: str, base: Path) -> str:
    """A relative folder or `.gguf` named in a deployment file is relative to that file, as `path`
    is; a hub id stays as it is."""
    p = Path(spec).expanduser()
    if p.is_absolute() or spec.startswith("~"):
        return str(p)
    candidate = base / p
    if candidate.exists() or spec.lower().endswith(".gguf") or spec.startswith(("./", "../")):
        return str(candidate)
    return spec


def default_served_name(spec: str) -> str:
    """The name clients use for a model named by `spec` when no name is given (what
    `resolve_model` reports, computed without touching the network)."""
    from cascade.models.source import served_name_of

    return served_name_of(spec)


def model_from_spec(
    spec: str,
    home: Path | None = None,
    name: str | None = None,
    replicas: int = 1,
    kv_cache_mb: float | None = None,
    max_model_len: int | None = None,
) -> ModelDeployment:
    """A deployment entry for `cascade up --model SPEC` / `cascade deploy --model SPEC`."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("--model is empty: name a folder, a .gguf file or a hub id")
    if name is not None and not name.strip():
        raise ConfigError("--served-model-name is empty")
    served = name or default_served_name(spec)
    mb, n = kv_limits(served, kv_cache_mb, max_model_len)
    return ModelDeployment(
        name=served,
        path=Path(),
        min_replicas=replicas,
        max_replicas=max(replicas, 8),
        source=str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec,
        kv_cache_mb=mb,
        max_model_len=n,
    )


def unresolved(dep: Deployment) -> list[ModelDeployment]:
    """Entries still waiting for `resolve_sources` (named by `model =`, no path yet)."""
    return [m for m in dep.models if m.source and m.path == Path()]


def check_names(dep: Deployment, where: str) -> None:
    names = dep.names()
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where} names model {twice[0]!r} twice (give each its own name / --served-model-name)")


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
    if not all(isinstance(t, dict) for t in models):
        raise ConfigError(f"deployment file {path}: every [[models]] entry must be a table")
    if "host_copies" in data:
        # A deployment-wide default; an entry's own host_copies wins.
        k = _host_copies(f"(deployment file {path})", data["host_copies"])
        models = [{"host_copies": k, **t} for t in models]
    dep = Deployment(models=tuple(_model_from_table(t, home, path.parent) for t in models))
    check_names(dep, f"deployment file {path}")
    return dep


def with_replicas(dep: Deployment, replicas: int) -> Deployment:
    return Deployment(models=tuple(replace(m, min_replicas=replicas) for m in dep.models))


def stage_settings(name: str, stages: Any, stage_layers: Any) -> tuple[int, tuple[tuple[int, int], ...]]:
    """A model's `stages` and `stage_layers` checked (docs/pipelined-and-shared.md): a whole number
    of stages >= 1; ranges, when given, contiguous from layer 0 and one per stage. Whether they end
    at the model's last layer is checked when the checkpoint is read (the loader)."""
    if stage_layers is not None and not isinstance(stage_layers, list | tuple):
        raise ConfigError(f"model {name}: stage_layers must be a list of [start, end) pairs (got {stage_layers!r})")
    ranges: tuple[tuple[int, int], ...] = ()
    if stage_layers:
        try:
            ranges = check_ranges([r if isinstance(r, list | tuple) else [r] for r in stage_layers])
        except StageError as e:
            raise ConfigError(f"model {name}: stage_layers: {e}") from None
    if stages is None:
        n = len(ranges) or 1
    elif isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"model {name}: stages must be a whole number >= 1 (got {stages!r})")
    else:
        n = stages
    if ranges and len(ranges) != n:
        raise ConfigError(f"model {name}: stage_layers gives {len(ranges)} ranges for stages = {n}")
    return n, ranges


def _coscale(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"model {name}: coscale must be true or false (got {value!r})")
    return value


def _host_copies(name: str, value: Any) -> int:
    """host_copies checked: a whole number, at least 1 (a model with no host copy is `loading = "disk"`
    or `--host-cache off`, not zero copies)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model {name}: host_copies must be a whole number of at least 1 (got {value!r})")
    return value
