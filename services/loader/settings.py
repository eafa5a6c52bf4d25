"""The loader's settings: one frozen value, from flags (and `CASCADE_LOADER_*`) or built by tests."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import Literal

from cascade.cliargs import add_common_arguments, positive_float, positive_int
from cascade.config import env_float, env_int, env_str
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    d = LoaderSettings()
    g = parser.add_argument_group("loader")
    g.add_argument(
        "--loader-id",
        default=env_str("CASCADE_LOADER_ID", f"loader-{os.getpid()}"),
        help="instance id (env CASCADE_LOADER_ID; default loader-<pid>)",
    )
    g.add_argument(
        "--heartbeat-s",
        type=positive_float,
        default=env_float("CASCADE_HEARTBEAT_S", d.heartbeat_s),
        help="workers' heartbeat interval; 3 missed = dead (env CASCADE_HEARTBEAT_S, default 1.0)",
    )
    g.add_argument(
        "--idle-wait-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_IDLE_WAIT_S", d.idle_wait_s),
        help="how long a scale-up waits for enough idle workers (workers may still be starting; default 10)",
    )
    g.add_argument(
        "--load-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_LOAD_TIMEOUT_S", d.load_timeout_s),
        help="deadline for chosen workers to serve the model fully (default 300)",
    )
    g.add_argument(
        "--unload-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_UNLOAD_TIMEOUT_S", d.unload_timeout_s),
        help="deadline for a worker to drain and free its model (default 120)",
    )
    g.add_argument(
        "--request-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_REQUEST_TIMEOUT_S", d.request_timeout_s),
        help="deadline for a worker to answer LoadModel (default 10)",
    )
    g.add_argument(
        "--transfer-timeout-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_TRANSFER_TIMEOUT_S", d.transfer_timeout_s),
        help="a receiver that sees no connection or no bytes for this long reports its transfer failed; "
        "a target that lost its chain keeps its verified units this long for a re-plan (default 30)",
    )
    g.add_argument(
        "--send-mb-s",
        type=float,
        default=env_float("CASCADE_LOADER_SEND_MB_S", d.send_mb_s),
        help="cap every parameter send at this many MB/s (a bandwidth budget, or an emulated link; 0 = none)",
    )
    g.add_argument(
        "--serving-send-mb-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_SERVING_SEND_MB_S", d.serving_send_mb_s),
        help="what a holder that serves requests may give a transfer, MB/s, so its requests keep going "
        f"(default {d.serving_send_mb_s:g})",
    )
    g.add_argument(
        "--host-cache",
        choices=("mmap", "copy", "off"),
        default=env_str("CASCADE_LOADER_HOST_CACHE", d.host_cache),
        help="the one host copy per model: the checkpoint's pages held in memory (mmap), an anonymous "
        "copy (copy), or none (off); env CASCADE_LOADER_HOST_CACHE, default mmap",
    )
    g.add_argument(
        "--host-cache-keep-alive-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_HOST_CACHE_KEEP_ALIVE_S", d.host_cache_keep_alive_s),
        help=f"drop a cached model idle this long while workers hold it (default {d.host_cache_keep_alive_s:g})",
    )
    g.add_argument(
        "--host-cache-keep-alive-cold-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_HOST_CACHE_KEEP_ALIVE_COLD_S", d.host_cache_keep_alive_cold_s),
        help=f"drop a cached model nobody else holds after this long idle (default {d.host_cache_keep_alive_cold_s:g})",
    )
    g.add_argument(
        "--host-id",
        default=os.environ.get("CASCADE_HOST_ID", ""),
        help="which machine this loader's host cache is on; the planner prefers sources on a target's own host "
        "(env CASCADE_HOST_ID; default: the hostname)",
    )

    g.add_argument(
        "--lease",
        choices=("auto", "required", "off"),
        default=env_str("CASCADE_LOADER_LEASE", d.lease),
        help="several loaders: one plans at a time, by a lease in the broker's JetStream key-value store. "
        "auto: use it when the broker has JetStream, else plan alone (one loader only); required: exit "
        "without JetStream (run several loaders with this); off: plan alone (env CASCADE_LOADER_LEASE, default auto)",
    )
    g.add_argument(
        "--lease-s",
        type=positive_float,
        default=env_float("CASCADE_LOADER_LEASE_S", d.lease_s),
        help="the lease's length: the leader renews it every third of it, and another loader takes over "
        f"this long after the leader's last renewal (env CASCADE_LOADER_LEASE_S, default {d.lease_s:g})",
    )
    g.add_argument(
        "--control-replicas",
        type=positive_int,
        default=env_int("CASCADE_LOADER_CONTROL_REPLICAS", d.control_replicas),
        help="JetStream replicas of the lease and journal bucket when it is made: 3 on a 3-node NATS "
        "cluster (env CASCADE_LOADER_CONTROL_REPLICAS, default 1)",
    )


def settings_from_args(args: argparse.Namespace) -> LoaderSettings:
    return LoaderSettings(
        loader_id=args.loader_id,
        heartbeat_s=args.heartbeat_s,
        idle_wait_s=args.idle_wait_s,
        load_timeout_s=args.load_timeout_s,
        unload_timeout_s=args.unload_timeout_s,
        request_timeout_s=args.request_timeout_s,
        transfer_timeout_s=args.transfer_timeout_s,
        send_mb_s=args.send_mb_s,
        serving_send_mb_s=args.serving_send_mb_s,
        host_cache=args.host_cache,
        host_cache_keep_alive_s=args.host_cache_keep_alive_s,
        host_cache_keep_alive_cold_s=args.host_cache_keep_alive_cold_s,
        lease=args.lease,
        lease_s=args.lease_s,
        control_replicas=args.control_replicas,
        host_id=args.host_id or "",
    )
