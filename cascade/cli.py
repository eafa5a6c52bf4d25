"""`cascade`: one command for the whole mesh.

    cascade up                 start a broker and every service on this machine
    cascade gateway|scaler|loader|worker [flags]   run one service
    cascade status | tap | scale | deploy | cache | model create | bench

Service modules (and torch) are imported only by the subcommand that needs
them, so `cascade --help`, `cascade status` and `cascade tap` start fast.
Mistakes the user can fix end as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import orjson

from cascade.cliargs import non_negative_int, positive_float, positive_int
from cascade.config import ConfigError, cascade_home, resolve_nats_url, resolve_prefix

SERVICES: dict[str, str] = {
    "gateway": "OpenAI-compatible HTTP API: admission, batching, routing",
    "scaler": "turns load and replica targets into scale decisions",
    "loader": "carries out scale decisions: loads and unloads models on workers",
    "worker": "holds a model's layers and runs them with torch",
}


class CliError(Exception):
    """A problem the user can fix: printed as one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point at the right --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- parser


def service_module(name: str) -> ModuleType:
    """Import `services.<name>.main` (lazily: the worker pulls in torch)."""
    modname = f"services.{name}.main"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name in (modname, "services", f"services.{name}"):
            raise CliError(f"the {name} service is not part of this build ({modname} not found)") from None
        raise CliError(f"the {name} service needs the Python package {e.name!r}, which is not installed") from None
    for attr in ("add_arguments", "run"):
        if not callable(getattr(mod, attr, None)):
            raise CliError(f"{modname} has no {attr}(): it does not follow the service contract")
    return mod


def build_parser(services: Collection[str] = ()) -> Parser:
    """The whole command tree. Services named in `services` get their real flags (which
    imports them); the others are listed with a one-line help only."""
    p = Parser(
        prog="cascade",
        description="Cascade: a model-serving mesh that scales live. Run `cascade up` to start one here.",
    )
    p.add_argument("--version", action="version", version=f"cascade {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, help_text in SERVICES.items():
        sp = sub.add_parser(name, help=f"run the {name} service: {help_text}", description=f"The {name}: {help_text}.")
        if name in services:
            mod = service_module(name)
            mod.add_arguments(sp)
            sp.set_defaults(func=mod.run)
        else:
            sp.set_defaults(func=_unloaded_service(name))

    from cascade import up

    sp = sub.add_parser(
        "up",
        help="start a NATS broker and every service on this machine",
        description="Start an embedded NATS broker, the gateway, scaler, loader and N workers as child "
        "processes; generate missing models; wait until the default model serves; stop all on Ctrl-C.",
    )
    up.add_arguments(sp)
    sp.set_defaults(func=up.run)

    _add_model_commands(sub)
    _add_status(sub)
    _add_tap(sub)
    _add_scale(sub)
    _add_deploy(sub)
    _add_cache(sub)
    _add_bench(sub)
    return p


def _unloaded_service(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # Only reached when a caller built the parser without loading this service's flags.
        raise CliError(f"internal: the {name} parser was built without its flags; use cascade.cli.parse_args")

    return run


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a full command line, importing the one service it names so its flags are known."""
    argv = list(argv)
    wanted = [argv[0]] if argv and argv[0] in SERVICES else []
    return build_parser(wanted).parse_args(argv)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cascade-mesh")
    except Exception:  # not installed (running from a checkout)
        return "0.1.0 (source)"


# --------------------------------------------------------------------------- model


def _add_model_commands(sub: Any) -> None:
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


# --------------------------------------------------------------------------- status


def _add_mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats-url",
        default=None,
        help="NATS server (default: $CASCADE_NATS_URL, else the running mesh's, else nats://127.0.0.1:4222)",
    )
    p.add_argument("--prefix", default=None, help="subject prefix (default: $CASCADE_PREFIX, else the mesh's)")


def _add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show every service and model instance of the running mesh",
        description="Ask every service for its status (scatter-gather on the status subject) and print "
        "services and model instances: model, units ready, state, running/waiting, load.",
    )
    _add_mesh_flags(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument(
        "--timeout", type=positive_float, default=1.0, help="how long to collect answers, seconds (default 1.0)"
    )
    p.set_defaults(func=cmd_status)


async def _connect(url: str, name: str) -> Any:
    from cascade.meshview import connect_bounded

    try:
        # A short connect budget: an interactive command should say "nothing there" quickly.
        return await connect_bounded(url, name, timeout_s=2.0)
    except ConnectionError:
        raise CliError(f"cannot reach NATS at {url}: is a mesh running? (start one with `cascade up`)") from None


def cmd_status(args: argparse.Namespace) -> int:
    from cascade.meshview import gather_status, render, to_json
    from cascade.subjects import Subjects

    url, prefix = resolve_nats_url(args.nats_url), resolve_prefix(args.prefix)

    async def go() -> int:
        nc = await _connect(url, "cascade-status")
        try:
            st = await gather_status(nc, Subjects(prefix), args.timeout)
        finally:
            await nc.drain()
        if not st.services and not st.heartbeats:
            raise CliError(
                f"no Cascade service answered on '{prefix}.status' within {args.timeout:g}s "
                f"(NATS at {url} is up, but no mesh runs under prefix '{prefix}')"
            )
        if args.json:
            print(orjson.dumps(to_json(st, url, prefix), option=orjson.OPT_INDENT_2).decode())
        else:
            print(render(st, url, prefix))
        return 0

    return asyncio.run(go())


# --------------------------------------------------------------------------- tap


def _add_tap(sub: Any) -> None:
    p = sub.add_parser(
        "tap",
        help="print every message of the mesh as it happens",
        description="Subscribe to everything under the prefix and print one line per message "
        "(time, subject, type, key fields). Ctrl-C to stop.",
    )
    _add_mesh_flags(p)
    p.add_argument("--raw", action="store_true", help="print each payload as JSON, as it went over the wire")
    p.add_argument("--filter", metavar="SUBJECT", default=None, help="subscribe to this subject (wildcards allowed)")
    p.add_argument("--count", type=positive_int, default=None, help="exit after this many messages")
    p.set_defaults(func=cmd_tap)


def cmd_tap(args: argparse.Namespace) -> int:
    from cascade.events import format_message
    from cascade.natsutil import stop_event
    from cascade.subjects import Subjects

    url, prefix = resolve_nats_url(args.nats_url), resolve_prefix(args.prefix)
    subject = args.filter or Subjects(prefix).all()

    async def go() -> int:
        stop = stop_event()
        nc = await _connect(url, "cascade-tap")
        seen = 0

        async def on_msg(msg: Any) -> None:
            nonlocal seen
            if stop.is_set():
                return
            print(format_message(msg.subject, msg.data, raw=args.raw), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                stop.set()

        try:
            try:
                await nc.subscribe(subject, cb=on_msg)
                await nc.flush()
            except Exception as e:  # nats-py reports a bad subject as one of several error types
                raise CliError(f"cannot subscribe to {subject!r}: {e}") from None
            print(f"tapping {subject} on {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            await nc.drain()
        return 0

    return asyncio.run(go())


# --------------------------------------------------------------------------- scale


def _add_scale(sub: Any) -> None:
    p = sub.add_parser(
        "scale",
        help="set how many replicas of a model the mesh keeps",
        description="Ask the scaler to keep N replicas of MODEL (bounded by the deployment's max_replicas).",
    )
    p.add_argument("model", help="model name, as in the deployment")
    p.add_argument("--replicas", type=non_negative_int, required=True, help="target number of replicas")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for the scaler's answer")
    _add_mesh_flags(p)
    p.set_defaults(func=cmd_scale)


def _ask(args: argparse.Namespace, service: str, subject: Callable[[Any], str], msg: Any) -> str:
    """One request/reply to a service of the running mesh; its `Ok` detail, or a one-line error."""
    from cascade.messages import Ok

    reply: Ok = _request(args, service, subject, msg, Ok)
    return reply.detail


def _request(args: argparse.Namespace, service: str, subject: Callable[[Any], str], msg: Any, expect: type[Any]) -> Any:
    """One request/reply to a service of the running mesh: its typed reply, or a one-line error."""
    from cascade.messages import RemoteError
    from cascade.natsutil import RequestTimeout, request
    from cascade.subjects import Subjects

    url, prefix = resolve_nats_url(args.nats_url), resolve_prefix(args.prefix)

    async def go() -> Any:
        nc = await _connect(url, f"cascade-{args.command}")
        try:
            return await request(nc, subject(Subjects(prefix)), msg, expect, args.timeout)
        except RemoteError as e:
            raise CliError(f"the {service} refused: {e.message}") from None
        except RequestTimeout:
            why = f"no {service} answered within {args.timeout:g}s (is the mesh '{prefix}' running?)"
            raise CliError(why) from None
        finally:
            await nc.drain()

    return asyncio.run(go())


def cmd_scale(args: argparse.Namespace) -> int:
    from cascade.messages import ScaleRequest

    detail = _ask(args, "scaler", lambda s: s.scale_request(), ScaleRequest(args.model, args.replicas))
    print(detail or f"{args.model}: target {args.replicas} replicas")
    return 0


# --------------------------------------------------------------------------- deploy


def _knob(text: str) -> tuple[str, float]:
    """argparse type for --knob NAME=VALUE."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"knob {name.strip()}: {value!r} is not a number") from None


def _add_deploy(sub: Any) -> None:
    p = sub.add_parser(
        "deploy",
        help="change a model's scaling policy and knobs at run time",
        description="Ask the scaler to run MODEL under another scaling policy (manual, concurrency, rate, "
        "two-stage) and/or with other knobs, from now on; without --policy or --knob, show what it runs. Knobs "
        "merge into the current ones unless the policy changes or --replace-knobs is given. The change lasts "
        "until the scaler restarts (the deployment file is not rewritten). See docs/deployment.md.",
    )
    p.add_argument("model", help="model name, as in the deployment")
    p.add_argument("--policy", default="", help="manual | concurrency | rate | two-stage (default: keep the current)")
    p.add_argument(
        "--knob", type=_knob, action="append", default=[], metavar="NAME=VALUE", help="a policy knob (repeatable)"
    )
    p.add_argument("--replace-knobs", action="store_true", help="the given knobs replace the current ones")
    p.add_argument("--json", action="store_true", help="print the scaler's reply as JSON")
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for the scaler's answer")
    _add_mesh_flags(p)
    p.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    from cascade.messages import DeployReply, DeployRequest

    req = DeployRequest(args.model, args.policy, dict(args.knob), args.replace_knobs)
    r: DeployReply = _request(args, "scaler", lambda s: s.scale_deploy(), req, DeployReply)
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


# --------------------------------------------------------------------------- host cache


def _add_cache(sub: Any) -> None:
    p = sub.add_parser(
        "cache",
        help="load a model into the loader's host cache, or release it",
        description="The host cache keeps at most one host-memory copy of each model in the mesh, the chain "
        "head when no worker holds the model. `load` fills it now (a scale from zero then skips the disk); "
        "`release` frees it now (it is also released by its keep-alive policy). `cascade status` shows it.",
    )
    p.add_argument("action", choices=["load", "release"], help="what to do")
    p.add_argument("model", help="model name, as in the deployment")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds to wait for the loader's answer")
    _add_mesh_flags(p)
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    from cascade.messages import HostCacheRequest

    print(_ask(args, "loader", lambda s: s.host_cache(), HostCacheRequest(args.action, args.model)))
    return 0


# --------------------------------------------------------------------------- bench


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark from bench/ (e.g. `cascade bench serve --help`)",
        description="Run bench/<NAME>.py's main(argv) with the remaining arguments. Without NAME, list them.",
    )
    p.add_argument("name", nargs="?", help="benchmark name (a module in bench/)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_bench)


def _bench_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "bench"


def cmd_bench(args: argparse.Namespace) -> int:
    available = sorted(p.stem for p in _bench_dir().glob("*.py") if not p.stem.startswith("_"))
    if not args.name:
        print("benchmarks: " + (", ".join(available) if available else "none in this build"))
        return 0
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", args.name):
        raise CliError(f"{args.name!r} is not a benchmark name")
    try:
        mod = importlib.import_module(f"bench.{args.name}")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("bench"):
            raise CliError(f"benchmark {args.name} needs the Python package {e.name!r}") from None
        # bench/ is not an installed package: from a checkout, import it from the source tree.
        root = str(_bench_dir().parent)
        if _bench_dir().is_dir() and root not in sys.path:
            sys.path.insert(0, root)
        try:
            mod = importlib.import_module(f"bench.{args.name}")
        except ModuleNotFoundError:
            known = ", ".join(available) or "none in this build"
            raise CliError(f"no benchmark {args.name!r} (available: {known})") from None
    fn = getattr(mod, "main", None)
    if not callable(fn):
        raise CliError(f"bench/{args.name}.py has no main(argv)")
    result = fn(list(args.bench_args))
    return int(result or 0)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        if args.command not in SERVICES:
            # Services set up their own logging; for the CLI's own commands, library chatter
            # (reconnect attempts and the like) would bury the one line that matters.
            from cascade.logs import setup_logging

            setup_logging("cli", level="warning")
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"cascade: error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"cascade: configuration error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cascade tap | head`: the reader left; not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
