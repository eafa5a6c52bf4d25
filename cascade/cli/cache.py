"""`cascade cache`: load a model into the loader's host cache, or release it."""

from __future__ import annotations

import argparse
from typing import Any

from cascade.cli.common import add_mesh_flags, ask
from cascade.cliargs import positive_float
from cascade.messages import HostCacheRequest


def register(sub: Any) -> None:
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
    add_mesh_flags(p)
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    print(ask(args, "loader", lambda s: s.host_cache(), HostCacheRequest(args.action, args.model)))
    return 0
