"""The worker's end of the direct token streams (cascade/tokenlink.py): on the engine thread, one
blocking socket per gateway, written right after each step, with NATS as the fallback.

A gateway that can take them puts its token address and key in every `GenerateBatch`
(`learn`, on the loop). The engine thread connects lazily, the first time a step has events for
that gateway (a connect and a one-byte ack with `CONNECT_TIMEOUT_S` each), then writes the step's
events for it as one frame per step: one non-blocking `send`, and only when the socket is full,
the rest with `sendall` under `SEND_TIMEOUT_S`. Any failure drops the
link: a gateway that restarts, a full socket or a broken connection never holds the engine thread
longer than that timeout; the link is tried again after a back-off (`RETRY_S`, doubling up to
`RETRY_MAX_S`) or at once when the gateway advertises a new address.

The ordering rule, per request (per choice of an n > 1 request): a request's events go by one
path until the request ends, except that they leave a failed link for NATS.

- A request whose events went by NATS once (no link yet, a link that failed, a result the engine
  thread hands to the worker's loop: stage frames, or results still queued there) keeps going by
  NATS to its end, even once a link is up: a frame on the link could overtake its earlier events
  still in nats-server.
- When a link fails, every request that had events on it moves to NATS for good. What the failed
  link had delivered before is handled; what it lost (bytes in the kernel when the connection
  broke) makes the next event run ahead of the gateway's count: the gateway's index check treats
  it as lost events and resumes the request elsewhere from what the client has (the same as a
  broker restart); a late event it had already counted is dropped as a repeat. Never a reordered
  token to the client, never a hang.
- A new link, at a later step, carries only requests that never went by NATS.

The sets that pin requests are cleared when the engine holds no sequence (`idle`).
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from cascade.advertise import split_host_port
from cascade.messages import TokenEvent
from cascade.tokenlink import ACK_OK, frame, hello
from services.worker.engine import StepResult

CONNECT_TIMEOUT_S = 0.2
SEND_TIMEOUT_S = 0.05
RETRY_S = 1.0
RETRY_MAX_S = 30.0


class TokenLinks:
    """One lane's links (its worker id is in the hello). `learn` runs on the loop; everything else
    on the engine thread."""

    def __init__(
        self,
        worker_id: str,
        encode_events: Callable[[list[TokenEvent], int], bytes],
        logger: Any = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self.worker_id = worker_id
        self._encode = encode_events
        self.log = logger or structlog.get_logger()
        self._connect_timeout_s = connect_timeout_s
        self._send_timeout_s = send_timeout_s
        # gateway id → (address, key), as the gateway last advertised them (written by the loop,
        # read here: a plain dict, each write one atomic store).
        self._addrs: dict[str, tuple[str, str]] = {}
        self._socks: dict[str, tuple[socket.socket, tuple[str, str]]] = {}
        # gateway → (next try, back-off, the address it applies to: a new one is tried at once)
        self._retry: dict[str, tuple[float, float, tuple[str, str] | None]] = {}
        # (gateway, request, choice): each of a request's n choices is a stream of its own (its own
        # index at the gateway) and ends on its own.
        self._on_nats: set[tuple[str, str, int]] = set()  # pinned to NATS
        self._on_link: set[tuple[str, str, int]] = set()  # on the current link
        self.frames = 0  # frames written
        self.events_sent = 0  # events carried by them
        self.connects = 0
        self.failures = 0  # connects refused or failed, writes failed

    def learn(self, gateway_id: str, addr: str, key: str) -> None:
        """The gateway's token address from a `GenerateBatch`; empty: it wants NATS."""
        if addr:
            if self._addrs.get(gateway_id) != (addr, key):
                self._addrs[gateway_id] = (addr, key)
        else:
            self._addrs.pop(gateway_id, None)

    def summary(self) -> dict[str, Any]:
        """For the worker's status (read from the loop: counters, a snapshot of the gateways)."""
        return {
            "linked": sorted(self._socks.copy()),  # copied at once: the engine thread changes it
            "frames": self.frames,
            "events": self.events_sent,
            "connects": self.connects,
            "failures": self.failures,
        }

    def linked(self, gateway_id: str) -> bool:
        return gateway_id in self._socks

    # ---- engine thread ------------------------------------------------------
    def send(self, result: StepResult) -> StepResult:
        """Write the events of `result` that may go by a link (the module's rule); the result
        with the events left for NATS (`result` itself when none went)."""
        by_gw: dict[str, list[TokenEvent]] = defaultdict(list)
        for gw, ev in result.events:
            by_gw[gw].append(ev)
        left: list[tuple[str, TokenEvent]] = []
        for gw, evs in by_gw.items():
            sock = self._link(gw)
            on_link = [] if sock is None else [ev for ev in evs if (gw, ev.request_id, ev.choice) not in self._on_nats]
            if on_link and sock is not None and self._write(gw, sock, self._encode(on_link, result.batch_size)):
                self.events_sent += len(on_link)
                for ev in on_link:
                    if ev.finish_reason is None:
                        self._on_link.add((gw, ev.request_id, ev.choice))
                    else:
                        self._on_link.discard((gw, ev.request_id, ev.choice))
                if len(on_link) == len(evs):
                    continue
                evs = [ev for ev in evs if (gw, ev.request_id, ev.choice) in self._on_nats]
            for ev in evs:
                key = (gw, ev.request_id, ev.choice)
                self._on_link.discard(key)
                if ev.finish_reason is None:
                    self._on_nats.add(key)
                else:
                    self._on_nats.discard(key)
                left.append((gw, ev))
        if len(left) == len(result.events):
            return result
        return replace(result, events=left)

    def idle(self) -> None:
        """The engine holds no sequence: no request is in flight on either path."""
        self._on_nats.clear()
        self._on_link.clear()

    def close(self) -> None:
        for gw in list(self._socks):
            self._drop(gw, None)

    def _link(self, gw: str) -> socket.socket | None:
        entry = self._addrs.get(gw)
        held = self._socks.get(gw)
        if held is not None:
            if held[1] == entry:
                return held[0]
            # The gateway advertised another address (it restarted): this link is stale.
            self._drop(gw, "the gateway advertised a new token address")
            self._retry.pop(gw, None)
        if entry is None:
            return None
        now = time.monotonic()
        next_try, backoff, tried = self._retry.get(gw, (0.0, RETRY_S / 2, entry))
        if now < next_try and tried == entry:
            return None
        addr, key = entry
        sock: socket.socket | None = None
        try:
            host, port = split_host_port(addr)
            sock = socket.create_connection((host, port), timeout=self._connect_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(hello(key, self.worker_id))
            ack = sock.recv(1)
            if ack != ACK_OK:
                raise ConnectionRefusedError(f"the gateway refused the link (answered {ack!r})")
            sock.setblocking(False)
        except (OSError, ValueError) as e:
            if sock is not None:
                sock.close()
            backoff = min(backoff * 2, RETRY_MAX_S)
            self._retry[gw] = (now + backoff, backoff, entry)
            self.failures += 1
            self.log.warning("token_link_failed", gateway_id=gw, addr=addr, error=repr(e), retry_s=backoff)
            return None
        self._retry.pop(gw, None)
        self._socks[gw] = (sock, entry)
        self.connects += 1
        self.log.info("token_link_up", gateway_id=gw, addr=addr)
        return sock

    def _write(self, gw: str, sock: socket.socket, payload: bytes) -> bool:
        try:
            data = frame(payload)
            # Non-blocking first: one `send` syscall when the socket has room (a socket with a
            # timeout would `poll` before every send); only a full socket waits, and not long.
            try:
                n = sock.send(data)
            except BlockingIOError:
                n = 0
            if n < len(data):
                sock.settimeout(self._send_timeout_s)
                try:
                    sock.sendall(memoryview(data)[n:])
                finally:
                    sock.setblocking(False)
        except (OSError, ValueError) as e:
            # Not all of the frame went (a timeout, a reset): the gateway drops the truncated
            # frame with the connection, and these events go by NATS.
            self.failures += 1
            entry = self._socks[gw][1] if gw in self._socks else None
            self._drop(gw, repr(e))
            self._retry[gw] = (time.monotonic() + RETRY_S, RETRY_S, entry)
            return False
        self.frames += 1
        return True

    def _drop(self, gw: str, why: str | None) -> None:
        held = self._socks.pop(gw, None)
        if held is not None:
            try:
                held[0].close()
            except OSError:
                pass
        # Requests that had events on it stay on NATS from now on (the module's rule).
        moved = [k for k in self._on_link if k[0] == gw]
        for k in moved:
            self._on_link.discard(k)
            self._on_nats.add(k)
        if why is not None:
            self.log.warning("token_link_dropped", gateway_id=gw, error=why, requests_moved=len(moved))
