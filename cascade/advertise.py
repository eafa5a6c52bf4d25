"""Checking, at start, that an address a service advertises reaches its own listener.

Peers connect to what a service advertises (a worker's stage link and data plane), not to where it
listens. A wrong advertised address (a container's hostname other hosts cannot resolve, a pod IP
that is not this pod's, a typo) used to show only as a hang at the first transfer; a connect to
it with a short deadline right after the listener starts makes it an error at start instead.
Kubernetes passes the pod IP through the downward API into `CASCADE_ADVERTISE_HOST`.
"""

from __future__ import annotations

import socket

DEFAULT_CHECK_TIMEOUT_S = 3.0


class AddressError(ConnectionError):
    """An advertised address that does not reach the listener it stands for."""


def advertised_host(listen_host: str, advertise_host: str | None = None) -> str:
    """The host peers are told to reach a listener on: `advertise_host` when set; a wildcard
    listen address is no address for a peer, so this host's name (what containers resolve each
    other by); else the listen host itself."""
    if advertise_host:
        return advertise_host
    return socket.gethostname() if listen_host in ("0.0.0.0", "::", "") else listen_host


def split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise AddressError(f"advertised address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


def check_reachable(addr: str, what: str, listen: str, timeout_s: float = DEFAULT_CHECK_TIMEOUT_S) -> None:
    """Connect to `addr` (what `what` advertises; it listens on `listen`) and close at once;
    raises AddressError saying what to set when that fails within `timeout_s`. Blocking."""
    host, port = split_host_port(addr)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise AddressError(
            f"the {what} listens on {listen} and advertises {addr}, which does not reach it within {timeout_s:g}s "
            f"({type(e).__name__}: {e}). Peers connect to the advertised address: set --advertise-host (env "
            "CASCADE_ADVERTISE_HOST, e.g. the pod IP from the Kubernetes downward API) to an address of this "
            "machine that other hosts can reach, or listen where it points"
        ) from None
