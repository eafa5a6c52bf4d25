"""The worker's end of the direct token streams (cascade/tokenlink.py): on the engine thread, one
blocking socket per gateway, written right after each step, with NATS as the fallback.

A gateway that can take them puts its token address and key in every `GenerateBatch`
(`learn`, on the loop), which starts the connect at once on a short-lived thread of its own (a
connect and a one-byte ack with `CONNECT_TIMEOUT_S` each): the engine thread never waits for a
gateway that is slow to answer or unreachable. A loopback or LAN connect is through long before
the request's prefill is, so its first events already take the link; until a link is up, a
gateway's events go by NATS. The engine thread adopts the connected socket at its next step with
events for that gateway, then writes the step's events for it as one frame per step: one
non-blocking `send`, and only when the socket is full, the rest with `sendall` under
`SEND_TIMEOUT_S`. Any failure drops the link: a gateway that restarts, a full socket or a broken
connection never holds the engine thread longer than that timeout; the link is tried again after a
back-off (`RETRY_S`, doubling up to `RETRY_MAX_S`) or at once when the gateway advertises a new
address.

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
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import structlog

from cascade.advertise import split_host_port
from cascade.messages import TokenEvent
from cascade.tokenlink import ACK_OK, encode_rows, frame, hello, local_socket_address
from services.worker.engine import StepResult

# (address, key, local socket name) as a gateway advertises them.
_Entry = tuple[str, str, str]

CONNECT_TIMEOUT_S = 0.2
SEND_TIMEOUT_S = 0.05
RETRY_S = 1.0
RETRY_MAX_S = 30.0


class TokenLinks:
    """One lane's links (its worker id is in the hello). `learn` runs on the loop, the connects on
    threads of their own, everything else on the engine thread."""

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
        # gateway id → (address, key, local socket name), as the gateway last advertised them
        # (written by the loop, read here: a plain dict, each write one atomic store).
        self._addrs: dict[str, _Entry] = {}
        # Links in use, the engine thread's alone.
        self._socks: dict[str, tuple[socket.socket, _Entry]] = {}
        # Connected by a connect thread, not yet taken up by the engine thread (each put and pop
        # one atomic dict operation).
        self._ready: dict[str, tuple[socket.socket, _Entry]] = {}
        # Under `_lock` (the loop, the engine thread and the connect threads all start or end
        # connects): gateways with a connect in flight, and gateway → (next try, back-off, the
        # address it applies to: a new one is tried at once).
        self._lock = threading.Lock()
        self._connecting: dict[str, threading.Thread] = {}
        self._retry: dict[str, tuple[float, float, _Entry | None]] = {}
        self._closed = False
        # (gateway, request, choice): each of a request's n choices is a stream of its own (its own
        # index at the gateway) and ends on its own.
        self._on_nats: set[tuple[str, str, int]] = set()  # pinned to NATS
        self._on_link: set[tuple[str, str, int]] = set()  # on the current link
        self.frames = 0  # frames written
        self.events_sent = 0  # events carried by them
        self.connects = 0  # written by the connect threads
        self.local_connects = 0  # of them, over the gateway's local (Unix) socket
        self.connect_failures = 0  # connects refused or failed (the connect threads)
        self.write_failures = 0  # writes failed (the engine thread)

    @property
    def failures(self) -> int:
        return self.connect_failures + self.write_failures

    def learn(self, gateway_id: str, addr: str, key: str, local: str = "") -> None:
        """The gateway's token address from a `GenerateBatch`; empty: it wants NATS. A new
        address is connected to at once, off the engine thread. `local`: the gateway's Unix
        socket in the abstract namespace (`@name`), tried first (cascade/tokenlink.py)."""
        if addr:
            if self._addrs.get(gateway_id) != (addr, key, local):
                self._addrs[gateway_id] = (addr, key, local)
            if gateway_id not in self._socks:
                self._start_connect(gateway_id)
        else:
            self._addrs.pop(gateway_id, None)

    def summary(self) -> dict[str, Any]:
        """For the worker's status (read from the loop: counters, a snapshot of the gateways)."""
        return {
            "linked": sorted(self._socks.copy()),  # copied at once: the engine thread changes it
            "frames": self.frames,
            "events": self.events_sent,
            "connects": self.connects,
            "local_connects": self.local_connects,
            "failures": self.failures,
        }

    def linked(self, gateway_id: str) -> bool:
        return gateway_id in self._socks

    def settle(self, timeout_s: float = 5.0) -> bool:
        """Wait for the connects in flight to end (for tests: `close` does not wait, a connect that
        ends after it closes its own socket). True when none is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                threads = list(self._connecting.values())
            if not threads:
                return True
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                with self._lock:
                    return not self._connecting

    # ---- engine thread ------------------------------------------------------
    def send(self, result: StepResult) -> list[tuple[str, TokenEvent]]:
        """Write the events of `result` that may go by a link (the module's rule); the events left
        for NATS (`result.events` itself when none went)."""
        events = result.events
        gw = events[0][0]
        held = self._socks.get(gw)
        if held is not None and not self._on_nats and not self._ready and held[1] == self._addrs.get(gw):
            # The usual step: a link up to the one gateway of every event, no request pinned to
            # NATS. What `_send_group` does then, without its grouping and lookups (this runs
            # after every step, cold); a write that fails falls to the general path below, which
            # finds the link dropped and leaves the events to NATS.
            evs = [ev for g, ev in events if g == gw]
            if len(evs) == len(events) and self._carry(gw, held[0], evs, result.batch_size):
                return []
        groups: dict[str, list[TokenEvent]] = {gw: []}
        for g, ev in events:  # one gateway, most often: no grouping
            if g != gw:
                groups = defaultdict(list)
                for g2, ev2 in events:
                    groups[g2].append(ev2)
                break
            groups[gw].append(ev)
        left: list[tuple[str, TokenEvent]] = []
        for g, evs in groups.items():
            self._send_group(g, evs, result.batch_size, left)
        return events if len(left) == len(events) else left

    def _send_group(self, gw: str, evs: list[TokenEvent], batch_size: int, left: list[tuple[str, TokenEvent]]) -> None:
        """One gateway's events of a step: on its link those the rule allows, the rest (and all of
        them when the write fails) appended to `left`."""
        sock = self._link(gw)
        on_nats = self._on_nats
        if sock is not None:
            on_link = [ev for ev in evs if (gw, ev.request_id, ev.choice) not in on_nats] if on_nats else evs
            if on_link and self._carry(gw, sock, on_link, batch_size):
                if len(on_link) == len(evs):
                    return
                evs = [ev for ev in evs if (gw, ev.request_id, ev.choice) in on_nats]
        for ev in evs:
            key = (gw, ev.request_id, ev.choice)
            self._on_link.discard(key)
            if ev.finish_reason is None:
                on_nats.add(key)
            else:
                on_nats.discard(key)
            left.append((gw, ev))

    def _carry(self, gw: str, sock: socket.socket, evs: list[TokenEvent], batch_size: int) -> bool:
        """Write `evs` as one frame on `gw`'s link and note which requests ride it (True), or
        drop the link (False: `_write`)."""
        if not self._write(gw, sock, encode_rows(evs, batch_size) or self._encode(evs, batch_size)):
            return False
        self.events_sent += len(evs)
        on_link = self._on_link
        for ev in evs:
            if ev.finish_reason is None:
                on_link.add((gw, ev.request_id, ev.choice))
            else:
                on_link.discard((gw, ev.request_id, ev.choice))
        return True

    def idle(self) -> None:
        """The engine holds no sequence: no request is in flight on either path."""
        self._on_nats.clear()
        self._on_link.clear()

    def close(self) -> None:
        """On the engine thread as it ends, or after it ended: every link closes, and a connect
        still in flight closes its socket when it ends."""
        with self._lock:
            self._closed = True
        for gw in list(self._socks):
            self._drop(gw, None)
        for gw in list(self._ready):
            held = self._ready.pop(gw, None)
            if held is not None:
                _close_quietly(held[0])

    def _link(self, gw: str) -> socket.socket | None:
        entry = self._addrs.get(gw)
        fresh = self._ready.pop(gw, None)
        if fresh is not None:
            if fresh[1] == entry and gw not in self._socks:
                self._socks[gw] = fresh
            else:
                _close_quietly(fresh[0])  # for an address the gateway no longer advertises
        held = self._socks.get(gw)
        if held is not None:
            if held[1] == entry:
                return held[0]
            # The gateway advertised another address (it restarted): this link is stale.
            self._drop(gw, "the gateway advertised a new token address")
            with self._lock:
                self._retry.pop(gw, None)
        if entry is not None:
            self._start_connect(gw)  # nothing when one is in flight or backing off
        return None

    # ---- connects (any thread) --------------------------------------------
    def _start_connect(self, gw: str) -> None:
        with self._lock:
            entry = self._addrs.get(gw)
            if entry is None or gw in self._connecting or self._closed:
                return
            ready = self._ready.get(gw)
            if ready is not None and ready[1] == entry:
                return  # connected, waiting for the engine thread to take it up
            next_try, _, tried = self._retry.get(gw, (0.0, 0.0, entry))
            if time.monotonic() < next_try and tried == entry:
                return
            t = threading.Thread(target=self._connect, args=(gw, entry), name=f"token-link-{gw}", daemon=True)
            self._connecting[gw] = t
        t.start()

    def _connect(self, gw: str, entry: _Entry) -> None:
        addr, key, local = entry
        sock: socket.socket | None = None
        try:
            sock = self._connect_local(local)
            if sock is None:
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
                _close_quietly(sock)
            with self._lock:
                _, backoff, _ = self._retry.get(gw, (0.0, RETRY_S / 2, entry))
                backoff = min(backoff * 2, RETRY_MAX_S)
                self._retry[gw] = (time.monotonic() + backoff, backoff, entry)
                self._connecting.pop(gw, None)
            self.connect_failures += 1
            self.log.warning("token_link_failed", gateway_id=gw, addr=addr, error=repr(e), retry_s=backoff)
            return
        with self._lock:
            self._retry.pop(gw, None)
            self._connecting.pop(gw, None)
            closed = self._closed
            stale = None if closed else self._ready.get(gw)
            if not closed:
                self._ready[gw] = (sock, entry)
        if stale is not None:
            _close_quietly(stale[0])  # one for an address the gateway advertised before
        if closed:
            _close_quietly(sock)
            return
        self.connects += 1
        via_local = sock.family == getattr(socket, "AF_UNIX", None)
        self.local_connects += via_local
        self.log.info("token_link_up", gateway_id=gw, addr=local if via_local else addr)

    def _connect_local(self, local: str) -> socket.socket | None:
        """A connected socket to the gateway's local name, or None: not advertised, not this
        platform, or not reachable from here (another host, another network namespace: a
        container or pod of its own), which is told at once (no listener, no wait)."""
        name = local_socket_address(local)
        if name is None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._connect_timeout_s)
            sock.connect(name)
        except OSError:
            _close_quietly(sock)
            return None
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
            self.write_failures += 1
            entry = self._socks[gw][1] if gw in self._socks else None
            self._drop(gw, repr(e))
            with self._lock:
                self._retry[gw] = (time.monotonic() + RETRY_S, RETRY_S, entry)
            return False
        self.frames += 1
        return True

    def _drop(self, gw: str, why: str | None) -> None:
        held = self._socks.pop(gw, None)
        if held is not None:
            _close_quietly(held[0])
        # Requests that had events on it stay on NATS from now on (the module's rule).
        moved = [k for k in self._on_link if k[0] == gw]
        for k in moved:
            self._on_link.discard(k)
            self._on_nats.add(k)
        if why is not None:
            self.log.warning("token_link_dropped", gateway_id=gw, error=why, requests_moved=len(moved))


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
