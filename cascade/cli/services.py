"""`cascade gateway|scaler|loader|worker`: run one service in this process.

Each service module follows one contract: `add_arguments(parser)` and `run(args) -> int`.
They are imported only by the command that runs them (the worker pulls in torch), so
`cascade --help`, `status` and `tap` start fast; the imports are plain ones all the same,
so the tools that follow imports see what this package depends on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol

from cascade.cli.common import CliError

SERVICES: dict[str, str] = {
    "gateway": "OpenAI-compatible HTTP API: admission, batching, routing",
    "scaler": "turns load and replica targets into scale decisions",
    "loader": "carries out scale decisions: loads and unloads models on workers",
    "worker": "holds a model's layers and runs them with torch",
}


class ServiceModule(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def service_module(name: str) -> ServiceModule:
    """The service's main module (imported now, not before)."""
    try:
        if name == "gateway":
            from services.gateway import main as gateway

            return gateway
        if name == "scaler":
            from services.scaler import main as scaler

            return scaler
        if name == "loader":
            from services.loader import main as loader

            return loader
        if name == "worker":
            from services.worker import main as worker

            return worker
    except ModuleNotFoundError as e:
        raise CliError(f"the {name} service needs the Python package {e.name!r}, which is not installed") from None
    raise CliError(f"no service {name!r} (services: {', '.join(SERVICES)})")


def register(sub: Any, load: frozenset[str]) -> None:
    """One subcommand per service. Those in `load` get their real flags (which imports them);
    the others are listed with their one-line help only."""
    for name, help_text in SERVICES.items():
        sp = sub.add_parser(name, help=f"run the {name} service: {help_text}", description=f"The {name}: {help_text}.")
        if name in load:
            mod = service_module(name)
            mod.add_arguments(sp)
            sp.set_defaults(func=mod.run)
        else:
            sp.set_defaults(func=_unloaded(name))


def _unloaded(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # Only reached when a caller built the parser without loading this service's flags.
        raise CliError(f"internal: the {name} parser was built without its flags; use cascade.cli.parse_args")

    return run
