"""API keys of the gateway, as the gateway and `cascade up` both see them: where keys come
from, and when an open gateway deserves a warning. The check itself is the gateway's
(services/gateway/auth.py)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable

API_KEYS_ENV = "CASCADE_API_KEYS"


def keys_from(flags: Iterable[str] | None, env: str | None = None) -> tuple[str, ...]:
    """The accepted keys: every `--api-key`, then every comma-separated key of $CASCADE_API_KEYS
    (or `env`); blanks dropped, order kept, duplicates removed."""
    raw = os.environ.get(API_KEYS_ENV, "") if env is None else env
    out: list[str] = []
    for k in [*(flags or ()), *raw.split(",")]:
        k = k.strip()
        if k and k not in out:
            out.append(k)
    return tuple(out)


def is_loopback(host: str) -> bool:
    """True when `host` accepts connections from this machine only ("", 0.0.0.0 and :: do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def open_gateway_warning(host: str) -> str:
    return (
        f"the gateway listens on {host or 'every interface'} with no API key: anyone who can reach it "
        f"can use the models. Pass --api-key KEY (or set {API_KEYS_ENV}) and send 'Authorization: Bearer KEY'"
    )
