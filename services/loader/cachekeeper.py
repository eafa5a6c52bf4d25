"""The loader's side of the O(1) host cache (hostcache.py holds the copies themselves): fill it
after a scale-up had to read a model from disk, head chains from it, release models by its
keep-alive policy, and answer an operator's `HostCacheRequest` (`cascade cache`).

With several loaders (copies.py): every loader announces its copies; the leader decides which
loaders hold a copy of each model (`host_copies` per model) and orders fills and drops, and a
follower heads a chain from its copy when the leader's plan picks it (`on_send`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cascade.config import Deployment, ModelDeployment
from cascade.framing import TransferError, send_units
from cascade.meshfiles import chunk
from cascade.messages import (
    HostCacheRequest,
    HostCopies,
    HostCopyOrder,
    ModelFilesChunk,
    ModelFilesRequest,
    Ok,
    RemoteError,
    TransferOrder,
)
from cascade.modelfiles import ModelFiles, pack_dir
from cascade.natsutil import TaskSet
from services.loader.copies import CopyTable, LoaderCopies, place_copies
from services.loader.hostcache import HostCache
from services.loader.settings import LoaderSettings

# A loader not heard announcing its copies for this many pulses is gone, its copies with it.
COPIES_STALE_PULSES = 3.5


class HostCacheKeeper:
    def __init__(self, settings: LoaderSettings, deployment: Deployment, tasks: TaskSet, log: Any) -> None:
        self.settings = settings
        self.deployment = deployment
        self.tasks = tasks
        self.log = log
        self.cache: HostCache | None = None if settings.host_cache == "off" else HostCache(mode=settings.host_cache)
        self._filling: set[str] = set()
        self.clock: Callable[[], float] = time.monotonic
        self.copies = CopyTable(settings.loader_id, COPIES_STALE_PULSES * settings.heartbeat_s)
        # Set by the loader: announce our copies now (after a fill or a release), and send another
        # loader a fill or drop order.
        self.changed: Callable[[], None] = lambda: None
        self.order: Callable[[str, HostCopyOrder], Awaitable[None]] | None = None
        self._ordered: dict[tuple[str, str], tuple[str, float]] = {}  # (loader, model) → (action, when)
        self._files: dict[str, ModelFiles] = {}  # the blob a fetch in pieces is reading, per model

    def models(self) -> frozenset[str]:
        return self.cache.models() if self.cache is not None else frozenset()

    def fill(self, model: ModelDeployment, lg: Any) -> None:
        """Put `model` in the cache in the background (after a scale-up read it from disk: the
        next one must not wait on the disk). Once per model at a time."""
        self._fill_in_background(model.name, Path(model.path), lg)

    def _fill_in_background(self, name: str, path: Path, lg: Any) -> None:
        if self.cache is None or self.cache.has(name) or name in self._filling:
            return
        self._filling.add(name)
        self.changed()
        self.tasks.spawn(self._fill(name, path, lg), f"cache-fill-{name}")

    async def fill_now(self, model: ModelDeployment, lg: Any) -> None:
        """Put `model` in the cache and wait for it (a load whose targets cannot read the model
        store has no other source); a fill already under way is waited for, not repeated."""
        if self.cache is None or self.cache.has(model.name):
            return
        # HostCache.load is idempotent and keeps one copy if two fills race.
        self._filling.add(model.name)
        await self._fill(model.name, Path(model.path), lg)

    async def _fill(self, name: str, path: Path, lg: Any) -> None:
        assert self.cache is not None
        t0 = time.monotonic()
        try:
            entry = await asyncio.to_thread(self.cache.load, name, path)
            lg.info(
                "host_cache_filled", cached=name, mb=round(entry.nbytes / 1e6, 1), mode=entry.mode,
                locked=entry.locked, seconds=round(time.monotonic() - t0, 3),
            )  # fmt: skip
        except (OSError, ValueError) as e:
            lg.warning("host_cache_fill_failed", cached=name, error=str(e))
        finally:
            self._filling.discard(name)
            self.changed()

    async def on_files(self, req: ModelFilesRequest) -> ModelFilesChunk | None:
        """A piece of a model's small files, for a service that cannot see the store (the
        gateway): from the host copy, else this loader's own read of the store. Silent when this
        loader has neither, or another version than the asker pinned."""
        files = self._files.get(req.model)
        if files is None or req.offset == 0 or (req.digest and files.digest != req.digest):
            files = self.cache.files(req.model) if self.cache is not None else None
            m = self.deployment.get(req.model)
            if files is None and m is not None:
                try:
                    files = await asyncio.to_thread(pack_dir, Path(m.path))
                except (OSError, ValueError):
                    files = None
            if files is None:
                return None
            self._files[req.model] = files
        if req.digest and files.digest != req.digest:
            return None
        if not 0 <= req.offset < files.nbytes:
            raise RemoteError(
                "bad_offset", f"offset {req.offset} outside the {files.nbytes} bytes of {req.model}'s files"
            )
        return chunk(req.model, files.blob, files.digest, req.offset)

    def unit_sizes(self, model: str) -> tuple[int, ...] | None:
        """The units' sizes from a held copy (None: not held here)."""
        return self.cache.unit_nbytes(model) if self.cache is not None else None

    # ---- copies across loaders (copies.py) -----------------------------------------------------
    def announcement(self) -> HostCopies:
        return HostCopies(
            self.settings.loader_id, self.settings.host, sorted(self.models()), sorted(self._filling),
            cache=self.cache is not None,
        )  # fmt: skip

    def heard(self, msg: HostCopies) -> None:
        c = LoaderCopies(
            msg.loader_id, msg.host, frozenset(msg.models), frozenset(msg.filling), msg.cache, self.clock()
        )
        self.copies.heard(c)

    def peers(self, now: float) -> tuple[tuple[str, str, frozenset[str]], ...]:
        """Other loaders' copies, as the planner takes them."""
        return tuple((c.loader_id, c.host, c.models) for c in self.copies.peers(now))

    def want(self, model: str) -> None:
        """(Leader) keep `model` cached mesh-wide from now on, in `host_copies` loaders."""
        self.copies.want(model, self.clock())
        self.place()

    def touch(self, model: str) -> None:
        self.copies.touch(model, self.clock())

    def place(self) -> None:
        """(Leader) order the fills and drops that bring each wanted model to its `host_copies`."""
        now = self.clock()
        me = LoaderCopies(
            self.settings.loader_id, self.settings.host, self.models(), frozenset(self._filling),
            self.cache is not None, now,
        )  # fmt: skip
        loaders = [c for c in self.copies.live(now) if c.loader_id != me.loader_id] + [me]
        wanted = {}
        for name in self.copies.wanted:
            m = self.deployment.get(name)
            wanted[name] = m.host_copies if m is not None else 1
        for o in place_copies(wanted, loaders, me.loader_id):
            if o.loader_id == me.loader_id:
                self._apply(o.action, o.model, "more copies than host_copies, or no longer kept")
                continue
            last = self._ordered.get((o.loader_id, o.model))
            # An order repeats only once its loader had time to announce the result.
            if self.order is None or (last is not None and last[0] == o.action and now - last[1] < self.copies.stale_s):
                continue
            m = self.deployment.get(o.model)
            path = str(m.path) if m is not None else ""
            self._ordered[(o.loader_id, o.model)] = (o.action, now)
            self.log.info("host_copy_order", to=o.loader_id, cached=o.model, action=o.action)
            self.tasks.spawn(
                self.order(o.loader_id, HostCopyOrder(o.action, o.model, path, self.settings.loader_id)),
                f"copy-order-{o.loader_id}-{o.model}",
            )

    def _apply(self, action: str, model: str, why: str) -> None:
        if self.cache is None:
            return
        if action == "fill":
            m = self.deployment.get(model)
            if m is not None:
                self._fill_in_background(m.name, Path(m.path), self.log.bind(model=model))
        elif self.cache.release(model):
            self.log.info("host_cache_released", cached=model, why=why)
            self.changed()

    async def on_copy_order(self, order: HostCopyOrder) -> Ok:
        """The leader's fill or drop order for this loader's copy of a model."""
        if self.cache is None:
            raise RemoteError(
                "disabled", f"loader {self.settings.loader_id} runs without a host cache (--host-cache off)"
            )
        lg = self.log.bind(model=order.model, leader=order.leader)
        if order.action == "fill":
            m = self.deployment.get(order.model)
            path = Path(order.path) if order.path else (Path(m.path) if m is not None else None)
            if path is None:
                raise RemoteError(
                    "unknown_model", f"{order.model} is not in loader {self.settings.loader_id}'s deployment"
                )
            lg.info("host_copy_fill", path=str(path))
            self._fill_in_background(order.model, path, lg)
            return Ok(f"filling {order.model}")
        if self.cache.has(order.model) and not self.cache.release(order.model):
            raise RemoteError("in_use", f"{order.model} is heading a transfer here; the leader asks again later")
        lg.info("host_cache_released", cached=order.model, why=f"dropped by the leader {order.leader}")
        self.changed()
        return Ok(f"dropped {order.model}")

    async def on_send(self, order: TransferOrder) -> Ok:
        """The leader's plan chose this loader's copy as a chain source."""
        if self.cache is None:
            raise RemoteError(
                "disabled", f"loader {self.settings.loader_id} runs without a host cache (--host-cache off)"
            )
        if order.role != "send" or order.downstream is None:
            raise RemoteError("bad_order", "a loader only heads chains: role send, with a downstream address")
        if not self.cache.has(order.model):
            raise RemoteError("not_cached", f"{order.model} is not in loader {self.settings.loader_id}'s host cache")
        self.send(order, self.log.bind(model=order.model, plan=order.plan_id))
        return Ok(f"sending {order.model}")

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
                    host_id=self.settings.host,  # a same-host receiver copies from the cache itself
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
        """(Leader) stop keeping what the keep-alive policy says to (given how many workers serve
        each model), then bring every copy in line: a released model is dropped everywhere."""
        if self.cache is not None:
            for model in self.cache.models():
                use = self.cache.usage(model)
                if use is not None and model in self.copies.wanted:  # its own sends count as uses
                    self.copies.wanted[model] = max(self.copies.wanted.get(model, use[0]), use[0])

        def in_use(model: str) -> int:
            use = self.cache.usage(model) if self.cache is not None else None
            return use[1] if use is not None else 0

        s = self.settings
        for model, d in self.copies.sweep(
            self.clock(), holders, in_use, s.host_cache_keep_alive_s, s.host_cache_keep_alive_cold_s
        ):
            self.log.info("host_copies_unwanted", cached=model, why=d.reason)
        self.place()

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
            # Released mesh-wide: the other loaders' copies go too.
            self.copies.wanted.pop(req.model, None)
            self.changed()
            self.place()
            return Ok(f"released {req.model} from the host cache")
        model = self.deployment.get(req.model)
        if model is None:
            raise RemoteError("unknown_model", f"{req.model} is not in the loader's deployment")
        try:
            entry = await asyncio.to_thread(self.cache.load, model.name, Path(model.path))
        except (OSError, ValueError) as e:
            raise RemoteError("load_failed", f"{req.model}: {e}") from None
        self.changed()
        self.want(model.name)
        return Ok(f"{req.model} in the host cache: {entry.nbytes / 1e6:.1f} MB ({entry.mode})")

    def status(self) -> dict[str, Any]:
        return {
            "host_cache": self.cache.status() if self.cache is not None else None,
            "host_cache_bytes": self.cache.nbytes() if self.cache is not None else 0,
            "host_id": self.settings.host,
            "host_copies": self.copies.status(self.clock()),
        }

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
