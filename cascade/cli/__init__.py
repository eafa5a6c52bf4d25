"""`cascade`: one command for the whole mesh, one module per command.

    cascade up                 start a broker and every service on this machine (up.py)
    cascade gateway|scaler|loader|worker [flags]   run one service (services.py)
    cascade status | tap | scale | deploy | cache | model create | bench | sim | place

Service modules (and torch) are imported only by the subcommand that needs them, so
`cascade --help`, `cascade status` and `cascade tap` start fast. Mistakes the user can fix
end as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection, Sequence

from cascade.cli import apply, bench, cache, deploy, model, scale, services, sim, status, tap, up
from cascade.cli import place as place_cmd
from cascade.cli.common import CliError, Parser
from cascade.cli.quota import register as register_quota
from cascade.config import ConfigError

__all__ = ["CliError", "build_parser", "main", "parse_args"]


def build_parser(load_services: Collection[str] = ()) -> Parser:
    """The whole command tree. Services named in `load_services` get their real flags (which
    imports them); the others are listed with a one-line help only."""
    p = Parser(
        prog="cascade",
        description="Cascade: a model-serving mesh that scales live. Run `cascade up` to start one here.",
    )
    p.add_argument("--version", action="version", version=f"cascade {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    services.register(sub, frozenset(load_services))
    up.register(sub)
    model.register(sub)
    status.register(sub)
    tap.register(sub)
    scale.register(sub)
    register_quota(sub)
    deploy.register(sub)
    cache.register(sub)
    bench.register(sub)
    sim.register(sub)
    place_cmd.register(sub)
    apply.register(sub)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a full command line, importing the one service it names so its flags are known."""
    argv = list(argv)
    wanted = [argv[0]] if argv and argv[0] in services.SERVICES else []
    return build_parser(wanted).parse_args(argv)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cascade-mesh")
    except Exception:  # not installed (running from a checkout)
        return "0.1.0 (source)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        if args.command not in services.SERVICES:
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
