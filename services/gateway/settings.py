"""The gateway's settings: one frozen value built from flags (main.py) or by tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from cascade.cliargs import HEARTBEAT_S
from cascade.subjects import check_token


def new_gateway_id() -> str:
    return "gw-" + uuid.uuid4().hex[:8]


def default_heartbeat_s() -> float:
    # No flag: the gateway reads the workers' interval from the variable every service shares.
    return float(HEARTBEAT_S.env_default())


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    nats_url: str
    prefix: str = "cascade"
    gateway_id: str = field(default_factory=new_gateway_id)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (GatewayService.port tells which)
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    max_queue: int = 256  # per model
    queue_timeout_s: float = 30.0
    request_timeout_s: float = 120.0  # inactivity: longest gap between two events of a request
    max_body_bytes: int = 1 << 20
    heartbeat_s: float = field(default_factory=default_heartbeat_s)
    dispatch_timeout_s: float = 5.0  # GenerateBatch request/reply
    snapshot_timeout_s: float = 2.0
    max_attempts: int = 3  # dispatches per request (first try + retries after loss or a dead worker)
    # Moves of a request whose worker was lost after tokens reached the client (0: fail it instead).
    migration_limit: int = 3
    # A request decoding on a partial route (several instances) with at least this many tokens to
    # go moves onto one whole instance once one has room (0: never; router.consolidations).
    consolidate_min_tokens: int = 8
    shutdown_grace_s: float = 10.0  # how long running streams may finish after SIGTERM
    retry_after_s: int = 1  # what a 429 or 503 asks the client to wait
    metrics_interval_s: float = 1.0  # how often load reports (ModelMetrics) go to the scaler
    nats_connect_timeout_s: float = 10.0  # the broker may be starting beside us
    # vLLM's --tool-call-parser: hermes | llama3_json | mistral, or auto (read off the model's chat
    # template: what it teaches the model to write).
    tool_call_parser: str = "auto"
    # Token events straight from the workers' engine threads on a TCP listener of the gateway
    # (cascade/tokenlink.py) instead of through nats-server; off: every event on the NATS tokens
    # subject, where `nats sub` can tap them (docs/subjects.md).
    direct_tokens: bool = True
    token_port: int = 0  # the listener's port on `host` (0: any free port)
    # The same listener on a Unix socket in the abstract namespace too (Linux), which workers in
    # the gateway's network namespace try first: a cheaper send per token than loopback TCP.
    local_tokens: bool = True
    # Workers open a request link to that listener too, and batches go to them on it rather than
    # by a NATS request (cascade/tokenlink.py); off: every GenerateBatch on NATS, where it can be tapped.
    direct_requests: bool = True
    # The host workers reach that listener at (the listen address when None; this machine's name
    # when that is a wildcard). Set it in containers, like the workers' --advertise-host.
    advertise_host: str | None = None
    # Accepted `Authorization: Bearer` keys on /v1 routes (auth.py); empty: open (loopback use).
    api_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_token(self.gateway_id)
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "queue_timeout_s",
            "request_timeout_s",
            "heartbeat_s",
            "dispatch_timeout_s",
            "snapshot_timeout_s",
            "metrics_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.migration_limit < 0 or self.consolidate_min_tokens < 0:
            raise ValueError("migration_limit and consolidate_min_tokens must not be negative")
        if self.tool_call_parser not in ("auto", "hermes", "llama3_json", "mistral"):
            raise ValueError(
                f"tool_call_parser must be auto, hermes, llama3_json or mistral, not {self.tool_call_parser!r}"
            )
        if self.batch_wait_timeout_s < 0 or self.shutdown_grace_s < 0:
            raise ValueError("batch_wait_timeout_s and shutdown_grace_s must not be negative")
        for name in ("port", "token_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} {getattr(self, name)} is out of range")
