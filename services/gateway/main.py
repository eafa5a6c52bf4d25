"""The gateway process: flags → settings → NATS → HTTP server, one shutdown path.

In-process use (tests, benchmarks): `services.gateway.testing.running_gateway`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import structlog
from aiohttp import web

from cascade.apikeys import API_KEYS_ENV, is_loopback, keys_from, open_gateway_warning
from cascade.cliargs import METRICS_S, Opt, add_common_arguments, add_options, deployment_from_args, settings_from
from cascade.config import ConfigError, Deployment, env_str
from cascade.logs import setup_logging
from cascade.service import Runtime, ServiceHost
from services.gateway.app import create_app
from services.gateway.core import GatewayCore
from services.gateway.settings import GatewaySettings, new_gateway_id

# aiohttp's cut-off of handlers still running, this long after the core's own at the grace's end.
_BACKSTOP_S = 1.0


class GatewayService:
    """The gateway as a service (cascade/service.py): its engine (`core`) on the host's NATS
    connection, and the HTTP server in front of it."""

    service = "gateway"

    def __init__(self, settings: GatewaySettings, deployment: Deployment, logger: Any = None) -> None:
        self.settings = settings
        self.deployment = deployment
        self.log = logger or structlog.get_logger().bind(service="gateway", gateway_id=settings.gateway_id)
        self.port = settings.port
        self._core: GatewayCore | None = None

    @property
    def instance(self) -> str:
        return self.settings.gateway_id

    @property
    def id(self) -> str:
        return self.settings.gateway_id

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def core(self) -> GatewayCore:
        if self._core is None:
            raise RuntimeError("the gateway is not started")
        return self._core

    async def start(self, rt: Runtime) -> None:
        self._core = GatewayCore(self.settings, self.deployment, rt.nc, self.log, tasks=rt.tasks)
        rt.on_reconnect.append(self._core.broker_back)
        runner = web.AppRunner(
            create_app(self._core),
            # Without this, a handler keeps waiting for tokens after its client has gone.
            handler_cancellation=True,
            # The core fails what still runs when the grace ends (an error event, then the end of
            # the stream); aiohttp's own cut-off, a moment later, is the backstop.
            shutdown_timeout=self.settings.shutdown_grace_s + _BACKSTOP_S,
            access_log=None,
        )
        await runner.setup()
        # Stops listening, lets running handlers finish for shutdown_grace_s, cancels the rest, then
        # closes the engine (cleanup_ctx): all before the host cancels tasks and drains NATS.
        rt.stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.settings.host, self.settings.port)
        await site.start()
        self.port = int(runner.addresses[0][1])
        self._core.url = self.url
        self.log.info(
            "listening",
            url=self.url,
            nats_url=self.settings.nats_url,
            prefix=self.settings.prefix,
            api_keys=len(self.settings.api_keys),
        )
        if not self.settings.api_keys and not is_loopback(self.settings.host):
            self.log.warning("open_gateway", warning=open_gateway_warning(self.settings.host))


def host(service: GatewayService) -> ServiceHost:
    s = service.settings
    return ServiceHost(service, s.nats_url, s.prefix, connect_timeout_s=s.nats_connect_timeout_s, logger=service.log)


# --------------------------------------------------------------------------- CLI


def options() -> tuple[Opt, ...]:
    """The gateway's flags in --help order; those with a variable read their default from it when it
    is set. Built when asked: the settings' own defaults read variables too."""
    d = GatewaySettings(nats_url="")
    return (
        Opt("--gateway-id", None, "gateway id in subjects", shown="gw-<random>"),
        Opt("--host", d.host, "listen address", env="CASCADE_GATEWAY_HOST"),
        Opt("--port", d.port, "listen port (0: any free port)", env="CASCADE_GATEWAY_PORT", type=int),
        Opt(
            "--token-port",
            d.token_port,
            "port of the direct token listener, on --host (0: any free port)",
            env="CASCADE_GATEWAY_TOKEN_PORT",
            type=int,
        ),
        Opt(
            "--advertise-host",
            None,
            "host name workers use to reach the token listener; set it in containers",
            env="CASCADE_ADVERTISE_HOST",
            shown="the listen address",
        ),
        Opt("--max-batch-size", d.max_batch_size, "requests per dispatched batch", type=int),
        Opt(
            "--batch-wait-timeout-s",
            d.batch_wait_timeout_s,
            "longest wait for a batch to fill after its first request",
            type=float,
        ),
        Opt("--max-queue", d.max_queue, "queued requests per model before 429", type=int),
        Opt("--queue-timeout-s", d.queue_timeout_s, "wait for an instance before 503", type=float),
        Opt(
            "--request-timeout-s",
            d.request_timeout_s,
            "longest silence from a worker during a request before 504",
            type=float,
        ),
        Opt("--max-body-bytes", d.max_body_bytes, "largest request body (413 above)", type=int),
        Opt("--dispatch-timeout-s", d.dispatch_timeout_s, "wait for a worker to admit a batch", type=float),
        # The same variable as the workers' --metrics-s: one knob sets how often the scaler hears.
        METRICS_S.but(flag="--metrics-interval-s", default=d.metrics_interval_s),
        Opt(
            "--migration-limit",
            d.migration_limit,
            "times a request whose worker is lost mid-stream moves to another instance, resuming "
            "where its stream stopped; 0 fails it instead",
            type=int,
        ),
        Opt(
            "--consolidate-min-tokens",
            d.consolidate_min_tokens,
            "a request decoding across several instances (a live route made while the whole ones "
            "were busy) with at least this many tokens to go moves onto one whole instance once one "
            "has room, resuming where its stream is; 0 never moves it",
            env="CASCADE_GATEWAY_CONSOLIDATE_MIN_TOKENS",
            type=int,
        ),
        Opt(
            "--tool-call-parser",
            d.tool_call_parser,
            "how the model writes tool calls (vLLM's parser names); auto reads it off the chat template",
            env="CASCADE_TOOL_CALL_PARSER",
            choices=("auto", "hermes", "llama3_json", "mistral"),
        ),
        Opt("--shutdown-grace-s", d.shutdown_grace_s, "time running streams get at shutdown", type=float),
    )


def _off_switch(g: argparse._ArgumentGroup, flag: str, env: str, help: str) -> None:
    """`--no-X`: sets X false; its variable set to 0/false/no/off is the same as the flag."""
    g.add_argument(
        flag,
        dest=flag.removeprefix("--no-").replace("-", "_"),
        action="store_false",
        default=env_str(env, "1").lower() not in ("0", "false", "no", "off"),
        help=f"{help[:-1]}; env {env}=0 turns it off too)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    g = parser.add_argument_group("gateway")
    add_options(g, *options())
    # Switches, not values (as the workers' --no-prefix-caching): each one's variable turns it off too.
    _off_switch(
        g, "--no-direct-tokens", "CASCADE_GATEWAY_DIRECT_TOKENS",
        "workers publish token events on NATS (where `nats sub` can tap them) instead of sending them "
        "straight to this gateway over TCP (default: over TCP)",
    )  # fmt: skip
    _off_switch(
        g, "--no-direct-requests", "CASCADE_GATEWAY_DIRECT_REQUESTS",
        "send every batch to its worker by a NATS request (where `nats sub` can tap it) instead of on "
        "the worker's request link to this gateway (default: the link, once the worker opened it)",
    )  # fmt: skip
    _off_switch(
        g, "--no-local-tokens", "CASCADE_GATEWAY_LOCAL_TOKENS",
        "workers in this gateway's network namespace link over TCP too, not over its Unix socket "
        "(default on Linux: that socket, a cheaper send per token)",
    )  # fmt: skip
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1 routes (repeatable; also the comma-separated "
        f"${API_KEYS_ENV}; default: none, which is for a gateway on loopback only)",
    )


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return settings_from(
        GatewaySettings,
        args,
        gateway_id=args.gateway_id or new_gateway_id(),
        api_keys=keys_from(getattr(args, "api_key", None)),
    )


def run(args: argparse.Namespace) -> int:
    log = setup_logging("gateway", getattr(args, "log_level", None))
    try:
        settings = settings_from_args(args)
        deployment = deployment_from_args(args)
    except (ConfigError, ValueError) as e:
        log.error("bad_config", error=str(e))
        return 2
    log = log.bind(gateway_id=settings.gateway_id, pid=os.getpid())

    async def main() -> int:
        try:
            return await host(GatewayService(settings, deployment, log)).run()
        except (ConnectionError, OSError) as e:
            log.error("start_failed", error=str(e))
            return 1

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cascade-gateway", description="Cascade's OpenAI-compatible gateway")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
