"""The supervisor behind `cascade up`: the mesh's processes on one machine.

Children are ordinary `python -m cascade.cli <service>` processes in their own
session (a terminal Ctrl-C reaches only the supervisor, which then stops them in
order) and, on Linux, with PR_SET_PDEATHSIG so that a supervisor killed with
SIGKILL does not leave them behind. It waits until every service said
`ServiceReady`, every model serves on its min_replicas workers and the gateway's
/health is 200; then it records the mesh file and waits for a signal, and stops
the children (SIGTERM, then SIGKILL after a grace period).

Once the mesh is up, a child that dies (the embedded broker included) is started
again after a back-off, and a worker's exit is announced at once (`WorkerGone`),
so the gateway migrates its requests without waiting for missed heartbeats. A
child that dies `max_restarts` times within `restart_window_s` is crash-looping:
restarting it again would only hide the cause, so `cascade up` stops, saying
which child and where its log is. During start-up a dying child stops `up` at
once: that is a configuration error far more often than bad luck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.apikeys import API_KEYS_ENV
from cascade.config import Deployment, ModelDeployment, mesh_file, read_mesh_file, write_mesh_file
from cascade.messages import Heartbeat, MessageError, ServiceReady, WorkerGone, decode, encode
from cascade.natsauth import PASSWORD_ENV, TOKEN_ENV, USER_ENV, NatsCredentials
from cascade.natsutil import connect, stop_event
from cascade.stages import covers
from cascade.subjects import Subjects

# While `cascade up` waits for the mesh and nothing changes, it says what it waits for this often.
_STILL_WAITING_S = 10.0


class UpError(Exception):
    """`cascade up` cannot go on; the message says what and where to look."""


# --------------------------------------------------------------------------- restart policy


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Back-off doubles from `backoff_s` up to `max_backoff_s` with each recent restart; more than
    `max_restarts` deaths within `window_s` is a crash loop (0 restarts: never restart)."""

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0


@dataclass
class RestartBook:
    """Which child died when: the decision to restart (and after how long) or give up. Pure: the
    caller passes the time."""

    policy: RestartPolicy
    deaths: dict[str, list[float]] = field(default_factory=dict)

    def died(self, name: str, now: float) -> float | None:
        """Record a death; the delay before the restart, or None when the child crash-loops."""
        recent = [t for t in self.deaths.get(name, []) if now - t < self.policy.window_s]
        recent.append(now)
        self.deaths[name] = recent
        if len(recent) > self.policy.max_restarts:
            return None
        return min(self.policy.backoff_s * 2 ** (len(recent) - 1), self.policy.max_backoff_s)

    def recent(self, name: str) -> int:
        return len(self.deaths.get(name, []))


# --------------------------------------------------------------------------- processes


def make_die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to send `sig` to the child when this process dies (Linux
    only). Tools that start a whole `cascade up` (benchmarks, tests) pass SIGTERM, so that the
    supervisor still stops its children in order."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        # Own session: a terminal's Ctrl-C goes to the supervisor only, which stops children in order.
        os.setsid()
        # SIGKILL for the supervisor's children, not SIGTERM: this fires only when the supervisor itself
        # was killed, and then nobody is left to escalate a child that hangs on shutdown.
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died between fork and prctl
            os._exit(1)

    return preexec


def die_with_parent_preexec(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """For a process that starts `cascade up` itself: its mesh stops when that process dies."""
    return make_die_with_parent(sig)


def _source_root() -> Path | None:
    """The checkout this package runs from, if any (so children find `services` without an install)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "services").is_dir() and (root / "pyproject.toml").is_file() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Child:
    name: str  # "gateway", "worker-0", ...
    service: str  # "gateway", "worker", ...
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    exited: asyncio.Task[int] | None = None
    restart_at: float | None = None  # loop time of a pending restart

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _open_log(path: Path, fresh: bool) -> Any:
    return open(path, "wb" if fresh else "ab")  # opening a local file: quick, no need for a thread


def _tail(path: Path, lines: int = 12) -> str:
    try:
        data = path.read_bytes()[-8192:]
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join("    | " + line for line in text)


# --------------------------------------------------------------------------- readiness


@dataclass
class Readiness:
    """What has come up, from ServiceReady and heartbeats, keyed by pid so that another mesh on
    the same broker and prefix cannot be mistaken for ours."""

    deployment: Deployment
    ready_pids: set[int] = field(default_factory=set)
    # (pid, worker id) → latest Heartbeat: a shared worker (--slots) beats once per instance.
    beats: dict[tuple[int, str], Any] = field(default_factory=dict)

    def serving(self, model: ModelDeployment, pids: set[int]) -> list[Any]:
        whole = [
            hb
            for (pid, _), hb in self.beats.items()
            if pid in pids
            and hb.model == model.name
            and hb.state == "serving"
            and hb.num_units > 0
            and hb.units_ready == hb.num_units
        ]
        return whole + self.serving_pipelines(model, pids)

    def serving_pipelines(self, model: ModelDeployment, pids: set[int]) -> list[Any]:
        """One heartbeat (the first stage's) per pipelined instance of `model` whose every stage
        serves its layers (docs/pipelined-and-shared.md)."""
        groups: dict[str, list[Any]] = {}
        for (pid, _), hb in self.beats.items():
            if pid in pids and hb.model == model.name and hb.group and hb.state == "serving":
                groups.setdefault(hb.group, []).append(hb)
        out = []
        for members in groups.values():
            members.sort(key=lambda hb: hb.stage_start)
            if covers([(hb.stage_start, hb.stage_end) for hb in members], members[0].num_units - 2):
                out.append(members[0])
        return out

    def missing(self, children: list[Child]) -> list[str]:
        """What is not up yet, in words (empty when everything is)."""
        out = [f"{c.name} (no ServiceReady yet)" for c in children if c.pid not in self.ready_pids]
        worker_pids = {c.pid for c in children if c.service == "worker" and c.pid is not None}
        for m in self.deployment.models:
            if m.min_replicas <= 0:
                continue
            have = self.serving(m, worker_pids)
            if len(have) < m.min_replicas:
                loading = [
                    f"{hb.worker_id} {hb.state} {hb.units_ready}/{hb.num_units}"
                    for (pid, _), hb in sorted(self.beats.items(), key=lambda kv: kv[0])
                    if pid in worker_pids and hb.model == m.name and hb not in have
                ]
                extra = f"; {', '.join(loading)}" if loading else ""
                out.append(f"{m.name} (serving on {len(have)} of {m.min_replicas} workers{extra})")
        return out


# --------------------------------------------------------------------------- supervisor


class Supervisor:
    def __init__(
        self,
        args: argparse.Namespace,
        home: Path,
        deployment: Deployment,
        deployment_file: Path,
        nats_url: str,
        gateway_port: int,
        broker_pid: int | None,
        broker: Any = None,
        nats_credentials: NatsCredentials | None = None,
        api_keys: tuple[str, ...] = (),
    ) -> None:
        self.args = args
        # The embedded broker's credentials, handed to every child (None: the broker is the user's,
        # and children find credentials as any client does, natsauth.py).
        self.nats_credentials = nats_credentials
        # Passed to the gateway in its environment, not its command line (`ps` shows that to all).
        self.api_keys = api_keys
        self.home = home
        self.logs = home / "logs"
        self.deployment = deployment
        self.deployment_file = deployment_file
        self.nats_url = nats_url
        self.gateway_port = gateway_port
        self.broker_pid = broker_pid
        self.children: list[Child] = []
        self.readiness = Readiness(deployment)
        self.changed = asyncio.Event()
        self.stopping = False
        self._wrote_mesh = False
        self._last_worker_state: dict[tuple[int, str], tuple[str, str | None, int]] = {}
        self._preexec = make_die_with_parent()
        # The embedded broker (an EmbeddedNats), watched and restarted like a child.
        self.broker = broker
        self.book = RestartBook(
            RestartPolicy(
                max_restarts=getattr(args, "max_restarts", 5), window_s=getattr(args, "restart_window_s", 60.0)
            )
        )
        self._broker_watch: Callable[[], None] | None = None
        self._broker_restart_at: float | None = None
        self.gone: Callable[[Child], Any] | None = None  # announces a worker's exit (set by supervise)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/v1"

    # ---- children ----------------------------------------------------------
    def _plan_children(self) -> None:
        a = self.args
        common = [
            "--nats-url",
            self.nats_url,
            "--prefix",
            a.prefix,
            "--config",
            str(self.deployment_file),
            "--log-level",
            a.log_level,
        ]
        specs: list[tuple[str, str, list[str]]] = [
            ("gateway", "gateway", ["--host", a.host, "--port", str(self.gateway_port), "--gateway-id", "gateway"]),
            ("scaler", "scaler", []),
            ("loader", "loader", []),
        ]
        worker_flags = ["--threads", str(a.threads)]
        if getattr(a, "kv_cache_mb", None) is not None:
            worker_flags += ["--kv-cache-mb", f"{a.kv_cache_mb:g}"]
        if getattr(a, "max_model_len", None) is not None:
            worker_flags += ["--max-model-len", str(a.max_model_len)]
        specs += [(f"worker-{i}", "worker", ["--worker-id", f"worker-{i}", *worker_flags]) for i in range(a.workers)]
        for name, service, extra in specs:
            argv = [sys.executable, "-m", "cascade.cli", service, *common, *extra]
            self.children.append(Child(name, service, argv, self.logs / f"{name}.log"))

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CASCADE_HOME"] = str(self.home)
        if self.nats_credentials is not None:
            for k in (TOKEN_ENV, USER_ENV, PASSWORD_ENV):
                env.pop(k, None)  # the user's, for another broker: not this mesh's
            env.update(self.nats_credentials.env())
        if self.api_keys:
            env[API_KEYS_ENV] = ",".join(self.api_keys)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they happen
        root = _source_root()
        if root is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        return env

    async def start_children(self) -> None:
        self._plan_children()
        self.logs.mkdir(parents=True, exist_ok=True)
        for c in self.children:
            await self._spawn(c, fresh_log=True)
        names = ", ".join(c.name for c in self.children)
        print(f"started {names}; logs in {self.logs}/<name>.log", flush=True)

    async def _spawn(self, c: Child, fresh_log: bool) -> None:
        # A fresh log per run (the previous run's lines would only mislead); a restart appends, so
        # the lines that explain the death stay above the new start.
        with _open_log(c.log_path, fresh_log) as log:
            c.proc = await asyncio.create_subprocess_exec(
                *c.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self._child_env(),
                preexec_fn=self._preexec,
                start_new_session=self._preexec is None,  # the preexec does setsid itself
            )
        c.restart_at = None
        c.exited = asyncio.ensure_future(c.proc.wait())
        c.exited.add_done_callback(lambda _t: self.changed.set())

    # ---- restarts (after the mesh is up) -------------------------------------
    def _how(self, c: Child) -> str:
        code = c.proc.returncode if c.proc else None
        return f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"

    async def tend(self) -> float | None:
        """Schedule restarts for children that died, start those that are due. Returns how long
        until the next is due (None: nothing pending); raises UpError on a crash loop."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for c in self.children:
            if c.restart_at is None and c.exited is not None and c.exited.done():
                how = self._how(c)
                if self.gone is not None and c.service == "worker":
                    await self.gone(c)
                delay = self.book.died(c.name, now)
                if delay is None:
                    raise self._crash_loop(c.name, how, c.log_path)
                c.exited = None
                c.restart_at = now + delay
                print(
                    f"cascade up: {c.name} {how}; restarting it in {delay:g}s "
                    f"({self.book.recent(c.name)} death(s) in the last {self.book.policy.window_s:g}s; "
                    f"log: {c.log_path})",
                    file=sys.stderr,
                    flush=True,
                )
        await self._tend_broker(now)
        for c in self.children:
            if c.restart_at is not None and c.restart_at <= loop.time() and not self.stopping:
                await self._spawn(c, fresh_log=False)
                print(f"cascade up: {c.name} restarted (pid {c.pid})", flush=True)
                self._rewrite_mesh()
        pending = [c.restart_at for c in self.children if c.restart_at is not None]
        if self._broker_restart_at is not None:
            pending.append(self._broker_restart_at)
        return max(0.0, min(pending) - loop.time()) if pending else None

    def _crash_loop(self, name: str, how: str, log_path: Path) -> UpError:
        tail = _tail(log_path)
        return UpError(
            f"{name} {how}: {self.book.recent(name)} deaths within {self.book.policy.window_s:g}s, "
            f"it is crash-looping, so the mesh stops (log: {log_path})" + (f"\n{tail}" if tail else "")
        )

    # ---- the embedded broker ---------------------------------------------
    def watch_broker(self) -> None:
        """Wake the supervisor when the embedded broker's process exits (a pidfd on Linux; else
        the loop's periodic wake-up finds it)."""
        proc = self.broker.proc if self.broker is not None else None
        if proc is None or not hasattr(os, "pidfd_open"):
            return
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            return

        def readable() -> None:
            self.changed.set()
            stop_watching()

        def stop_watching() -> None:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
            self._broker_watch = None

        loop.add_reader(fd, readable)
        self._broker_watch = stop_watching

    def broker_dead(self) -> bool:
        proc = self.broker.proc if self.broker is not None else None
        return proc is not None and proc.poll() is not None

    async def _tend_broker(self, now: float) -> None:
        if self.broker is None or self.stopping:
            return
        if self._broker_restart_at is None and self.broker_dead():
            code = self.broker.proc.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            log_path = self.logs / "nats.log"
            delay = self.book.died("nats", now)
            if delay is None:
                raise self._crash_loop("the NATS server", how, log_path)
            self._broker_restart_at = now + delay
            print(f"cascade up: the NATS server {how}; restarting it in {delay:g}s", file=sys.stderr, flush=True)
        if self._broker_restart_at is not None and self._broker_restart_at <= asyncio.get_running_loop().time():
            from cascade.cli.embedded_nats import BrokerError

            self._broker_restart_at = None
            try:
                # Same port: every service reconnects to the URL it has.
                await asyncio.to_thread(self.broker.start)
            except BrokerError as e:
                print(f"cascade up: the NATS server did not restart: {e}", file=sys.stderr, flush=True)
                self._broker_restart_at = asyncio.get_running_loop().time() + self.book.policy.max_backoff_s
                self.book.died("nats", asyncio.get_running_loop().time())
                return
            self.broker_pid = self.broker.proc.pid
            print(f"cascade up: the NATS server restarted (pid {self.broker_pid})", flush=True)
            self.watch_broker()
            self._rewrite_mesh()

    def _rewrite_mesh(self) -> None:
        if self._wrote_mesh:
            self.write_mesh()

    def died(self) -> Child | None:
        for c in self.children:
            if c.exited is not None and c.exited.done():
                return c
        return None

    def _died_error(self, c: Child) -> UpError:
        tail = _tail(c.log_path)
        return UpError(f"{c.name} {self._how(c)} (log: {c.log_path})" + (f"\n{tail}" if tail else ""))

    async def stop_children(self) -> None:
        """SIGTERM everyone, wait for the grace period, SIGKILL the rest. Safe to call twice."""
        self.stopping = True
        if self._broker_watch is not None:
            self._broker_watch()
        live = [c for c in self.children if c.running()]
        for c in live:
            with contextlib.suppress(ProcessLookupError):
                assert c.proc is not None
                c.proc.send_signal(signal.SIGTERM)
        waits = [c.exited for c in live if c.exited is not None]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=self.args.stop_timeout)
            if pending:
                stuck = [c for c in live if c.exited in pending]
                print(
                    f"cascade up: {', '.join(c.name for c in stuck)} did not stop within "
                    f"{self.args.stop_timeout:g}s; killing",
                    file=sys.stderr,
                    flush=True,
                )
                for c in stuck:
                    with contextlib.suppress(ProcessLookupError):
                        assert c.proc is not None
                        c.proc.kill()
                await asyncio.wait(pending)

    # ---- readiness ---------------------------------------------------------
    def _by_pid(self, pid: int) -> Child | None:
        for c in self.children:
            if c.pid == pid:
                return c
        return None

    def on_ready(self, msg: Any) -> None:
        if msg.pid in self.readiness.ready_pids:
            return
        self.readiness.ready_pids.add(msg.pid)
        c = self._by_pid(msg.pid)
        if c is not None:
            print(f"  ready: {c.name} (pid {msg.pid})", flush=True)
        self.changed.set()

    def on_heartbeat(self, hb: Any) -> None:
        self.readiness.beats[(hb.pid, hb.worker_id)] = hb
        c = self._by_pid(hb.pid)
        # A line per state change and per quarter of a load: a big model's load shows progress.
        quarter = 4 * hb.units_ready // hb.num_units if hb.num_units else 0
        key = (hb.state, hb.model, quarter)
        if c is not None and self._last_worker_state.get((hb.pid, hb.worker_id)) != key:
            self._last_worker_state[(hb.pid, hb.worker_id)] = key
            model = f" {hb.model}" if hb.model else ""
            name = f"{c.name} [{hb.worker_id}]" if hb.shared_device else c.name
            print(f"  {name}: {hb.state}{model} ({hb.units_ready}/{hb.num_units} units)", flush=True)
        self.changed.set()

    async def wait_up(self, deadline: float, stop: asyncio.Event) -> bool:
        """True once everything is up; False if stopped by a signal. Raises UpError otherwise."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            # Clear before looking, so a change that lands while we look wakes the next wait.
            self.changed.clear()
            if stop.is_set():
                return False
            dead = self.died()
            if dead is not None:
                raise self._died_error(dead)
            missing = self.readiness.missing(self.children)
            if not missing:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._timeout_error(missing)
            if not await _wait_any(self.changed, stop, timeout=min(remaining, _STILL_WAITING_S)):
                # Nothing changed for a while: say what it still waits for, so a slow start
                # (a big model read from a slow disk) does not look like a hang.
                waited = loop.time() - started
                print(f"  still waiting ({waited:.0f}s of {self.args.timeout:g}s): {'; '.join(missing)}", flush=True)
        return await self._wait_health(deadline, stop)

    async def _wait_health(self, deadline: float, stop: asyncio.Event) -> bool:
        import aiohttp

        url = f"http://127.0.0.1:{self.gateway_port}/health"
        loop = asyncio.get_running_loop()
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            while True:
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return True
                        last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                except (aiohttp.ClientError, TimeoutError) as e:
                    last = f"{type(e).__name__}: {e}"
                dead = self.died()
                if dead is not None:
                    raise self._died_error(dead)
                if loop.time() >= deadline:
                    raise self._timeout_error([f"gateway {url} ({last})"])
                # HTTP has no readiness event to await: poll with a deadline, waking early on a signal.
                if await _wait_any(stop, timeout=0.25):
                    return False

    def _timeout_error(self, missing: list[str]) -> UpError:
        return UpError(
            f"the mesh did not come up within {self.args.timeout:g}s; not up: {'; '.join(missing)}. Logs: {self.logs}"
        )

    # ---- mesh file ---------------------------------------------------------
    def write_mesh(self) -> Path:
        pids: dict[str, int | None] = {"up": os.getpid(), "nats": self.broker_pid}
        pids.update({c.name: c.pid for c in self.children})
        info = {
            "nats_url": self.nats_url,
            "gateway_url": self.gateway_url,
            "prefix": self.args.prefix,
            "pids": pids,
            "logs": str(self.logs),
            "deployment": str(self.deployment_file),
            "started": time.time(),
        }
        self._wrote_mesh = True
        return write_mesh_file(info, self.home)

    def remove_mesh(self) -> None:
        if not self._wrote_mesh:
            return
        info = read_mesh_file(self.home)
        # Remove only our own record: another `cascade up` may have replaced it meanwhile.
        if info and info.get("pids", {}).get("up") == os.getpid():
            mesh_file(self.home).unlink(missing_ok=True)


async def _wait_any(*events: asyncio.Event, timeout: float) -> bool:
    """Wait until any event is set or the timeout passes; True if one was set."""
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return bool(done)


async def supervise(sup: Supervisor) -> int:

    stop = stop_event()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + sup.args.timeout
    subjects = Subjects(sup.args.prefix)
    nc = None
    try:
        try:
            nc = await connect(sup.nats_url, "cascade-up", connect_timeout_s=10.0, credentials=sup.nats_credentials)
        except ConnectionError as e:
            raise UpError(str(e)) from None

        async def on_ready(msg: Any) -> None:
            with contextlib.suppress(MessageError):
                sup.on_ready(decode(msg.data, ServiceReady))

        async def on_beat(msg: Any) -> None:
            with contextlib.suppress(MessageError):
                sup.on_heartbeat(decode(msg.data, Heartbeat))

        # Subscribe before any child exists, so no ServiceReady can be missed.
        await nc.subscribe(subjects.service_ready(), cb=on_ready)
        await nc.subscribe(subjects.heartbeat_all(), cb=on_beat)
        await nc.flush()

        await sup.start_children()
        if not await sup.wait_up(deadline, stop):
            print("cascade up: interrupted while starting; stopping", file=sys.stderr, flush=True)
            return 0
        path = sup.write_mesh()
        models = ", ".join(m.name for m in sup.deployment.models)
        print(f"\nCascade is up: {sup.gateway_url}", flush=True)
        print(f"  models: {models}; {sup.args.workers} worker(s); NATS {sup.nats_url}; prefix '{sup.args.prefix}'")
        base = sup.gateway_url.removesuffix("/v1")
        print(f"  dashboard {base}/dashboard; Prometheus metrics {base}/metrics")
        print(f"  mesh recorded in {path}; `cascade status` and `cascade tap` find it there")
        print("  Ctrl-C stops everything", flush=True)

        async def announce_gone(c: Child) -> None:
            assert c.proc is not None
            # Best effort: while the broker is away, missed heartbeats tell the same later.
            with contextlib.suppress(Exception):
                await nc.publish(
                    subjects.gone(c.name), encode(WorkerGone(c.name, c.proc.pid, f"process {sup._how(c)}"))
                )
                await nc.flush(timeout=1)

        sup.gone = announce_gone if sup.args.max_restarts > 0 else None
        sup.watch_broker()
        while True:
            sup.changed.clear()
            if stop.is_set():
                print("\ncascade up: stopping", flush=True)
                return 0
            if sup.args.max_restarts <= 0:
                dead = sup.died()
                if dead is not None:
                    raise sup._died_error(dead)
                if sup.broker_dead():
                    raise UpError("the NATS server stopped (log: " + str(sup.logs / "nats.log") + ")")
                wait: float | None = None
            else:
                wait = await sup.tend()
            # Without a pidfd for the broker, look at it now and then.
            if sup.broker is not None and sup._broker_watch is None:
                wait = min(wait, 1.0) if wait is not None else 1.0
            await _wait_any(sup.changed, stop, timeout=3600 if wait is None else wait)
    except UpError as e:
        print(f"cascade up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await sup.stop_children()
        sup.remove_mesh()
