"""What every `cascade` command shares: the one-line error, the parser that points at the
right --help, the flags that find a running mesh, and one request/reply to a service."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any, NoReturn

from nats.aio.client import Client as NATS

from cascade.config import resolve_nats_url, resolve_prefix
from cascade.messages import Ok, RemoteError
from cascade.natsutil import RequestTimeout, connect, request
from cascade.subjects import Subjects


class CliError(Exception):
    """A problem the user can fix: printed as one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point at the right --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats-url",
        default=None,
        help="NATS server, or a comma-separated seed list of a NATS cluster's servers (default: "
        "$CASCADE_NATS_URL, else the running mesh's, else nats://127.0.0.1:4222)",
    )
    p.add_argument("--prefix", default=None, help="subject prefix (default: $CASCADE_PREFIX, else the mesh's)")


def mesh_address(args: argparse.Namespace) -> tuple[str, str]:
    """(NATS URL, subject prefix) of the mesh a command talks to."""
    return resolve_nats_url(args.nats_url), resolve_prefix(args.prefix)


async def connect_to_mesh(url: str, name: str) -> NATS:
    try:
        # A short connect budget: an interactive command should say "nothing there" quickly.
        return await connect(url, name, connect_timeout_s=2.0)
    except ConnectionError:
        raise CliError(f"cannot reach NATS at {url}: is a mesh running? (start one with `cascade up`)") from None


def ask(args: argparse.Namespace, service: str, subject: Callable[[Subjects], str], msg: Any) -> str:
    """One request/reply to a service of the running mesh; its `Ok` detail, or a one-line error."""
    reply: Ok = ask_typed(args, service, subject, msg, Ok)
    return reply.detail


def ask_typed(
    args: argparse.Namespace, service: str, subject: Callable[[Subjects], str], msg: Any, expect: type[Any]
) -> Any:
    """One request/reply to a service of the running mesh: its typed reply, or a one-line error."""
    url, prefix = mesh_address(args)

    async def go() -> Any:
        nc = await connect_to_mesh(url, f"cascade-{args.command}")
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
