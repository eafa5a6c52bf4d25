"""The worker's settings: one frozen value, from flags (and `CASCADE_*`) or built by tests."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from cascade.cliargs import HEARTBEAT_S, HOST_ID, METRICS_S, Opt, add_common_arguments, add_options, settings_from
from cascade.config import ConfigError, cascade_home, env_float, env_str, resolve_nats_url, resolve_prefix
from cascade.cpus import check_cpus, parse_cpu_list
from cascade.device_profile import load_profile
from cascade.subjects import check_token


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    nats_url: str
    prefix: str
    worker_id: str
    threads: int = 1  # torch threads; the engine thread does all of this worker's torch work
    cpus: str = ""  # CPUs the engine thread runs on (a CPU list, "" = wherever the kernel puts it)
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
    # "disk": read a checkpoint where an order names it (today's default); "network": never read a
    # model store, take everything (weights and the small files) from the data plane.
    model_source: str = "disk"
    host_id: str = ""  # which machine this worker is on ("" = this machine's hostname)
    files_dir: str = ""  # where files received over the data plane are kept ("" = under CASCADE_HOME)
    address_check_s: float = 3.0  # the deadline of the start-up check that advertised addresses reach us
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
        check_cpus(self.engine_cpus)
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
        if self.address_check_s <= 0:
            raise ConfigError("--address-check-s must be above 0")
        if self.model_source not in ("disk", "network"):
            raise ConfigError(f"--model-source must be disk or network, not {self.model_source!r}")
        if self.device_profile:
            load_profile(self.device_profile)  # a bad name or file fails at start, with the reason

    @property
    def engine_cpus(self) -> frozenset[int]:
        return parse_cpu_list(self.cpus)

    @property
    def kv_capacity(self) -> int:
        """The most the batch limit can be raised to."""
        return max(self.kv_slots, self.max_batch)

    @property
    def host(self) -> str:
        """The host id carried in heartbeats (the planner prefers same-host sources)."""
        return self.host_id or socket.gethostname()

    @property
    def model_files_dir(self) -> Path:
        return Path(self.files_dir) if self.files_dir else cascade_home() / "worker-files" / self.worker_id

    @property
    def data_listen_host(self) -> str:
        return self.data_host or self.stage_host

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> WorkerSettings:
        wid = a.worker_id or f"w-{socket.gethostname().split('.')[0]}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        wid = "".join(c if c.isalnum() or c in "-_" else "-" for c in wid)
        return settings_from(
            cls,
            a,
            nats_url=resolve_nats_url(a.nats_url),
            prefix=resolve_prefix(a.prefix),
            worker_id=wid,
            emulated_token_scale=env_float("CASCADE_EMULATED_TOKEN_SCALE", 1.0),
            host_id=a.host_id or "",
            files_dir=a.files_dir or "",
        )


# The worker's flags in --help order; each one's default is read from its variable when that is set.
OPTIONS = (
    Opt(
        "--worker-id",
        None,
        "unique id: letters, digits, - and _",
        env="CASCADE_WORKER_ID",
        shown="derived from host and pid",
    ),
    Opt(
        "--threads",
        1,
        "torch threads for this worker",
        env="CASCADE_TORCH_THREADS",
        type=int,
        shown="1: workers share the cores",
    ),
    Opt(
        "--cpus",
        "",
        "CPUs the engine thread (all of this worker's torch work) runs on, a list such as 3 or 2-3 (Linux); "
        "give as many as --threads, and keep other busy processes off them (taskset, a cpuset)",
        env="CASCADE_WORKER_CPUS",
        shown="any",
    ),
    Opt("--max-batch", 32, "most sequences in the running batch", env="CASCADE_MAX_BATCH", type=int),
    Opt(
        "--max-prefill-tokens",
        2048,
        "prompt tokens one step computes at most, across every prompt it starts or continues; longer "
        "prompts are prefilled in chunks, so decoding sequences never wait behind a whole long prompt. With "
        "an emulated device, in the tokens it prices",
        env="CASCADE_MAX_PREFILL_TOKENS",
        type=int,
    ),
    Opt(
        "--kv-cache-mb",
        0.0,
        "memory for the paged KV cache, in MB",
        env="CASCADE_KV_CACHE_MB",
        type=float,
        shown="0: measured at load, what is left after the weights with a margin: 90 % on a GPU, half and "
        "at most 4 GiB on a CPU",
    ),
    Opt(
        "--max-model-len",
        0,
        "longest sequence (prompt and output) served; longer prompts are refused",
        env="CASCADE_MAX_MODEL_LEN",
        type=int,
        shown="0: the model's context, capped so that one sequence fits the KV cache",
    ),
    Opt("--kv-block-size", 16, "tokens per KV cache block", env="CASCADE_KV_BLOCK_SIZE", type=int),
    Opt(
        "--logprobs-mode",
        "raw",
        "what `logprobs` report: raw, the model's own distribution before penalties, the structured-output "
        "mask and temperature (vLLM's default), or processed, the distribution each token was drawn from; "
        "prompt logprobs are always raw",
        env="CASCADE_LOGPROBS_MODE",
        choices=("raw", "processed"),
    ),
    Opt(
        "--kv-slots",
        0,
        "the most the scaler may raise the batch limit to at run time; KV memory is --kv-cache-mb's",
        env="CASCADE_KV_SLOTS",
        type=int,
        shown="0: --max-batch",
    ),
    METRICS_S,
    Opt(
        "--max-waiting",
        256,
        "admitted sequences waiting for a batch slot before new ones are refused",
        env="CASCADE_MAX_WAITING",
        type=int,
    ),
    Opt("--device", "auto", "auto | cpu | cuda | cuda:N", env="CASCADE_DEVICE"),
    HEARTBEAT_S,
    Opt(
        "--device-profile",
        None,
        "emulate an accelerator: pad every step to this profile's time (a name in docs/device-profiles "
        "or a path). For scaling benchmarks on CPUs",
        env="CASCADE_DEVICE_PROFILE",
        shown="off",
    ),
    Opt(
        "--load-mb-s",
        0.0,
        "cap disk loads at this bandwidth, to emulate an SSD",
        env="CASCADE_LOAD_MB_S",
        type=float,
        shown="0: uncapped",
    ),
    Opt(
        "--local-cache-mb",
        0.0,
        "keep a host-memory copy of checkpoints this worker read from disk, up to this many MB, least "
        "recently used out first; a later disk load of one installs from it",
        env="CASCADE_LOCAL_CACHE_MB",
        type=float,
        shown="0: off",
    ),
    Opt(
        "--local-cache-mb-s",
        0.0,
        "pace loads from the local cache at this bandwidth, to emulate the host-to-GPU copy",
        env="CASCADE_LOCAL_CACHE_MB_S",
        type=float,
        shown="0: unpaced",
    ),
    Opt(
        "--stage-host",
        "127.0.0.1",
        "address the stage link (activations of pipelined routes) listens on",
        env="CASCADE_STAGE_HOST",
    ),
    Opt("--stage-port", 0, "stage link port", env="CASCADE_STAGE_PORT", type=int, shown="0: free"),
    Opt(
        "--data-host",
        None,
        "address the parameter data plane listens on",
        env="CASCADE_DATA_HOST",
        shown="the stage host",
    ),
    Opt("--data-port", 0, "data plane port", env="CASCADE_DATA_PORT", type=int, shown="0: free"),
    Opt(
        "--advertise-host",
        None,
        "host name peers use to reach this worker; set it in containers",
        env="CASCADE_ADVERTISE_HOST",
        shown="the listen address",
    ),
    Opt(
        "--drain-timeout-s",
        10.0,
        "on SIGTERM, how long running requests may finish before they are ended with an error",
        env="CASCADE_DRAIN_TIMEOUT_S",
        type=float,
    ),
    Opt(
        "--model-source",
        "disk",
        "disk: read a checkpoint where an order names it, or take it over the data plane when the path is "
        "not visible here; network: never read a model store (any order to do so fails, naming the path), for "
        "nodes without storage",
        env="CASCADE_MODEL_SOURCE",
        choices=("disk", "network"),
    ),
    HOST_ID,
    Opt(
        "--files-dir",
        None,
        "where config and tokenizer files received over the data plane are kept",
        env="CASCADE_FILES_DIR",
        shown="$CASCADE_HOME/worker-files/<worker id>",
    ),
    Opt(
        "--address-check-s",
        3.0,
        "at start, connect to the advertised stage and data addresses within this many seconds, and fail "
        "with the reason if they do not reach this worker",
        env="CASCADE_ADDRESS_CHECK_S",
        type=float,
    ),
    Opt(
        "--slots",
        1,
        "instances this worker holds at once: each is a worker of its own to the mesh (ids WORKER_ID, "
        "WORKER_ID-2, ...), and they take turns on this worker's engine thread by compute quota (set with "
        "SetQuota on worker.<id>.quota; see docs/pipelined-and-shared.md)",
        env="CASCADE_WORKER_SLOTS",
        type=int,
    ),
    Opt(
        "--memory-mb",
        0.0,
        "memory the instances on this worker may hold together, weights and KV cache, in MB; a load "
        "past it is refused with what is held",
        env="CASCADE_MEMORY_MB",
        type=float,
        shown="0: not accounted",
    ),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The service contract's flags; a worker reads no deployment, but takes --config like its peers.
    add_common_arguments(p)
    add_options(p, *OPTIONS)
    # A switch, not a value: its variable turns caching off with any of the usual false words.
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        default=env_str("CASCADE_PREFIX_CACHING", "1").lower() not in ("0", "false", "no", "off"),
        help="do not reuse the KV blocks of prompt prefixes other requests computed (env CASCADE_PREFIX_CACHING=0)",
    )
