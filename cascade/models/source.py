"""Where a model comes from: whatever a user names with `cascade up --model X` becomes one local
folder in the transformers layout (config.json, model*.safetensors, tokenizer files) before any
worker sees it.

X is, in this order of precedence:

* a local folder holding a checkpoint (or a hub cache folder `models--org--name`);
* a `.gguf` file, converted once into a cached folder (see cascade.models.gguf);
* a Hugging Face hub id `org/name`, optionally `org/name@revision`, fetched with
  `huggingface_hub.snapshot_download` into the hub's own cache (so `HF_HOME`, `HF_HUB_CACHE`,
  `HF_TOKEN` and `HF_HUB_OFFLINE` mean what they mean to every other Hugging Face tool).

Every failure is a `ModelSourceError` whose message says what is wrong and what to do about it.
Importing this module is cheap (no torch, no gguf): the hub client and the GGUF converter are
imported only when a spec needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cascade.config import Deployment, cascade_home, unresolved
from cascade.models.config import CheckpointError, read_config

if TYPE_CHECKING:
    from huggingface_hub import HfApi

SourceKind = Literal["local", "hub", "gguf"]

# Files a checkpoint needs, and nothing else: a hub repo often also carries .bin / .pth / .gguf /
# ONNX copies of the same weights, and downloading those would multiply the bytes for nothing.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# Weights in the transformers layout: `model.safetensors` or `model-00001-of-00004.safetensors`.
WEIGHT_PATTERN = "model*.safetensors"

# How long one hub request may take before we call the hub unreachable.
HUB_TIMEOUT_S = 10.0

# Bump when the folders the GGUF converter writes change, so older conversions are not reused.
GGUF_CONVERTER_VERSION = 1
# Written last into a finished conversion: its presence is what "converted" means.
GGUF_MANIFEST = "cascade_gguf.json"

_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelSourceError(CheckpointError):
    """A model that cannot be obtained; the message names it and says what to do."""


class GGUFError(ModelSourceError):
    """A GGUF file that cannot be converted; the message names the file and the reason."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model ready for workers: a local folder in the transformers layout."""

    path: Path
    # The name clients use by default: the hub id, the GGUF's file name, the folder's name.
    name: str
    kind: SourceKind
    # What the user asked for, as typed.
    spec: str
    # The hub commit the folder holds (hub sources only).
    revision: str | None = None


# --------------------------------------------------------------------------- entry point


def resolve_model(spec: str, *, home: Path | None = None, progress: bool = True) -> ResolvedModel:
    """Turn what a user typed (folder, `.gguf` file, hub id[@revision]) into a local checkpoint folder.

    Raises ModelSourceError (a CheckpointError) with a message a user can act on; a folder whose
    config.json Cascade cannot serve raises the CheckpointError of `read_config`."""
    spec = spec.strip()
    if not spec:
        raise ModelSourceError("no model given: name a folder, a .gguf file or a hub id such as org/name")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_folder(path, spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            folder = gguf_checkpoint(path, home=home, progress=progress)
            return ResolvedModel(path=folder, name=gguf_served_name(path), kind="gguf", spec=spec)
        raise ModelSourceError(
            f"{spec} is a file but not a .gguf file: give a checkpoint folder, a .gguf file or a hub id"
        )
    if path.suffix.lower() == ".gguf":
        raise GGUFError(f"{spec}: no such file")
    hub = parse_hub_id(spec)
    # `./x`, `/x`, `~/x`: the user meant a path, so "not found" is the useful answer, not a hub look-up.
    if hub is None or spec.startswith(("/", "./", "../", "~")):
        raise ModelSourceError(f"{spec}: no such file or folder, and not a hub id (org/name or org/name@revision)")
    repo_id, revision = hub
    return resolve_hub(repo_id, revision, spec=spec)


def resolve_deployment(dep: Deployment, *, home: Path | None = None, progress: bool = True) -> Deployment:
    """Every entry named by source (`model = ...`, `--model`) with its local folder filled in;
    the first model that cannot be obtained raises, naming it."""
    models = []
    for m in dep.models:
        if m in unresolved(dep):
            try:
                got = resolve_model(m.source, home=home, progress=progress)
            except CheckpointError as e:
                raise ModelSourceError(f"model {m.name}: {e}") from None
            m = replace(m, path=got.path)
        models.append(m)
    return Deployment(models=tuple(models))


def served_name_of(spec: str) -> str:
    """The name `resolve_model(spec)` gives the model, without network or conversion: the hub id
    (revision dropped), the GGUF file's name, or the folder's (a hub cache folder's repo id)."""
    spec = spec.strip()
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return gguf_served_name(path)
    if path.is_dir():
        if path.name.startswith("models--"):
            return _repo_id_from_cache_name(path.name)
        resolved = path.resolve()
        if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
            return _repo_id_from_cache_name(resolved.parent.parent.name)
        return resolved.name
    hub = parse_hub_id(spec)
    if hub is not None and not spec.startswith(("/", "./", "../", "~")):
        return hub[0]
    return path.name or spec


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """`org/name[@revision]` → (repo id, revision or None); None when `spec` cannot be a hub id."""
    repo_id, at, revision = spec.partition("@")
    if not _HUB_ID.match(repo_id) or (at and not revision):
        return None
    if ".." in repo_id or repo_id.endswith(".git"):
        return None
    return repo_id, (revision or None)


def gguf_served_name(path: Path) -> str:
    return path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name


# --------------------------------------------------------------------------- GGUF files


def gguf_cache_dir(path: Path, home: Path | None = None) -> Path:
    """Where the conversion of a GGUF file lives: `$CASCADE_HOME/models/gguf/<name>-<key>`, keyed by
    the file's resolved path, size and modification time (and the converter's version), so a
    changed file converts again and an unchanged one is reused."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{GGUF_CONVERTER_VERSION}\0{path}\0{st.st_size}\0{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf_served_name(path))
    return (home or cascade_home()) / "models" / "gguf" / f"{stem}-{digest}"


def gguf_checkpoint(path: Path, *, home: Path | None = None, progress: bool = True) -> Path:
    """The checkpoint folder of a GGUF file, converting it on first use. A cache hit costs a stat:
    the converter (and torch with it) is imported only when there is converting to do."""
    if not Path(path).is_file():
        raise GGUFError(f"{path}: no such file")
    folder = gguf_cache_dir(path, home)
    if (folder / GGUF_MANIFEST).is_file():
        return folder
    from cascade.models.gguf import convert_gguf_cached

    return convert_gguf_cached(path, home=home, progress=progress)


# --------------------------------------------------------------------------- local folders


def _resolve_folder(path: Path, spec: str) -> ResolvedModel:
    hub_folder = _hub_cache_repo(path)
    if hub_folder is not None:
        repo_id, snapshot, commit = hub_folder
        check_checkpoint_dir(snapshot)
        return ResolvedModel(path=snapshot, name=repo_id, kind="local", spec=spec, revision=commit)
    check_checkpoint_dir(path)
    resolved = path.resolve()
    name, revision = resolved.name, None
    # A snapshot folder inside a hub cache is named by its commit; the repo's name is better.
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        name = _repo_id_from_cache_name(resolved.parent.parent.name)
        revision = resolved.name
    return ResolvedModel(path=resolved, name=name, kind="local", spec=spec, revision=revision)


def _hub_cache_repo(path: Path) -> tuple[str, Path, str] | None:
    """A hub cache repo folder (`models--org--name` with refs/ and snapshots/) → its main snapshot."""
    if not (path.name.startswith("models--") and (path / "snapshots").is_dir()):
        return None
    ref = path / "refs" / "main"
    if not ref.is_file():
        raise ModelSourceError(f"{path} is a hub cache folder without refs/main: name a folder under snapshots/")
    commit = ref.read_text().strip()
    snapshot = path / "snapshots" / commit
    if not snapshot.is_dir():
        raise ModelSourceError(f"{path}: refs/main names commit {commit}, which has no snapshot folder")
    return _repo_id_from_cache_name(path.name), snapshot.resolve(), commit


def _repo_id_from_cache_name(folder: str) -> str:
    return folder[len("models--") :].replace("--", "/")


def check_checkpoint_dir(path: Path, what: str | None = None) -> None:
    """Raise ModelSourceError unless `path` holds a checkpoint in the transformers layout:
    config.json and safetensors weights (every shard the index names). `what` names the
    checkpoint in messages (default: the path)."""
    what = what or str(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            raise ModelSourceError(
                f"{what} holds GGUF files ({', '.join(ggufs[:3])}) but no config.json: pass the .gguf file itself"
            )
        raise ModelSourceError(f"{what} has no config.json: it is not a checkpoint in the transformers layout")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelSourceError(f"{what}: model.safetensors.index.json does not parse ({e})") from None
        missing = sorted({str(f) for f in weight_map.values()} - {p.name for p in path.glob("*.safetensors")})
        if missing:
            raise ModelSourceError(f"{what} lacks shards its index names: {', '.join(missing[:4])}")
    elif not any(path.glob("*.safetensors")):
        torch_files = sorted(
            p.name for ext in ("bin", "pt", "pth") for p in path.glob(f"*.{ext}") if p.name != "training_args.bin"
        )
        if torch_files:
            raise ModelSourceError(
                f"{what} holds only PyTorch weights ({', '.join(torch_files[:3])}), no safetensors. Cascade reads "
                "safetensors only (pickled .bin files can run code when loaded): convert once with transformers, "
                "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst), which writes safetensors"
            )
        raise ModelSourceError(f"{what} has config.json but no *.safetensors weights")
    # The config must describe a model Cascade can run; read_config says why not in its own words.
    read_config(path)


# --------------------------------------------------------------------------- the hub


@dataclass(frozen=True, slots=True)
class HubSettings:
    """The hub settings in effect now, with huggingface_hub's precedence. huggingface_hub reads
    its environment once, at import; reading it per call means a cache location or offline mode set
    later (by an embedding application, a test) is still honoured. (Offline mode switched off after
    import is not: huggingface_hub itself keeps refusing requests then.)"""

    cache_dir: Path
    offline: bool
    endpoint: str

    @classmethod
    def from_env(cls) -> HubSettings:
        env = os.environ
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache:
            home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
            cache = os.path.join(home, "hub")
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in {
            "1",
            "ON",
            "YES",
            "TRUE",
        }
        endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return cls(Path(os.path.expandvars(cache)).expanduser(), offline, endpoint)


def resolve_hub(
    repo_id: str, revision: str | None = None, *, spec: str | None = None, cache_only: bool = False
) -> ResolvedModel:
    """Fetch (or find in the hub cache) the checkpoint files of `repo_id` at `revision`.
    With `cache_only`, or when HF_HUB_OFFLINE is set, only the hub cache is looked at."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # huggingface_hub < 2 does not check cached snapshots for completeness
        IncompleteSnapshotError = LocalEntryNotFoundError  # type: ignore[misc,assignment]

    hs = HubSettings.from_env()
    spec = spec or (f"{repo_id}@{revision}" if revision else repo_id)
    if cache_only and not (hs.cache_dir / ("models--" + repo_id.replace("/", "--"))).is_dir():
        raise ModelSourceError(f"{spec} is not in the hub cache ({hs.cache_dir})")
    at = f" at revision {revision!r}" if revision else ""
    token_hint = (
        "the token in HF_TOKEN has no access to it yet"
        if os.environ.get("HF_TOKEN")
        else "set HF_TOKEN to a token that can read it"
    )
    files: list[str] = [*CHECKPOINT_FILES, WEIGHT_PATTERN]
    reason_offline = ""
    try:
        if hs.offline or cache_only:
            reason_offline = "HF_HUB_OFFLINE is set" if hs.offline else "only the cache was asked for"
        else:
            api = HfApi(endpoint=hs.endpoint)
            try:
                files = _hub_checkpoint_files(api, repo_id, revision, spec)
            except (HfHubHTTPError, ModelSourceError):
                raise  # the hub answered: the repo, revision or token is wrong
            except Exception as e:
                # No answer at all (DNS, refused, timeout, proxy). The transport's exception classes
                # differ between huggingface_hub releases (requests, httpx, httpx2), so anything that
                # is not an HTTP answer counts as "unreachable", and the cache may still hold it.
                reason_offline = f"the hub at {hs.endpoint} is unreachable ({_short(e)})"
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hs.cache_dir,
            allow_patterns=files,
            local_files_only=bool(reason_offline),
            endpoint=hs.endpoint,
            etag_timeout=HUB_TIMEOUT_S,
        )
    except GatedRepoError:
        raise ModelSourceError(
            f"{repo_id} is a gated model: accept its terms at {hs.endpoint}/{repo_id} and then {token_hint}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{spec}: no such model on the hub ({hs.endpoint}), nor a local file or folder of that name "
            f"(if it is private, {token_hint})"
        ) from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"{repo_id} has no revision {revision!r} on the hub") from None
    except IncompleteSnapshotError as e:
        raise ModelSourceError(
            f"the hub cache holds {repo_id}{at} only in part ({reason_offline or 'the hub is unreachable'}): "
            f"download it once with network access. {e}"
        ) from None
    except LocalEntryNotFoundError:
        why = reason_offline or "the hub cannot be reached"
        fix = "unset HF_HUB_OFFLINE" if hs.offline else "allow downloads" if cache_only else "check the network"
        raise ModelSourceError(
            f"{spec} is not in the hub cache ({hs.cache_dir}) and {why}: {fix}, or point HF_HUB_CACHE at a "
            "cache that holds it"
        ) from None
    except HfHubHTTPError as e:
        raise ModelSourceError(f"the hub refused {spec}: {_short(e)}") from None
    except (OSError, ConnectionError) as e:
        raise ModelSourceError(f"cannot download {spec} from {hs.endpoint}: {_short(e)}") from None
    snapshot = Path(folder)
    where = f"{repo_id}{at} (hub cache {snapshot})"
    try:
        check_checkpoint_dir(snapshot, where)
    except ModelSourceError as e:
        if reason_offline:
            raise ModelSourceError(f"{e} ({reason_offline}, so only the cached copy could be used)") from None
        raise
    return ResolvedModel(path=snapshot, name=repo_id, kind="hub", spec=spec, revision=snapshot.name)


def _hub_checkpoint_files(api: HfApi, repo_id: str, revision: str | None, spec: str) -> list[str]:
    """The files of the repo a checkpoint needs, checked before any download: a repo with only
    .bin or .gguf weights is refused before gigabytes move."""
    info = api.model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    names = [s.rfilename for s in (info.siblings or [])]
    top = [n for n in names if "/" not in n]
    if "config.json" not in top:
        ggufs = [n for n in names if n.lower().endswith(".gguf")]
        if ggufs:
            raise ModelSourceError(
                f"{spec} holds GGUF files ({', '.join(ggufs[:3])}) but no config.json: download one "
                f"(hf download {repo_id} {ggufs[0]}) and pass the .gguf file"
            )
        raise ModelSourceError(f"{spec} has no config.json: it is not a checkpoint in the transformers layout")
    weights = [n for n in top if n.startswith("model") and n.endswith(".safetensors")]
    if not weights:
        weights = [n for n in top if n.endswith(".safetensors")]
    if not weights:
        torch_files = [n for n in top if n.endswith((".bin", ".pt", ".pth")) and n != "training_args.bin"]
        if torch_files:
            raise ModelSourceError(
                f"{spec} publishes only PyTorch weights ({', '.join(torch_files[:3])}), no safetensors. Cascade "
                "reads safetensors only (pickled .bin files can run code when loaded); look for a safetensors "
                "revision of the model, or convert it once with transformers and pass the folder"
            )
        raise ModelSourceError(f"{spec} has no *.safetensors weights")
    return [n for n in top if n in CHECKPOINT_FILES] + weights


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
