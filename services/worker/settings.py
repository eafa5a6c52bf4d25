"""The worker's settings: one frozen value, from flags (and `CASCADE_*`) or built by tests."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass

from cascade.cliargs import add_common_arguments
from cascade.config import ConfigError, env_float, env_int, env_str, resolve_nats_url, resolve_prefix
from cascade.device_profile import load_profile
from cascade.subjects import check_token


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    nats_url: str
    prefix: str
    worker_id: str
    threads: int = 1  # torch threads; the engine thread does all of this worker's torch work
    max_batch: int = 32
    max_waiting: int = 256
    device: str = "auto"
    heartbeat_s: float = 1.0
    drain_timeout_s: float = 10.0
    stage_host: str = "127.0.0.1"
    stage_port: int = 0
    advertise_host: str | None = None
    load_mb_s: float = 0.0
    # Both links face the same peers, so by default the data plane listens where the stage link does.
    data_host: str | None = None
    data_port: int = 0
    device_profile: str | None = None
    kv_slots: int = 0  # 0: max_batch
    metrics_s: float = 1.0
    local_cache_mb: float = 0.0
    local_cache_mb_s: float = 0.0
    max_prefill_tokens: int = 2048
    # With an emulated device, each real prompt/context token is priced as this many.
    emulated_token_scale: float = 1.0
    kv_cache_mb: float = 0.0  # 0: what is left after the weights, with a margin, measured at load
    max_model_len: int = 0  # 0: the model's context, capped so that one sequence fits the KV budget
    kv_block_size: int = 16
    prefix_caching: bool = True
    # vLLM's --logprobs-mode: "raw" logprobs are the model's own distribution (before penalties,
    # the structured-output mask and temperature); "processed" the one each token was drawn from.
    logprobs_mode: str = "raw"
    # Sharing one worker (docs/pipelined-and-shared.md): instances this process holds at once, each
    # its own mesh worker id (the first is `worker_id`, the others `worker_id-2`, ...) stepped on
    # one engine thread by quota; and the memory they may hold together (0: unbounded).
    slots: int = 1
    memory_mb: float = 0.0

    def __post_init__(self) -> None:
        check_token(self.worker_id)
        if self.slots < 1 or self.memory_mb < 0:
            raise ConfigError("--slots must be >= 1 and --memory-mb >= 0")
        if self.threads < 1 or self.max_batch < 1 or self.max_waiting < 0 or self.heartbeat_s <= 0:
            raise ConfigError("--threads and --max-batch must be >= 1, --heartbeat-s > 0")
        if self.kv_slots < 0 or self.metrics_s <= 0:
            raise ConfigError("--kv-slots must be >= 0 and --metrics-s > 0")
        if self.local_cache_mb < 0 or self.local_cache_mb_s < 0:
            raise ConfigError("--local-cache-mb and --local-cache-mb-s must be >= 0")
        if self.max_prefill_tokens < 1:
            raise ConfigError("--max-prefill-tokens must be >= 1")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ConfigError(f"--logprobs-mode must be raw or processed, not {self.logprobs_mode!r}")
        if self.kv_cache_mb < 0 or self.max_model_len < 0 or self.kv_block_size < 1:
            raise ConfigError("--kv-cache-mb and --max-model-len must be >= 0, --kv-block-size >= 1")
        if self.emulated_token_scale <= 0:
            raise ConfigError("CASCADE_EMULATED_TOKEN_SCALE must be above 0")
        if self.device_profile:
            load_profile(self.device_profile)  # a bad name or file fails at start, with the reason

    @property
    def kv_capacity(self) -> int:
        """The most the batch limit can be raised to."""
        return max(self.kv_slots, self.max_batch)

    @property
    def data_listen_host(self) -> str:
        return self.data_host or self.stage_host

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> WorkerSettings:
        wid = a.worker_id or f"w-{socket.gethostname().split('.')[0]}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        wid = "".join(c if c.isalnum() or c in "-_" else "-" for c in wid)
        return cls(
            nats_url=resolve_nats_url(a.nats_url),
            prefix=resolve_prefix(a.prefix),
            worker_id=wid,
            threads=a.threads,
            max_batch=a.max_batch,
            max_waiting=a.max_waiting,
            device=a.device,
            heartbeat_s=a.heartbeat_s,
            drain_timeout_s=a.drain_timeout_s,
            stage_host=a.stage_host,
            stage_port=a.stage_port,
            advertise_host=a.advertise_host,
            load_mb_s=a.load_mb_s,
            data_host=a.data_host,
            data_port=a.data_port,
            device_profile=a.device_profile,
            kv_slots=a.kv_slots,
            metrics_s=a.metrics_s,
            local_cache_mb=a.local_cache_mb,
            local_cache_mb_s=a.local_cache_mb_s,
            max_prefill_tokens=a.max_prefill_tokens,
            emulated_token_scale=env_float("CASCADE_EMULATED_TOKEN_SCALE", 1.0),
            kv_cache_mb=a.kv_cache_mb,
            max_model_len=a.max_model_len,
            kv_block_size=a.kv_block_size,
            prefix_caching=a.prefix_caching,
            logprobs_mode=a.logprobs_mode,
            slots=a.slots,
            memory_mb=a.memory_mb,
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The service contract's flags; a worker reads no deployment, but takes --config like its peers.
    add_common_arguments(p)
    p.add_argument(
        "--worker-id",
        default=os.environ.get("CASCADE_WORKER_ID"),
        help="unique id (letters, digits, - and _); default: derived from host and pid",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=env_int("CASCADE_TORCH_THREADS", 1),
        help="torch threads for this worker (env CASCADE_TORCH_THREADS, default 1: workers share the cores)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=env_int("CASCADE_MAX_BATCH", 32),
        help="most sequences in the running batch (env CASCADE_MAX_BATCH, default 32)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=env_int("CASCADE_MAX_PREFILL_TOKENS", 2048),
        help="prompt tokens one step computes at most, across every prompt it starts or continues; longer "
        "prompts are prefilled in chunks, so decoding sequences never wait behind a whole long prompt. With "
        "an emulated device, in the tokens it prices (env CASCADE_MAX_PREFILL_TOKENS, default 2048)",
    )
    p.add_argument(
        "--kv-cache-mb",
        type=float,
        default=env_float("CASCADE_KV_CACHE_MB", 0.0),
        help="memory for the paged KV cache, in MB (env CASCADE_KV_CACHE_MB; default 0: measured at load, what "
        "is left after the weights with a margin: 90 %% on a GPU, half and at most 4 GiB on a CPU)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=env_int("CASCADE_MAX_MODEL_LEN", 0),
        help="longest sequence (prompt and output) served; longer prompts are refused (env CASCADE_MAX_MODEL_LEN; "
        "default 0: the model's context, capped so that one sequence fits the KV cache)",
    )
    p.add_argument(
        "--kv-block-size",
        type=int,
        default=env_int("CASCADE_KV_BLOCK_SIZE", 16),
        help="tokens per KV cache block (env CASCADE_KV_BLOCK_SIZE, default 16)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        default=env_str("CASCADE_PREFIX_CACHING", "1").lower() not in ("0", "false", "no", "off"),
        help="do not reuse the KV blocks of prompt prefixes other requests computed (env CASCADE_PREFIX_CACHING=0)",
    )
    p.add_argument(
        "--logprobs-mode",
        choices=("raw", "processed"),
        default=env_str("CASCADE_LOGPROBS_MODE", "raw"),
        help="what `logprobs` report: raw, the model's own distribution before penalties, the structured-output "
        "mask and temperature (vLLM's default), or processed, the distribution each token was drawn from "
        "(env CASCADE_LOGPROBS_MODE, default raw); prompt logprobs are always raw",
    )
    p.add_argument(
        "--kv-slots",
        type=int,
        default=env_int("CASCADE_KV_SLOTS", 0),
        help="the most the scaler may raise the batch limit to at run time (env CASCADE_KV_SLOTS; default: "
        "--max-batch); KV memory is --kv-cache-mb's",
    )
    p.add_argument(
        "--metrics-s",
        type=float,
        default=env_float("CASCADE_METRICS_S", 1.0),
        help="how often load metrics (InstanceMetrics) go to the scaler (env CASCADE_METRICS_S, default 1.0)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=env_int("CASCADE_MAX_WAITING", 256),
        help="admitted sequences waiting for a batch slot before new ones are refused (default 256)",
    )
    p.add_argument("--device", default=env_str("CASCADE_DEVICE", "auto"), help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--heartbeat-s",
        type=float,
        default=env_float("CASCADE_HEARTBEAT_S", 1.0),
        help="heartbeat interval in seconds (env CASCADE_HEARTBEAT_S, default 1.0)",
    )
    p.add_argument(
        "--device-profile",
        default=os.environ.get("CASCADE_DEVICE_PROFILE") or None,
        help="emulate an accelerator: pad every step to this profile's time (a name in docs/device-profiles "
        "or a path; env CASCADE_DEVICE_PROFILE). For scaling benchmarks on CPUs; off by default",
    )
    p.add_argument(
        "--load-mb-s",
        type=float,
        default=env_float("CASCADE_LOAD_MB_S", 0.0),
        help="cap disk loads at this bandwidth, to emulate an SSD (env CASCADE_LOAD_MB_S; 0 = uncapped)",
    )
    p.add_argument(
        "--local-cache-mb",
        type=float,
        default=env_float("CASCADE_LOCAL_CACHE_MB", 0.0),
        help="keep a host-memory copy of checkpoints this worker read from disk, up to this many MB, least "
        "recently used out first; a later disk load of one installs from it (env CASCADE_LOCAL_CACHE_MB; 0 = off)",
    )
    p.add_argument(
        "--local-cache-mb-s",
        type=float,
        default=env_float("CASCADE_LOCAL_CACHE_MB_S", 0.0),
        help="pace loads from the local cache at this bandwidth, to emulate the host-to-GPU copy "
        "(env CASCADE_LOCAL_CACHE_MB_S; 0 = unpaced)",
    )
    p.add_argument(
        "--stage-host",
        default=env_str("CASCADE_STAGE_HOST", "127.0.0.1"),
        help="address the stage link (activations of pipelined routes) listens on (default 127.0.0.1)",
    )
    p.add_argument(
        "--stage-port", type=int, default=env_int("CASCADE_STAGE_PORT", 0), help="stage link port (default: free)"
    )
    p.add_argument(
        "--data-host",
        default=os.environ.get("CASCADE_DATA_HOST"),
        help="address the parameter data plane listens on (env CASCADE_DATA_HOST; default: the stage host)",
    )
    p.add_argument(
        "--data-port",
        type=int,
        default=env_int("CASCADE_DATA_PORT", 0),
        help="data plane port (env CASCADE_DATA_PORT; default: free)",
    )
    p.add_argument(
        "--advertise-host",
        default=os.environ.get("CASCADE_ADVERTISE_HOST"),
        help="host name peers use to reach this worker (default: the listen address; set in containers)",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=env_float("CASCADE_DRAIN_TIMEOUT_S", 10.0),
        help="on SIGTERM, how long running requests may finish before they are ended with an error",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=env_int("CASCADE_WORKER_SLOTS", 1),
        help="instances this worker holds at once (env CASCADE_WORKER_SLOTS, default 1): each is a worker of "
        "its own to the mesh (ids WORKER_ID, WORKER_ID-2, ...), and they take turns on this worker's engine "
        "thread by compute quota (set with SetQuota on worker.<id>.quota; see docs/pipelined-and-shared.md)",
    )
    p.add_argument(
        "--memory-mb",
        type=float,
        default=env_float("CASCADE_MEMORY_MB", 0.0),
        help="memory the instances on this worker may hold together, weights and KV cache, in MB; a load "
        "past it is refused with what is held (env CASCADE_MEMORY_MB; default 0: not accounted)",
    )
