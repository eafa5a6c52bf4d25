"""API keys on the gateway: OpenAI-style `Authorization: Bearer <key>` on every `/v1` route.

Keys come from `--api-key` (repeatable) and `CASCADE_API_KEYS` (comma-separated); any one of
them is accepted. `/health`, `/live` and `/metrics` stay open, as in vLLM: probes and scrapers
carry no key, and they reveal no model output. A refused request gets a 401 with an OpenAI
error body (`invalid_api_key`), before its body is read.

Without keys the gateway is open, which is meant for loopback only: the gateway (at start) and
`cascade up` warn when an open gateway is reachable from other machines (cascade/apikeys.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from services.gateway.openai_api import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PROTECTED_PREFIX = "/v1"


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", type="invalid_request_error")


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key in constant time: how long it takes says nothing about a key.
    given = presented.encode()
    found = False
    for k in keys:
        found |= hmac.compare_digest(given, k.encode())
    return found


def api_key_middleware(keys: tuple[str, ...]) -> Middleware:
    """A middleware refusing `/v1` requests without one of `keys`. Placed after the observing
    middleware, so refusals are counted under their status like any other answer."""
    if not keys:
        raise ValueError("api_key_middleware needs at least one key")

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == _PROTECTED_PREFIX or request.path.startswith(_PROTECTED_PREFIX + "/"):
            given = presented_key(request)
            if given is None:
                raise _unauthorized(
                    "no API key provided: send it as 'Authorization: Bearer KEY' (this gateway requires one)"
                )
            if not key_matches(given, keys):
                raise _unauthorized("incorrect API key provided")
        return await handler(request)

    return check_api_key
