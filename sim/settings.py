"""The knobs of a simulated mesh: the services' own settings (their defaults are the services'
defaults) and the few figures that only exist in a model of the machine (latencies, setup
times). One frozen value per run; every result records it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from services.gateway.settings import GatewaySettings
from services.loader.planner import DEFAULT_SERVING_RATE_LIMIT_BPS
from services.loader.settings import LoaderSettings
from services.scaler.replicas import DEFAULT_ACK_TIMEOUT_S

_GW = GatewaySettings(nats_url="nats://sim")
_LD = LoaderSettings()

HostCachePlacement = Literal["one", "every-host", "off"]


@dataclass(frozen=True, slots=True)
class MeshSettings:
    # ---- workers (services/worker/main.py flags)
    heartbeat_s: float = 1.0
    metrics_s: float = 1.0  # workers' InstanceMetrics and the gateway's ModelMetrics interval
    max_batch: int = 32
    kv_slots: int = 0  # 0: max_batch
    max_prefill_tokens: int = 2048  # in priced tokens (the engine's --max-prefill-tokens)
    token_scale: float = 1.0  # each modelled token is priced as this many (CASCADE_EMULATED_TOKEN_SCALE)
    max_waiting: int = 256
    # ---- gateway (services/gateway/settings.py)
    gateways: int = 1  # requests spread over this many gateways, each with its own queues
    gw_max_batch_size: int = _GW.max_batch_size
    gw_batch_wait_s: float = _GW.batch_wait_timeout_s
    gw_max_queue: int = _GW.max_queue
    gw_queue_timeout_s: float = _GW.queue_timeout_s
    gw_max_attempts: int = _GW.max_attempts
    # ---- scaler (services/scaler/main.py flags)
    scaler_tick_s: float = 1.0
    window_s: float = 30.0
    rate_window_s: float = 10.0
    stale_s: float = 5.0
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    # A tick's own time (the worker table's views, the policies, publishing): the service waits
    # `scaler_tick_s` from its end. About 1 ms: `core.tick` alone takes 0.8 ms on this machine
    # (timed in the simulator on the burst benchmark's mesh).
    scaler_tick_cost_s: float = 1e-3
    # ---- loader (services/loader/settings.py)
    idle_wait_s: float = _LD.idle_wait_s
    send_cap_bps: float = 0.0  # CASCADE_LOADER_SEND_MB_S: every parameter send capped (0: none)
    serving_send_bps: float = DEFAULT_SERVING_RATE_LIMIT_BPS  # what a serving holder gives a transfer
    # ---- where parameters are kept
    host_cache: HostCachePlacement = "one"  # one copy per model in the mesh, one per host (AllCache), none
    local_cache: bool = False  # a host keeps in DRAM what its workers read from disk (ServerlessLLM)
    # ---- the machine model (not service settings)
    control_latency_s: float = 0.5e-3  # one NATS message, one way
    stage_latency_s: float = 0.0  # stage-link frame latency on top of its bytes (0: the topology's link latency)
    transfer_setup_s: float = 0.0  # from the loader's orders to a data-plane send's first byte
    disk_setup_s: float = 0.0  # from the loader's order to a disk read's first byte
    client_timeout_s: float = 60.0  # the client gives up; the request counts as failed

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def prefill_budget(self) -> int:
        """Modelled prompt tokens one step computes at most (the engine's `prefill_budget`)."""
        return max(1, int(self.max_prefill_tokens / self.token_scale))
