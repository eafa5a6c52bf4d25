"""`cascade status`: every service and model instance of the running mesh."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson

from cascade.cli.common import CliError, add_mesh_flags, connect_to_mesh, mesh_address
from cascade.cli.statusview import render, to_json
from cascade.cliargs import positive_float
from cascade.natsutil import gather_status
from cascade.subjects import Subjects


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show every service and model instance of the running mesh",
        description="Ask every service for its status (scatter-gather on the status subject) and print "
        "services and model instances: model, units ready, state, running/waiting, load.",
    )
    add_mesh_flags(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument(
        "--timeout", type=positive_float, default=1.0, help="how long to collect answers, seconds (default 1.0)"
    )
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    url, prefix = mesh_address(args)

    async def go() -> int:
        nc = await connect_to_mesh(url, "cascade-status")
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
