"""The loader's side of the O(1) host cache (hostcache.py holds the copies themselves): fill it
after a scale-up had to read a model from disk, head chains from it, release models by its
keep-alive policy, and answer an operator's `HostCacheRequest` (`cascade cache`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade.config import Deployment, ModelDeployment
from cascade.framing import TransferError, send_units
from cascade.messages import HostCacheRequest, Ok, RemoteError, TransferOrder
from cascade.natsutil import TaskSet
from services.loader.hostcache import HostCache
from services.loader.settings import LoaderSettings


class HostCacheKeeper:
    def __init__(self, settings: LoaderSettings, deployment: Deployment, tasks: TaskSet, log: Any) -> None:
        self.settings = settings
        self.deployment = deployment
        self.tasks = tasks
        self.log = log
        self.cache: HostCache | None = None if settings.host_cache == "off" else HostCache(mode=settings.host_cache)
        self._filling: set[str] = set()

    def models(self) -> frozenset[str]:
        return self.cache.models() if self.cache is not None else frozenset()

    def fill(self, model: ModelDeployment, lg: Any) -> None:
        """Put `model` in the cache in the background (after a scale-up read it from disk: the
        next one must not wait on the disk). Once per model at a time."""
        if self.cache is None or self.cache.has(model.name) or model.name in self._filling:
            return
        self._filling.add(model.name)
        self.tasks.spawn(self._fill(model, lg), f"cache-fill-{model.name}")

    async def fill_now(self, model: ModelDeployment, lg: Any) -> None:
        """Put `model` in the cache and wait for it (a load whose targets cannot read the model
        store has no other source); a fill already under way is waited for, not repeated."""
        if self.cache is None or self.cache.has(model.name):
            return
        # HostCache.load is idempotent and keeps one copy if two fills race.
        self._filling.add(model.name)
        await self._fill(model, lg)

    async def _fill(self, model: ModelDeployment, lg: Any) -> None:
        assert self.cache is not None
        t0 = time.monotonic()
        try:
            entry = await asyncio.to_thread(self.cache.load, model.name, Path(model.path))
            lg.info(
                "host_cache_filled", cached=model.name, mb=round(entry.nbytes / 1e6, 1), mode=entry.mode,
                locked=entry.locked, seconds=round(time.monotonic() - t0, 3),
            )  # fmt: skip
        except (OSError, ValueError) as e:
            lg.warning("host_cache_fill_failed", cached=model.name, error=str(e))
        finally:
            self._filling.discard(model.name)

    def send(self, order: TransferOrder, lg: Any) -> None:
        """Head one chain of a plan: stream from the cached copy in the background."""
        self.tasks.spawn(self._send(order, lg), f"cache-send-{order.transfer_id}")

    async def _send(self, order: TransferOrder, lg: Any) -> None:
        cache = self.cache
        assert cache is not None and order.downstream is not None
        downstream = order.downstream
        cancel = threading.Event()

        def go() -> int:
            with cache.lease(order.model) as src:
                return send_units(
                    src, downstream, order.transfer_id, order.token, order.units,
                    rate_limit_bps=order.rate_limit_bps, cancel=cancel, timeout_s=order.timeout_s,
                ).nbytes  # fmt: skip

        try:
            # Sockets block: the stream runs on a thread.
            nbytes = await asyncio.to_thread(go)
            lg.info("cache_send_done", transfer=order.transfer_id, mb=round(nbytes / 1e6, 1))
        except (TransferError, KeyError) as e:
            # The targets that lost the stream report it; their reports decide the re-plan.
            lg.warning("cache_send_failed", transfer=order.transfer_id, error=str(e))
        finally:
            cancel.set()

    def sweep(self, holders: Mapping[str, int]) -> None:
        """Release what the keep-alive policy says to, given how many workers serve each model."""
        if self.cache is None:
            return
        for model, why in self.cache.sweep(
            holders, self.settings.host_cache_keep_alive_s, self.settings.host_cache_keep_alive_cold_s
        ):
            self.log.info("host_cache_released", cached=model, why=why)

    async def on_request(self, req: HostCacheRequest) -> Ok:
        if self.cache is None:
            raise RemoteError(
                "disabled", f"loader {self.settings.loader_id} runs without a host cache (--host-cache off)"
            )
        if req.action == "release":
            if not self.cache.has(req.model):
                return Ok(f"{req.model} is not in the host cache")
            if not self.cache.release(req.model):
                raise RemoteError("in_use", f"{req.model} is heading a transfer; try again when it is done")
            self.log.info("host_cache_released", cached=req.model, why="on demand")
            return Ok(f"released {req.model} from the host cache")
        model = self.deployment.get(req.model)
        if model is None:
            raise RemoteError("unknown_model", f"{req.model} is not in the loader's deployment")
        try:
            entry = await asyncio.to_thread(self.cache.load, model.name, Path(model.path))
        except (OSError, ValueError) as e:
            raise RemoteError("load_failed", f"{req.model}: {e}") from None
        return Ok(f"{req.model} in the host cache: {entry.nbytes / 1e6:.1f} MB ({entry.mode})")

    def status(self) -> dict[str, Any]:
        return {
            "host_cache": self.cache.status() if self.cache is not None else None,
            "host_cache_bytes": self.cache.nbytes() if self.cache is not None else 0,
            "host_id": self.settings.host,
        }

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
