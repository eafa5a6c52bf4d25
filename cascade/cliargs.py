"""Flags every `cascade` command and service shares, so `--nats-url`, `--prefix`,
`--config` and `--log-level` mean the same thing everywhere (and default from
the same `CASCADE_*` variables)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cascade.config import (
    ConfigError,
    Deployment,
    env_float,
    env_int,
    load_deployment,
    resolve_nats_url,
    resolve_prefix,
)
from cascade.logs import setup_logging
from cascade.subjects import Subjects, check_token


def add_common_arguments(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    """The service contract's common flags (defaults resolved now, from env or the running mesh)."""
    parser.add_argument(
        "--nats-url",
        default=resolve_nats_url(None),
        help="NATS server, or a comma-separated seed list of a NATS cluster's servers (default: "
        "$CASCADE_NATS_URL, else the running mesh's, else nats://127.0.0.1:4222)",
    )
    parser.add_argument(
        "--prefix",
        default=resolve_prefix(None),
        help="subject prefix of the mesh (default: $CASCADE_PREFIX, else 'cascade')",
    )
    if config:
        parser.add_argument(
            "--config",
            default=os.environ.get("CASCADE_CONFIG") or None,
            help="deployment file, TOML or JSON (default: $CASCADE_CONFIG, else the built-in cascade-tiny)",
        )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("CASCADE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        type=str.lower,
        help="log level (default: $CASCADE_LOG_LEVEL, else info)",
    )


N = TypeVar("N", int, float)


def _number(text: str, parse: Callable[[str], N], kind: str, ok: Callable[[N], bool], rule: str) -> N:
    """argparse type: `text` parsed, or a message that names the bad value and the rule it breaks."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{value} {rule}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, "an integer", lambda v: v >= 1, "must be at least 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer", lambda v: v >= 0, "must not be negative")


def positive_float(text: str) -> float:
    return _number(text, float, "a number", lambda v: v > 0, "must be above 0")


class _Adds(Protocol):
    """A parser or an argument group."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Opt:
    """One service flag, declared as data: its default, read from `env` when that is set, and
    its help, to which `add` appends "(env X, default Y)", so that what `--help` says is made in
    one place from the values the flag really has. `shown` is the default as help should name it
    when the value alone would not say it (a derived id, a free port, "0: off"); unlike `help`, it
    is plain text (no argparse %-formatting)."""

    flag: str
    default: Any
    help: str
    env: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    shown: str | None = None
    metavar: str | None = None

    def env_default(self) -> Any:
        """The default with `env` applied: parsed as the built-in default's type (int, float or
        string), so a bad value fails at start, naming the variable (ConfigError)."""
        if self.env is None:
            return self.default
        if isinstance(self.default, float):
            return env_float(self.env, self.default)
        if isinstance(self.default, int) and not isinstance(self.default, bool):
            return env_int(self.env, self.default)
        return os.environ.get(self.env, self.default)

    def full_help(self) -> str:
        shown = self.shown if self.shown is not None else _show(self.default)
        where = f"env {self.env}, default {shown}" if self.env else f"default {shown}"
        return f"{self.help} ({where.replace('%', '%%')})"  # argparse %-formats help

    def add(self, parser: _Adds, **overrides: Any) -> None:
        kwargs: dict[str, Any] = {"default": self.env_default(), "help": self.full_help()}
        if self.type is not None:
            kwargs["type"] = self.type
        if self.choices is not None:
            kwargs["choices"] = self.choices
        if self.metavar is not None:
            kwargs["metavar"] = self.metavar
        parser.add_argument(self.flag, **{**kwargs, **overrides})

    def but(self, **changes: Any) -> Opt:
        """The same option with some fields changed (another flag name for the same variable)."""
        return replace(self, **changes)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_options(parser: _Adds, *options: Opt) -> None:
    for option in options:
        option.add(parser)


# Options more than one service takes, declared once: the same flag reads the same variable,
# has the same default and says so the same way in every service's --help.
HEARTBEAT_S = Opt(
    "--heartbeat-s",
    1.0,
    "workers' heartbeat interval in seconds; 3 missed = dead",
    env="CASCADE_HEARTBEAT_S",
    type=positive_float,
)
# The workers' --metrics-s and the gateways' --metrics-interval-s: one variable sets how often the
# scaler hears from both.
METRICS_S = Opt(
    "--metrics-s",
    1.0,
    "how often load metrics go to the scaler, in seconds",
    env="CASCADE_METRICS_S",
    type=positive_float,
)
HOST_ID = Opt(
    "--host-id",
    None,
    "which machine this service is on: carried in heartbeats, and the loader prefers transfer sources "
    "(a worker, or the loader's host cache) on a target's own host",
    env="CASCADE_HOST_ID",
    shown="the hostname",
)

S = TypeVar("S")


def settings_from(cls: Callable[..., S], args: argparse.Namespace, **given: Any) -> S:
    """`cls` (a settings dataclass) with each field that has a flag of the same name taken from
    `args`, and `given` for the rest (fields whose value is derived, or not a flag)."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    taken = {n: getattr(args, n) for n in names if n not in given and hasattr(args, n)}
    return cls(**taken, **given)


def deployment_from_args(args: argparse.Namespace) -> Deployment:
    return load_deployment(Path(args.config) if getattr(args, "config", None) else None)


def service_start(service: str, args: argparse.Namespace, instance_id: str) -> tuple[Any, Deployment, Subjects] | None:
    """A control-plane service's first steps: logging, then its id, deployment and subjects checked.
    Returns the logger bound to the instance, or None after logging why the configuration is bad
    (the caller exits 2)."""
    log = setup_logging(service, args.log_level)
    try:
        check_token(instance_id)
        deployment = deployment_from_args(args)
        subjects = Subjects(args.prefix)
    except (ConfigError, ValueError) as e:
        log.error("bad_config", error=str(e))
        return None
    return log.bind(instance=instance_id, prefix=args.prefix), deployment, subjects
