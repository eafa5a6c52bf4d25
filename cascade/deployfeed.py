"""Which deployment a gateway or loader works from: its deployment file's at start, then the
scaler's (`deployment.get`), then every `deployment.changed`.

A model deployed at run time (`cascade deploy --model`) lives in the scaler's deployment. Under
`cascade up` the scaler also rewrites the deployment.json its children read, but under compose or
Kubernetes the file is read-only and shared: a gateway or loader that restarts there learns such
models only by asking the scaler. No scaler answering is not an error: the file's deployment
holds until a `deployment.changed` arrives.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS

from cascade.config import ConfigError, Deployment, deployment_from_entries, deployment_from_message
from cascade.messages import DeploymentReply, DeploymentRequest, MessageError, RemoteError
from cascade.natsutil import NoResponders, RequestTimeout, request
from cascade.subjects import Subjects

# A live scaler answers from memory at once; this bounds a service's start when one is stuck.
DEPLOYMENT_GET_TIMEOUT_S = 2.0


class DeploymentFeed:
    """Counts the `deployment.changed` messages a service took, so that the scaler's answer to an
    earlier `deployment.get` never replaces a change that came in meanwhile (every change message
    carries the whole deployment, so the latest one is at least as new as the answer)."""

    def __init__(self) -> None:
        self.changes = 0

    def changed(self, data: bytes) -> tuple[Deployment, list[str]]:
        """Decode a `deployment.changed` message (ConfigError / MessageError when it cannot be used)."""
        dep, added = deployment_from_message(data)
        self.changes += 1
        return dep, added

    async def ask(
        self, nc: NATS, subjects: Subjects, requester: str, timeout: float = DEPLOYMENT_GET_TIMEOUT_S
    ) -> tuple[Deployment | None, str]:
        """The scaler's deployment, or None and why not (then the service keeps its own)."""
        before = self.changes
        try:
            reply = await request(nc, subjects.deployment_get(), DeploymentRequest(requester), DeploymentReply, timeout)
        except NoResponders:
            return None, "no scaler answers deployment.get"
        except RequestTimeout:
            return None, f"no scaler answered deployment.get within {timeout:g}s"
        except (RemoteError, MessageError) as e:
            return None, f"the scaler's deployment.get answer is unusable: {e}"
        try:
            dep = deployment_from_entries(reply.models, f"scaler {reply.scaler_id}'s deployment")
        except ConfigError as e:
            return None, str(e)
        if self.changes != before:
            return None, "a deployment.changed came in while asking (it is the newer)"
        return dep, f"scaler {reply.scaler_id}"
