"""`cascade tap`: one readable line per message of the mesh, as it happens."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from cascade.cli.common import CliError, add_mesh_flags, connect_to_mesh, mesh_address
from cascade.cli.tapformat import format_message
from cascade.cliargs import positive_int
from cascade.natsutil import stop_event
from cascade.subjects import Subjects


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tap",
        help="print every message of the mesh as it happens",
        description="Subscribe to everything under the prefix and print one line per message "
        "(time, subject, type, key fields). Ctrl-C to stop.",
    )
    add_mesh_flags(p)
    p.add_argument("--raw", action="store_true", help="print each payload as JSON, as it went over the wire")
    p.add_argument("--filter", metavar="SUBJECT", default=None, help="subscribe to this subject (wildcards allowed)")
    p.add_argument("--count", type=positive_int, default=None, help="exit after this many messages")
    p.set_defaults(func=cmd_tap)


def cmd_tap(args: argparse.Namespace) -> int:
    url, prefix = mesh_address(args)
    subject = args.filter or Subjects(prefix).all()

    async def go() -> int:
        stop = stop_event()
        nc = await connect_to_mesh(url, "cascade-tap")
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
