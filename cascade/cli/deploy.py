"""`cascade deploy`: a model's scaling policy and knobs, changed at run time; or a new model
(`--model`: a folder, a `.gguf` file or a hub id, resolved here as `cascade up --model` does)."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from cascade.cli.common import CliError, add_mesh_flags, ask_typed
from cascade.cliargs import non_negative_int, positive_float, positive_int
from cascade.config import ConfigError, ModelDeployment, entry_json, kv_limits
from cascade.messages import DeployReply, DeployRequest


def _knob(text: str) -> tuple[str, float]:
    """argparse type for --knob NAME=VALUE."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"knob {name.strip()}: {value!r} is not a number") from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "deploy",
        help="deploy a new model, or change a model's scaling policy and knobs, at run time",
        description="With --model: deploy a new model into the running mesh (a checkpoint folder, a .gguf file or "
        "a hub id org/name[@revision], fetched or converted here first, as `cascade up --model` does); NAME is "
        "what clients call it (default: the hub id, the file's or the folder's name). Otherwise ask the scaler to "
        "run NAME under another scaling policy (manual, concurrency, rate, two-stage) and/or with other knobs, "
        "from now on; without --policy or --knob, show what it runs. Knobs merge into the current ones unless "
        "the policy changes or --replace-knobs is given. Under `cascade up` a new model stays deployed across "
        "service restarts; policy changes last until the scaler restarts. See docs/deployment.md.",
    )
    p.add_argument("model", nargs="?", default=None, metavar="NAME", help="model name, as clients call it")
    p.add_argument(
        "--model",
        dest="source",
        default=None,
        metavar="MODEL",
        help="deploy this new model: a checkpoint folder, a .gguf file or a hub id org/name[@revision]",
    )
    p.add_argument(
        "--min-replicas", type=non_negative_int, default=1, help="with --model: replicas kept up (default 1)"
    )
    p.add_argument(
        "--max-replicas", type=positive_int, default=None, help="with --model: most replicas (default max(8, min))"
    )
    p.add_argument(
        "--kv-cache-mb",
        type=float,
        default=None,
        help="with --model: each instance's paged KV cache, in MB (default: the worker's own --kv-cache-mb)",
    )
    p.add_argument(
        "--max-model-len",
        type=non_negative_int,
        default=None,
        help="with --model: the longest sequence its instances serve (default: the worker's own --max-model-len)",
    )
    p.add_argument("--policy", default="", help="manual | concurrency | rate | two-stage (default: keep the current)")
    p.add_argument(
        "--knob", type=_knob, action="append", default=[], metavar="NAME=VALUE", help="a policy knob (repeatable)"
    )
    p.add_argument("--replace-knobs", action="store_true", help="the given knobs replace the current ones")
    p.add_argument("--json", action="store_true", help="print the scaler's reply as JSON")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for the scaler's answer")
    add_mesh_flags(p)
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    add = None
    if args.source is not None:
        add = new_model_entry(args)
        args.model = add["name"]
    elif args.model is None:
        raise CliError("name the model (NAME), or deploy a new one with --model")
    req = DeployRequest(args.model, args.policy, dict(args.knob), args.replace_knobs, add=add)
    r: DeployReply = ask_typed(args, "scaler", lambda s: s.scale_deploy(), req, DeployReply)
    if args.json:
        print(orjson.dumps(r, option=orjson.OPT_INDENT_2).decode())
        return 0

    def knobs(d: dict[str, float]) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in sorted(d.items())) or "(defaults)"

    print(f"{r.model}: policy {r.policy}" + (" (changed)" if r.changed else " (unchanged)"))
    print(f"  knobs set:  {knobs(r.knobs)}")
    if r.effective:
        print(f"  in effect:  {knobs(r.effective)}")
    limit = f", batch limit {r.batch_limit}" if r.batch_limit else ""
    print(f"  replicas:   min {r.min_replicas}, max {r.max_replicas}, target now {r.target_replicas}{limit}")
    return 0


def new_model_entry(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve --model on this machine (download, conversion: with progress) into a deployment entry.
    The folder must be readable where the workers run: the same machine, or a shared volume."""
    from cascade.models.config import CheckpointError
    from cascade.models.source import resolve_model

    mx = args.max_replicas if args.max_replicas is not None else max(8, args.min_replicas)
    if mx < args.min_replicas:
        raise CliError(f"--max-replicas {mx} is below --min-replicas {args.min_replicas}")
    if args.model is not None and not args.model.strip():
        raise CliError("the model name is empty")
    try:
        kv_cache_mb, max_model_len = kv_limits(args.model or args.source, args.kv_cache_mb, args.max_model_len)
    except ConfigError as e:
        raise CliError(str(e)) from None
    try:
        got = resolve_model(args.source)
    except CheckpointError as e:
        raise CliError(str(e)) from None
    entry = ModelDeployment(
        name=args.model or got.name,
        path=got.path,
        min_replicas=args.min_replicas,
        max_replicas=mx,
        policy=args.policy or "concurrency",
        knobs=dict(args.knob),
        source=args.source,
        kv_cache_mb=kv_cache_mb,
        max_model_len=max_model_len,
    )
    print(f"deploying {entry.name} from {entry.path}", flush=True)
    return entry_json(entry)
