"""The control plane's small shared state in NATS JetStream key-value buckets: who leads (a
lease, services/loader/lease.py) and what the leader is in the middle of (a journal), so that a
successor finishes it. One bucket per mesh prefix; values are JSON.

JetStream is optional on a broker: `open_store` says `None` (with why) when it is not there,
and the caller decides whether it can go on without (one loader can; several cannot agree).
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

# JetStream API calls answer in milliseconds; a broker without JetStream may not answer at all.
KV_TIMEOUT_S = 2.0


class StoreUnavailable(RuntimeError):
    """The broker has no JetStream (or its bucket cannot be made): no lease, no journal."""


class Conflict(RuntimeError):
    """A compare-and-set lost: the key changed since the revision we knew."""


def bucket_name(prefix: str) -> str:
    """One bucket per mesh: a prefix's dots are not allowed in bucket names."""
    return f"{prefix.replace('.', '_')}_control"


def journal_key(kind: str, ident: str) -> str:
    """A key for any id: ids may hold characters KV keys do not allow, so they are encoded."""
    return f"{kind}.{base64.urlsafe_b64encode(ident.encode()).decode().rstrip('=')}"


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: dict[str, Any]
    revision: int


class ControlStore:
    """Typed access to one bucket: get / create / compare-and-set / delete / list by kind."""

    def __init__(self, kv: KeyValue, bucket: str) -> None:
        self.kv = kv
        self.bucket = bucket

    async def get(self, key: str) -> Entry | None:
        try:
            e = await asyncio.wait_for(self.kv.get(key), KV_TIMEOUT_S)
        except KeyNotFoundError:  # also a deleted or purged key
            return None
        if e.value is None or not e.value:
            return None
        return Entry(key, json.loads(e.value), e.revision or 0)

    async def create(self, key: str, value: dict[str, Any], timeout: float = KV_TIMEOUT_S) -> int:
        """Write `key` only if it does not exist (or was deleted); its revision, or Conflict."""
        try:
            return await asyncio.wait_for(self.kv.create(key, _dump(value)), timeout)
        except KeyWrongLastSequenceError:
            raise Conflict(f"{key} exists") from None

    async def update(self, key: str, value: dict[str, Any], last: int, timeout: float = KV_TIMEOUT_S) -> int:
        """Write `key` only if its revision is still `last`; the new revision, or Conflict."""
        try:
            return await asyncio.wait_for(self.kv.update(key, _dump(value), last=last), timeout)
        except KeyWrongLastSequenceError:
            raise Conflict(f"{key} changed since revision {last}") from None

    async def put(self, key: str, value: dict[str, Any]) -> int:
        return await asyncio.wait_for(self.kv.put(key, _dump(value)), KV_TIMEOUT_S)

    async def delete(self, key: str) -> None:
        await asyncio.wait_for(self.kv.delete(key), KV_TIMEOUT_S)

    async def entries(self, kind: str) -> list[Entry]:
        """Every live entry whose key starts with `kind.`."""
        try:
            keys = await asyncio.wait_for(self.kv.keys(), KV_TIMEOUT_S)
        except NoKeysError:
            return []
        out = []
        # nats-py's own key filter matches substrings: the prefix is checked here.
        for k in (k for k in keys if k.startswith(f"{kind}.")):
            e = await self.get(k)
            if e is not None:
                out.append(e)
        return out


async def open_store(nc: NATS, prefix: str, replicas: int = 1) -> ControlStore:
    """The mesh's control bucket, made if missing; StoreUnavailable when the broker has no
    JetStream (nats-server without `-js`, or an account without it)."""
    bucket = bucket_name(prefix)
    js = nc.jetstream(timeout=KV_TIMEOUT_S)
    try:
        kv = await asyncio.wait_for(js.key_value(bucket), KV_TIMEOUT_S)
    except Exception:  # not there yet (or no JetStream: the create below says which)
        cfg = KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas)
        try:
            kv = await asyncio.wait_for(js.create_key_value(cfg), KV_TIMEOUT_S)
        except Exception as e:  # nats-py raises unrelated types for "no JetStream"
            why = type(e).__name__ if "code=None" in str(e) or not str(e) else f"{type(e).__name__}: {e}"
            raise StoreUnavailable(
                f"the broker has no JetStream key-value store (nats-server -js enables it; {why})"
            ) from None
    return ControlStore(kv, bucket)


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
