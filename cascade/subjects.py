"""The one catalogue of NATS subjects.

Every subject the mesh uses is built here, so `nats sub 'cascade.>'` (or
`cascade tap`) shows the whole mesh, and a test can run a mesh under its own
prefix beside another. docs/subjects.md documents each one; a test checks
that every builder below is documented there.

Names that go into a subject (worker ids, gateway ids) are validated early:
a NATS token cannot hold '.', '*', '>' or white space.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")

DEFAULT_PREFIX = "cascade"
METRICS_ROLES = ("gateway", "worker")


def check_token(name: str) -> str:
    """Return `name` if it is usable as one subject token, else raise ValueError."""
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} cannot be used in a NATS subject: use letters, digits, '_' and '-' only")
    return name


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subject builders under one prefix (default `cascade`)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        for part in self.prefix.split("."):
            check_token(part)

    # ---- workers -----------------------------------------------------------
    def heartbeat(self, worker_id: str) -> str:
        """Worker → everyone: state, model, layers held, load. Every heartbeat interval."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.heartbeat"

    def heartbeat_all(self) -> str:
        return f"{self.prefix}.worker.*.heartbeat"

    def gone(self, worker_id: str) -> str:
        """Supervisor (`cascade up`) → everyone: this worker's process exited (`WorkerGone`)."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.gone"

    def gone_all(self) -> str:
        return f"{self.prefix}.worker.*.gone"

    def ready(self, worker_id: str) -> str:
        """Worker → everyone: one layer became usable (sequence-numbered per worker)."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.ready"

    def ready_all(self) -> str:
        return f"{self.prefix}.worker.*.ready"

    def snapshot(self, worker_id: str) -> str:
        """Request/reply to a worker: its full readiness state (after a gap or a new sender)."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.snapshot"

    def load(self, worker_id: str) -> str:
        """Request/reply, loader → worker: take this model (acknowledged at once, loads async)."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.load"

    def unload(self, worker_id: str) -> str:
        """Request/reply, loader → worker: drain, free the model, return to the idle pool."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.unload"

    def transfer(self, worker_id: str) -> str:
        """Request/reply, loader → worker: take part in a parameter transfer (`TransferOrder`:
        receive and forward, send, or read from disk); bytes then flow on the TCP data plane."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.transfer"

    def transfer_event(self, worker_id: str) -> str:
        """Worker → loader: how its part of a transfer ended (`TransferEvent`: complete, failed
        with a reason, or lost its downstream hop)."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.transfer_event"

    def transfer_event_all(self) -> str:
        return f"{self.prefix}.worker.*.transfer_event"

    def generate(self, worker_id: str) -> str:
        """Request/reply, gateway → worker: a batch of requests to admit (reply: accepted/rejected)."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.generate"

    def cancel(self, worker_id: str) -> str:
        """Gateway → worker: stop these requests (client went away)."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.cancel"

    def batch_limit(self, worker_id: str) -> str:
        """Request/reply, scaler → worker: set the engine's batch limit at run time (vertical
        scaling), bounded by the KV slots the worker allocated."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.batch_limit"

    def quota(self, worker_id: str) -> str:
        """Request/reply, scaler or operator → an instance on a shared worker: its compute quota."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.quota"

    def quota_set(self, worker_id: str) -> str:
        """Worker → anyone (cascade tap, status): a quota applied, as every decision is published."""
        return f"{self.prefix}.worker.{check_token(worker_id)}.quota_set"

    # ---- gateways ----------------------------------------------------------
    def tokens(self, gateway_id: str) -> str:
        """Worker → gateway: token events of one engine step for every request of that gateway."""
        return f"{self.prefix}.gateway.{check_token(gateway_id)}.tokens"

    def tokens_all(self) -> str:
        return f"{self.prefix}.gateway.*.tokens"

    # ---- scaling -----------------------------------------------------------
    def scale_decision(self) -> str:
        """Scaler → loader: a scale decision with an id, reason and figures."""
        return f"{self.prefix}.scale.decision"

    def scale_ack(self) -> str:
        """Loader → scaler: a decision was carried out (or failed, with why)."""
        return f"{self.prefix}.scale.ack"

    def scale_request(self) -> str:
        """Request/reply, operator (`cascade scale`) → scaler: set a model's replica target."""
        return f"{self.prefix}.scale.request"

    def scale_deploy(self) -> str:
        """Request/reply, operator (`cascade deploy`) → scaler: set a model's scaling policy and
        knobs at run time (the admin API)."""
        return f"{self.prefix}.scale.deploy"

    def scale_apply(self) -> str:
        """Request/reply, operator (`cascade apply`) → scaler: a placement plan's instance and stage
        counts become the models' floor and target (`ApplyPlan` → `PlanApplied`)."""
        return f"{self.prefix}.scale.apply"

    def deployment_changed(self) -> str:
        """Scaler → everyone: the deployment changed (`cascade deploy --model` added a model); the
        message carries the whole deployment, so a service applies it without asking back."""
        return f"{self.prefix}.deployment.changed"

    def deployment_get(self) -> str:
        """Request/reply, any service → scaler: the deployment as the scaler holds it now, models
        added at run time included (`DeploymentRequest` → `DeploymentReply`). A gateway or loader
        that (re)starts asks it, and keeps its deployment file's when no scaler answers."""
        return f"{self.prefix}.deployment.get"

    # ---- parameter transfers -----------------------------------------------
    def transfer_plan(self) -> str:
        """Loader → everyone: the transfer plan of a scale-up, and every re-plan (`cascade tap`)."""
        return f"{self.prefix}.transfer.plan"

    def placement(self) -> str:
        """Loader → everyone: a pipelined instance placed on its workers, up, failed or removed
        (`InstancePlaced`; docs/pipelined-and-shared.md)."""
        return f"{self.prefix}.placement"

    def loader_decisions(self) -> str:
        """Request/reply, scaler → loader: the decisions it is carrying out, not acked yet
        (`ActiveDecisionsRequest` → `ActiveDecisions`)."""
        return f"{self.prefix}.loader.decisions"

    def host_cache(self) -> str:
        """Request/reply, operator → loader: load a model into the host cache, or release it."""
        return f"{self.prefix}.loader.cache"

    def model_files(self) -> str:
        """Request/reply, anyone → loaders: a piece of a model's small files (`ModelFilesRequest` →
        `ModelFilesChunk`); the gateway asks when it cannot see a model's folder."""
        return f"{self.prefix}.loader.files"

    def host_copies(self, loader_id: str) -> str:
        """Loader → loaders: the host copies it holds (`HostCopies`), every pulse and on change."""
        return f"{self.prefix}.loader.{check_token(loader_id)}.copies"

    def host_copies_all(self) -> str:
        return f"{self.prefix}.loader.*.copies"

    def host_copy_order(self, loader_id: str) -> str:
        """Request/reply, leading loader → loader: fill or drop a host copy (`HostCopyOrder` → `Ok`)."""
        return f"{self.prefix}.loader.{check_token(loader_id)}.copy"

    def loader_send(self, loader_id: str) -> str:
        """Request/reply, leading loader → loader: head a chain from this loader's host copy
        (`TransferOrder`, role send → `Ok`, or `ErrorReply` `not_cached`)."""
        return f"{self.prefix}.loader.{check_token(loader_id)}.send"

    # ---- load metrics ------------------------------------------------------
    def metrics(self, role: str, sender_id: str) -> str:
        """Gateway or worker → scaler: load signals every metrics interval (`ModelMetrics` from a
        gateway, `InstanceMetrics` from a worker). Model names stay out of the subject because
        they may hold '.'; the message names its model."""
        if role not in METRICS_ROLES:
            raise ValueError(f"metrics role must be one of {METRICS_ROLES}, got {role!r}")
        return f"{self.prefix}.metrics.{role}.{check_token(sender_id)}"

    def metrics_all(self) -> str:
        return f"{self.prefix}.metrics.>"

    # ---- mesh-wide ---------------------------------------------------------
    def status(self) -> str:
        """Scatter-gather: every service answers with its status (`cascade status`)."""
        return f"{self.prefix}.status"

    def service_ready(self) -> str:
        """Any service → `cascade up`: this service is up and serving."""
        return f"{self.prefix}.service.ready"

    def all(self) -> str:
        """Everything under the prefix (what `cascade tap` subscribes to)."""
        return f"{self.prefix}.>"
