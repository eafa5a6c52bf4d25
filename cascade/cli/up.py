"""`cascade up`: the whole mesh on one machine.

Order of work, each step undone in reverse on the way out: models on disk →
broker → deployment file → children (gateway, scaler, loader, workers, run and
watched by the supervisor, supervisor.py) → mesh file → wait for Ctrl-C /
SIGTERM, restarting children (and the broker) that die → stop children → broker →
mesh file removed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from cascade.apikeys import is_loopback, keys_from, open_gateway_warning
from cascade.cli.supervisor import Supervisor, UpError, make_die_with_parent, pid_alive, supervise
from cascade.cliargs import non_negative_int, positive_float, positive_int
from cascade.config import (
    DEFAULT_MODEL,
    DEFAULT_NATS_PORT,
    ConfigError,
    Deployment,
    ModelDeployment,
    cascade_home,
    check_names,
    default_deployment,
    load_deployment,
    model_from_spec,
    read_mesh_file,
    with_replicas,
)
from cascade.natsauth import NatsCredentials, remove_mesh_credentials, write_mesh_credentials
from cascade.natsauth import generate as generate_nats_credentials


def register(sub: Any) -> None:
    sp = sub.add_parser(
        "up",
        help="start a NATS broker and every service on this machine",
        description="Start an embedded NATS broker, the gateway, scaler, loader and N workers as child "
        "processes and wait until every model serves; stop all on Ctrl-C. The models: each --model (a "
        "checkpoint folder, a .gguf file or a Hugging Face hub id org/name[@revision]), else the deployment "
        "file's, else SmolLM2-135M-Instruct (fetched and cached on first run; the generated test model "
        "cascade-tiny when it cannot be fetched).",
    )
    add_arguments(sp)
    sp.set_defaults(func=run)


# --------------------------------------------------------------------------- flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODEL",
        help="serve this model: a checkpoint folder, a .gguf file or a hub id org/name[@revision] "
        "(repeatable; default: the deployment file's models, else SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        metavar="NAME",
        help="the name clients use for the --model at the same position (repeatable; default: the hub id, "
        "the .gguf file's or the folder's name)",
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes to start (default 2)")
    parser.add_argument(
        "--port", type=non_negative_int, default=8000, help="gateway HTTP port (default 8000; 0 picks a free one)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway HTTP address (default 127.0.0.1)")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="the gateway requires 'Authorization: Bearer KEY' on /v1 routes (repeatable; also the "
        "comma-separated $CASCADE_API_KEYS; default: none, which is for a gateway on loopback only)",
    )
    parser.add_argument(
        "--nats-url",
        default=None,
        help="use this NATS server instead of starting an embedded one on port 4222; a comma-separated seed "
        "list for a NATS cluster (nats://a:4222,nats://b:4222): every service connects to one and fails over "
        "to any other. --loaders above 1 needs JetStream on it",
    )
    parser.add_argument(
        "--nats-port",
        type=non_negative_int,
        default=None,
        help="port of the embedded NATS server (default 4222 if free, else any free port; 0: any free port)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="deployment file, TOML (default: $CASCADE_CONFIG; see docs/deployment.md)",
    )
    parser.add_argument(
        "--replicas",
        type=non_negative_int,
        default=None,
        help="min replicas of every model (default: the deployment's min_replicas, 1 for the built-in model)",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument(
        "--loaders",
        type=positive_int,
        default=1,
        help="loader processes to start (default 1); with more, one plans at a time by a lease in the "
        "broker's JetStream store (the embedded broker runs with JetStream then, its store in "
        "$CASCADE_HOME/nats-store) and another takes over within seconds when it dies",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=positive_float,
        default=None,
        help="each worker's paged KV cache, in MB (default: $CASCADE_KV_CACHE_MB, else measured at load)",
    )
    parser.add_argument(
        "--max-model-len",
        type=positive_int,
        default=None,
        help="longest sequence (prompt + output) a worker takes (default: the model's context, capped to fit "
        "the KV cache)",
    )
    parser.add_argument(
        "--prefix",
        default=os.environ.get("CASCADE_PREFIX") or "cascade",
        help="subject prefix (default: $CASCADE_PREFIX, else 'cascade')",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("CASCADE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="log level of the services (default: $CASCADE_LOG_LEVEL, else info)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=300.0, help="seconds to wait for the mesh to come up (default 300)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=positive_float,
        default=15.0,
        help="seconds children get to stop after SIGTERM before SIGKILL (default 15)",
    )
    parser.add_argument(
        "--max-restarts",
        type=non_negative_int,
        default=5,
        help="restarts of one child (or the embedded broker) within --restart-window-s before `up` "
        "gives up on a crash loop and stops (default 5; 0: a dying child stops the mesh)",
    )
    parser.add_argument(
        "--restart-window-s",
        type=positive_float,
        default=60.0,
        help="the window --max-restarts counts in (default 60)",
    )


# --------------------------------------------------------------------------- models


def _holds_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def chosen_deployment(args: argparse.Namespace, home: Path) -> Deployment | None:
    """The deployment the flags name; None means the default model (chosen later, in `prepare`,
    because obtaining it may download)."""
    if args.served_model_name and len(args.served_model_name) != len(args.model):
        raise ConfigError(
            f"{len(args.served_model_name)} --served-model-name for {len(args.model)} --model: give one name per "
            "--model, in the same order"
        )
    config = args.config or (None if args.model else os.environ.get("CASCADE_CONFIG") or None)
    if args.model:
        if args.config:
            raise ConfigError("--model and --config both name the models to serve: use one of them")
        names = args.served_model_name or [None] * len(args.model)
        dep = Deployment(models=tuple(model_from_spec(m, home, n) for m, n in zip(args.model, names, strict=True)))
        check_names(dep, "the --model flags")
        return dep
    if config:
        return load_deployment(Path(config), home)
    return None


def default_model_deployment(home: Path, replicas: int, who: str = "cascade up") -> Deployment:
    """SmolLM2-135M-Instruct, from the first source that has it; else the generated test model,
    saying why (a mesh that starts beats one that refuses to on an offline machine)."""
    from cascade.models.default_model import DEFAULT_HUB_ID, DefaultModelUnavailable, obtain_default_model

    print(f"default model: {DEFAULT_HUB_ID} (pass --model to serve another)", flush=True)
    try:
        got = obtain_default_model(home=home)
    except DefaultModelUnavailable as e:
        print(
            f"{who}: {e}\n  serving the generated test model {DEFAULT_MODEL} instead (random weights: its "
            "answers are noise); pass --model to serve a checkpoint you have",
            file=sys.stderr,
            flush=True,
        )
        return default_deployment(home, replicas)
    return Deployment(
        models=(ModelDeployment(name=got.name, path=got.path, min_replicas=replicas, source=DEFAULT_HUB_ID),)
    )


def prepare_models(dep: Deployment, home: Path | None = None) -> Deployment:
    """Resolve every model named by source (hub download, GGUF conversion), generate every model
    that has a generate spec and no files yet, and check the others; returns the deployment with
    every path filled in."""
    from cascade.models.config import CheckpointError
    from cascade.models.source import resolve_deployment

    try:
        dep = resolve_deployment(dep, home=home)
    except CheckpointError as e:
        raise UpError(str(e)) from None
    for m in dep.models:
        if _holds_model(m.path):
            # Every header and tensor shape, not only config.json: a bad checkpoint stops `up` here
            # rather than failing in a worker mid-load.
            from cascade.models.checkpoint import validate_checkpoint

            try:
                validate_checkpoint(m.path)
            except (CheckpointError, OSError) as e:
                raise UpError(f"model {m.name}: {e}") from None
            continue
        if m.generate is None:
            raise UpError(
                f"model {m.name}: no model at {m.path} (needs config.json and *.safetensors), "
                "and the deployment has no generate spec for it"
            )
        from cascade.console import Progress
        from cascade.models.generate import generate_model

        print(f"generating model {m.name} in {m.path} (first run only)", flush=True)
        bar = Progress(f"  {m.name}", total=1)
        try:
            generate_model(m.path, m.generate, progress=bar.update)
        except (CheckpointError, OSError) as e:
            raise UpError(f"cannot generate model {m.name} in {m.path}: {e}") from None
        bar.done("generated")
    return dep


# --------------------------------------------------------------------------- entry


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    # Until the event loop takes over signals, SIGTERM must unwind through the finally blocks
    # (stopping the broker) rather than end the process on the spot.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from cascade.cli.embedded_nats import BrokerError, EmbeddedNats, port_is_free

    if args.nats_url and args.nats_port is not None:
        raise ConfigError("--nats-port sets the embedded broker's port; with --nats-url no broker is started")
    home = cascade_home()
    chosen = chosen_deployment(args, home)
    if chosen is not None and args.replicas is not None:
        chosen = with_replicas(chosen, args.replicas)
    replicas = 1 if args.replicas is None else args.replicas
    needed = replicas if chosen is None else sum(m.min_replicas for m in chosen.models)
    if needed > args.workers:
        raise ConfigError(
            f"the deployment needs {needed} worker(s) for its min_replicas but --workers is {args.workers}"
        )
    info = read_mesh_file(home)
    if info:
        pid = (info.get("pids") or {}).get("up")
        if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
            print(
                f"cascade up: a mesh is already running from {home} (pid {pid}, {info.get('gateway_url')}); "
                "stop it first, or set CASCADE_HOME to run another",
                file=sys.stderr,
            )
            return 1

    port = args.port
    if port == 0:
        from cascade.cli.embedded_nats import free_port

        port = free_port()
    elif not port_is_free(port, "127.0.0.1" if args.host in ("127.0.0.1", "localhost") else args.host):
        print(f"cascade up: port {port} is in use; pass --port N (or --port 0 for a free one)", file=sys.stderr)
        return 1

    api_keys = keys_from(args.api_key)
    if not api_keys and not is_loopback(args.host):
        print(f"\n*** WARNING ***\ncascade up: {open_gateway_warning(args.host)}\n", file=sys.stderr, flush=True)

    try:
        dep = prepare_models(chosen or default_model_deployment(home, replicas), home)
    except UpError as e:
        print(f"cascade up: {e}", file=sys.stderr)
        return 1

    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    deployment_file = home / "deployment.json"
    deployment_file.write_bytes(orjson.dumps(dep.to_json(), option=orjson.OPT_INDENT_2))

    broker: EmbeddedNats | None = None
    creds: NatsCredentials | None = None
    try:
        if args.nats_url:
            nats_url = args.nats_url
        else:
            if args.nats_port is None:
                nats_port = DEFAULT_NATS_PORT if port_is_free(DEFAULT_NATS_PORT) else None
            else:
                nats_port = args.nats_port or None  # 0 → EmbeddedNats picks a free port
            broker = EmbeddedNats(
                port=nats_port,
                log_file=home / "logs" / "nats.log",
                preexec_fn=make_die_with_parent(),
                # Several loaders agree on one leader through JetStream's key-value store.
                jetstream=args.loaders > 1,
                store_dir=home / "nats-store" if args.loaders > 1 else None,
            )
            # Credentials for this mesh only: a client without them is refused by the broker.
            creds = generate_nats_credentials()
            _, broker.config_file = write_mesh_credentials(creds, broker.url, home)
            try:
                broker.start()
            except BrokerError as e:
                print(f"cascade up: cannot start the embedded NATS server: {e}", file=sys.stderr)
                return 1
            nats_url = broker.url
            print(f"NATS broker at {nats_url} (log: {home / 'logs' / 'nats.log'})", flush=True)
        sup = Supervisor(
            args,
            home,
            dep,
            deployment_file,
            nats_url,
            port,
            broker.proc.pid if broker and broker.proc else None,
            broker=broker,
            nats_credentials=creds,
            api_keys=api_keys,
        )
        return asyncio.run(supervise(sup))
    finally:
        if broker is not None:
            broker.stop()
        if creds is not None:
            remove_mesh_credentials(home)
