"""Flags every `cascade` command and service shares, so `--nats-url`, `--prefix`,
`--config` and `--log-level` mean the same thing everywhere (and default from
the same `CASCADE_*` variables)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cascade.config import ConfigError, Deployment, load_deployment, resolve_nats_url, resolve_prefix
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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that names the bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value


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
