"""The loader's settings: one frozen value, from flags (and `CASCADE_LOADER_*`) or built by tests."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import Literal

from cascade.cliargs import (
    HEARTBEAT_S,
    HOST_ID,
    Opt,
    add_common_arguments,
    add_options,
    positive_float,
    positive_int,
    settings_from,
)
from cascade.subjects import check_token
from services.loader.hostcache import DEFAULT_KEEP_ALIVE_COLD_S, DEFAULT_KEEP_ALIVE_S
from services.loader.planner import DEFAULT_SERVING_RATE_LIMIT_BPS

HostCacheMode = Literal["mmap", "copy", "off"]
LeaseMode = Literal["auto", "required", "off"]


@dataclass(frozen=True, slots=True)
class LoaderSettings:
    loader_id: str = "loader"
    heartbeat_s: float = 1.0  # the workers' interval; 3 missed = dead
    idle_wait_s: float = 10.0  # a scale-up waits this long for enough idle workers
    load_timeout_s: float = 300.0  # chosen workers must serve the model fully by then
    unload_timeout_s: float = 120.0  # a worker must drain and free its model by then
    request_timeout_s: float = 10.0  # a worker must answer a load or transfer order by then
    # A receiver that sees no connection or no bytes for this long reports its transfer failed;
    # a target that lost its chain keeps its verified units this long for a re-plan.
    transfer_timeout_s: float = 30.0
    send_mb_s: float = 0.0  # cap on every parameter send (a bandwidth budget, an emulated link; 0 = none)
    serving_send_mb_s: float = DEFAULT_SERVING_RATE_LIMIT_BPS / 1e6  # what a serving holder gives a transfer
    host_cache: HostCacheMode = "mmap"
    host_cache_keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    host_cache_keep_alive_cold_s: float = DEFAULT_KEEP_ALIVE_COLD_S
    # Several loaders: one leads by a lease in the broker's JetStream key-value store (lease.py).
    lease: LeaseMode = "auto"
    lease_s: float = 2.0
    control_replicas: int = 1  # JetStream replicas of the control bucket (3 on a 3-node cluster)
    host_id: str = ""  # the machine the host cache is on ("" = this machine's hostname)

    def __post_init__(self) -> None:
        check_token(self.loader_id)
        for name in (
            "heartbeat_s",
            "idle_wait_s",
            "load_timeout_s",
            "unload_timeout_s",
            "request_timeout_s",
            "transfer_timeout_s",
            "serving_send_mb_s",
            "host_cache_keep_alive_s",
            "host_cache_keep_alive_cold_s",
            "lease_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0")
        if self.send_mb_s < 0:
            raise ValueError("send_mb_s must not be negative")
        if self.host_cache not in ("mmap", "copy", "off"):
            raise ValueError(f"host_cache must be mmap, copy or off (got {self.host_cache!r})")
        if self.lease not in ("auto", "required", "off"):
            raise ValueError(f"lease must be auto, required or off (got {self.lease!r})")
        if self.control_replicas < 1:
            raise ValueError("control_replicas must be at least 1")

    @property
    def host(self) -> str:
        return self.host_id or socket.gethostname()

    @property
    def send_cap_bps(self) -> float:
        return self.send_mb_s * 1e6

    @property
    def serving_bps(self) -> float:
        return self.serving_send_mb_s * 1e6


_D = LoaderSettings()
# The loader's flags in --help order; each one's default is read from its variable when that is set.
OPTIONS = (
    Opt("--loader-id", f"loader-{os.getpid()}", "instance id", env="CASCADE_LOADER_ID", shown="loader-<pid>"),
    HEARTBEAT_S,
    Opt(
        "--idle-wait-s",
        _D.idle_wait_s,
        "how long a scale-up waits for enough idle workers, who may still be starting",
        env="CASCADE_LOADER_IDLE_WAIT_S",
        type=positive_float,
    ),
    Opt(
        "--load-timeout-s",
        _D.load_timeout_s,
        "deadline for chosen workers to serve the model fully",
        env="CASCADE_LOADER_LOAD_TIMEOUT_S",
        type=positive_float,
    ),
    Opt(
        "--unload-timeout-s",
        _D.unload_timeout_s,
        "deadline for a worker to drain and free its model",
        env="CASCADE_LOADER_UNLOAD_TIMEOUT_S",
        type=positive_float,
    ),
    Opt(
        "--request-timeout-s",
        _D.request_timeout_s,
        "deadline for a worker to answer LoadModel",
        env="CASCADE_LOADER_REQUEST_TIMEOUT_S",
        type=positive_float,
    ),
    Opt(
        "--transfer-timeout-s",
        _D.transfer_timeout_s,
        "a receiver that sees no connection or no bytes for this long reports its transfer failed; "
        "a target that lost its chain keeps its verified units this long for a re-plan",
        env="CASCADE_LOADER_TRANSFER_TIMEOUT_S",
        type=positive_float,
    ),
    Opt(
        "--send-mb-s",
        _D.send_mb_s,
        "cap every parameter send at this many MB/s: a bandwidth budget, or an emulated link",
        env="CASCADE_LOADER_SEND_MB_S",
        type=float,
        shown="0: none",
    ),
    Opt(
        "--serving-send-mb-s",
        _D.serving_send_mb_s,
        "what a holder that serves requests may give a transfer, MB/s, so its requests keep going",
        env="CASCADE_LOADER_SERVING_SEND_MB_S",
        type=positive_float,
    ),
    Opt(
        "--host-cache",
        _D.host_cache,
        "the one host copy per model: the checkpoint's pages held in memory (mmap), an anonymous "
        "copy (copy), or none (off)",
        env="CASCADE_LOADER_HOST_CACHE",
        choices=("mmap", "copy", "off"),
    ),
    Opt(
        "--host-cache-keep-alive-s",
        _D.host_cache_keep_alive_s,
        "drop a cached model idle this long while workers hold it",
        env="CASCADE_LOADER_HOST_CACHE_KEEP_ALIVE_S",
        type=positive_float,
    ),
    Opt(
        "--host-cache-keep-alive-cold-s",
        _D.host_cache_keep_alive_cold_s,
        "drop a cached model nobody else holds after this long idle",
        env="CASCADE_LOADER_HOST_CACHE_KEEP_ALIVE_COLD_S",
        type=positive_float,
    ),
    HOST_ID,
    Opt(
        "--lease",
        _D.lease,
        "several loaders: one plans at a time, by a lease in the broker's JetStream key-value store. "
        "auto: use it when the broker has JetStream, else plan alone (one loader only); required: exit "
        "without JetStream (run several loaders with this); off: plan alone",
        env="CASCADE_LOADER_LEASE",
        choices=("auto", "required", "off"),
    ),
    Opt(
        "--lease-s",
        _D.lease_s,
        "the lease's length: the leader renews it every third of it, and another loader takes over "
        "this long after the leader's last renewal",
        env="CASCADE_LOADER_LEASE_S",
        type=positive_float,
    ),
    Opt(
        "--control-replicas",
        _D.control_replicas,
        "JetStream replicas of the lease and journal bucket when it is made: 3 on a 3-node NATS cluster",
        env="CASCADE_LOADER_CONTROL_REPLICAS",
        type=positive_int,
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_options(parser.add_argument_group("loader"), *OPTIONS)


def settings_from_args(args: argparse.Namespace) -> LoaderSettings:
    return settings_from(LoaderSettings, args, host_id=args.host_id or "")
